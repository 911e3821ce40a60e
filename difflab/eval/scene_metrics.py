"""Metrics of the scenes (:mod:`difflab.data.scenes`): monocular-depth errors (Eigen et al. 2014,
Section 5: absolute relative error, threshold accuracy delta < 1.25) and the foreground adjusted
Rand index of object masks (Greff et al. 2019; Locatello et al. 2020, Section 4.1)."""
from __future__ import annotations

import numpy as np
import torch


def _check_pair(pred: torch.Tensor, true: torch.Tensor) -> None:
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {tuple(pred.shape)} and {tuple(true.shape)}")


def abs_rel(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Absolute relative error mean(|d - d*| / d*) over every pixel of positive depths."""
    _check_pair(pred, true)
    return float(((pred - true).abs() / true).mean())


def delta_accuracy(pred: torch.Tensor, true: torch.Tensor, threshold: float = 1.25) -> float:
    """The fraction of pixels with max(d / d*, d* / d) < ``threshold`` (delta < 1.25)."""
    _check_pair(pred, true)
    ratio = torch.maximum(pred / true, true / pred)
    return float((ratio < threshold).float().mean())


def fg_ari(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over images of the adjusted Rand index (Hubert & Arabie 1985; scikit-learn's) between
    predicted segment ids ``pred`` (N, H, W) and true ids ``true`` (N, H, W), counted only on the
    foreground (true id > 0). Images with fewer than two foreground pixels are skipped."""
    from sklearn.metrics import adjusted_rand_score
    _check_pair(pred, true)
    scores = []
    for p, t in zip(pred.reshape(len(pred), -1).numpy(), true.reshape(len(true), -1).numpy()):
        fg = t > 0
        if fg.sum() >= 2:
            scores.append(adjusted_rand_score(t[fg], p[fg]))
    if not scores:
        raise ValueError("no image has two foreground pixels to score")
    return float(np.mean(scores))


__all__ = ["abs_rel", "delta_accuracy", "fg_ari"]
