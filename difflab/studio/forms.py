"""What the page submits, checked before it is queued: every bad value is a ValueError naming the
field and what would be valid, answered to the page at once (the worker never sees it).

Uploaded images travel inside the JSON body as ``data:`` URLs; :func:`decode_image` checks that
they are images (Pillow opens and verifies them; PNG, JPEG, WebP, BMP or GIF) of at most
:data:`MAX_PIXELS` pixels. The server refuses a body over its upload limit before reading it.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from ..core.grids import GRIDS
from ..samplers import SAMPLERS
from ..samplers.names import resolve as resolve_sampler_name
from .catalogue import MODES, ModelEntry

MAX_STEPS = 1000
MAX_BATCH = 16
MAX_SIDE = 1024
MAX_PIXELS = 4096 * 4096
MAX_PAD = 512
MAX_SEED = 2**63 - 1
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MODEL_GRID = "model"  # the grid the model records (its default)


@dataclass(frozen=True)
class Request:
    """A checked request: the model, the mode, the prompt or class, the sampling settings, and the
    decoded images an edit needs (Pillow images, or None)."""

    model: ModelEntry
    mode: str
    prompt: str = ""
    negative_prompt: str = ""
    class_label: int | None = None
    sampler: str = "ddim"
    grid: str = MODEL_GRID
    steps: int = 20
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 1
    height: int | None = None
    width: int | None = None
    strength: float = 0.75
    source_prompt: str = ""
    pads: dict = field(default_factory=dict)
    image: object = None
    mask: object = None

    def parameters(self) -> dict:
        """The parameters of an image of this request (:mod:`difflab.studio.params`), without the
        position in the batch and the input images' names, which the job adds."""
        p = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps,
             "sampler": self.sampler, "grid": self.grid, "guidance": float(self.guidance), "seed": self.seed,
             "model": self.model.name, "mode": self.mode, "batch_size": self.batch_size}
        if self.height and self.width:
            p["size"] = f"{self.width}x{self.height}"
        if self.class_label is not None:
            p["class_label"] = str(self.class_label)
        if self.mode in ("img2img", "inpaint"):
            p["strength"] = float(self.strength)
        if self.mode == "invert":
            p["source_prompt"] = self.source_prompt
        if self.mode == "outpaint":
            p["outpaint"] = ",".join(str(self.pads[k]) for k in ("left", "right", "top", "bottom"))
        return p


def shown(value) -> str:
    """A submitted value as the message shows it: numbers and plain words bare, anything else quoted."""
    text = str(value)
    return text if isinstance(value, (int, float, str)) and text and text.replace(".", "").replace("-", "").isalnum() else repr(value)


def integer(form: dict, name: str, low: int, high: int, default=None) -> int:
    """``form[name]`` as an int in [low, high]; a ValueError naming the field otherwise."""
    value = form.get(name, default)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{name}: give a whole number from {low} to {high}")
        value = default
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ValueError(f"{name}={shown(value)} must be a whole number from {low} to {high}")
    return number


def number(form: dict, name: str, low: float, high: float, default: float, *, open_low: bool = False) -> float:
    """``form[name]`` as a finite float in [low, high] ((low, high] with ``open_low``)."""
    value = form.get(name, default)
    if value is None or value == "":
        value = default
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or x > high or (x <= low if open_low else x < low):
        raise ValueError(f"{name}={shown(value)} must be a number in {'(' if open_low else '['}{low:g}, {high:g}]")
    return x


def sampler_name(value) -> str:
    """A difflab sampler key from a key or an A1111 / k-diffusion name; a ValueError listing them."""
    name = str(value or "").strip()
    if name in SAMPLERS:
        return name
    try:
        fn, _, _ = resolve_sampler_name(name)
    except ValueError:
        raise ValueError(f"sampler {name!r} is unknown; choose one of {sorted(SAMPLERS)}") from None
    return next(k for k, v in SAMPLERS.items() if v is fn)


def size_text(n: int) -> str:
    """A byte count as KiB under a MiB, MiB above."""
    return f"{n / 1024:.0f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def decode_image(data, name: str, max_bytes: int) -> Image.Image:
    """A ``data:`` URL (or bare base64) -> a loaded Pillow image; a ValueError naming ``name`` when
    it is missing, too large, or not an image of :data:`IMAGE_FORMATS`."""
    if not isinstance(data, str) or not data:
        raise ValueError(f"{name}: upload an image (PNG, JPEG, WebP, BMP or GIF)")
    payload = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: the upload is not base64 data") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{name}: the upload is too large: {size_text(len(raw))}, over the limit of {size_text(max_bytes)}")
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt, size = probe.format, probe.size
            probe.verify()
        if fmt not in IMAGE_FORMATS:
            raise ValueError(f"{name}: {fmt} images are not taken; upload {', '.join(IMAGE_FORMATS)}")
        if size[0] * size[1] > MAX_PIXELS:
            raise ValueError(f"{name}: the image is {size[0]}x{size[1]}, over the limit of {MAX_PIXELS} pixels")
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        raise ValueError(f"{name}: the upload is not an image (PNG, JPEG, WebP, BMP or GIF)") from None
    return image


def check_request(form: dict, model: ModelEntry, max_bytes: int) -> Request:
    """A :class:`Request` from the page's ``form`` for ``model``; a ValueError naming the first bad field."""
    mode = form.get("mode") or "txt2img"
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; choose one of {list(MODES)}")
    if mode not in model.modes:
        raise ValueError(f"model {model.name!r} ({model.kind}) does not do {mode}; it does {', '.join(model.modes)}")
    defaults = model.defaults
    sampler = sampler_name(form.get("sampler") or defaults.get("sampler") or "ddim")
    grid = str(form.get("grid") or MODEL_GRID)
    if grid != MODEL_GRID and grid not in GRIDS:
        raise ValueError(f"grid {grid!r} is unknown; choose one of {[MODEL_GRID, *GRIDS]}")
    steps = integer(form, "steps", 1, MAX_STEPS, defaults.get("steps", 20))
    guidance = number(form, "guidance", 0.0, 50.0, defaults.get("guidance", 1.0))
    seed = integer(form, "seed", 0, MAX_SEED, 0)
    batch = integer(form, "batch_size", 1, MAX_BATCH, 1)
    prompt, negative = str(form.get("prompt") or ""), str(form.get("negative_prompt") or "")
    if len(prompt) > 2000 or len(negative) > 2000:
        raise ValueError("prompt: at most 2000 characters")
    fields: dict = {}
    if model.kind == "checkpoint":
        label = form.get("class_label")
        if label not in (None, "", "none"):
            if model.num_classes is None:
                raise ValueError(f"class_label: model {model.name!r} is unconditional; leave the class empty")
            fields["class_label"] = integer(form, "class_label", 0, model.num_classes - 1)
        elif guidance != 1.0:
            raise ValueError("guidance: without a class there is nothing to guide towards; set guidance to 1 or pick a class")
        height, width = defaults.get("height"), defaults.get("width")
    else:
        height = integer(form, "height", 8, MAX_SIDE, defaults.get("height") or 512)
        width = integer(form, "width", 8, MAX_SIDE, defaults.get("width") or 512)
    if mode in ("img2img", "inpaint"):
        fields["strength"] = number(form, "strength", 0.0, 1.0, 0.75 if mode == "img2img" else 1.0, open_low=True)
    if mode != "txt2img":
        fields["image"] = decode_image(form.get("image"), "image", max_bytes)
    if mode == "inpaint":
        fields["mask"] = decode_image(form.get("mask"), "mask", max_bytes)
    if mode == "outpaint":
        pads = form.get("pads") or {}
        if not isinstance(pads, dict):
            raise ValueError("pads: give left, right, top and bottom pixels")
        fields["pads"] = {k: integer(pads, k, 0, MAX_PAD, 0) for k in ("left", "right", "top", "bottom")}
        if not any(fields["pads"].values()):
            raise ValueError("pads: outpainting needs some padding: give left, right, top and/or bottom pixels")
    if mode == "invert":
        fields["source_prompt"] = str(form.get("source_prompt") or "")
        sampler = "ddim"  # inversion and its editing run DDIM (eta = 0)
    return Request(model=model, mode=mode, prompt=prompt, negative_prompt=negative, sampler=sampler, grid=grid,
                   steps=steps, guidance=guidance, seed=seed, batch_size=batch, height=height, width=width, **fields)


__all__ = ["Request", "check_request", "decode_image", "size_text", "sampler_name", "MAX_STEPS", "MAX_BATCH", "IMAGE_FORMATS", "MODEL_GRID"]
