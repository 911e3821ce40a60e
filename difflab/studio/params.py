"""Generation parameters as text: AUTOMATIC1111's ``parameters`` convention, in a PNG text chunk
and in a JSON file beside the image.

The text is the prompt, an optional ``Negative prompt: ...`` line, then one line of
``Key: value`` pairs separated by ``", "`` (a value holding a comma, a colon or a quote is written
as a JSON string), e.g.::

    a seven
    Negative prompt: blurry
    Steps: 20, Sampler: ddim, Schedule type: default, CFG scale: 2, Seed: 1, Size: 16x16, Model: text16, Mode: txt2img

Keys A1111 knows keep its spelling (``Steps``, ``Sampler``, ``Schedule type``, ``CFG scale``,
``Seed``, ``Size``, ``Model``, ``Denoising strength``); A1111 ignores the rest (``Mode``,
``Class``, ``Batch size``, ``Batch pos``, ...). A1111's sampler names ("DPM++ 2M Karras") are read
through :func:`difflab.samplers.names.resolve`.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..io.checkpoint import atomic_write_text

# parameter name -> (A1111 key, type); the order is the order written
FIELDS = {
    "steps": ("Steps", int),
    "sampler": ("Sampler", str),
    "grid": ("Schedule type", str),
    "guidance": ("CFG scale", float),
    "seed": ("Seed", int),
    "size": ("Size", str),
    "model": ("Model", str),
    "mode": ("Mode", str),
    "class_label": ("Class", str),
    "strength": ("Denoising strength", float),
    "source_prompt": ("Source prompt", str),
    "outpaint": ("Outpaint", str),
    "batch_size": ("Batch size", int),
    "batch_pos": ("Batch pos", int),
    "init_image": ("Init image", str),
    "mask_image": ("Mask image", str),
}
KEYS = {key: name for name, (key, _) in FIELDS.items()}
PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
TEXT_KEY = "parameters"


def quote(value) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, a colon, a quote or a newline."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def format_parameters(params: dict) -> str:
    """The ``parameters`` text of ``params`` (``prompt``, ``negative_prompt`` and the names of :data:`FIELDS`)."""
    lines = [params.get("prompt") or ""]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = [f"{key}: {quote(params[name])}" for name, (key, _) in FIELDS.items() if params.get(name) not in (None, "")]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """``params`` from a ``parameters`` text (:func:`format_parameters`'s, or A1111's own): the
    prompt, the negative prompt and every known key (typed); unknown keys are kept under ``extra``.
    A ValueError when the text has no ``Key: value`` line."""
    lines = text.strip("\n").split("\n")
    last = lines[-1] if lines else ""
    pairs = PAIR.findall(last)
    if not pairs or "Steps" not in {k for k, _ in pairs}:
        raise ValueError("the text holds no generation parameters (its last line needs 'Steps: N, Sampler: ..., ...')")
    head, negative, in_negative = [], [], False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else head).append(line)
    params: dict = {"prompt": "\n".join(head).strip(), "negative_prompt": "\n".join(negative).strip(), "extra": {}}
    for key, raw in pairs:
        value = raw.strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        name = KEYS.get(key.strip())
        if name is None:
            params["extra"][key.strip()] = value
            continue
        kind = FIELDS[name][1]
        try:
            params[name] = kind(value)
        except ValueError:
            raise ValueError(f"parameter {key.strip()!r} has the value {value!r}, not a {kind.__name__}") from None
    return params


def save_png(image: Image.Image, path, params: dict) -> Path:
    """Write ``image`` to ``path`` (atomically) with ``params`` in its ``parameters`` text chunk, and
    ``params`` as JSON beside it (same name, ``.json``). Returns the PNG's path."""
    path = Path(path)
    text = format_parameters(params)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic_write_text(path.with_suffix(".json"), json.dumps({**params, "parameters": text}, indent=1))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def read_png_parameters(image: Image.Image) -> dict:
    """The parameters of an opened PNG's ``parameters`` text chunk; a ValueError naming the chunk
    when the image has none."""
    text = image.info.get(TEXT_KEY)
    if not text:
        raise ValueError(f"the image has no '{TEXT_KEY}' text chunk: drop a PNG written by difflab studio or AUTOMATIC1111")
    return parse_parameters(text)


__all__ = ["FIELDS", "format_parameters", "parse_parameters", "save_png", "read_png_parameters", "quote", "TEXT_KEY"]
