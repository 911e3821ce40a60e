"""Reference statistics: the features of a set of images, fitted once and cached as ``.npz``.

A :class:`FeatureStats` holds what the metrics need of one set: the Gaussian fit (mu, Sigma)
for FID and, when asked, the features themselves (KID, precision/recall) and the class logits
(Inception Score). It records which extractor made it (name, preprocessing, weights
fingerprint: :func:`~difflab.eval.features.extractor_identity`) and refuses to be compared with
features from another one.

The ``.npz`` file (``numpy.load(path)`` reads it, no pickle): ``format`` ("difflab.feature_stats"),
``version``, ``mu`` (D,) float64, ``sigma`` (D, D) float64, ``n``, ``extractor`` (JSON of the
identity), ``source`` (what the images were), optionally ``features`` (N, D) and ``logits`` (N, K).

Sources of images (:func:`load_images`): a tensor (N, C, H, W) in [-1, 1], an ``(images, labels)``
pair or a ``TensorDataset``, ``"digits"`` (the embedded digits' held-out split), or a folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import image_files, load_digits, load_image_folder, read_image
from .features import extract, extractor_identity
from .frechet import feature_stats

FORMAT = "difflab.feature_stats"
VERSION = 1
DIGITS = "digits"


@dataclass
class FeatureStats:
    """Statistics of one image set in one extractor's feature space (see the module doc)."""

    mu: torch.Tensor                      # (D,) float64
    sigma: torch.Tensor                   # (D, D) float64, unbiased covariance
    n: int                                # number of images
    extractor: dict                       # extractor_identity(): name, preprocessing, fingerprint
    source: str = ""                      # what the images were, e.g. "digits:test:size=8"
    features: torch.Tensor | None = None  # (N, D), for KID and precision/recall
    logits: torch.Tensor | None = None    # (N, K), for the Inception Score

    @classmethod
    def from_features(cls, features, extractor: dict, *, logits=None, source: str = "",
                      keep_features: bool = True) -> "FeatureStats":
        """Fit (mu, Sigma) to (N, D) ``features`` made by the extractor of identity ``extractor``."""
        features = torch.as_tensor(features).detach().cpu()
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, len(features), dict(extractor), source, features if keep_features else None,
                   None if logits is None else torch.as_tensor(logits).detach().cpu())

    def check_extractor(self, identity: dict, what: str = "these statistics") -> None:
        """Raise ``ValueError`` unless ``identity`` is the extractor these statistics came from."""
        if identity != self.extractor:
            diff = ", ".join(f"{k}: {self.extractor.get(k)!r} here vs {identity.get(k)!r}"
                             for k in sorted(set(identity) | set(self.extractor)) if identity.get(k) != self.extractor.get(k))
            raise ValueError(f"{what} were computed with another feature extractor ({diff}); statistics from different "
                             "extractors cannot be compared: recompute them with the same extractor")

    def require(self, features: bool = False, logits: bool = False, what: str = "these statistics") -> None:
        """Raise ``ValueError`` if the features or logits a metric needs were not kept."""
        if features and self.features is None:
            raise ValueError(f"{what} hold only mu and sigma; KID and precision/recall need the features "
                             "(recompute them with keep_features=True)")
        if logits and self.logits is None:
            raise ValueError(f"{what} hold no logits; the Inception Score needs them (recompute them with logits=True)")

    # ---- files ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` (atomically: a temporary file, then a rename) and return its path."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"statistics files end in .npz, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(format=np.array(FORMAT), version=np.array(VERSION), mu=self.mu.double().numpy(),
                      sigma=self.sigma.double().numpy(), n=np.array(self.n),
                      extractor=np.array(json.dumps(self.extractor, sort_keys=True)), source=np.array(self.source))
        if self.features is not None:
            arrays["features"] = self.features.numpy()
        if self.logits is not None:
            arrays["logits"] = self.logits.numpy()
        tmp = path.with_name(f".{path.name}.tmp.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Read a ``.npz`` written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no statistics file at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a statistics .npz: {err}") from None
        if str(data.get("format", "")) != FORMAT:
            raise ValueError(f"{path} is not a difflab statistics file (no format={FORMAT!r}); "
                             "write one with FeatureStats.save or `difflab eval --cache`")
        opt = {k: torch.from_numpy(data[k]) if k in data else None for k in ("features", "logits")}
        return cls(torch.from_numpy(data["mu"]), torch.from_numpy(data["sigma"]), int(data["n"]),
                   json.loads(str(data["extractor"])), str(data["source"]), **opt)


# ----------------------------------------------------------------------------------------------
# Images from a source


def _folder_shape(folder: Path) -> tuple[int, int]:
    """(size, channels) of the first image under ``folder``: its shorter side; 1 if grey, else 3."""
    files = image_files(folder)
    if not files:
        raise ValueError(f"no images found under {folder}")
    im = read_image(files[0])  # an unreadable file is a ValueError naming it
    return min(im.size), (1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3)


def _resolve(source, size: int | None, channels: int | None):
    """(kind, object, size, channels) of a source without reading its images; kind is
    "tensor", "digits" or "folder"."""
    if isinstance(source, torch.utils.data.TensorDataset):
        source = source.tensors[0]
    if isinstance(source, (tuple, list)) and len(source) in (2, 3) and torch.is_tensor(source[0]):
        source = source[0]
    if torch.is_tensor(source):
        if source.ndim != 4 or not source.is_floating_point():
            raise ValueError(f"images must be a float (N, C, H, W) tensor in [-1, 1], got {source.dtype} {tuple(source.shape)}")
        return "tensor", source, source.shape[-1], source.shape[1]
    if source == DIGITS:
        return "digits", None, size or 8, 1
    folder = Path(source)
    if not folder.exists():
        raise FileNotFoundError(f"{source} is neither 'digits' nor an existing folder of images")
    if not folder.is_dir():
        raise ValueError(f"{source} is a file, not a folder of images (statistics files end in .npz)")
    if size is None or channels is None:
        first_size, first_channels = _folder_shape(folder)
        size, channels = size or first_size, channels or first_channels
    return "folder", folder, size, channels


def describe_source(source, *, size: int | None = None, channels: int | None = None) -> str:
    """What :func:`load_images` would load, as stored in ``FeatureStats.source``:
    ``tensor(N, C, H, W)``, ``digits:test:size=S`` or ``folder:/abs/path:size=S:channels=C``."""
    kind, obj, size, channels = _resolve(source, size, channels)
    if kind == "tensor":
        return f"tensor{tuple(obj.shape)}"
    if kind == "digits":
        return f"digits:test:size={size}"
    return f"folder:{obj.resolve()}:size={size}:channels={channels}"


def load_images(source, *, size: int | None = None, channels: int | None = None) -> tuple[torch.Tensor, str]:
    """(images (N, C, H, W) in [-1, 1], :func:`describe_source`) of ``source``: a tensor, an
    ``(images, labels)`` pair, a ``TensorDataset``, ``"digits"`` (the held-out split of the
    embedded digits at ``size``, default 8, upsampled with nearest neighbours as for training)
    or a folder of images (all resized to ``size``, default the first image's shorter side;
    ``channels`` default: 1 if the first image is grey, else 3)."""
    kind, obj, size, channels = _resolve(source, size, channels)
    if kind == "tensor":
        images = obj
    elif kind == "digits":
        images = load_digits(size, split="test")[0]
    else:
        images = load_image_folder(obj, size, channels)
    return images, describe_source(source, size=size, channels=channels)


def compute_stats(source, extractor, *, batch_size: int = 64, keep_features: bool = True, logits: bool = False,
                  size: int | None = None, channels: int | None = None, cache: str | Path | None = None,
                  progress: bool = True, label: str = "") -> FeatureStats:
    """Statistics of the images of ``source`` (see :func:`load_images`) through ``extractor``.

    With ``cache`` (a ``.npz`` path): reused when the file exists, was made by the same extractor
    (else ``ValueError``) from the same source, and holds the features/logits asked for; otherwise
    computed and written there. ``label`` names the set on the progress bar."""
    identity = extractor_identity(extractor)
    if cache is not None and Path(cache).exists():
        stats = FeatureStats.load(cache)
        stats.check_extractor(identity, f"the cached statistics {cache}")
        described = describe_source(source, size=size, channels=channels)
        if stats.source != described:
            raise ValueError(f"the cached statistics {cache} are of {stats.source!r}, not of {described!r}; "
                             "delete the file or give another cache path")
        if (stats.features is not None or not keep_features) and (stats.logits is not None or not logits):
            return stats
    images, described = load_images(source, size=size, channels=channels)
    feats, lg = extract(extractor, images, batch_size=batch_size, logits=logits, progress=progress,
                        desc=f"{identity['name']} features {label}".rstrip())
    stats = FeatureStats.from_features(feats, identity, logits=lg, source=described, keep_features=keep_features)
    if cache is not None:
        stats.save(cache)
    return stats

