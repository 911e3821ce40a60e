"""Image folders: every image under a directory, centre-cropped to a square and resized.

With ``with_labels=True`` the layout is ``path/<class name>/<images>`` (as torchvision's
``ImageFolder``): classes are the sub-folders in sorted order, numbered from 0.

How a file becomes a tensor (docs/training.md, "Image folders"):

- it is decoded in full, so a truncated or damaged file is an error naming it (difflab never sets
  Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES``); its EXIF orientation is applied;
- transparency (RGBA, LA, PA, a palette or a colour marked transparent) is composited over white;
- 8-bit modes (1, L, P, RGB, CMYK, YCbCr, ...) go through Pillow's conversion to RGB or grey
  (colour profiles are not applied); 16-bit grey (``I;16``, and ``I`` with values in 0..65535)
  is scaled from 0..65535 and float (``F``) from 0..1, keeping their precision; other values of
  ``I`` or ``F`` are an error. Pillow reads 16-bit RGB(A) PNGs at 8 bits per channel.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

class NotAFolderError(NotADirectoryError, ValueError):
    """A path that should be a folder of images is a file: a user error (a ValueError), and an OSError as before."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ON_ERROR = ("stop", "skip")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageReadError(ValueError):
    """A file difflab cannot read as an image: ``file`` and ``reason`` say which and why."""

    def __init__(self, file, reason: str):
        super().__init__(f"could not read {file} as an image: {reason}")
        self.file, self.reason = Path(file), reason


def image_files(folder: Path) -> list[Path]:
    """Image files at any depth under ``folder``, in sorted order (hidden files skipped)."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def read_image(file: str | Path) -> Image.Image:
    """The image of ``file``, decoded in full, its EXIF orientation applied (``ImageOps.exif_transpose``).
    An empty, unknown, truncated or damaged file is an :class:`ImageReadError` naming it."""
    file = Path(file)
    if file.is_file() and file.stat().st_size == 0:
        raise ImageReadError(file, "the file is empty (0 bytes)")
    try:
        with Image.open(file) as im:
            im.load()  # decode now: a truncated file fails here, not half-grey later
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise ImageReadError(file, "not an image format Pillow knows (or its header is damaged)") from None
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, struct.error, EOFError, ...
        raise ImageReadError(file, f"damaged or truncated ({type(err).__name__}: {err})") from err


def _unit_float(im: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``, ``I``) or float (``F``) grey image as an ``F`` image in [0, 1]."""
    values = np.asarray(im.convert("F"), dtype=np.float32)
    top, kind = (1.0, "float (mode F)") if im.mode == "F" else (65535.0, f"integer (mode {im.mode})")
    if not np.isfinite(values).all():
        raise ValueError(f"{kind} values include NaN or infinity")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 or hi > top:
        raise ValueError(f"{kind} values span [{lo:g}, {hi:g}]; difflab reads them as 0..{top:g}")
    return Image.fromarray(values / np.float32(top))


def _over_white(im: Image.Image) -> Image.Image:
    """``im`` with its transparency composited over white (as a viewer shows it on a white page)."""
    if im.mode not in ALPHA_MODES and "transparency" not in im.info:
        return im
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")


def image_tensor(im: Image.Image, size: int, channels: int = 3) -> torch.Tensor:
    """A Pillow image as a (channels, size, size) float32 tensor in [-1, 1]: the largest centred
    square, resized with bicubic filtering; modes and transparency as in the module docstring.
    ``ValueError`` for ``I``/``F`` values outside the ranges read."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    if im.mode in SIXTEEN_BIT or im.mode in ("I", "F"):
        band = _unit_float(im).crop(box).resize((size, size), Image.Resampling.BICUBIC)
        grey = torch.from_numpy(np.asarray(band, dtype=np.float32).copy()).clamp(0, 1) * 2 - 1
        return grey.expand(channels, size, size).clone()
    im = _over_white(im).convert("RGB" if channels == 3 else "L")
    im = im.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(im, dtype=np.float32).reshape(size, size, channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _read(file: Path, size: int, channels: int) -> tuple[torch.Tensor, tuple[int, int], str]:
    """(tensor, (width, height), mode) of one file; every failure an :class:`ImageReadError`."""
    im = read_image(file)
    try:
        return image_tensor(im, size, channels), im.size, im.mode
    except ValueError as err:
        raise ImageReadError(file, str(err)) from None


def load_image(file: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """One image as a (channels, size, size) float32 tensor in [-1, 1] (:func:`read_image`, then
    :func:`image_tensor`); an unreadable file is an :class:`ImageReadError` (a ``ValueError``) naming it."""
    return _read(Path(file), size, channels)[0]


def _examples(first: dict, n: int = 2) -> str:
    """``"64x48 (a.png), 32x32 (b.png)"``: the first ``n`` values of ``first`` (value -> name)."""
    shown = [f"{k} ({name})" for k, name in list(first.items())[:n]]
    return ", ".join(shown) + (", ..." if len(first) > n else "")


def _warn_if_mixed(folder: Path, seen: list, size: int, channels: int) -> None:
    """One UserWarning if the images ``seen`` ((file, (w, h), mode) each) differ in size or mode."""
    sizes, modes = {}, {}
    for file, (w, h), mode in seen:
        name = str(file.relative_to(folder))
        sizes.setdefault(f"{w}x{h}", name)
        modes.setdefault(mode, name)
    mixed = [f"{len(d)} {what} ({_examples(d)})" for what, d in (("sizes", sizes), ("modes", modes)) if len(d) > 1]
    if mixed:
        warnings.warn(f"{folder}: the images come in {' and '.join(mixed)}; each is centre-cropped to a square, "
                      f"resized to {size}x{size} and read as {'RGB' if channels == 3 else 'grey'}", UserWarning, stacklevel=4)


def _read_all(folder: Path, files: list[Path], size: int, channels: int, on_error: str):
    """(tensors, the files read) of ``files``; unreadable ones stop the reading or are skipped with one warning."""
    tensors, kept, seen, bad = [], [], [], []
    for file in files:
        try:
            x, wh, mode = _read(file, size, channels)
        except ImageReadError as err:
            if on_error == "stop":
                raise
            bad.append(err)
            continue
        tensors.append(x)
        kept.append(file)
        seen.append((file, wh, mode))
    names = "; ".join(f"{e.file.relative_to(folder)}: {e.reason}" for e in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if not tensors:
        raise ValueError(f"no readable images under {folder}: all {len(bad)} image files failed to read ({names})")
    if bad:
        warnings.warn(f"{folder}: skipped {len(bad)} of {len(files)} image files that could not be read ({names})",
                      UserWarning, stacklevel=3)
    _warn_if_mixed(folder, seen, size, channels)
    return tensors, kept


def load_image_folder(path: str | Path, size: int, channels: int = 3, *, with_labels: bool = False,
                      on_error: str = "stop"):
    """All images under ``path`` as one (N, channels, size, size) float32 tensor in [-1, 1].

    ``channels``: 3 (RGB) or 1 (grey); transparency is composited over white. Images are found at
    any depth, sorted by path, and read as :func:`load_image`. Images of several sizes or modes
    give one ``UserWarning``. ``on_error``: ``"stop"`` (an unreadable file is a ``ValueError``
    naming it) or ``"skip"`` (left out, with one ``UserWarning`` giving the count and the first
    names; a ``ValueError`` if none is readable). ``with_labels=True`` returns ``(images,
    labels (N,) long, class_names)`` with one class per sub-folder of ``path`` (sorted names;
    images nested deeper count for their top sub-folder; a class keeps its number when files
    of it are skipped).
    """
    # 1. Check the inputs
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 (grey) or 3 (RGB)")
    if size < 1:
        raise ValueError(f"size={size} must be positive")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")
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

    # 3. Read them
    tensors, kept = _read_all(folder, files, size, channels, on_error)
    images = torch.stack(tensors)
    if with_labels:
        index = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([index[f.relative_to(folder).parts[0]] for f in kept], dtype=torch.long)
        return images, labels, class_names
    return images
