"""The default feature extractor: the digits judge (:class:`~difflab.eval.judge.DigitsJudge`, embedded,
no download) as a :class:`~difflab.eval.features.JudgeFeatures`, loaded from a file or trained afresh.

Kept apart from :mod:`difflab.eval.features` so that the feature interface never imports the
judge (the judge's report uses the interface).
"""
from __future__ import annotations

from pathlib import Path

from .features import JudgeFeatures
from .judge import DigitsJudge


def load_judge(path: str | Path | None = None, *, device="cpu") -> JudgeFeatures:
    """The digits judge as an extractor: loaded from the ``.safetensors`` file ``path`` (written
    by :meth:`DigitsJudge.save`, e.g. ``demo_out/digits_judge.safetensors``); with no path, the
    default judge is trained afresh on the digits' train split (deterministic, a few seconds)."""
    if path is None:
        return JudgeFeatures(DigitsJudge.fit()).to(device)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no digits judge at {path}: give a .safetensors file written by DigitsJudge.save "
                                "(the demo writes demo_out/digits_judge.safetensors), or no weights to train one")
    return JudgeFeatures(DigitsJudge.load(path)).to(device)


__all__ = ["load_judge"]
