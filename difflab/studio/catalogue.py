"""The models a studio serves: what lies directly in its models folder, and nothing outside it.

An entry is a child of the folder (a run folder or a file), of one of these kinds:

| kind | what | modes |
| --- | --- | --- |
| ``checkpoint`` | an image checkpoint of ``difflab train`` / ``difflab demo`` (a run folder holding ``checkpoint.safetensors``, or the file) | txt2img (class labels) |
| ``text`` | a difflab text model (``difflab demo --text``, ``difflab distill --method lcm``, ``difflab dreambooth``) | txt2img, img2img, inpaint, outpaint, invert |
| ``stable-diffusion`` | a diffusers Stable Diffusion 1.x / 2.x folder | txt2img, img2img, inpaint, outpaint, invert |
| ``folder`` | another :data:`difflab.pipelines.folder.MODEL_FOLDERS` layout that needs nothing more (SDXL, SD3, Flux folders) | txt2img |

A model is named by its entry's name alone; :func:`resolve_model` refuses any other name (a path, a
``..``, a link that leads out of the folder) with a message listing the names it serves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..io.checkpoint import CHECKPOINT_NAME, read_metadata
from ..io.spec import NETWORKS, checkpoint_spec, read_spec, sample_shape
from ..io.text_model import is_text_model, model_file
from ..pipelines.checkpoint import sampling_defaults
from ..pipelines.folder import IMAGE_FAMILIES, SINGLE_FILE_FAMILIES, model_family

MODES = ("txt2img", "img2img", "inpaint", "outpaint", "invert")
KIND_MODES = {"checkpoint": ("txt2img",), "text": MODES, "stable-diffusion": MODES, "folder": ("txt2img",)}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the folder: its ``name`` (the child's name), ``path``, ``kind`` (module table),
    ``modes`` it serves, the number of classes of a class-conditional checkpoint (None otherwise),
    and ``defaults``: its own sampler, steps, guidance and size where it records them."""

    name: str
    path: Path
    kind: str
    modes: tuple
    num_classes: int | None = None
    defaults: dict = field(default_factory=dict)

    def public(self) -> dict:
        """What the page sees (no paths)."""
        return {"name": self.name, "kind": self.kind, "modes": list(self.modes), "num_classes": self.num_classes,
                "defaults": self.defaults}


def checkpoint_entry(name: str, path: Path) -> ModelEntry | None:
    """An entry for an image checkpoint (None when ``path`` is no checkpoint or makes no images)."""
    try:
        kind, meta = checkpoint_spec(path)
    except (OSError, ValueError, KeyError):
        return None
    if NETWORKS.get(kind) is None or NETWORKS[kind].output != "image":
        return None
    try:
        _, config, _ = read_spec(meta["spec"])
        opts = sampling_defaults(meta)
        shape = sample_shape(meta["spec"], meta)
    except (ValueError, KeyError, TypeError):
        return None
    config = config if isinstance(config, dict) else getattr(config, "__dict__", {})
    defaults = {"sampler": opts.sampler, "steps": opts.steps, "guidance": opts.guidance_scale,
                "height": int(shape[-2]), "width": int(shape[-1])}
    return ModelEntry(name, path, "checkpoint", KIND_MODES["checkpoint"], config.get("num_classes"), defaults)


def text_entry(name: str, path: Path) -> ModelEntry:
    """An entry for a difflab text model, with the file's own sampling defaults."""
    sampling = read_metadata(model_file(path)).get("sampling") or {}
    defaults = {"sampler": sampling.get("sampler", "ddim"), "steps": sampling.get("steps", 50),
                "guidance": sampling.get("guidance_scale", 7.5), "height": sampling.get("height"),
                "width": sampling.get("width")}
    return ModelEntry(name, path, "text", KIND_MODES["text"], None, defaults)


def model_entry(path: Path) -> ModelEntry | None:
    """The entry of one child of the models folder, or None when it is not a model the studio serves."""
    name = path.name
    if name.startswith("."):
        return None
    if path.is_dir() and (path / CHECKPOINT_NAME).is_file():
        return checkpoint_entry(name, path)
    if is_text_model(path):
        return text_entry(name, path)
    if path.is_file():
        return checkpoint_entry(name, path) if path.suffix == ".safetensors" else None
    try:
        family = model_family(path)
    except (OSError, ValueError):
        return None
    if family in IMAGE_FAMILIES or family in SINGLE_FILE_FAMILIES:
        return None  # an upscaler needs an image, a single file a base folder: not served
    kind = "stable-diffusion" if family == "stable-diffusion" else "folder"
    return ModelEntry(name, path, kind, KIND_MODES[kind], None, {"family": family})


def list_models(root) -> list[ModelEntry]:
    """The models directly in ``root``, sorted by name (a link leading out of ``root`` is skipped)."""
    root = Path(root).resolve()
    inside = [child for child in sorted(root.iterdir()) if child.resolve().is_relative_to(root)]  # no link out
    entries = [safe_entry(child) for child in inside]
    return [e for e in entries if e is not None]


def safe_entry(path: Path) -> ModelEntry | None:
    """:func:`model_entry`, None for a damaged entry (it is not served; the others are)."""
    try:
        return model_entry(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_model(root, name) -> ModelEntry:
    """The entry named ``name`` in ``root``; a ValueError for anything else: a name with a path
    separator or ``..``, a link leading out of ``root``, or a name that is not one of its models."""
    root = Path(root).resolve()
    if not isinstance(name, str) or not name:
        raise ValueError("model: choose a model from the list")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or "\x00" in name:
        raise ValueError(f"model {name!r} is not a model name: models are named by their entry in the models folder, "
                         "never by a path")
    path = root / name
    if not path.resolve().is_relative_to(root):
        raise ValueError(f"model {name!r} leads outside the models folder; it is not served")
    entry = safe_entry(path) if path.exists() else None
    if entry is None:
        names = [e.name for e in list_models(root)]
        raise ValueError(f"model {name!r} is not in the models folder; choose one of {names}")
    return entry


__all__ = ["ModelEntry", "MODES", "KIND_MODES", "list_models", "resolve_model", "model_entry"]
