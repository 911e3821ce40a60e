"""The stages every pipeline shares, as small functions: inputs (:func:`check_size`,
:func:`as_images`, :func:`encode_prompts`, :func:`add_conditions`), the grid (:func:`sampling_grid`), guidance and the
sampler (:func:`guided`, :func:`denoise`), batching (:func:`run_batches`) and the way out
(:func:`decode`, :func:`finish`, :func:`to_output`).

Conventions (the same in every pipeline of this package):

- images given to a pipeline are (B, C, H, W) tensors in [-1, 1], difflab's data range;
- ``output_type``: ``"pt"`` (B, C, H, W) tensor in [-1, 1] (difflab's range, *not* diffusers'
  [0, 1]); ``"np"`` (B, H, W, C) float32 array in [0, 1] (diffusers' convention); ``"pil"`` a list
  of Pillow images; ``"latent"`` the final samples before decoding (B, C, h, w) (for a pixel-space
  model, ``vae=None``, the samples themselves, unclamped). Results come back on the CPU.
- sample i of a run with ``seed`` s draws every Gaussian it needs from its own generator
  (:class:`difflab.core.SampleNoise`): the starting noise first, then (img2img/inpainting) the
  VAE posterior draws, then the sampler's draws. So a sample never depends on ``batch_size``.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..progress import progress_bar
from ..core import SampleNoise, VPDiscrete, grids
from ..guidance import ClassifierFreeGuidance, GuidanceInput, takes_guidance_scale
from ..nn.unet_sd import UNetSD
from ..samplers import check_sigmas, get_sampler
from .options import SampleOptions

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def net_config(denoiser):
    """The config of the denoiser's network (None when it has none)."""
    return getattr(getattr(denoiser, "net", None), "config", None)


def param_dtype_device(module, default_dtype=torch.float32):
    """(dtype, device) of a module's first floating parameter (float32 on the CPU when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return default_dtype, torch.device("cpu")


def vae_factor(vae) -> int:
    """How many image pixels one latent pixel covers along H and W (1 without a VAE)."""
    return 1 if vae is None else int(vae.downsample_factor)


def latent_channels(denoiser, vae) -> int:
    """Channels of the samples the diffusion model walks through: the VAE's latent channels, or the
    network's input channels for a pixel-space model."""
    if vae is not None:
        return int(vae.config.latent_channels)
    channels = getattr(net_config(denoiser), "in_channels", None)
    if channels is None:
        raise ValueError("cannot tell the sample channels: the network has no config.in_channels; pass latent_shape=")
    return int(channels)


def check_size(denoiser, vae, height: int, width: int, names=("height", "width")) -> tuple[int, int]:
    """The latent size (h, w) of ``height`` x ``width`` images; a ValueError naming the argument
    when it is not divisible by the VAE's factor times the U-Net's own factor. difflab's ADM
    ``UNet`` needs latents divisible by 2 ** (levels - 1); ``UNetSD`` follows its skips when
    upsampling, as diffusers' ``UNet2DConditionModel`` does, so it needs only the VAE's factor."""
    f = vae_factor(vae)
    net = getattr(denoiser, "net", None)
    unet_f = 1 if isinstance(net, UNetSD) else int(getattr(net_config(denoiser), "downsample_factor", 1))
    need = f * unet_f
    for name, v in zip(names, (height, width)):
        if not isinstance(v, (int, np.integer)) or v < need or v % need:
            raise ValueError(f"{name}={v} must be a positive multiple of {need} (the VAE's downsampling factor {f} "
                             f"x the U-Net's factor {unet_f})")
    return height // f, width // f


def as_images(image, n: int, channels: int | None = None, name: str = "image") -> torch.Tensor:
    """Images for n samples as a float (n, C, H, W) tensor in [-1, 1]: a tensor (n or 1, C, H, W)
    in [-1, 1], or Pillow images (one, or a list of one or n), converted from [0, 255]."""
    if isinstance(image, Image.Image) or (isinstance(image, (list, tuple)) and image and isinstance(image[0], Image.Image)):
        pics = [image] if isinstance(image, Image.Image) else list(image)
        arrays = [np.asarray(p.convert("L" if channels == 1 else "RGB"), dtype=np.float32) for p in pics]
        image = torch.stack([torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1)).permute(2, 0, 1) for a in arrays]) / 127.5 - 1
    image = torch.as_tensor(image)
    if image.ndim != 4 or image.shape[0] not in (1, n) or (channels is not None and image.shape[1] != channels):
        c = "C" if channels is None else channels
        raise ValueError(f"{name} must be (N, {c}, H, W) or (1, {c}, H, W) images in [-1, 1] for N = {n} prompts, "
                         f"got shape {tuple(image.shape)}")
    return image.float().expand(n, -1, -1, -1) if image.shape[0] == 1 else image.float()


def image_channels(denoiser, vae) -> int | None:
    """Channels of the images: the VAE's input channels, or the network's without a VAE (None when
    it does not say)."""
    if vae is not None:
        return int(vae.config.in_channels)
    channels = getattr(net_config(denoiser), "in_channels", None)
    return None if channels is None else int(channels)


def default_size(denoiser, vae) -> tuple[int, int]:
    """The image size the model was trained at: the U-Net's ``sample_size`` times the VAE factor."""
    size = getattr(net_config(denoiser), "sample_size", None)
    if size is None:
        raise ValueError("the network records no sample_size: pass height= and width= (or latent_shape=)")
    return size * vae_factor(vae), size * vae_factor(vae)


def as_prompts(value, name: str = "prompts") -> list[str]:
    """A string or a list (tuple) of strings as a list; a ValueError naming ``name`` otherwise."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        got = type(value).__name__ if not isinstance(items, (list, tuple)) else \
            f"a list holding {sorted({type(p).__name__ for p in items if not isinstance(p, str)})}"
        raise ValueError(f"{name} must be a string or a list of strings, got {got}")
    return list(items)


def encode_prompts(text_encoder, prompts, negative_prompts=None, *, guided: bool = True, prompt_embeds=None,
                   negative_prompt_embeds=None, dtype=None, device=None) -> tuple[dict, dict | None, int]:
    """Prompts -> ``(cond, uncond, n)``: the keyword arguments of the conditional branch
    (``context`` (n, L, D) and, when the encoder returns one, ``context_mask`` (n, L) bool), those of
    the unconditional branch of classifier-free guidance (None when not ``guided``), and n.

    Prompts and negative prompts are encoded in ONE call, so a long prompt chunked into K windows
    gets negatives of K windows too. Negatives default to the empty prompt; one negative (str or a
    list of one) is used for every prompt. Precomputed ``prompt_embeds`` (n, L, D) and
    ``negative_prompt_embeds`` (n or 1, L, D) replace the encoder; they attend to every token.
    """
    if prompt_embeds is None:
        if prompts is None:
            raise ValueError("give prompts (a non-empty list of strings) or prompt_embeds")
        prompts = as_prompts(prompts)
        if not prompts:
            raise ValueError("prompts is an empty list: give at least one prompt (use '' for an unconditional image)")
        n = len(prompts)
    else:
        if prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be (N, L, D), got shape {tuple(prompt_embeds.shape)}")
        if prompts is not None:
            raise ValueError("give prompts or prompt_embeds, not both")
        n = prompt_embeds.shape[0]
    if negative_prompts is not None and negative_prompt_embeds is not None:
        raise ValueError("give negative_prompts or negative_prompt_embeds, not both")
    negatives = [""] * n if negative_prompts is None else as_prompts(negative_prompts, "negative_prompts")
    if len(negatives) == 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise ValueError(f"negative_prompts has {len(negatives)} entries for {n} prompts: give one, or one per prompt")
    if not guided or negative_prompt_embeds is not None:
        negatives = None

    to_encode = (prompts if prompt_embeds is None else []) + (negatives or [])
    hidden = mask = None
    if to_encode:
        if text_encoder is None:
            raise ValueError("prompts need a text_encoder (or pass prompt_embeds and negative_prompt_embeds)")
        hidden, _, mask = text_encoder.encode(to_encode, return_mask=True)
    if prompt_embeds is None:  # rows 0..n-1 are the prompts, the rest the negatives
        context, cmask, rest = hidden[:n], None if mask is None else mask[:n], slice(n, None)
    else:
        context, cmask, rest = prompt_embeds, None, slice(0, None)
    cond = {"context": context.to(device, dtype)}
    if not guided:
        if cmask is not None:
            cond["context_mask"] = cmask.to(device)
        return cond, None, n
    if negative_prompt_embeds is not None:
        neg, nmask = negative_prompt_embeds, None
    else:
        neg, nmask = hidden[rest], None if mask is None else mask[rest]
    if neg.ndim != 3 or neg.shape[0] not in (1, n) or neg.shape[1:] != context.shape[1:]:
        raise ValueError(f"negative prompt embeddings of shape {tuple(neg.shape)} do not match the prompt embeddings "
                         f"{tuple(context.shape)}: they need the same (L, D) (the same number of 77-token windows)")
    neg = neg.expand(n, -1, -1)
    uncond = {"context": neg.to(device, dtype)}
    if cmask is not None or nmask is not None:  # precomputed embeddings attend to every token
        full = torch.ones(context.shape[:2], dtype=torch.bool)
        cond["context_mask"] = (full if cmask is None else cmask).to(device)
        uncond["context_mask"] = (full if nmask is None else nmask.expand(n, -1)).to(device)
    return cond, uncond, n


def add_conditions(cond: dict, uncond: dict | None, added: dict | None, negative_added: dict | None, n: int, *,
                   dtype=None, device=None) -> tuple[dict, dict | None]:
    """Join extra network inputs to the prompts' conditioning: ``added`` (name -> (n or 1, ...)
    tensor) for the conditional branch, ``negative_added`` (default: ``added``) for the
    unconditional one (e.g. SDXL's pooled ``text_embeds`` and ``time_ids``). Floating tensors go
    to the network's ``dtype``; everything to ``device``."""
    if not added:
        if negative_added:
            raise ValueError("negative_added_cond given without added_cond")
        return cond, uncond
    negative_added = added if negative_added is None else negative_added
    extra = sorted(set(negative_added) - set(added))
    if extra:
        raise ValueError(f"negative_added_cond has keys {extra} that added_cond lacks ({sorted(added)})")

    def rows(d: dict, name: str) -> dict:
        out = {}
        for key, value in d.items():
            value = torch.as_tensor(value)
            if value.ndim < 1 or value.shape[0] not in (1, n):
                raise ValueError(f"{name}[{key!r}] must be a (N, ...) or (1, ...) tensor for N = {n} prompts, got shape {tuple(value.shape)}")
            value = value.to(device, dtype if value.is_floating_point() else None)
            out[key] = value.expand(n, *value.shape[1:])
        return out

    cond = {**cond, **rows(added, "added_cond")}
    if uncond is not None:
        uncond = {**uncond, **rows({**added, **negative_added}, "negative_added_cond")}
    return cond, uncond


def sampling_grid(denoiser, steps: int, grid="default", spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
    """The decreasing grid of sigmas (float64, ending in 0): ``grid`` is a name of
    :func:`difflab.core.grids.for_denoiser` or an explicit 1-D tensor of sigmas (then ``steps`` is
    ignored). ``steps_offset`` (diffusers' scheduler setting; SD uses 1 with ``spacing="leading"``)
    shifts the timesteps of a discrete model's timestep grid."""
    if not isinstance(grid, str):
        return check_sigmas(grid)
    if steps_offset:
        frame = denoiser.frame
        if not isinstance(frame, VPDiscrete) or grid not in ("default", "timesteps"):
            raise ValueError(f"steps_offset={steps_offset} applies to the timestep grid of a discrete (VPDiscrete) model only")
        return grids.timestep_sigmas(frame, grids.discrete_timesteps(frame.T, steps, spacing, steps_offset))
    return grids.for_denoiser(denoiser, steps, grid=grid, spacing=spacing)


def batch_slice(d: dict | None, start: int, b: int) -> dict | None:
    """Rows start .. start+b of every tensor in a conditioning dict."""
    return None if d is None else {k: v[start:start + b] for k, v in d.items()}


def guided(denoiser, guidance_scale: float, uncond: dict | None, guidance_rescale: float = 0.0):
    """The denoiser wrapped with classifier-free guidance when ``guidance_scale != 1``; a
    guidance-distilled student (its network takes the scale as an input) gets the scale instead."""
    if takes_guidance_scale(denoiser):
        return GuidanceInput(denoiser, guidance_scale)
    if guidance_scale == 1.0 or uncond is None:
        return denoiser
    return ClassifierFreeGuidance(denoiser, guidance_scale, uncond=uncond, guidance_rescale=guidance_rescale)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (not clamped) from the model's (scaled) latents; identity without a VAE."""
    if vae is None:
        return latents
    dtype, device = param_dtype_device(vae)
    return vae.decode_latents(latents.to(device, dtype)).to(latents.dtype)


def encode(vae, images: torch.Tensor, *, sample: bool, noise=None) -> torch.Tensor:
    """The model's latents of images in [-1, 1]: a posterior sample (drawing ``noise()``) or its mean."""
    if vae is None:
        return images
    dtype, device = param_dtype_device(vae)
    return vae.encode_latents(images.to(device, dtype), sample=sample, noise=noise if sample else None)


def to_output(images: torch.Tensor, output_type: str):
    """Convert (B, C, H, W) images in [-1, 1] to ``output_type`` (see the module docstring)."""
    if output_type == "pt":
        return images.clamp(-1, 1)
    x = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()  # diffusers' postprocess
    if output_type == "np":
        return x
    arr = (x * 255).round().astype(np.uint8)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def check_output_type(output_type: str) -> None:
    """A ValueError naming ``output_type`` when it is not one of :data:`OUTPUT_TYPES`."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is unknown; choose one of {list(OUTPUT_TYPES)}")


def run_batches(n: int, batch_size: int, seed: int, shape, sample_batch, *, device, dtype, desc: str, progress: bool):
    """Call ``sample_batch(start, b, noise)`` for batches of at most ``batch_size`` of the n samples,
    with ``noise`` the per-sample :class:`SampleNoise` of samples start .. start+b-1 (shaped
    ``shape`` per sample); concatenate the results on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    out = []
    bar = progress_bar(n, desc=desc, unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = SampleNoise.for_run(seed, b, shape, start=start, device=device, dtype=dtype)
        out.append(sample_batch(start, b, noise).cpu())
        bar.update(b)
    bar.close()
    return torch.cat(out)


def finish(samples: torch.Tensor, vae, output_type: str, batch_size: int, paste=None):
    """Decode the samples batch by batch, apply ``paste(images, start)`` (known pixels put back) and
    convert to ``output_type``."""
    if output_type == "latent":
        return samples
    images = []
    for start in range(0, len(samples), batch_size):
        x = decode(vae, samples[start:start + batch_size]).cpu().clamp(-1, 1)
        images.append(x if paste is None else paste(x, start))
    return to_output(torch.cat(images), output_type)


def sample_device(denoiser, opts: SampleOptions) -> tuple[torch.dtype, torch.device]:
    """(the network's dtype, the device to sample on): ``opts.device``, or the network's."""
    net_dtype, device = param_dtype_device(denoiser)
    return net_dtype, device if opts.device is None else torch.device(opts.device)


def encode_request(denoiser, text_encoder, prompts, negative_prompts, opts: SampleOptions, *, prompt_embeds=None,
                   negative_prompt_embeds=None) -> tuple[dict, dict | None, int]:
    """The prompt stage of every text pipeline: :func:`encode_prompts` at the network's dtype and
    device, with the unconditional branch only when ``opts.guidance_scale != 1``."""
    net_dtype, device = sample_device(denoiser, opts)
    return encode_prompts(text_encoder, prompts, negative_prompts, guided=opts.guidance_scale != 1.0,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          dtype=net_dtype, device=device)


def denoise(denoiser, x: torch.Tensor, sigmas, opts: SampleOptions, noise, cond: dict | None = None,
            uncond: dict | None = None, sampler=None) -> torch.Tensor:
    """The sampling stage of every pipeline: wrap the denoiser with classifier-free guidance (Ho &
    Salimans 2022, eq. 6; the unconditional branch sees ``uncond``) and run ``opts.sampler`` (or
    ``sampler``, e.g. a RePaint wrapper) from ``x`` over ``sigmas``, drawing from ``noise``."""
    model = guided(denoiser, opts.guidance_scale, uncond, opts.guidance_rescale)
    sample = get_sampler(opts.sampler) if sampler is None else sampler
    kwargs = dict(opts.sampler_kwargs)
    user_callback = kwargs.pop("callback", None)

    def callback(info):
        stop_if_not_finite(info)
        if user_callback is not None:
            user_callback(info)

    return sample(model, x, sigmas, noise=noise, extra_args=cond, callback=callback, **kwargs)


class NonFiniteSampleError(ValueError):
    """The network's output stopped being finite while sampling."""


def stop_if_not_finite(info: dict) -> None:
    """A sampler callback that stops sampling when the denoised estimate holds a NaN or an
    infinity, naming the step and its sigma (a damaged network gives black images otherwise)."""
    if not bool(torch.isfinite(info["denoised"]).all()):
        raise NonFiniteSampleError(f"the network's output is not finite at sampling step {info['i']} "
                                   f"(sigma={info['sigma']:.4g}); the weights or the inputs are damaged")


def run_options(n: int, shape, sample_batch, opts: SampleOptions, *, device, desc: str) -> torch.Tensor:
    """:func:`run_batches` with the batch size, seed, dtype and progress of ``opts``."""
    return run_batches(n, opts.batch_size, opts.seed, shape, sample_batch, device=device, dtype=opts.dtype,
                       desc=desc, progress=opts.progress)
