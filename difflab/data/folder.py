"""Image folders: every image under a directory, centre-cropped to a square and resized.

With ``with_labels=True`` the layout is ``path/<class name>/<images>`` (as torchvision's
``ImageFolder``): classes are the sub-folders in sorted order, numbered from 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

class NotAFolderError(NotADirectoryError, ValueError):
    """A path that should be a folder of images is a file: a user error (a ValueError), and an OSError as before."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """Image files at any depth under ``folder``, in sorted order (hidden files skipped)."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def load_image(file: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """One image as a (channels, size, size) float32 tensor in [-1, 1]: the largest centred
    square is cropped, then resized with bicubic filtering (Pillow)."""
    try:
        with Image.open(file) as im:
            im = im.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"could not read {file} as an image: {err}") from err
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    im = im.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(im, dtype=np.float32).reshape(size, size, channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_image_folder(path: str | Path, size: int, channels: int = 3, *, with_labels: bool = False):
    """All images under ``path`` as one (N, channels, size, size) float32 tensor in [-1, 1].

    ``channels``: 3 (RGB; an alpha channel is dropped) or 1 (grey). Images are found at any
    depth, sorted by path. ``with_labels=True`` returns ``(images, labels (N,) long, class_names)``
    with one class per sub-folder of ``path`` (sorted names; images nested deeper count for
    their top sub-folder).
    """
    # 1. Check the inputs
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 (grey) or 3 (RGB)")
    if size < 1:
        raise ValueError(f"size={size} must be positive")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotAFolderError(f"{folder} is a file, not a folder of images")

    # 2. Find the files (and their classes)
    files = image_files(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    if with_labels:
        loose = [f for f in files if f.parent == folder]
        if loose:
            raise ValueError(
                f"with_labels=True expects {folder}/<class name>/<image>, "
                f"but {len(loose)} image(s) lie directly in {folder}, e.g. {loose[0].name}"
            )
        class_names = sorted({f.relative_to(folder).parts[0] for f in files})
        index = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([index[f.relative_to(folder).parts[0]] for f in files], dtype=torch.long)

    # 3. Read them
    images = torch.stack([load_image(f, size, channels) for f in files])
    if with_labels:
        return images, labels, class_names
    return images
