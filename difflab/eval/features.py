"""Feature extractors: the one interface every metric network is used through.

A **feature extractor** is a small object (usually an ``nn.Module``) with

- ``name: str`` -- a short stable name ("digits-judge", "inception-v3-fid", "clip-vit-b-32", ...);
- ``__call__(images) -> features`` -- ``images`` (N, C, H, W) float in [-1, 1] on the CPU (the
  extractor moves them to its own device, resizes them, converts grey to RGB and normalises them
  as its network expects); returns (N, D) float features on any device;

and, optionally,

- ``preprocessing: str`` -- a one-line description of what ``__call__`` does to the images
  before the network (resize mode and size, normalisation); stored with reference statistics;
- ``fingerprint: str`` -- an id of the weights (default: a SHA-256 of the ``state_dict`` of an
  ``nn.Module``), so statistics from different weights are never compared;
- ``logits(images) -> (N, K)`` -- class logits, for the Inception Score;
- ``features_and_logits(images) -> ((N, D), (N, K))`` -- both in one pass (used when present);
- ``encode_text(prompts: list[str]) -> (N, D)`` -- text embeddings in the image-feature space,
  for the CLIP score (``__call__`` then returns the image embeddings).

Features must not depend on the batch an image is in: the extractor runs in eval mode, with no
batch-dependent operation (no batch norm in training mode); :func:`extract` runs it under
``torch.no_grad()`` in batches of any size.

Extractors that need weights live in their own modules and are imported only when named
(:data:`EXTRACTORS`); each module exposes a loader ``load_x(path, *, device="cpu")`` that raises
``FileNotFoundError`` naming the file or folder expected when the weights are absent:

| name        | loader                                  | ``path``                                  |
| ----------- | --------------------------------------- | ----------------------------------------- |
| ``judge``   | ``difflab.eval.default_judge.load_judge`` | a judge ``.safetensors``; None: train one (~5 s) |
| ``inception`` | ``difflab.eval.inception.load_inception`` | the FID Inception-v3 weights file          |
| ``clip``    | ``difflab.eval.clip.load_clip``         | a local transformers CLIP folder          |
| ``dinov2``  | ``difflab.eval.dinov2.load_dinov2``     | a local transformers DINOv2 folder        |
"""
from __future__ import annotations

import copy
import hashlib
import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from ..progress import progress_bar


@runtime_checkable
class FeatureExtractor(Protocol):
    """(N, C, H, W) images in [-1, 1] -> (N, D) features; see the module docstring."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


# name -> (module, loader); a loader is ``load(path, *, device="cpu") -> FeatureExtractor``
EXTRACTORS = {
    "judge": ("difflab.eval.default_judge", "load_judge"),
    "inception": ("difflab.eval.inception", "load_inception"),
    "clip": ("difflab.eval.clip", "load_clip"),
    "dinov2": ("difflab.eval.dinov2", "load_dinov2"),
}


def load_extractor(name: str, path: str | Path | None = None, *, device="cpu") -> FeatureExtractor:
    """The extractor registered as ``name`` in :data:`EXTRACTORS`, its module imported now."""
    if name not in EXTRACTORS:
        raise ValueError(f"extractor {name!r} is unknown; choose one of {sorted(EXTRACTORS)}")
    module_name, loader = EXTRACTORS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ImportError(f"extractor {name!r} needs {module_name}, which this installation lacks") from None
    if not hasattr(module, loader):
        raise ImportError(f"extractor {name!r}: {module_name} has no {loader}()")
    return getattr(module, loader)(path, device=device)


# ----------------------------------------------------------------------------------------------
# Identity: which network, which weights, which preprocessing


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's ``state_dict``: names, dtypes, shapes, bytes."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def extractor_identity(extractor) -> dict:
    """``{"name", "preprocessing", "fingerprint"}`` of an extractor; two sets of statistics are
    comparable only when these agree."""
    name = getattr(extractor, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"a feature extractor needs a `name` string; {type(extractor).__name__} has none")
    fingerprint = getattr(extractor, "fingerprint", None)
    if fingerprint is None and isinstance(extractor, nn.Module):
        fingerprint = state_fingerprint(extractor)
    return {"name": name, "preprocessing": str(getattr(extractor, "preprocessing", "")), "fingerprint": str(fingerprint or "")}


# ----------------------------------------------------------------------------------------------
# Running an extractor


@torch.no_grad()
def extract(extractor, images: torch.Tensor, *, batch_size: int = 64, logits: bool = False, progress: bool = True,
            desc: str = "features") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features (N, D), logits (N, K) or None) of ``images`` (N, C, H, W) in [-1, 1], on the
    CPU, computed in batches of ``batch_size`` (which changes no number: see the module doc)."""
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if logits and not callable(getattr(extractor, "logits", None)):
        raise ValueError(f"extractor {extractor.name!r} has no logits(); the Inception Score needs one "
                         "(use 'judge' or 'inception')")
    if isinstance(extractor, nn.Module):
        extractor.eval()
    feats, outs = [], []
    bar = progress_bar(len(images), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if logits:
            both = getattr(extractor, "features_and_logits", None)
            f, lg = both(batch) if callable(both) else (extractor(batch), extractor.logits(batch))
            outs.append(lg.detach().cpu())
        else:
            f = extractor(batch)
        feats.append(f.detach().cpu())
        bar.update(len(batch))
    bar.close()
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), (torch.cat(outs) if logits else None)


# ----------------------------------------------------------------------------------------------
# The digits judge as an extractor: the embedded default, no download


class JudgeFeatures(nn.Module):
    """The digits judge (:class:`~difflab.eval.judge.DigitsJudge`) as a feature extractor: its
    penultimate features (``feature_dim``) and its class logits, in float64 and image by image,
    so that an image's features are bit for bit the same whatever batch it is in (float32
    batches on the CPU differ by ~1e-6). ``judge`` is a trained ``DigitsJudge``; :func:`difflab.eval.default_judge.load_judge`
    loads or trains one."""

    name = "digits-judge"
    preprocessing = "1 channel; adaptive_avg_pool2d to 8x8; clamp to [-1, 1]; float64"

    def __init__(self, judge: nn.Module):
        super().__init__()
        self.judge = copy.deepcopy(judge).to(torch.float64).eval()

    def _device(self) -> torch.device:
        return self.judge.head.weight.device

    def _each(self, fn, images: torch.Tensor) -> torch.Tensor:
        """``fn`` on one image at a time: the same bits whatever the batch (batched float64
        kernels differ by ~1e-15, which FID's square roots of near-zero eigenvalues magnify to
        ~1e-7); the net is so small that this is no slower."""
        x = self.judge.prepare(images).to(self._device(), torch.float64)
        return torch.cat([fn(x[i:i + 1]) for i in range(len(x))])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim), float64."""
        return self._each(self.judge.embed, images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes), float64."""
        return self.features_and_logits(images)[1]

    def _features_then_logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.judge.embed(x)
        return torch.cat([f, self.judge.head(f)], 1)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both in one pass, image by image: (N, feature_dim), (N, num_classes)."""
        out = self._each(self._features_then_logits, images)
        d = self.judge.config.feature_dim
        return out[:, :d], out[:, d:]

