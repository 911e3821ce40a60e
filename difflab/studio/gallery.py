"""The gallery: a folder of PNGs, each with its parameters in its ``parameters`` text chunk and in
a JSON file beside it (:mod:`difflab.studio.params`), plus the input images of edits under
``inputs/``, named by the SHA-256 of their PNG bytes, so that an edit can be reproduced too.

Files are named ``NNNNN-MODEL-SEED-POS.png``; :func:`gallery_file` refuses any other name.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from pathlib import Path

from PIL import Image

from .params import format_parameters, save_png

NAME = re.compile(r"^[0-9]{5}-[A-Za-z0-9_.-]{1,80}\.(png|json)$")
INPUT_NAME = re.compile(r"^[0-9a-f]{16}\.png$")
INPUTS = "inputs"


def safe_part(text: str) -> str:
    """``text`` with every character outside [A-Za-z0-9_.-] replaced, at most 40 of them."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40].strip(".") or "model"


class Gallery:
    """The gallery folder: saving images with their parameters, listing them, serving them by name."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / INPUTS).mkdir(exist_ok=True)
        self.lock = threading.Lock()
        numbers = [int(p.name[:5]) for p in self.folder.glob("*.png") if NAME.match(p.name)]
        self.next = max(numbers, default=-1) + 1

    def save(self, image: Image.Image, params: dict) -> dict:
        """Write ``image`` with ``params``; the entry the page shows (name, url, params)."""
        with self.lock:
            number, self.next = self.next, self.next + 1
        name = f"{number:05d}-{safe_part(params.get('model', ''))}-{params.get('seed', 0)}-{params.get('batch_pos', 0)}.png"
        save_png(image, self.folder / name, params)
        return {"name": name, "url": f"/gallery/{name}", "params": {**params, "parameters": format_parameters(params)}}

    def save_input(self, image: Image.Image) -> str:
        """Keep an edit's input image (as PNG) under ``inputs/``; its name (the hash)."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        name = hashlib.sha256(data).hexdigest()[:16] + ".png"
        path = self.folder / INPUTS / name
        if not path.exists():
            path.write_bytes(data)
        return name

    def input_file(self, name: str) -> Path | None:
        """The stored input image ``name`` (None when the name is not one or it is gone)."""
        if not isinstance(name, str) or not INPUT_NAME.match(name):
            return None
        path = self.folder / INPUTS / name
        return path if path.is_file() else None

    def file(self, name: str) -> Path | None:
        """The gallery file ``name`` (a PNG or its JSON), or None for any other name."""
        if not NAME.match(name):
            return None
        path = self.folder / name
        return path if path.is_file() else None

    def entries(self, limit: int = 200) -> list[dict]:
        """The newest ``limit`` images with their parameters, newest first."""
        out = []
        for png in sorted((p for p in self.folder.glob("*.png") if NAME.match(p.name)), reverse=True)[:limit]:
            try:
                params = json.loads(png.with_suffix(".json").read_text())
            except (OSError, ValueError):
                params = {}
            out.append({"name": png.name, "url": f"/gallery/{png.name}", "params": params})
        return out


__all__ = ["Gallery", "safe_part"]
