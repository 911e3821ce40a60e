"""``python -m difflab.cli`` (what torchrun launches): the ``difflab`` command."""
import sys

from . import main

sys.exit(main())
