"""Memory plans of today's model families at their real sizes, with no weights: SDXL, SD3, Flux.

Every network of a family (denoiser, text encoders, autoencoder) is built on the meta device, so
parameters are counted exactly without allocating them, and one denoising step and one VAE decode
are *run* on the meta device under a dispatch mode that follows every tensor the call creates until
it is freed (:class:`MetaPeak`): the peak bytes alive at once, from shapes and dtypes alone.
Attention is counted as a fused kernel (FlashAttention, Dao et al. 2022): its output only, never
the N x N score matrix, as PyTorch's SDPA runs on a GPU.

:func:`family_plan` sums that into the peak of a text-to-image call under four placements,
cheapest to slowest (Rajbhandari et al. 2021, "ZeRO-Infinity", for the offload idea):

- ``gpu``: every component resident; peak = all weights + the larger of a step and a decode;
- ``model offload``: each component moved to the GPU only while it runs
  (:func:`difflab.perf.memory.offload` on each); peak = the largest (weights + work) of one component;
- ``model offload + VAE tiling``: the same, the decode in tiles (``vae.decode(z, tiled=True)``);
- ``sequential offload + VAE tiling``: the denoiser's blocks too (:func:`difflab.perf.memory.offload_blocks`;
  diffusers' ``enable_sequential_cpu_offload``): its resident weights are its non-block layers and one block.

:func:`suggest` picks the first that fits a GPU, leaving 10% of it for the CUDA context and the
allocator's fragmentation.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..nn.flux import FluxConfig, FluxTransformer
from ..nn.mmdit import PRESETS as MMDIT_PRESETS
from ..nn.mmdit import MMDiT
from ..nn.text import CLIPTextEncoder, CLIPTextEncoderConfig
from ..nn.unet_sd import PRESETS as SD_PRESETS
from ..nn.unet_sd import UNetSD
from ..nn.vae import AutoencoderKL, VAEConfig
from .runtime import blocks, dtype_of

GIB = 2**30
HEADROOM = 0.9  # the fraction of a GPU a plan may fill

# the text towers, as published: CLIP ViT-L/14 (123 M), OpenCLIP ViT-bigG/14 with projection (695 M)
CLIP_L = CLIPTextEncoderConfig()
CLIP_L_PROJECTED = CLIPTextEncoderConfig(projection_dim=768)
CLIP_G = CLIPTextEncoderConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               hidden_act="gelu", projection_dim=1280)
# T5 v1.1 XXL's encoder (4.76 B), as SD3 and Flux ship it
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# the autoencoders: SD's 4-channel one (SDXL), the 16-channel one of SD3 and Flux (no quant convs)
VAE_4 = VAEConfig(scaling_factor=0.13025)
VAE_16 = VAEConfig(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                   shift_factor=0.0609)


@dataclass(frozen=True)
class Family:
    """One preset: how to build its denoiser, its text encoders and VAE, and its default call."""

    name: str
    denoiser: callable  # () -> nn.Module
    text: tuple  # (name, () -> nn.Module) per text encoder
    vae: VAEConfig
    resolution: int = 1024  # default image size (pixels)
    cfg: bool = True  # classifier-free guidance runs the denoiser on 2 x the images (Flux dev/schnell: no)
    text_tokens: int = 77  # tokens of the denoiser's text context
    published: float = 0.0  # the denoiser's published parameter count


def _t5() -> nn.Module:
    import transformers  # noqa: PLC0415  (optional third-party package, as where T5 is loaded)
    return transformers.T5EncoderModel(transformers.T5Config(**T5_XXL))


FAMILIES = {
    "sdxl": Family("sdxl", lambda: UNetSD(SD_PRESETS["sdxl"]),
                   (("CLIP ViT-L", lambda: CLIPTextEncoder(CLIP_L)), ("OpenCLIP ViT-bigG", lambda: CLIPTextEncoder(CLIP_G))),
                   VAE_4, published=2.567e9),
    "sd3": Family("sd3", lambda: MMDiT(MMDIT_PRESETS["sd3_medium"]),
                  (("CLIP-L", lambda: CLIPTextEncoder(CLIP_L_PROJECTED)), ("CLIP-G", lambda: CLIPTextEncoder(CLIP_G)),
                   ("T5-XXL", _t5)), VAE_16, text_tokens=77 + 256, published=2.028e9),
    "sd3.5-large": Family("sd3.5-large", lambda: MMDiT(MMDIT_PRESETS["sd35_large"]),
                          (("CLIP-L", lambda: CLIPTextEncoder(CLIP_L_PROJECTED)), ("CLIP-G", lambda: CLIPTextEncoder(CLIP_G)),
                           ("T5-XXL", _t5)), VAE_16, text_tokens=77 + 256, published=8.1e9),
    "flux-dev": Family("flux-dev", lambda: FluxTransformer(FluxConfig(guidance_embeds=True)),
                       (("CLIP-L", lambda: CLIPTextEncoder(CLIP_L)), ("T5-XXL", _t5)), VAE_16, cfg=False, text_tokens=512,
                       published=11.9e9),
    "flux-schnell": Family("flux-schnell", lambda: FluxTransformer(FluxConfig()),
                           (("CLIP-L", lambda: CLIPTextEncoder(CLIP_L)), ("T5-XXL", _t5)), VAE_16, cfg=False, text_tokens=256,
                           published=11.9e9),
}
ALIASES = {"flux": "flux-dev", "sd3-medium": "sd3", "sd3.5": "sd3.5-large"}


def family(name: str) -> Family:
    """The :data:`FAMILIES` entry named ``name`` (or an alias: flux, sd3-medium, sd3.5); a ValueError listing them otherwise."""
    key = ALIASES.get(name, name)
    if key not in FAMILIES:
        raise ValueError(f"unknown family preset {name!r}; choose one of {sorted(FAMILIES) + sorted(ALIASES)}")
    return FAMILIES[key]


def on_meta(build) -> nn.Module:
    """``build()`` on the meta device: shapes and dtypes, no storage."""
    with torch.device("meta"):
        return build()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Live bytes on the meta device


class _FusedAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention as a fused kernel allocates it: the output, no score matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2] if len(args) > 2 else kwargs["value"]
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **kwargs)


class MetaPeak(TorchDispatchMode):
    """The peak bytes of the tensors created inside the mode that are alive at once, on any device
    (the meta device included): a tensor's bytes count from the op that creates it until its last
    reference (views and in-place results share their base's bytes) is freed."""

    def __init__(self):
        super().__init__()
        self.owner, self.refs, self.size, self.live, self.peak = {}, {}, {}, 0, 0

    def _hold(self, t, alloc):
        self.refs[alloc] += 1
        self.owner[id(t)] = alloc
        weakref.finalize(t, self._release, id(t), alloc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        base = next((self.owner.get(id(a)) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)), None)
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if aliases:  # a view or an in-place result: the bytes of the input it aliases
                if base is not None:
                    self._hold(t, base)
                continue
            alloc = object()
            self.refs[alloc], self.size[alloc] = 0, t.numel() * t.element_size()
            self.live += self.size[alloc]
            self.peak = max(self.peak, self.live)
            self._hold(t, alloc)
        return out

    def _release(self, key, alloc):
        if self.owner.get(key) is alloc:
            del self.owner[key]
        self.refs[alloc] -= 1
        if not self.refs[alloc]:
            self.live -= self.size.pop(alloc)
            del self.refs[alloc]


def peak_bytes(fn, *args, **kwargs) -> int:
    """The peak bytes :class:`MetaPeak` sees during ``fn(*args, **kwargs)`` under no_grad with fused attention."""
    with torch.no_grad(), _FusedAttention(), MetaPeak() as mode:
        out = fn(*args, **kwargs)
        del out
    return mode.peak


# ----------------------------------------------------------------------------------------------
# One step, one decode


def step_inputs(net: nn.Module, batch: int, latent: int, text_tokens: int, dtype) -> tuple:
    """``(x, t, cond)`` for one denoiser call on the meta device: latents (batch, C, latent, latent), the text context."""
    meta = dict(device="meta", dtype=dtype)
    c = net.config
    if isinstance(net, UNetSD):
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        cond = dict(context=torch.empty(batch, text_tokens, c.cross_attention_dim, **meta),
                    text_embeds=torch.empty(batch, pooled, **meta), time_ids=torch.empty(batch, 6, **meta))
        return torch.empty(batch, c.in_channels, latent, latent, **meta), torch.empty(batch, device="meta"), cond
    if isinstance(net, MMDiT):
        cond = dict(context=torch.empty(batch, text_tokens, c.joint_attention_dim, **meta),
                    pooled=torch.empty(batch, c.pooled_projection_dim, **meta))
        return torch.empty(batch, c.in_channels, latent, latent, **meta), torch.empty(batch, device="meta"), cond
    if isinstance(net, FluxTransformer):
        cond = dict(context=torch.empty(batch, text_tokens, c.joint_attention_dim, **meta),
                    pooled=torch.empty(batch, c.pooled_projection_dim, **meta))
        if c.guidance_embeds:
            cond["guidance_scale"] = 3.5
        return torch.empty(batch, c.in_channels // 4, latent, latent, **meta), torch.empty(batch, device="meta"), cond
    raise TypeError(f"no step inputs for {type(net).__name__}")


def step_activations(net: nn.Module, batch: int, latent: int, text_tokens: int) -> int:
    """Peak bytes alive at once during one call of ``net`` (weights and inputs excluded), on the meta device."""
    x, t, cond = step_inputs(net, batch, latent, text_tokens, next(net.parameters()).dtype)
    return peak_bytes(net, x, t, **cond)


def decode_activations(vae: AutoencoderKL, batch: int, latent: int, *, tiled: bool = False) -> int:
    """Peak bytes alive at once during one ``vae.decode`` of (batch, C, latent, latent) latents (its output included)."""
    z = torch.empty(batch, vae.config.latent_channels, latent, latent, device="meta", dtype=next(vae.parameters()).dtype)
    return peak_bytes(lambda: vae.decode(z, tiled=tiled))


# ----------------------------------------------------------------------------------------------
# The plan


def family_plan(name: str, *, precision: str = "fp16", images: int = 1, resolution: int | None = None) -> dict:
    """Parameters and predicted peak bytes of a text-to-image call of family ``name`` at real size.

    Returns ``dict(family, precision, resolution, images, parameters={component: count}, weights={component: bytes},
    step=bytes, decode=bytes, decode_tiled=bytes, largest_block=bytes, plans={placement: peak bytes})``:
    one denoiser step on ``images`` images (twice as many under classifier-free guidance) at
    ``resolution`` pixels (default the family's), weights in ``precision``.
    """
    fam, dtype = family(name), dtype_of(precision)
    resolution = resolution or fam.resolution
    if resolution % 16 or resolution < 16:
        raise ValueError(f"resolution={resolution} must be a positive multiple of 16 (the VAE's 8 x the 2x2 patches)")
    latent, batch = resolution // 8, images * (2 if fam.cfg else 1)
    net = on_meta(fam.denoiser).to(dtype).eval()
    vae = on_meta(lambda: AutoencoderKL(fam.vae)).to(dtype).eval()
    texts = {n: on_meta(b) for n, b in fam.text}
    params = {"denoiser": count_parameters(net), **{n: count_parameters(m) for n, m in texts.items()}, "vae": count_parameters(vae)}
    weights = {k: n * dtype.itemsize for k, n in params.items()}
    step = step_activations(net, batch, latent, fam.text_tokens)
    decode, tiled = (decode_activations(vae, images, latent, tiled=t) for t in (False, True))
    block_bytes = [count_parameters(m) * dtype.itemsize for m in denoiser_blocks(net)]
    resident = weights["denoiser"] - sum(block_bytes)  # embeddings, final layers: not inside a block
    text_max = max(weights[n] for n in texts)
    plans = {
        "gpu": sum(weights.values()) + max(step, decode),
        "model offload": max(text_max, weights["denoiser"] + step, weights["vae"] + decode),
        "model offload + VAE tiling": max(text_max, weights["denoiser"] + step, weights["vae"] + tiled),
        "sequential offload + VAE tiling": max(resident + max(block_bytes) + step, weights["vae"] + tiled,
                                               max(_largest_layer(m) for m in texts.values()) * dtype.itemsize),
    }
    return dict(family=fam.name, precision=precision, resolution=resolution, images=images, parameters=params,
                weights=weights, step=step, decode=decode, decode_tiled=tiled, largest_block=max(block_bytes), plans=plans)


def denoiser_blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks sequential offload moves one at a time: difflab's checkpointable blocks (U-Net,
    MMDiT), else the entries of the network's own ModuleLists (Flux's double and single blocks)."""
    found = [m for _, m in blocks(net)]
    return found or [m for child in net.children() if isinstance(child, nn.ModuleList) for m in child]


def _largest_layer(module: nn.Module) -> int:
    """Parameters of the largest repeated layer of a text encoder (an nn.ModuleList entry)."""
    sizes = [count_parameters(m) for lst in module.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    return max(sizes) if sizes else count_parameters(module)


def suggest(plan: dict, gpu_gb: float) -> tuple[str | None, float]:
    """``(placement, peak GiB)``: the first placement of ``plan`` whose peak fits in ``HEADROOM`` of a
    ``gpu_gb`` GiB GPU, or ``(None, the smallest peak)`` when none does."""
    if not gpu_gb > 0:
        raise ValueError(f"gpu_gb={gpu_gb} must be a positive number of GiB")
    for placement, peak in plan["plans"].items():
        if peak <= HEADROOM * gpu_gb * GIB:
            return placement, peak / GIB
    return None, min(plan["plans"].values()) / GIB


HOW = {
    "gpu": "everything on the GPU",
    "model offload": "offload each component: difflab.perf.memory.offload(text_encoder / vae, 'cuda'), the denoiser on the GPU",
    "model offload + VAE tiling": "offload each component and decode in tiles: vae.decode(z, tiled=True)",
    "sequential offload + VAE tiling": "offload the denoiser block by block (difflab.perf.memory.offload_blocks(net, "
                                       "'cuda', difflab.perf.families.denoiser_blocks(net))), the other components too, and "
                                       "decode in tiles; slow: every step reads the weights over PCIe",
}


def format_plan(plan: dict, gpu_gb: float | None = None) -> str:
    """The plan as a table; with ``gpu_gb``, the placement to use on that GPU."""
    g = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    lines = [f"{plan['family']}: {plan['images']} image(s) at {plan['resolution']}x{plan['resolution']}, weights in {plan['precision']}"]
    for k, n in plan["parameters"].items():
        lines.append(f"  {k:<34} {n / 1e9:7.3f} B params  {g(plan['weights'][k])}")
    lines.append(f"  {'one denoiser step (activations)':<34} {'':17}{g(plan['step'])}")
    lines.append(f"  {'VAE decode / tiled (activations)':<34} {'':17}{g(plan['decode'])} / {plan['decode_tiled'] / GIB:.2f} GiB")
    lines.append("  predicted peak by placement:")
    for k, peak in plan["plans"].items():
        lines.append(f"    {k:<32} {g(peak)}")
    if gpu_gb is not None:
        placement, peak = suggest(plan, gpu_gb)
        if placement is None:
            lines.append(f"  a {gpu_gb:g} GiB GPU is too small for every placement (the smallest needs {peak:.2f} GiB); "
                         "try fewer images, a lower resolution or another precision")
        else:
            lines.append(f"  on a {gpu_gb:g} GiB GPU: {placement} ({peak:.2f} GiB): {HOW[placement]}")
    return "\n".join(lines)


__all__ = ["FAMILIES", "ALIASES", "Family", "family", "on_meta", "count_parameters", "MetaPeak", "peak_bytes",
           "step_inputs", "step_activations", "decode_activations", "denoiser_blocks", "family_plan", "suggest", "format_plan", "HOW",
           "HEADROOM", "GIB"]
