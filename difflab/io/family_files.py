"""Single-file SDXL, SD3 and Flux checkpoints (``.safetensors``) in their original layouts, difflab components out.

=========  ========================================================================================
SDXL       the sgm layout (Podell et al. 2023): ``model.diffusion_model.*`` (U-Net,
           :mod:`difflab.io.keymaps.unet_sd`, with ``label_emb``), ``conditioner.embedders.0.transformer.*``
           (CLIP ViT-L, transformers layout) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG,
           all blocks and its ``text_projection``; the refiner has bigG alone as ``embedders.0``),
           ``first_stage_model.*`` (the autoencoder, scaling 0.13025)
SD3        Stability's layout: ``model.diffusion_model.*`` (MMDiT, :mod:`difflab.io.keymaps.mmdit`),
           ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`` (transformers layouts; each optional),
           ``first_stage_model.*`` (16-channel autoencoder, shift 0.0609, scaling 1.5305)
Flux       Black Forest Labs' layout: the transformer alone (:mod:`difflab.io.keymaps.flux`, fused
           q/k/v split on load), with no prefix or under ``model.diffusion_model.``
=========  ========================================================================================

A single file records no config: each network's shape is read from its tensors, except what no
shape shows (attention head widths: 64 in SDXL's U-Net and CLIPs and SD3's MMDiT, 128 in Flux;
GroupNorm groups: 32; Flux's RoPE axes (16, 56, 56)), which keyword arguments override. A single
file holds no tokenizer and no scheduler settings: ``base``, a diffusers folder of the same family
(any size: only its tokenizers and scheduler are read), supplies them, and for Flux also the text
encoders and the autoencoder a transformer-only file lacks. Without ``base`` the text encoders take
token ids only, and the family's published defaults hold. Only ``.safetensors`` files are opened.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..core import Denoiser
from ..nn.flux import FluxConfig, FluxTransformer
from ..nn.mmdit import MMDiT, MMDiTConfig
from ..nn.sd3_text import SD3TextEncoder
from ..nn.text import CLIPTextEncoder, load_clip_tokenizer
from ..nn.text_dual import DualCLIPTextEncoder
from ..nn.unet_sd import UNetSD
from .checkpoint import strip_prefix
from .diffusers_folder import MODEL_INDEX, SCHEDULER_CONFIG, diffusion_from_scheduler_config, make_denoiser
from .diffusers_vae import load_sd_vae_from_single_file, sd_single_file_state
from .flux_folder import COMPONENTS as FLUX_COMPONENTS
from .flux_folder import FluxComponents, flux_denoiser, load_flux_folder, load_t5_tokenizer
from .folders import load_into, read_json, write_tensors
from .keymaps import from_difflab, join_fused, rename_key, split_fused, to_difflab
from .keymaps import flux as flux_keys
from .keymaps import mmdit as mmdit_keys
from .keymaps.clip_text import (SD3_CLIP_G_PREFIX, SD3_CLIP_L_PREFIX, SD3_T5_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX,
                                SDXL_REFINER_CLIP_G_PREFIX, OPEN_CLIP_PROJECTION, difflab_to_open_clip, difflab_to_transformers,
                                open_clip_num_blocks, open_clip_projection, open_clip_to_difflab, transformers_to_difflab)
from .keymaps.unet_sd import ORIGINAL_PREFIX, original_table
from .sd3_folder import SD3Components, diffusion_from_flow_scheduler
from .sdxl_folder import SDXLComponents
from .single_file import infer_clip_text_config, infer_unet_config
from .spec import build_frame

VAE_PREFIX = "first_stage_model."
SDXL_VAE = {"scaling_factor": 0.13025}
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FAMILIES = ("sdxl", "sd3", "flux")
# one tensor that only each family's original layout has (after any model.diffusion_model. prefix)
_MARKERS = {"sd3": re.compile(r"^(model\.diffusion_model\.)?joint_blocks\.0\.x_block\."),
            "flux": re.compile(r"^(model\.diffusion_model\.)?double_blocks\.0\.img_attn\."),
            "sdxl": re.compile(r"^model\.diffusion_model\.label_emb\.0\.0\.")}


# ----------------------------------------------------------------------------------------------
# Which family


def file_keys(path) -> list[str]:
    """The tensor names of a ``.safetensors`` file, read from its header (no tensor is loaded)."""
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def single_file_family(path) -> str | None:
    """``"sdxl"``, ``"sd3"`` or ``"flux"`` for a single-file checkpoint in that family's original
    layout (read from the tensor names alone), None for any other file or path."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        keys = file_keys(path)
    except Exception:  # not a safetensors file: not ours to judge here
        return None
    for family, marker in _MARKERS.items():
        if any(marker.match(k) for k in keys):
            return family
    return None


def _read(path, family: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors single files are read (pickled .ckpt files are never opened)")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    found = single_file_family(path)
    if found != family:
        raise ValueError(f"{path} is not a single-file {family} checkpoint in the original layout "
                         f"({'it looks like ' + found if found else 'no tensor names of ' + ', '.join(FAMILIES)})")
    return load_file(str(path))


def _finish(models, dtype, device):
    return [None if m is None else (m.to(device, dtype) if dtype is not None else m.to(device)).eval() for m in models]


def _base_index(base) -> tuple[Path, dict] | tuple[None, None]:
    if base is None:
        return None, None
    root = Path(base)
    return root, read_json(root / MODEL_INDEX, "a diffusers pipeline folder (base=)")


def _tokenizer(root, index, name, load=load_clip_tokenizer):
    if root is None or not (index.get(name) or [None])[0]:
        return None
    return load(root / name)


# ----------------------------------------------------------------------------------------------
# CLIP text encoders in a single file


def _clip_from_transformers(tensors, prefix, *, config=None, tokenizer=None, **kw) -> CLIPTextEncoder | None:
    """A CLIPTextEncoder from transformers-layout tensors under ``prefix`` (None when absent); a
    missing ``text_projection`` with ``projection=True`` is the identity (SD3's CLIP-L, as diffusers does)."""
    projection, act = kw.pop("projection", False), kw.pop("hidden_act", "quick_gelu")
    state = transformers_to_difflab(strip_prefix(tensors, prefix))
    if not state:
        return None
    config = config or infer_clip_text_config(state, hidden_act=act)
    if projection and "text_projection.weight" not in state:
        state["text_projection.weight"] = torch.eye(config.hidden_size)
    if "text_projection.weight" in state:
        config = dataclasses.replace(config, projection_dim=int(state["text_projection.weight"].shape[0]))
    encoder = CLIPTextEncoder(config, tokenizer=tokenizer, **kw)
    load_into(encoder, state, f"CLIP text encoder under {prefix!r}",
              lambda k: prefix + (k if k.startswith("text_projection.") else "text_model." + k))
    return encoder


def _clip_from_open_clip(tensors, prefix, *, config=None, tokenizer=None, **kw) -> CLIPTextEncoder | None:
    """SDXL's OpenCLIP ViT-bigG (all blocks, projected pooled vector) from OpenCLIP-layout tensors under ``prefix``."""
    raw = strip_prefix(tensors, prefix)
    if not raw:
        return None
    state = {**open_clip_to_difflab(raw, num_layers=open_clip_num_blocks(raw)), **open_clip_projection(raw)}
    config = config or infer_clip_text_config(state, hidden_act="gelu")
    if "text_projection.weight" in state:
        config = dataclasses.replace(config, projection_dim=int(state["text_projection.weight"].shape[0]))
    encoder = CLIPTextEncoder(config, tokenizer=tokenizer, **kw)
    load_into(encoder, state, f"OpenCLIP text encoder under {prefix!r}", lambda k: prefix + k)
    return encoder


def _open_clip_state(encoder: CLIPTextEncoder) -> dict[str, torch.Tensor]:
    state = dict(encoder.state_dict())
    projection = state.pop("text_projection.weight", None)
    out = difflab_to_open_clip(state)
    if projection is not None:
        out[OPEN_CLIP_PROJECTION] = projection.T.contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# SDXL


def load_sdxl_single_file(path, *, base=None, unet_config=None, num_heads=None, norm_num_groups: int = 32,
                          addition_time_embed_dim: int = 256, sample_size: int = 128, text_config=None, text_config_2=None, vae_config=None, load_vae: bool = True,
                          prediction: str | None = None, dtype: torch.dtype | None = None, device="cpu") -> SDXLComponents:
    """Read an SDXL base or refiner single file (sgm layout) into :class:`~difflab.io.sdxl_folder.SDXLComponents`.

    ``base``: a diffusers SDXL folder for the tokenizers and the scheduler (else Euler, SD's
    schedule, eps). ``num_heads``: the U-Net's heads per level (default width / 64);
    ``addition_time_embed_dim`` (256) and ``sample_size`` (128 latents) are SDXL's, not stored;
    ``unet_config`` / ``text_config`` / ``text_config_2`` / ``vae_config`` replace inferred configs.
    """
    # 1. Tensors; the base folder's tokenizers and scheduler
    tensors = _read(path, "sdxl")
    root, index = _base_index(base)
    refiner = any(k.startswith(SDXL_REFINER_CLIP_G_PREFIX) for k in tensors)
    out = SDXLComponents(pipeline_class="StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
                         force_zeros_for_empty_prompt=not refiner, requires_aesthetics_score=refiner)
    if root is not None:
        out.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", out.force_zeros_for_empty_prompt))
        if (index.get("scheduler") or [None])[0]:
            out.scheduler_config = read_json(root / "scheduler" / SCHEDULER_CONFIG, "a diffusers scheduler config")
            out.diffusion, out.sampling = diffusion_from_scheduler_config(out.scheduler_config, prediction)
    elif prediction is not None:
        out.diffusion["prediction"] = prediction

    # 2. U-Net (sgm names, label_emb for the added conditions)
    original = strip_prefix(tensors, ORIGINAL_PREFIX)
    config = unet_config or infer_unet_config(original, num_heads=num_heads, norm_num_groups=norm_num_groups,
                                                  sample_size=sample_size, addition_time_embed_dim=addition_time_embed_dim)
    unet, table = UNetSD(config), original_table(config)
    load_into(unet, to_difflab(original, table), f"U-Net of {path}", lambda k: ORIGINAL_PREFIX + rename_key(k, table, reverse=True)[0])

    # 3. Text encoders: penultimate hidden states without the final LayerNorm (Podell et al. 2023, Section 2.1)
    penultimate = dict(clip_skip=1, norm_hidden=False)
    tok, tok2 = _tokenizer(root, index, "tokenizer"), _tokenizer(root, index, "tokenizer_2")
    first = _clip_from_transformers(tensors, SDXL_CLIP_L_PREFIX, config=text_config, tokenizer=tok, **penultimate)
    second = _clip_from_open_clip(tensors, SDXL_REFINER_CLIP_G_PREFIX if refiner else SDXL_CLIP_G_PREFIX,
                                  config=text_config_2, tokenizer=tok2, **penultimate)

    # 4. Autoencoder
    vae = None
    if load_vae and any(k.startswith(VAE_PREFIX) for k in tensors):
        vae = load_sd_vae_from_single_file(tensors, vae_config, prefix=VAE_PREFIX, norm_num_groups=norm_num_groups,
                                           scaling_factor=SDXL_VAE["scaling_factor"])
    out.unet, first, second, out.vae = _finish([unet, first, second, vae], dtype, device)
    out.text_encoder = DualCLIPTextEncoder(first, second) if first is not None and second is not None else first or second
    out.denoiser = make_denoiser(out.unet, out.diffusion)
    return out


def sdxl_single_file_state(unet: UNetSD, text_encoder=None, vae=None) -> dict[str, torch.Tensor]:
    """The models' weights in the sgm single-file layout (inverse of :func:`load_sdxl_single_file`);
    ``text_encoder``: a DualCLIPTextEncoder (base) or the bigG encoder alone (refiner)."""
    state = {ORIGINAL_PREFIX + k: v for k, v in from_difflab(unet.state_dict(), original_table(unet.config)).items()}
    if isinstance(text_encoder, DualCLIPTextEncoder):
        state.update({SDXL_CLIP_L_PREFIX + k: v for k, v in difflab_to_transformers(text_encoder.text_encoder.state_dict()).items()})
        state.update({SDXL_CLIP_G_PREFIX + k: v for k, v in _open_clip_state(text_encoder.text_encoder_2).items()})
    elif text_encoder is not None:
        state.update({SDXL_REFINER_CLIP_G_PREFIX + k: v for k, v in _open_clip_state(text_encoder).items()})
    if vae is not None:
        state.update(sd_single_file_state(vae, prefix=VAE_PREFIX))
    return state


# ----------------------------------------------------------------------------------------------
# SD3


def infer_mmdit_config(original: dict[str, torch.Tensor], *, attention_head_dim: int = 64, sample_size: int = 128) -> MMDiTConfig:
    """The :class:`~difflab.nn.mmdit.MMDiTConfig` of an original-layout MMDiT state dict (no prefix),
    from tensor shapes; the head width (SD3: 64) and training latent size (SD3: 128) are not stored."""
    def shape(key):
        if key not in original:
            raise ValueError(f"cannot infer the MMDiT config: no tensor {key!r} in the checkpoint")
        return original[key].shape
    layers = sorted({int(m.group(1)) for k in original for m in [re.match(r"joint_blocks\.(\d+)\.", k)] if m})
    width, joint = shape("context_embedder.weight")
    patch = shape("x_embedder.proj.weight")[-1]
    if width % attention_head_dim:
        raise ValueError(f"cannot infer the MMDiT's heads: width {width} is not a multiple of attention_head_dim="
                         f"{attention_head_dim}; pass attention_head_dim (or transformer_config)")
    return MMDiTConfig(sample_size=sample_size, patch_size=patch, in_channels=shape("x_embedder.proj.weight")[1],
                       out_channels=shape("final_layer.linear.weight")[0] // patch**2, num_layers=len(layers),
                       attention_head_dim=attention_head_dim, num_attention_heads=width // attention_head_dim,
                       joint_attention_dim=joint, caption_projection_dim=width,
                       pooled_projection_dim=shape("y_embedder.mlp.0.weight")[1],
                       pos_embed_max_size=round(shape("pos_embed")[1] ** 0.5),
                       dual_attention_layers=tuple(i for i in layers if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in original),
                       qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in original else None)


def mmdit_original_state(net: MMDiT) -> dict[str, torch.Tensor]:
    """``net``'s weights in Stability's layout (no prefix): the inverse of the loader's map."""
    return join_fused(from_difflab(net.state_dict(), mmdit_keys.original_table(net.config.num_layers)), mmdit_keys.FUSED)


def _t5_from_state(state: dict[str, torch.Tensor]):
    """transformers' T5EncoderModel from a transformers-layout state dict, its config read from tensor shapes."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the T5 text encoder needs transformers") from e
    vocab, d_model = state["shared.weight"].shape
    bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    d_ff = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    layers = len({m.group(1) for k in state for m in [re.match(r"encoder\.block\.(\d+)\.", k)] if m})
    config = transformers.T5Config(vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=bias.shape[1],
                                   d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // bias.shape[1],
                                   relative_attention_num_buckets=bias.shape[0],
                                   feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False)
    model = transformers.T5EncoderModel(config)
    state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    model.load_state_dict(state, strict=True)
    return model


def load_sd3_single_file(path, *, base=None, transformer_config: MMDiTConfig | None = None, attention_head_dim: int = 64,
                         sample_size: int = 128, text_configs=(None, None), vae_config=None, load_vae: bool = True,
                         max_sequence_length: int = 256, dtype: torch.dtype | None = None, device="cpu") -> SD3Components:
    """Read an SD3 / SD 3.5 single file (Stability's layout) into :class:`~difflab.io.sd3_folder.SD3Components`.

    ``base``: a diffusers SD3 folder for the three tokenizers and the scheduler (else shift 3).
    Text encoders absent from the file are zeros (:class:`~difflab.nn.sd3_text.SD3TextEncoder`).
    """
    # 1. Tensors; the base folder's tokenizers and scheduler
    tensors = _read(path, "sd3")
    root, index = _base_index(base)
    out = SD3Components()
    if root is not None and (index.get("scheduler") or [None])[0]:
        out.scheduler_config = read_json(root / "scheduler" / SCHEDULER_CONFIG, "a diffusers scheduler config")
        out.diffusion, out.sampling = diffusion_from_flow_scheduler(out.scheduler_config)

    # 2. MMDiT: fused q/k/v split, names mapped, (shift, scale) rows swapped
    original = strip_prefix(tensors, mmdit_keys.ORIGINAL_PREFIX)
    config = transformer_config or infer_mmdit_config(original, attention_head_dim=attention_head_dim, sample_size=sample_size)
    net, table = MMDiT(config), mmdit_keys.original_table(config.num_layers)
    load_into(net, to_difflab(split_fused(original, mmdit_keys.FUSED), table), f"MMDiT of {path}",
              lambda k: mmdit_keys.ORIGINAL_PREFIX + rename_key(k, table, reverse=True)[0])

    # 3. Text encoders (CLIP-L, CLIP-G: penultimate hidden states and projected pooled vectors; T5)
    clips = [_clip_from_transformers(tensors, prefix, config=cfg, tokenizer=_tokenizer(root, index, tok), projection=True,
                                     hidden_act=act)
             for prefix, cfg, tok, act in ((SD3_CLIP_L_PREFIX, text_configs[0], "tokenizer", "quick_gelu"),
                                           (SD3_CLIP_G_PREFIX, text_configs[1], "tokenizer_2", "gelu"))]
    t5_state = strip_prefix(tensors, SD3_T5_PREFIX)
    t5 = _t5_from_state({k: v.float() for k, v in t5_state.items()}) if t5_state else None
    t5_tok = _tokenizer(root, index, "tokenizer_3", load_t5_tokenizer) if t5 is not None else None
    if t5 is not None and t5_tok is None:
        t5 = None  # T5 cannot read a prompt without its tokenizer: zeros, as a missing T5 (pass base= to use it)

    # 4. Autoencoder (16 channels)
    vae = None
    if load_vae and any(k.startswith(VAE_PREFIX) for k in tensors):
        vae = load_sd_vae_from_single_file(tensors, vae_config, prefix=VAE_PREFIX, **SD3_VAE)
    net, clip_l, clip_g, t5, vae = _finish([net, *clips, t5, vae], dtype, device)
    out.transformer, out.vae = net, vae
    if any(m is not None for m in (clip_l, clip_g, t5)):  # a transformer-only file has none: text_encoder stays None
        out.text_encoder = SD3TextEncoder(clip_l, clip_g, t5, t5_tok, joint_dim=config.joint_attention_dim,
                                          max_sequence_length=max_sequence_length)
    out.denoiser = Denoiser(net, build_frame(out.diffusion), prediction=out.diffusion["prediction"])
    return out


def sd3_single_file_state(transformer: MMDiT, text_encoder: SD3TextEncoder | None = None, vae=None) -> dict[str, torch.Tensor]:
    """The models' weights in Stability's SD3 single-file layout (inverse of :func:`load_sd3_single_file`)."""
    state = {mmdit_keys.ORIGINAL_PREFIX + k: v for k, v in mmdit_original_state(transformer).items()}
    if text_encoder is not None:
        for prefix, clip in ((SD3_CLIP_L_PREFIX, text_encoder.clip_l), (SD3_CLIP_G_PREFIX, text_encoder.clip_g)):
            if clip is not None:
                state.update({prefix + k: v for k, v in difflab_to_transformers(clip.state_dict()).items()})
        if text_encoder.t5 is not None:
            state.update({SD3_T5_PREFIX + k: v for k, v in text_encoder.t5.state_dict().items()
                          if k != "encoder.embed_tokens.weight"})
    if vae is not None:
        state.update(sd_single_file_state(vae, prefix=VAE_PREFIX))
    return state


# ----------------------------------------------------------------------------------------------
# Flux


def infer_flux_config(original: dict[str, torch.Tensor], *, axes_dims_rope=None) -> FluxConfig:
    """The :class:`~difflab.nn.flux.FluxConfig` of a BFL-layout state dict (no prefix), from tensor
    shapes; ``axes_dims_rope`` is not stored (default: FLUX.1's (16, 56, 56) for 128-wide heads)."""
    def shape(key):
        if key not in original:
            raise ValueError(f"cannot infer the Flux config: no tensor {key!r} in the checkpoint")
        return original[key].shape
    count = lambda kind: len({m.group(1) for k in original for m in [re.match(rf"{kind}\.(\d+)\.", k)] if m})  # noqa: E731
    inner, c_in = shape("img_in.weight")
    head = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if axes_dims_rope is None:
        if head != 128:
            raise ValueError(f"cannot infer the RoPE axes of {head}-wide heads (FLUX.1's (16, 56, 56) needs 128): "
                             "pass axes_dims_rope")
        axes_dims_rope = (16, 56, 56)
    c_out = shape("final_layer.linear.weight")[0]
    return FluxConfig(in_channels=c_in, out_channels=None if c_out == c_in else c_out, num_layers=count("double_blocks"),
                      num_single_layers=count("single_blocks"), attention_head_dim=head, num_attention_heads=inner // head,
                      joint_attention_dim=shape("txt_in.weight")[1], pooled_projection_dim=shape("vector_in.in_layer.weight")[1],
                      guidance_embeds="guidance_in.in_layer.weight" in original, axes_dims_rope=tuple(axes_dims_rope))


def flux_original_state(net: FluxTransformer) -> dict[str, torch.Tensor]:
    """``net``'s weights in Black Forest Labs' layout (the inverse of the loader's map)."""
    return join_fused(from_difflab(net.state_dict(), flux_keys.ORIGINAL), flux_keys.FUSED)


def load_flux_single_file(path, *, base=None, transformer_config: FluxConfig | None = None, axes_dims_rope=None,
                          dtype: torch.dtype | None = None, device="cpu") -> FluxComponents:
    """Read a FLUX.1 transformer file (BFL's layout) into :class:`~difflab.io.flux_folder.FluxComponents`.

    ``base``: a diffusers Flux folder for what the file lacks (text encoders, tokenizers,
    autoencoder, scheduler), read with :func:`~difflab.io.flux_folder.load_flux_folder`, and the
    RoPE axes of its transformer's config (when ``axes_dims_rope`` is not given); without it only
    ``transformer`` and ``denoiser`` are set. The network is built on the meta device and
    takes the file's tensors as its parameters (no random 12B copy first).
    """
    tensors = _read(path, "flux")
    original = {k[len(flux_keys.ORIGINAL_PREFIX):] if k.startswith(flux_keys.ORIGINAL_PREFIX) else k: v for k, v in tensors.items()}
    if axes_dims_rope is None and base is not None and (Path(base) / "transformer" / "config.json").is_file():
        axes_dims_rope = read_json(Path(base) / "transformer" / "config.json", "a FluxTransformer2DModel config").get("axes_dims_rope")
    config = transformer_config or infer_flux_config(original, axes_dims_rope=axes_dims_rope)
    out = FluxComponents()
    if base is not None:
        out = load_flux_folder(base, components=tuple(c for c in FLUX_COMPONENTS if c != "transformer"), dtype=dtype, device=device)
    with torch.device("meta"):
        net = FluxTransformer(config)
    state = {k: v.to(dtype or torch.float32) for k, v in to_difflab(split_fused(original, flux_keys.FUSED), flux_keys.ORIGINAL).items()}
    load_into(net, state, f"Flux transformer of {path}", lambda k: rename_key(k, flux_keys.ORIGINAL, reverse=True)[0], assign=True)
    out.transformer = net.to(device).eval()
    out.denoiser = flux_denoiser(out.transformer)
    return out


def save_family_single_file(path, state: dict[str, torch.Tensor]) -> Path:
    """Write a state dict made by :func:`sdxl_single_file_state`, :func:`sd3_single_file_state` or
    :func:`flux_original_state` as one ``.safetensors`` file, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, {k: v.contiguous() for k, v in state.items()})
    return path


LOADERS = {"sdxl": load_sdxl_single_file, "sd3": load_sd3_single_file, "flux": load_flux_single_file}

__all__ = ["single_file_family", "file_keys", "load_sdxl_single_file", "sdxl_single_file_state", "load_sd3_single_file",
           "sd3_single_file_state", "infer_mmdit_config", "mmdit_original_state", "load_flux_single_file", "infer_flux_config",
           "flux_original_state", "save_family_single_file", "LOADERS", "FAMILIES"]
