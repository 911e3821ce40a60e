"""Editing a real image by DDIM inversion (Song et al. 2021, Section 5.4; Mokady et al. 2023):
invert it under its source prompt to the noise that regenerates it, then sample from that noise
under an edited prompt. Optional null-text optimization (Mokady et al. 2023, Algorithm 1) makes
the *guided* sampling retrace the inversion, so guidance no longer drifts away from the image.

Usage::

    inv = invert(denoiser, text_encoder, vae, image, ["a cat on a bench"], steps=50, null_text=True)
    edited = edit(denoiser, text_encoder, vae, inv, ["a dog on a bench"])
    same, psnr = reconstruct(denoiser, text_encoder, vae, image, ["a cat on a bench"], null_text=True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..progress import progress_range
from ..guidance import ClassifierFreeGuidance
from ..samplers import invert_ddim, sample_ddim
from ..samplers.euler import euler_step
from .common import (as_images, check_output_type, check_size, encode, encode_prompts, finish, guided, image_channels,
                     sample_device, sampling_grid)
from .options import SampleOptions, resolve

# invert's defaults: null-text optimization for guidance 7.5, quiet.
INVERT_DEFAULTS = SampleOptions(guidance_scale=7.5, progress=False)


@dataclass
class Inversion:
    """What :func:`invert` found. ``trajectory[i]`` is the latent at ``sigmas[i]`` (sampling order:
    ``trajectory[0]`` is the inverted noise, ``trajectory[-1]`` the image's latents); ``cond`` the
    source prompt's conditioning and ``uncond`` the empty prompt's; ``null_embeddings`` one optimized
    unconditional ``context`` per step (None without null-text optimization), for ``guidance_scale``."""

    trajectory: list
    sigmas: torch.Tensor
    cond: dict
    uncond: dict
    guidance_scale: float = 1.0
    null_embeddings: list | None = None

    @property
    def latents(self) -> torch.Tensor:
        return self.trajectory[0]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE) in dB (images in [-1, 1]:
    data_range 2, the same number as for [0, 1] images with range 1)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def null_text_optimization(denoiser, inversion: Inversion, guidance_scale: float = 7.5, *, inner_steps: int = 10,
                           lr: float = 1e-2, early_stop: float = 1e-5, progress: bool = False) -> list:
    """Null-text optimization (Mokady et al. 2023, Algorithm 1): per step t, starting from the
    pivot z̄_T = z*_T and the empty prompt's embedding ∅, take ``inner_steps`` Adam steps on

        min_∅ || z*_{t-1} - z_{t-1}(z̄_t, ∅, C) ||^2

    where z_{t-1}(z̄_t, ∅, C) is the DDIM step with classifier-free guidance ``guidance_scale``
    (source prompt C, unconditional embedding ∅), then set z̄_{t-1} = z_{t-1}(z̄_t, ∅_t, C) and
    start the next step from ∅_t. As in the paper's code the learning rate decays as
    ``lr * (1 - i / (2 n))`` (their 1 - i/100 at n = 50 steps) and a step stops early when the
    loss falls below ``early_stop + 2e-5 i``; the loss is measured at the network's input scale
    (the VP frame's z, as the paper). Returns the n optimized embeddings ∅_t, in sampling order.

    The unconditional branch attends to every token of ∅ (a masked encoder's all-False mask for
    the empty prompt would give ∅ no effect to optimize).
    """
    sigmas, traj = inversion.sigmas.tolist(), inversion.trajectory
    null = inversion.uncond["context"].detach().clone()
    uncond_mask = None if "context_mask" not in inversion.uncond else torch.ones_like(inversion.uncond["context_mask"])
    cond = inversion.cond
    n = len(sigmas) - 1
    x = traj[0]
    s_in = x.new_ones(x.shape[0])
    nulls = []

    def step(x, sigma, sigma_next, null):
        uncond = {"context": null} if uncond_mask is None else {"context": null, "context_mask": uncond_mask}
        model = ClassifierFreeGuidance(denoiser, guidance_scale, uncond=uncond)
        return euler_step(x, sigma, sigma_next, model(x, sigma * s_in, **cond))  # the DDIM (eta = 0) step

    for i in progress_range(n, disable=not progress, desc="null-text optimization"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        scale = float(denoiser.frame.scale(torch.tensor(sigma_next, dtype=torch.float64)))  # network input scale
        null = null.detach().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=lr * (1 - i / (2 * n)))
        for _ in range(inner_steps):
            with torch.enable_grad():
                loss = ((step(x, sigma, sigma_next, null) - traj[i + 1]) * scale).pow(2).mean()
                (grad,) = torch.autograd.grad(loss, [null])
            null.grad = grad
            opt.step()
            if loss.item() < early_stop + 2e-5 * i:
                break
        null = null.detach()
        nulls.append(null)
        with torch.no_grad():
            x = step(x, sigma, sigma_next, null)
    return nulls


def ddim_options(options, defaults: SampleOptions, overrides: dict, what: str) -> SampleOptions:
    """The options of a DDIM-only stage (inversion, editing): any sampler but ``"ddim"`` and any
    sampler keyword are refused, naming them."""
    opts = resolve(options, defaults, overrides)
    if opts.sampler != "ddim" or opts.sampler_kwargs:
        extra = f" and keywords {sorted(opts.sampler_kwargs)}" if opts.sampler_kwargs else ""
        raise ValueError(f"{what} runs DDIM (eta = 0): sampler={opts.sampler!r}{extra} do(es) not apply")
    return opts


@torch.no_grad()
def invert(denoiser, text_encoder, vae, image, prompts, *, null_text: bool = False, inner_steps: int = 10,
           lr: float = 1e-2, early_stop: float = 1e-5, sample_posterior: bool = False,
           options: SampleOptions | None = None, **overrides) -> Inversion:
    """DDIM inversion of real images under their source ``prompts`` (Song et al. 2021, Section 5.4;
    Mokady et al. 2023, Section 3).

    Encodes ``image`` (N or 1, C, H, W in [-1, 1]; the VAE posterior's mean, or with
    ``sample_posterior`` a sample drawn from torch's global generator), then runs
    :func:`difflab.samplers.invert_ddim` with guidance 1 (the conditional model alone), keeping the
    whole trajectory. With ``null_text``, also runs :func:`null_text_optimization` for sampling at
    ``guidance_scale``. ``options`` (:class:`~difflab.pipelines.options.SampleOptions`, default
    guidance 7.5 and no progress bar) or keyword overrides give ``steps``, ``grid``, ``spacing``,
    ``steps_offset``, ``guidance_scale``, ``dtype`` and ``progress``.
    """
    # 1. Check inputs.
    opts = ddim_options(options, INVERT_DEFAULTS, overrides, "invert")
    net_dtype, device = sample_device(denoiser, opts)
    # 2. Encode the source prompts and the empty prompt (one call).
    cond, uncond, n = encode_prompts(text_encoder, prompts, None, guided=True, dtype=net_dtype, device=device)
    images = as_images(image, n, image_channels(denoiser, vae))
    check_size(denoiser, vae, *images.shape[2:], names=("image height", "image width"))
    # 3. Build the grid.
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset)
    # 4. Encode the images.
    z = encode(vae, images, sample=sample_posterior).to(device, opts.dtype)
    # 5. Invert with guidance 1, keeping every level.
    rising = [z]
    invert_ddim(denoiser, z, sigmas, extra_args=cond, callback=lambda info: rising.append(info["x"]), progress=opts.progress)
    inversion = Inversion(trajectory=rising[::-1], sigmas=sigmas, cond=cond, uncond=uncond)
    # 6. Optionally optimize the null text for guided sampling.
    if null_text:
        inversion.null_embeddings = null_text_optimization(denoiser, inversion, opts.guidance_scale, inner_steps=inner_steps,
                                                           lr=lr, early_stop=early_stop, progress=opts.progress)
        inversion.guidance_scale = opts.guidance_scale
    return inversion


@torch.no_grad()
def edit(denoiser, text_encoder, vae, inversion: Inversion, prompts, *, output_type: str = "pil",
         options: SampleOptions | None = None, **overrides):
    """Sample from ``inversion``'s noise under edited ``prompts`` with DDIM (eta = 0) and
    classifier-free guidance ``guidance_scale`` (an override or ``options``'; default: the
    inversion's, 1 without null-text). The unconditional branch uses the optimized null embeddings
    of each step when the inversion has them (Mokady et al. 2023, Section 3.2), the empty prompt
    otherwise. The same prompts as the inversion reconstruct the image. Returns images as
    ``output_type``."""
    # 1. Check inputs.
    check_output_type(output_type)
    if overrides.get("guidance_scale", 0) is None:
        del overrides["guidance_scale"]
    opts = ddim_options(options, SampleOptions(guidance_scale=inversion.guidance_scale, progress=False), overrides, "edit")
    scale, progress = float(opts.guidance_scale), opts.progress
    net_dtype, device = sample_device(denoiser, opts)
    # 2. Encode the edited prompts.
    cond, _, n = encode_prompts(text_encoder, prompts, None, guided=False, dtype=net_dtype, device=device)
    x = inversion.latents
    if n != x.shape[0]:
        raise ValueError(f"{n} prompts for an inversion of {x.shape[0]} images")
    if cond["context"].shape[1:] != inversion.uncond["context"].shape[1:]:
        raise ValueError(f"the edited prompts encode to {tuple(cond['context'].shape[1:])} but the inversion's null text to "
                         f"{tuple(inversion.uncond['context'].shape[1:])}: keep them within the same number of 77-token windows")
    if "context_mask" in inversion.uncond and "context_mask" not in cond:
        cond["context_mask"] = torch.ones(cond["context"].shape[:2], dtype=torch.bool, device=device)
    # 3. Sample from the inverted noise: one DDIM step per null embedding, or one call.
    sigmas, nulls = inversion.sigmas, inversion.null_embeddings
    if nulls is None:
        x = sample_ddim(guided(denoiser, scale, inversion.uncond), x, sigmas, extra_args=cond, progress=progress)
    else:
        mask = {}
        if "context_mask" in inversion.uncond:  # as in null_text_optimization: every null token attended to
            mask = {"context_mask": torch.ones_like(inversion.uncond["context_mask"])}
        for i in progress_range(len(sigmas) - 1, disable=not progress):
            x = sample_ddim(guided(denoiser, scale, {"context": nulls[i], **mask}), x, sigmas[i:i + 2], extra_args=cond)
    # 4. Decode and convert.
    return finish(x.cpu(), vae, output_type, batch_size=len(x))


@torch.no_grad()
def reconstruct(denoiser, text_encoder, vae, image, prompts, *, null_text: bool = False, output_type: str = "pt",
                options: SampleOptions | None = None, **kwargs):
    """Invert ``image`` under ``prompts`` and sample back under the same prompts at
    ``guidance_scale`` (default 1; with null-text optimization when asked): ``(images, psnr)``
    with the PSNR (dB, per image, :func:`psnr`) of the reconstruction against the input in pixel
    space. Through a VAE it includes the autoencoder's own reconstruction error. Keywords are
    options (``steps=``, ``guidance_scale=``, ...) or :func:`invert`'s (``inner_steps=``, ...)."""
    fields = SampleOptions.fields()
    opts = ddim_options(options, SampleOptions(guidance_scale=1.0, progress=False),
                        {k: v for k, v in kwargs.items() if k in fields}, "reconstruct")
    invert_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
    inversion = invert(denoiser, text_encoder, vae, image, prompts, null_text=null_text and opts.guidance_scale != 1.0,
                       options=opts, **invert_kwargs)
    out = edit(denoiser, text_encoder, vae, inversion, prompts, output_type="pt", options=opts)
    images = as_images(image, len(out))
    quality = psnr(out, images.clamp(-1, 1))
    return (out if output_type == "pt" else finish(out, None, output_type, len(out))), quality


__all__ = ["Inversion", "invert", "edit", "reconstruct", "null_text_optimization", "psnr"]
