"""The demos: one module per data set, each training, sampling and judging a model end to end
(``difflab demo`` runs :mod:`difflab.demos.digits`; ``difflab demo --text`` :mod:`difflab.demos.text`)."""
