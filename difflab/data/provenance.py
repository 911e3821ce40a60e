"""Training-data provenance: what a model was trained on, as hashes a checkpoint can carry.

:func:`provenance` hashes the training tensors themselves (every name, dtype, shape and byte, in
name order), so two runs on the same data record the same digest and a changed pixel changes it.
A ``source`` adds where the tensors came from: ``"digits"`` (a SHA-256 of the embedded data set's
raw bytes and the scikit-learn version that shipped it, :func:`digits_source`) or a folder of
images (a SHA-256 per file and one over the sorted manifest, :func:`folder_source`). The training
loop (:func:`difflab.train.fit`) writes the result into every checkpoint's metadata as
``data_provenance``; ``difflab check`` shows it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .digits import _raw_digits
from .folder import image_files

MAX_LISTED_FILES = 1000  # folders with more files record the manifest hash and the count only


def tensor_sha256(tensors: dict) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes (CPU, contiguous), in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"data[{name!r}] must be a tensor, got {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digits_source() -> dict:
    """The embedded digits: scikit-learn's version and a SHA-256 of the raw images and labels."""
    import sklearn

    images, labels = _raw_digits()
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return {"dataset": "digits", "sklearn_version": sklearn.__version__, "raw_sha256": h.hexdigest()}


def folder_source(folder) -> dict:
    """A folder of images: a SHA-256 per image file (listed when at most ``MAX_LISTED_FILES``) and
    one over the manifest (``relative/path<TAB>sha256`` lines, sorted by path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = {f.relative_to(folder).as_posix(): file_sha256(f) for f in image_files(folder)}
    manifest = "".join(f"{name}\t{digest}\n" for name, digest in sorted(files.items()))
    out = {"folder": str(folder), "files": len(files), "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()}
    if len(files) <= MAX_LISTED_FILES:
        out["file_sha256"] = dict(sorted(files.items()))
    return out


def provenance(data: dict, source=None) -> dict:
    """The provenance record of training ``data`` (a dict of per-example tensors (N, ...)):
    ``sha256`` of the tensors (:func:`tensor_sha256`), ``examples`` (N) and, with ``source``, where
    they came from: ``"digits"``, a folder path, or a dict recorded as given."""
    if not isinstance(data, dict) or not data:
        raise TypeError(f"data must be a non-empty dict of tensors, got {type(data).__name__}")
    first = next(iter(data.values()))
    record = {"sha256": tensor_sha256(data), "examples": int(len(first))}
    if source is None:
        return record
    if isinstance(source, dict):
        record["source"] = source
    elif source == "digits":
        record["source"] = digits_source()
    elif isinstance(source, (str, Path)):
        record["source"] = folder_source(source)
    else:
        raise ValueError(f"source must be 'digits', a folder path or a dict, got {type(source).__name__}")
    return record


__all__ = ["provenance", "tensor_sha256", "file_sha256", "digits_source", "folder_source", "MAX_LISTED_FILES"]
