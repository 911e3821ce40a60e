"""Classifier guidance: a noise-aware classifier p(y | x, sigma) and the wrapper that adds its
gradient to a denoiser.

In the canonical frame x = x0 + sigma eps, Tweedie's formula ties the denoiser to the score
(Karras et al. 2022, eq. 3)::

    D(x, sigma) = x + sigma^2 grad_x log p(x; sigma)

and Bayes' rule splits the conditional score (Song et al. 2021, "Score-Based Generative
Modeling through SDEs", Section 5, eq. 14)::

    grad_x log p(x | y; sigma) = grad_x log p(x; sigma) + grad_x log p(y | x, sigma)

so adding ``scale`` times the classifier's gradient to the score adds
``scale * sigma^2 * grad_x log p(y | x, sigma)`` to D. ``scale = 1`` is exact Bayesian
conditioning: for a Gaussian mixture and its exact classifier (:class:`difflab.oracle.MixtureClassifier`) the
guided unconditional denoiser *is* the denoiser of the chosen component. This is Dhariwal &
Nichol 2021, Algorithm 2 / eq. 14 (``eps_hat = eps - sqrt(1 - ab) grad log p(y | x_t)``, their
DDIM form, with their gradient taken in the VP frame), rewritten in the canonical frame.

A classifier here is any callable ``classifier(x, sigma) -> logits (B, K)`` on the *canonical*
noisy x and canonical sigma (a (B,) tensor); :class:`NoisyClassifier` is a small trainable one.

Usage::

    clf = NoisyClassifier(ClassifierConfig(in_channels=1, num_classes=10))
    train_classifier(clf, images, labels, denoiser.frame, steps=3000)   # difflab.train.train_classifier
    guided = ClassifierGuidance(uncond_denoiser, clf, scale=2.0)
    x = sample_ddim(guided, x, sigmas, extra_args={"class_labels": wanted})
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.denoiser import append_dims
from ..nn.layers import Downsample, ResBlock, TimestepMLP, group_norm, timestep_embedding


# ----------------------------------------------------------------------------------------------
# The guidance arithmetic, shared by every gradient-based wrapper (classifier, safety, reward)


def _sigma_vector(x: torch.Tensor, sigma) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def log_prob_gradient(log_prob: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """grad_x of ``log_prob(x).sum()``, where ``log_prob(x)`` returns (B,) values (one per sample,
    so the sum's gradient is each sample's own gradient). Works inside ``torch.no_grad()``
    (samplers run there); no parameter gradient is accumulated."""
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        value = log_prob(x_)
        if value.shape != (x.shape[0],):
            raise ValueError(f"the guided log-probability must be a (B,) = ({x.shape[0]},) tensor, got shape {tuple(value.shape)}")
        (grad,) = torch.autograd.grad(value.sum(), x_)
    return grad.detach()


def score_shift(x0: torch.Tensor, sigma, grad: torch.Tensor, scale) -> torch.Tensor:
    """x0 + scale sigma^2 grad: adding ``scale * grad`` to the score grad_x log p(x; sigma) moves
    the denoiser by scale sigma^2 grad (Tweedie, D = x + sigma^2 score; Karras et al. 2022, eq. 3).
    ``scale`` is a float or a (B,) tensor (see :func:`interval_scale`)."""
    s = append_dims(_sigma_vector(x0, sigma), x0.ndim)
    scale = append_dims(torch.as_tensor(scale, dtype=x0.dtype, device=x0.device).expand(x0.shape[0]), x0.ndim)
    return x0 + scale * s**2 * grad.to(x0.dtype)


def interval_scale(sigma: torch.Tensor, scale: float, sigma_max: float | None) -> torch.Tensor:
    """Guidance in a limited interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited
    Interval Improves Sample and Distribution Quality in Diffusion Models": the weight w(sigma) is
    zero outside an interval of noise levels): the per-sample scale, ``scale`` where
    sigma <= ``sigma_max`` and 0 above; ``None`` guides at every level."""
    on = torch.ones_like(sigma) if sigma_max is None else (sigma <= sigma_max).to(sigma.dtype)
    return scale * on


def class_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y = labels | x) from logits (B, K): (B,)."""
    return F.log_softmax(logits, dim=-1).gather(1, labels.long().reshape(-1, 1))[:, 0]


class ClassifierGuidance(nn.Module):
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 / eq. 14; in the canonical
    frame): D_guided = D + scale sigma^2 grad_x log p(y | x, sigma).

    The target class comes in ``cond`` under ``label_key`` (default ``class_labels``), a (B,)
    long tensor: ``guided(x, sigma, class_labels=y)``. It goes to the classifier and is removed
    from what the denoiser sees, so an unconditional denoiser can be guided; ``pass_label=True``
    also hands it to a class-conditional denoiser (classifier guidance on top of a conditional
    model, as ADM does). ``scale = 0`` is the base denoiser; ``scale = 1`` the exact conditional
    denoiser when the denoiser and the classifier are exact. ``classifier(x, sigma) -> logits``
    sees the canonical x and sigma (see the module docstring).

    ``sigma_max`` guides only at levels sigma <= sigma_max (:func:`interval_scale`). A learned
    classifier hardly sees the top levels of a discrete schedule (the cosine schedule's last step
    is at sigma ~ 2e4, drawn once in 1000), and its input gradient there is not the exact one's,
    which shrinks as 1 / sigma^2: on the digits, mean |sigma^2 grad| is 73 at sigma = 2e4 against
    0.29 at sigma = 32 (``bench/guidance_digits.py``); sigma_max below the top level avoids it.
    """

    def __init__(self, denoiser, classifier, scale: float, *, label_key: str = "class_labels", pass_label: bool = False,
                 sigma_max: float | None = None):
        super().__init__()
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)
        self.label_key, self.pass_label, self.sigma_max = label_key, bool(pass_label), sigma_max

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        if self.label_key not in cond:
            raise ValueError(f"classifier guidance needs the target class as cond[{self.label_key!r}], got keys {sorted(cond)}")
        labels = cond[self.label_key] if self.pass_label else cond.pop(self.label_key)
        x0 = self.denoiser(x, sigma, **cond)
        sigma = _sigma_vector(x, sigma)
        scale = interval_scale(sigma, self.scale, self.sigma_max)
        if not bool(scale.any()):
            return x0
        labels = torch.as_tensor(labels, device=x.device).long().expand(x.shape[0])
        grad = log_prob_gradient(lambda z: class_log_prob(self.classifier(z, sigma), labels), x)
        return score_shift(x0, sigma, grad, scale)


# ----------------------------------------------------------------------------------------------
# A noise-aware image classifier


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a :class:`NoisyClassifier`; JSON-safe through ``dataclasses.asdict``."""

    in_channels: int = 1
    num_classes: int = 10
    model_channels: int = 32          # width of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2)  # one entry per resolution; H, W halve between levels
    num_res_blocks: int = 1           # ResBlocks per level
    sigma_data: float = 1.0           # input scale c_in = 1 / sqrt(sigma^2 + sigma_data^2); 1 = the VP frame's
    dropout: float = 0.0
    groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))


class NoisyClassifier(nn.Module):
    """A noise-aware classifier p(y | x, sigma): the encoder half of the ADM U-Net, pooled
    (Dhariwal & Nichol 2021, Section 4.3: "the downsampling trunk of the UNet model").

    ``forward(x, sigma)`` takes the canonical x = x0 + sigma eps and (B,) sigmas; the network sees
    c_in x with c_in = 1 / sqrt(sigma^2 + sigma_data^2) (the VP frame's input when sigma_data = 1)
    and c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1) through the sinusoidal embedding,
    which conditions every ResBlock by scale and shift. Then GroupNorm, SiLU, mean over pixels,
    linear to ``num_classes`` logits.
    """

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = c = config
        emb_dim = 4 * c.model_channels
        self.time_embed = TimestepMLP(c.model_channels, emb_dim)
        ch = c.model_channels * c.channel_mult[0]
        self.input_conv = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        blocks = []
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, c.model_channels * mult, emb_dim, c.dropout, c.groups))
                ch = c.model_channels * mult
            if level != len(c.channel_mult) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = group_norm(ch, c.groups)
        self.head = nn.Linear(ch, c.num_classes)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        c = self.config
        sigma = _sigma_vector(x, sigma)
        dtype = self.input_conv.weight.dtype
        c_in = append_dims(1 / (sigma**2 + c.sigma_data**2).sqrt(), x.ndim)
        c_noise = sigma.clamp(min=1e-20).log() / 4
        emb = self.time_embed(timestep_embedding(c_noise, c.model_channels).to(dtype))
        h = self.input_conv((c_in * x).to(dtype))
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        h = F.silu(self.out_norm(h)).mean(dim=(2, 3))
        return self.head(h).to(x.dtype)

    # ---- checkpoints: safetensors, the config as JSON metadata --------------------------------
    def save(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "difflab.noisy_classifier", "config": json.dumps(dataclasses.asdict(self.config))}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path, device="cpu") -> "NoisyClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != "difflab.noisy_classifier":
            raise ValueError(f"{path} is not a NoisyClassifier checkpoint (kind={meta.get('kind')!r})")
        clf = cls(ClassifierConfig(**json.loads(meta["config"])))
        clf.load_state_dict(load_file(str(path)))
        return clf.to(device).eval()


@torch.no_grad()
def classifier_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor, sigma: float, *, seed: int = 0,
                        batch_size: int = 1024) -> float:
    """Accuracy of ``classifier`` on ``images`` noised to canonical ``sigma`` (noise from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(images), batch_size):
        x0 = images[i:i + batch_size].float()
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        correct += int((classifier(x, torch.full((len(x0),), float(sigma))).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / len(images)


__all__ = ["log_prob_gradient", "score_shift", "interval_scale", "class_log_prob", "ClassifierGuidance", "ClassifierConfig",
           "NoisyClassifier", "classifier_accuracy"]
