"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, Section 4.3):
cross-entropy on noised examples x = x0 + sigma eps, sigma drawn from the *diffusion model's*
training noise distribution, so that the classifier knows every level the sampler visits.
The classifier is any ``classifier(x, sigma) -> logits (B, K)`` on the canonical x and sigma
(:class:`difflab.guidance.NoisyClassifier`); :class:`difflab.guidance.ClassifierGuidance` uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.core import append_dims

from ..loop import TrainConfig, fit
from ..losses import draw_sigmas


class NoisyClassification:
    """Per-example cross-entropy of ``classifier(x0 + sigma eps, sigma)`` against the labels ``y``;
    sigma from :func:`~difflab.train.losses.draw_sigmas` of ``frame`` (or ``noise_level``)."""

    name = "noisy_classifier"

    def __init__(self, classifier: nn.Module, frame, noise_level: str | None = None):
        self.module, self.frame, self.noise_level = classifier, frame, noise_level

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        x0 = batch["x0"].float()
        sigma = draw_sigmas(self.frame, len(x0), generator, self.noise_level).float()
        return {"x0": x0, "sigma": sigma, "noise": torch.randn(x0.shape, generator=generator)}

    def loss(self, batch: dict) -> torch.Tensor:
        x0, sigma = batch["x0"], batch["sigma"]
        x = x0 + append_dims(sigma, x0.ndim) * batch["noise"]
        return F.cross_entropy(self.module(x, sigma), batch["y"], reduction="none")


def train_classifier(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, frame, *, steps: int = 3000,
                     batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 1e-4, noise_level: str | None = None,
                     seed: int = 0, log_every: int = 0) -> list[dict]:
    """Train a noise-aware classifier (:class:`NoisyClassification`) with :func:`difflab.train.fit`:
    AdamW with a cosine learning-rate decay, no EMA, in memory; batches, sigmas and noise come
    from ``seed`` (the classifier's initial weights are the caller's). Trains on the device of
    the classifier's parameters, leaves it in eval mode and returns the log (``{"step", "loss",
    "seconds", ...}`` every ``log_every`` steps; none when 0)."""
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, lr_schedule="cosine", weight_decay=weight_decay,
                         grad_clip=None, ema_decay=None, log_every=log_every, seed=seed, progress=False)
    data = {"x0": images.float(), "y": torch.as_tensor(labels).long().to(images.device)}
    state = fit(NoisyClassification(classifier, frame, noise_level), data, config)
    classifier.eval()
    return state.history


__all__ = ["NoisyClassification", "train_classifier"]
