"""Running a job: load its model (kept while the next jobs use it) and call the library's own
pipeline for its mode; the studio samples nothing itself.

| model kind | txt2img | img2img, inpaint, outpaint | invert |
| --- | --- | --- | --- |
| ``checkpoint`` | :func:`difflab.pipelines.generate` | - | - |
| ``text``, ``stable-diffusion`` | :func:`difflab.pipelines.text_to_image` | :func:`~difflab.pipelines.image_to_image`, :func:`~difflab.pipelines.inpaint`, :func:`~difflab.pipelines.outpaint` | :func:`~difflab.pipelines.invert` then :func:`~difflab.pipelines.edit` |
| ``folder`` | :func:`difflab.pipelines.sample_folder` | - | - |

Progress and cancelling ride on the samplers' ``callback`` (``SampleOptions.sampler_kwargs``):
after every step it checks the job's cancel flag and, a few times a second, decodes the first
sample's current estimate ``denoised`` into the job's preview. All images of a job are sampled
as one batch (``batch_size`` = the number of images), so a job run again from its parameters
repeats its pixels exactly.
"""
from __future__ import annotations

import base64
import collections
import io
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..io.diffusers_folder import load_diffusers_folder
from ..io.spec import load_denoiser, sample_shape
from ..pipelines import edit, generate, image_to_image, inpaint, invert, outpaint, sample_folder, text_to_image
from ..pipelines.checkpoint import sampling_defaults
from ..pipelines.common import decode, image_channels, to_output
from ..pipelines.folder import folder_defaults, load_text_model, model_options
from ..pipelines.options import SampleOptions
from .forms import MODEL_GRID, Request
from .gallery import Gallery
from .jobs import Job

PREVIEW_EVERY_S = 0.15
CACHED_MODELS = 2


@dataclass
class Loaded:
    """A model in memory: its denoiser, text encoder and VAE (None where it has none), its own
    sampling defaults, and for a checkpoint the shape of a sample and its null class."""

    denoiser: object
    text_encoder: object = None
    vae: object = None
    defaults: SampleOptions = field(default_factory=SampleOptions)
    shape: tuple | None = None
    null_class: int | None = None


def load_model(entry, device) -> Loaded | None:
    """Load the model of a catalogue entry (None for a ``folder`` entry: sample_folder loads it)."""
    if entry.kind == "checkpoint":
        denoiser, meta = load_denoiser(entry.path, device=device)
        return Loaded(denoiser, defaults=sampling_defaults(meta), shape=sample_shape(meta["spec"], meta),
                      null_class=meta.get("null_class"))
    if entry.kind == "text":
        model = load_text_model(entry.path, device)
        return Loaded(model.denoiser, model.text_encoder, model.vae, model_options(model))
    if entry.kind == "stable-diffusion":
        parts = load_diffusers_folder(entry.path, device=device)
        return Loaded(parts.denoiser, parts.text_encoder, parts.vae, folder_defaults(parts.sampling, sdxl=False))
    return None


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pil_images(images: torch.Tensor) -> list:
    """(N, C, H, W) in [-1, 1] -> Pillow images (grey for one channel), as the pipelines convert them."""
    return to_output(images.float().cpu(), "pil")


def input_tensor(image: Image.Image, channels: int, width: int, height: int, *, mask: bool = False) -> torch.Tensor:
    """An uploaded image as (1, C, H, W) in [-1, 1] at the request's size (a mask: (1, 1, H, W) of
    0 = keep, 1 = fill, resized nearest)."""
    im = image.convert("L" if mask or channels == 1 else "RGB")
    if im.size != (width, height):
        im = im.resize((width, height), Image.NEAREST if mask else Image.LANCZOS)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float()
    x = x.reshape(height, width, -1).permute(2, 0, 1)[None]
    return (x >= 128).float() if mask else x / 127.5 - 1


class Runner:
    """Runs jobs on ``device`` and writes their images into ``gallery``; keeps the last
    :data:`CACHED_MODELS` models loaded."""

    def __init__(self, gallery: Gallery, device="cpu"):
        self.gallery, self.device = gallery, device
        self.cache: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def model(self, entry) -> Loaded | None:
        key = (str(entry.path), entry.path.stat().st_mtime_ns if entry.path.exists() else 0)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        loaded = load_model(entry, self.device)
        with self.lock:
            self.cache[key] = loaded
            while len(self.cache) > CACHED_MODELS:
                self.cache.popitem(last=False)
        return loaded

    def options(self, loaded: Loaded | None, req: Request, callback) -> SampleOptions:
        """The model's own defaults with the request's settings (one batch, no progress bar)."""
        base = loaded.defaults if loaded is not None else SampleOptions()
        changes = dict(sampler=req.sampler, steps=req.steps, guidance_scale=req.guidance, seed=req.seed,
                       batch_size=req.batch_size, device=self.device, progress=False,
                       sampler_kwargs={} if callback is None else {"callback": callback})
        if req.grid != MODEL_GRID:
            changes["grid"] = req.grid
        return base.replace(**changes)

    def callback(self, job: Job, loaded: Loaded | None, expected: int):
        """The sampler callback of ``job``: cancel check, progress, a preview now and then."""
        state = {"count": 0, "last": 0.0}

        def callback(info):
            job.check_cancelled()
            state["count"] += 1
            job.progress = min(0.99, state["count"] / max(1, expected))
            job.message = f"step {min(state['count'], expected)} of {expected}"
            now = time.monotonic()
            if now - state["last"] >= PREVIEW_EVERY_S:
                state["last"] = now
                x = info["denoised"][:1].detach().float()
                if loaded is not None and loaded.vae is not None:
                    x = decode(loaded.vae, x)
                job.preview = data_url(pil_images(x.clamp(-1, 1))[0])
        return callback

    def __call__(self, job: Job) -> None:
        req: Request = job.request
        job.message = f"loading {req.model.name}"
        loaded = self.model(req.model)
        job.check_cancelled()
        expected = req.steps if req.mode not in ("img2img", "inpaint") else max(1, int(req.steps * req.strength))
        callback = self.callback(job, loaded, expected)
        images, inputs = self.sample(req, loaded, callback, job)
        params = req.parameters()
        for i, image in enumerate(pil_images(images)):
            job.results.append(self.gallery.save(image, {**params, "batch_pos": i, **inputs}))

    def sample(self, req: Request, loaded: Loaded | None, callback, job: Job):
        """(images (N, C, H, W) in [-1, 1], names of the stored input images) of the request."""
        n = req.batch_size
        if req.model.kind == "checkpoint":
            labels = None if req.class_label is None else [req.class_label] * n
            images = generate(loaded.denoiser, labels, num_samples=None if labels else n, shape=loaded.shape,
                              null_class=loaded.null_class, options=self.options(loaded, req, callback))
            return images, {}
        prompts = [req.prompt] * n
        negatives = req.negative_prompt or None
        if loaded is None:  # another folder layout: its own loader and defaults
            opts = self.options(None, req, callback)
            changes = {k: getattr(opts, k) for k in ("sampler", "steps", "guidance_scale", "seed", "batch_size",
                                                      "device", "progress", "sampler_kwargs")}
            if req.grid != MODEL_GRID:
                changes["grid"] = req.grid
            return sample_folder(req.model.path, prompts, negative_prompts=negatives, height=req.height, width=req.width,
                                 **changes), {}
        parts = (loaded.denoiser, loaded.text_encoder, loaded.vae)
        opts = self.options(loaded, req, callback)
        if req.mode == "txt2img":
            return text_to_image(*parts, prompts, negative_prompts=negatives, height=req.height, width=req.width,
                                 output_type="pt", options=opts), {}
        channels = image_channels(loaded.denoiser, loaded.vae) or 3
        image = input_tensor(req.image, channels, req.width, req.height)
        inputs = {"init_image": self.gallery.save_input(pil_images(image)[0])}
        if req.mode == "img2img":
            return image_to_image(*parts, prompts, image, strength=req.strength, negative_prompts=negatives,
                                  output_type="pt", options=opts), inputs
        if req.mode == "inpaint":
            mask = input_tensor(req.mask, 1, req.width, req.height, mask=True)
            inputs["mask_image"] = self.gallery.save_input(pil_images(mask * 2 - 1)[0])
            return inpaint(*parts, prompts, image, mask, strength=req.strength, negative_prompts=negatives,
                           output_type="pt", options=opts), inputs
        if req.mode == "outpaint":
            return outpaint(*parts, prompts, image, **req.pads, negative_prompts=negatives, output_type="pt",
                            options=opts), inputs
        # invert: DDIM inversion under the source prompt, then DDIM under the edited prompt
        plain = self.options(loaded, req, None).replace(sampler="ddim")
        job.message, job.progress = "inverting", 0.05
        inversion = invert(*parts, image, [req.source_prompt] * n, options=plain)
        job.check_cancelled()
        job.message, job.progress = "editing", 0.5
        return edit(*parts, inversion, prompts, output_type="pt", options=plain), inputs


__all__ = ["Runner", "Loaded", "load_model", "input_tensor", "pil_images", "data_url"]
