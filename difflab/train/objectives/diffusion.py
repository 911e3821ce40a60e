"""The diffusion objective: denoising score matching in the network's own parameterization
(Ho et al. 2020, Algorithm 1; Karras et al. 2022, eq. 2 and 8), with the loss weightings of
:mod:`difflab.train.losses` (simple, min-SNR, EDM), the hybrid loss of improved DDPM
(:func:`difflab.train.vlb.hybrid_loss`) and label / conditioning dropout for classifier-free
guidance (Ho & Salimans 2022). Flow matching is this objective with a :class:`~difflab.core.Flow`
frame (Lipman et al. 2023; Liu et al. 2023): the frame, not the loss, makes the difference.

:func:`train` is the classic entry point: it builds this objective from a
:class:`~difflab.train.TrainConfig`'s diffusion fields and runs :func:`difflab.train.fit`.
"""
from __future__ import annotations

from typing import Callable

import torch

from difflab.core import Denoiser

from ..loop import TrainConfig, TrainState, batch_indices, fit, step_generator
from ..losses import diffusion_loss, draw_sigmas
from ..vlb import hybrid_loss

DRAWN = ("x0", "sigma", "noise")  # every other key of a batch is a keyword of the net (class_labels, cond)


# ----------------------------------------------------------------------------------------------
# The random draws of one step


def draw_diffusion(batch: dict, generator: torch.Generator, frame, *, noise_level: str | None = None,
                   noise_level_kwargs: dict | None = None, cfg_dropout: float = 0.0, null_class: int | None = None,
                   null_cond: dict | None = None) -> dict:
    """x0 (float), sigma (float32), noise and class_labels (or None) of a batch of rows ``{"x0",
    "class_labels" (optional), cond...}``, drawn in this order from ``generator``: the sigmas of
    the frame's training distribution, the noise, then (only with ``cfg_dropout`` > 0 and labels
    or cond) the drop mask, which replaces the label by ``null_class`` and each ``cond[k]`` row by
    ``null_cond[k]`` (one example's value, e.g. the empty prompt's token ids) in the same examples;
    a key whose ``null_cond`` value is None is never dropped (a flag, not a condition: e.g. a video
    net's ``independent_frames``)."""
    x0 = batch["x0"].float()
    labels = batch.get("class_labels")
    cond = {k: v for k, v in batch.items() if k not in DRAWN and k != "class_labels"}
    B = len(x0)
    sigma = draw_sigmas(frame, B, generator, noise_level, **(noise_level_kwargs or {})).float()
    noise = torch.randn(x0.shape, generator=generator)
    drop = None
    if cfg_dropout > 0 and (labels is not None or cond):
        if labels is not None and null_class is None:
            raise ValueError("cfg_dropout > 0 needs null_class, the label that means 'no class'")
        missing = sorted(set(cond) - set(null_cond or {}))
        if missing:
            raise ValueError(f"cfg_dropout > 0 needs null_cond values for the cond keys {missing} (e.g. the empty prompt's)")
        drop = torch.rand(B, generator=generator) < cfg_dropout
    if labels is not None and drop is not None:
        labels = torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)
    out = {"x0": x0, "sigma": sigma, "noise": noise, "class_labels": labels}
    for name, rows in cond.items():
        if drop is not None and null_cond[name] is not None:
            null = torch.as_tensor(null_cond[name], dtype=rows.dtype, device=rows.device)
            keep = drop.to(rows.device).reshape(-1, *([1] * (rows.ndim - 1)))
            rows = torch.where(keep, null.expand_as(rows), rows)
        out[name] = rows
    return out


# ----------------------------------------------------------------------------------------------
# The objective


class DiffusionObjective:
    """Per-example denoising loss of ``denoiser`` (its ``net`` trains): ``loss="mse"`` is
    :func:`~difflab.train.losses.diffusion_loss`, ``"hybrid"`` adds ``vlb_weight`` L_vlb
    (:func:`~difflab.train.vlb.hybrid_loss`, learned variance). Batches hold ``x0`` and, as the
    net's keywords, ``class_labels`` and any per-example conditioning (``input_ids``, ``low_res``, ...).

    ``augment``: a function ``(batch, generator) -> batch`` run at the end of :meth:`draw`, after
    the sigmas, the noise and the dropout mask were drawn, from the same generator: the seam for
    conditioning inputs that get random draws of their own per example, e.g. cascaded diffusion's
    noise-conditioning augmentation of the low-res image
    (:class:`difflab.train.NoiseConditioningAugmentation`). Drawing from ``generator`` keeps resumes
    bit-exact; keys it adds reach the net as keywords.

    ``frame_weights``: for clips (B, C, F, H, W), a weight per frame (F,) on each frame's squared
    error (``loss="mse"`` only): an engineering choice, no paper's, e.g. heavier end frames where a
    video network's error is highest (docs/video.md, stop 36); None: every frame weighs 1."""

    name = "diffusion"

    def __init__(self, denoiser: Denoiser, *, weighting: str = "simple", min_snr_gamma: float = 5.0, loss: str = "mse",
                 vlb_weight: float = 0.001, noise_level: str | None = None, noise_level_kwargs: dict | None = None,
                 cfg_dropout: float = 0.0, null_class: int | None = None, null_cond: dict | None = None,
                 augment: Callable[[dict, torch.Generator], dict] | None = None,
                 frame_weights: torch.Tensor | None = None):
        if loss not in LOSS_FUNCTIONS:
            raise ValueError(f"loss={loss!r} must be one of {sorted(LOSS_FUNCTIONS)}")
        if augment is not None and not callable(augment):
            raise ValueError(f"augment must be a function (batch, generator) -> batch or None, got {type(augment).__name__}")
        if frame_weights is not None:
            frame_weights = torch.as_tensor(frame_weights, dtype=torch.float32)
            if loss != "mse" or frame_weights.ndim != 1 or not bool((frame_weights >= 0).all()):
                raise ValueError(f"frame_weights must be a 1-D tensor of weights >= 0 (one per frame) with loss='mse', "
                                 f"got {tuple(frame_weights.shape)} with loss={loss!r}")
            frame_weights = frame_weights.reshape(1, 1, -1, 1, 1)  # (B, C, F, H, W) clips
        self.augment, self.frame_weights = augment, frame_weights
        self.denoiser, self.module = denoiser, denoiser.net
        self.weighting, self.min_snr_gamma, self.loss_name, self.vlb_weight = weighting, min_snr_gamma, loss, vlb_weight
        self.draw_kwargs = dict(noise_level=noise_level, noise_level_kwargs=dict(noise_level_kwargs or {}),
                                cfg_dropout=cfg_dropout, null_class=null_class, null_cond=null_cond)

    @classmethod
    def from_config(cls, denoiser: Denoiser, config: TrainConfig, *, null_class: int | None = None,
                    null_cond: dict | None = None, augment=None, frame_weights=None, **extra) -> "DiffusionObjective":
        """The objective of ``config``'s diffusion fields (weighting, loss, noise level, cfg_dropout);
        ``extra``: a subclass's own keywords."""
        return cls(denoiser, weighting=config.weighting, min_snr_gamma=config.min_snr_gamma, loss=config.loss,
                   vlb_weight=config.vlb_weight, noise_level=config.noise_level, noise_level_kwargs=config.noise_level_kwargs,
                   cfg_dropout=config.cfg_dropout, null_class=null_class, null_cond=null_cond, augment=augment,
                   frame_weights=frame_weights, **extra)

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        out = draw_diffusion(batch, generator, self.denoiser.frame, **self.draw_kwargs)
        return out if self.augment is None else self.augment(out, generator)

    def loss(self, batch: dict) -> torch.Tensor:
        extra = {k: v for k, v in batch.items() if k not in DRAWN and v is not None}  # class_labels, cond
        kw = dict(extra_args=extra, weighting=self.weighting, min_snr_gamma=self.min_snr_gamma)
        if self.loss_name == "hybrid":
            kw["vlb_weight"] = self.vlb_weight
        if self.frame_weights is not None:
            kw["element_weight"] = self.frame_weights
        return LOSS_FUNCTIONS[self.loss_name](self.denoiser, batch["x0"], batch["sigma"], batch["noise"], **kw)


LOSS_FUNCTIONS = {"mse": diffusion_loss, "hybrid": hybrid_loss}


# ----------------------------------------------------------------------------------------------
# The classic entry point: train(denoiser, data, config, out_dir)


def as_dataset(data) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(images, labels, cond)`` from ``images`` (N, ...) float, ``(images, labels)`` with labels
    (N,) long or None, or ``(images, labels, cond)`` with ``cond`` a dict of per-example tensors
    (N, ...) that reach the net as keywords (e.g. ``{"input_ids": ...}`` for a text-conditioned
    net); ``cond`` is ``{}`` for the first two forms."""
    parts = (data,) if torch.is_tensor(data) else tuple(data)
    if len(parts) not in (1, 2, 3):
        raise ValueError(f"data must be images, (images, labels) or (images, labels, cond); got {len(parts)} parts")
    images, labels, cond = (*parts, None, None)[:3]
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim < 2:
        raise ValueError("data must be a float tensor (N, ...), a pair (images, labels) or a triple (images, labels, cond)")
    if labels is not None:
        if not torch.is_tensor(labels) or labels.dtype != torch.long or labels.shape != (len(images),):
            raise ValueError(f"labels must be a long tensor of shape ({len(images)},), got "
                             f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    cond = dict(cond or {})
    for name, value in cond.items():
        if name in DRAWN or name == "class_labels":
            raise ValueError(f"cond key {name!r} is reserved; pass labels as the second element of data")
        if not torch.is_tensor(value) or value.ndim < 1 or len(value) != len(images):
            raise ValueError(f"cond[{name!r}] must be a tensor with one row per example ({len(images)}, ...), got "
                             f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")
    return images, labels, cond


def as_rows(images, labels, cond) -> dict[str, torch.Tensor]:
    """The data dict of :func:`difflab.train.fit`: ``x0``, ``class_labels`` (when given) and ``cond``."""
    return {"x0": images, **({"class_labels": labels} if labels is not None else {}), **cond}


def draw_batch(images, labels, frame, config: TrainConfig, step: int, *, null_class: int | None = None,
               cond: dict | None = None, null_cond: dict | None = None) -> dict:
    """The batch :func:`train` trains on at 0-based ``step``: x0, sigma (float32), noise and
    class_labels (or None), plus one key per ``cond`` entry (:func:`draw_diffusion`), from the
    rows of :func:`~difflab.train.loop.batch_indices` and the generator of (seed, step)."""
    rows = as_rows(images, labels, dict(cond or {}))
    idx = batch_indices(len(images), config.batch_size, step, config.seed)
    rows = {k: v[idx.to(v.device)] for k, v in rows.items()}
    return draw_diffusion(rows, step_generator(config.seed, step), frame, noise_level=config.noise_level,
                          noise_level_kwargs=config.noise_level_kwargs, cfg_dropout=config.cfg_dropout,
                          null_class=null_class, null_cond=null_cond)


def resolve_null_class(net, labels, config: TrainConfig, null_class: int | None) -> int | None:
    """``null_class``, else the net's ``config.null_class`` / ``config.num_classes`` when labels are dropped."""
    if labels is None or config.cfg_dropout == 0:
        return null_class
    if null_class is None:
        cfg = getattr(net, "config", None)
        null_class = getattr(cfg, "null_class", getattr(cfg, "num_classes", None))
    if null_class is None:
        raise ValueError("cfg_dropout > 0 needs the null class index: pass null_class= or give the net a config.num_classes")
    return int(null_class)


def train(denoiser: Denoiser, data, config: TrainConfig, out_dir, *, spec: dict | None = None,
          null_class: int | None = None, metadata: dict | None = None, resume: bool = True,
          callback: Callable[[dict], None] | None = None, null_cond: dict | None = None, augment=None,
          data_source=None, frame_weights=None, objective: type | None = None,
          objective_kwargs: dict | None = None) -> TrainState:
    """Train ``denoiser.net`` on ``data`` for ``config.steps`` optimizer steps: the
    :class:`DiffusionObjective` of ``config`` run by :func:`difflab.train.fit` (see it for
    checkpoints, resuming, logging and DDP/FSDP).

    ``data``: images (N, ...) float in [-1, 1], or ``(images, labels)`` with labels (N,) long or
    None; labels reach the net as ``class_labels=``. ``cfg_dropout`` replaces a label by
    ``null_class`` (default ``net.config.null_class``, else ``net.config.num_classes``).
    ``(images, labels, cond)``: ``cond`` maps keyword names to per-example tensors (N, ...)
    that reach the net as those keywords (e.g. caption token ids); ``cfg_dropout`` replaces a
    dropped example's rows by ``null_cond[name]`` (see :func:`draw_diffusion`). ``spec`` (the model
    spec of :mod:`difflab.io.spec`, ``{"unet": ..., "diffusion": ...}``, which rebuilds the
    denoiser) and ``metadata`` (anything JSON) go into the checkpoint, with the denoiser's frame,
    prediction and sigma_data and the null class. Checkpoint tensors ``model.*`` are the net's.
    ``augment``: the :class:`DiffusionObjective`'s draw-time hook (e.g. noise-conditioning augmentation).
    ``data_source``: where the data came from (``"digits"``, an image folder), recorded with the
    data's hash in every checkpoint (see :func:`difflab.train.fit`).
    ``frame_weights``: the :class:`DiffusionObjective`'s weight per frame of a clip (None: uniform).
    ``objective``: a subclass of :class:`DiffusionObjective` to run instead (None: it), built by its
    ``from_config`` with ``objective_kwargs`` as its own keywords.
    """
    images, labels, cond = as_dataset(data)
    null_class = resolve_null_class(denoiser.net, labels, config, null_class)
    objective = (objective or DiffusionObjective).from_config(denoiser, config, null_class=null_class, null_cond=null_cond,
                                                              augment=augment, frame_weights=frame_weights,
                                                              **(objective_kwargs or {}))
    was_training = denoiser.training
    denoiser.train()
    try:
        return fit(objective, as_rows(images, labels, cond), config, out_dir, spec=spec, metadata=metadata, resume=resume,
                   callback=callback, null_class=null_class, data_source=data_source,
                   denoiser={"frame": type(denoiser.frame).__name__, "prediction": denoiser.prediction,
                             "sigma_data": denoiser.sigma_data})
    finally:
        denoiser.train(was_training)


__all__ = ["DiffusionObjective", "draw_diffusion", "draw_batch", "as_dataset", "as_rows", "resolve_null_class", "train",
           "LOSS_FUNCTIONS", "DRAWN"]
