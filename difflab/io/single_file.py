"""A single-file Stable Diffusion 1.x / 2.x checkpoint (``.safetensors``) in, difflab components out.

The original latent-diffusion layout keeps the whole model in one state dict, split by prefix:

==================================  =========================================================
``model.diffusion_model.*``         the U-Net (:mod:`difflab.io.keymaps.unet_sd`)
``first_stage_model.*``             the autoencoder (:mod:`difflab.io.diffusers_vae`)
``cond_stage_model.transformer.*``  SD 1.x: CLIP ViT-L/14 text encoder, transformers layout
``cond_stage_model.model.*``        SD 2.x: OpenCLIP ViT-H/14 text encoder (:mod:`difflab.io.keymaps.clip_text`)
==================================  =========================================================

A single file records no config: the architecture is read from tensor shapes
(:func:`infer_unet_config`, :func:`infer_clip_text_config`), except what no shape shows --
attention heads (SD 1.x: 8 per level; SD 2.x: 64 channels per head), GroupNorm groups (32), the
training resolution, and whether the model predicts eps or v. SD 2.x files come in both kinds
(2-base: eps; 768-v: v), so :func:`load_single_file` asks for ``prediction`` there. The noise
schedule is Stable Diffusion's (scaled-linear betas 0.00085..0.012, T = 1000). Single files hold
no tokenizer: pass a CLIP tokenizer folder (e.g. the ``tokenizer/`` of any SD pipeline folder of
the same family) to encode prompts.

Only ``.safetensors`` files are read; pickled ``.ckpt`` files are never opened.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.params import check_prediction
from ..nn.text import CLIPTextEncoder, CLIPTextEncoderConfig, load_clip_tokenizer
from ..nn.unet_sd import UNetSD, UNetSDConfig
from .checkpoint import strip_prefix
from .diffusers_folder import SD_DIFFUSION, SD_SAMPLING, StableDiffusionComponents, make_denoiser
from .diffusers_vae import load_sd_vae_from_single_file, sd_single_file_state
from .folders import load_into, write_tensors
from .keymaps import from_difflab, rename_key, to_difflab
from .keymaps.clip_text import OPEN_CLIP, SD1_PREFIX, SD2_PREFIX, difflab_to_open_clip, difflab_to_transformers, open_clip_to_difflab, transformers_to_difflab
from .keymaps.unet_sd import ORIGINAL_PREFIX, original_table

VAE_PREFIX = "first_stage_model."


def _shape(state: dict, key: str, what: str):
    if key not in state:
        raise ValueError(f"cannot infer the {what} config: no tensor {key!r} in the checkpoint")
    return state[key].shape


def _indices(state: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def infer_unet_config(original: dict[str, torch.Tensor], *, num_heads=None, norm_num_groups: int = 32,
                      sample_size: int = 64, addition_time_embed_dim: int = 256) -> UNetSDConfig:
    """The :class:`UNetSDConfig` of an original-layout U-Net state dict (no prefix), from tensor shapes.

    ``num_heads`` (an int or one per level) is not stored in the weights; None means Stable
    Diffusion's rule: 8 heads with 1x1-conv projections (SD 1.x), ``width / 64`` heads with linear
    projections (SD 2.x and XL). SDXL's added-condition embedding (``label_emb``) and per-level
    transformer depths are read from the tensors; the sinusoid width of its time ids is not (256).
    """
    what = "U-Net"
    blocks = _indices(original, r"input_blocks\.(\d+)\.")
    ops = _indices(original, r"input_blocks\.(\d+)\.0\.op\.weight")
    if not blocks:
        raise ValueError("cannot infer the U-Net config: no input_blocks.* tensors (not an original-layout SD U-Net)")
    lpb = ops[0] - 1 if ops else len(blocks) - 1
    levels = len(ops) + 1
    if len(blocks) != 1 + levels * lpb + len(ops):
        raise ValueError(f"cannot infer the U-Net config: {len(blocks)} input blocks do not fit {levels} levels of {lpb} blocks")
    first = [1 + i * (lpb + 1) for i in range(levels)]
    widths = tuple(_shape(original, f"input_blocks.{m}.0.out_layers.3.weight", what)[0] for m in first)
    down = tuple(f"input_blocks.{m}.1.proj_in.weight" in original for m in first)
    up = tuple(f"output_blocks.{j * (lpb + 1)}.1.proj_in.weight" in original for j in range(levels))
    proj = _shape(original, "middle_block.1.proj_in.weight", what)
    linear = len(proj) == 2
    # transformer depth: one int when every attention level and the middle agree (SD 1.x / 2.x, the SDXL
    # refiner), else one per level (SDXL base: (1, 2, 10)), a level without attention taking 1 (unused)
    mid = len(_indices(original, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    depths = [len(_indices(original, rf"input_blocks\.{m}\.1\.transformer_blocks\.(\d+)\.")) for m in first]
    used = {d for d in depths if d} | {mid}
    depth = used.pop() if len(used) == 1 else tuple(d or 1 for d in depths)
    context = _shape(original, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", what)[1]
    if num_heads is None and linear and any(w % 64 for w in widths):
        raise ValueError(f"cannot infer the U-Net's heads: widths {widths} are not multiples of SD 2.x's 64-wide heads; "
                         "pass num_heads (or a unet_config)")
    if num_heads is None:
        num_heads = tuple(w // 64 for w in widths) if linear else 8
    heads = (num_heads,) * levels if isinstance(num_heads, int) else tuple(num_heads)
    conv_in, conv_out = _shape(original, "input_blocks.0.0.weight", what), _shape(original, "out.2.weight", what)
    added = {}
    if "label_emb.0.0.weight" in original:  # SDXL's pooled text + micro-conditioning (Podell et al. 2023, Section 2.2)
        added = dict(addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                     projection_class_embeddings_input_dim=original["label_emb.0.0.weight"].shape[1])
    return UNetSDConfig(in_channels=conv_in[1], out_channels=conv_out[0], block_out_channels=widths, layers_per_block=lpb,
                        down_attention=down, up_attention=up, num_heads=heads, cross_attention_dim=context,
                        transformer_layers_per_block=depth, use_linear_projection=linear, norm_num_groups=norm_num_groups,
                        sample_size=sample_size, **added)


def infer_clip_text_config(state: dict[str, torch.Tensor], *, hidden_act: str = "quick_gelu", num_heads: int | None = None,
                           **token_ids) -> CLIPTextEncoderConfig:
    """The :class:`CLIPTextEncoderConfig` of a difflab-layout CLIP text state dict, from tensor
    shapes. ``num_heads`` (not stored) defaults to ``hidden / 64`` (CLIP ViT-L/14 and OpenCLIP
    ViT-H/14 both use 64-wide heads); ``token_ids`` may set bos/eos/pad_token_id."""
    what = "CLIP text encoder"
    vocab, hidden = _shape(state, "embeddings.token_embedding.weight", what)
    if num_heads is None:
        if hidden % 64:
            raise ValueError(f"cannot infer the CLIP text encoder's heads: width {hidden} is not a multiple of 64; pass num_heads "
                             "(or a text_config)")
        num_heads = hidden // 64
    return CLIPTextEncoderConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=_shape(state, "encoder.layers.0.mlp.fc1.weight", what)[0],
        num_hidden_layers=len(_indices(state, r"encoder\.layers\.(\d+)\.")), num_attention_heads=num_heads,
        max_position_embeddings=_shape(state, "embeddings.position_embedding.weight", what)[0], hidden_act=hidden_act, **token_ids)


def _text_layout(tensors: dict) -> str | None:
    if any(k.startswith(SD1_PREFIX) for k in tensors):
        return "sd1"
    if any(k.startswith(SD2_PREFIX) for k in tensors):
        return "sd2"
    return None


def load_single_file(path, *, prediction: str | None = None, unet_config: UNetSDConfig | None = None,
                     text_config: CLIPTextEncoderConfig | None = None, tokenizer=None, vae_config=None,
                     load_vae: bool = True, dtype: torch.dtype | None = None, device="cpu") -> StableDiffusionComponents:
    """Read a single-file SD 1.x / 2.x ``.safetensors`` checkpoint into difflab components (offline).

    ``prediction``: "eps" or "v"; SD 1.x defaults to eps, SD 2.x files must say (2-base: eps,
    768-v: v). ``unet_config`` / ``text_config`` / ``vae_config`` replace the inferred configs
    (see :func:`infer_unet_config`). ``tokenizer``: a CLIP tokenizer folder or object for
    :meth:`CLIPTextEncoder.encode`. Models come back in eval mode on ``device`` (cast to ``dtype``).
    """
    # 1. Read the tensors
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors single files are read (pickled .ckpt files are never opened)")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    tensors = load_file(str(path))
    original = strip_prefix(tensors, ORIGINAL_PREFIX)
    if not original:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in tensors})
        raise ValueError(f"{path} has no U-Net tensors under {ORIGINAL_PREFIX!r} (prefixes present: {prefixes}): "
                         "not a single-file Stable Diffusion checkpoint")
    layout = _text_layout(tensors)

    # 2. Diffusion spec: SD's schedule; the prediction as given
    diffusion = dict(SD_DIFFUSION)
    if prediction is None and layout == "sd2":
        raise ValueError("SD 2.x single files do not record what the U-Net predicts: pass prediction='eps' (2-base) "
                         "or prediction='v' (768-v)")
    diffusion["prediction"] = check_prediction(prediction or "eps")
    out = StableDiffusionComponents(diffusion=diffusion, sampling=dict(SD_SAMPLING))

    # 3. U-Net
    config = unet_config or infer_unet_config(original)
    out.unet = UNetSD(config)
    table = original_table(config)
    load_into(out.unet, to_difflab(original, table), f"U-Net of {path}",
               lambda k: ORIGINAL_PREFIX + rename_key(k, table, reverse=True)[0])

    # 4. Text encoder
    if layout is not None:
        if layout == "sd1":
            state = transformers_to_difflab(strip_prefix(tensors, SD1_PREFIX))
        else:
            state = open_clip_to_difflab(strip_prefix(tensors, SD2_PREFIX))
        tconfig = text_config or infer_clip_text_config(state, hidden_act="quick_gelu" if layout == "sd1" else "gelu")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_clip_tokenizer(tokenizer)
        out.text_encoder = CLIPTextEncoder(tconfig, tokenizer=tokenizer)
        if layout == "sd1":
            file_name = lambda k: SD1_PREFIX + "text_model." + k  # noqa: E731
        else:  # q/k/v pieces are fused into attn.in_proj_* in the file
            file_name = lambda k: SD2_PREFIX + rename_key(k, OPEN_CLIP, reverse=True)[0]  # noqa: E731
        load_into(out.text_encoder, state, f"text encoder of {path}", file_name)

    # 5. Autoencoder
    if load_vae and any(k.startswith(VAE_PREFIX) for k in tensors):
        out.vae = load_sd_vae_from_single_file(tensors, vae_config, prefix=VAE_PREFIX)

    for name in ("unet", "text_encoder", "vae"):
        model = getattr(out, name)
        if model is not None:
            setattr(out, name, (model.to(device, dtype) if dtype is not None else model.to(device)).eval())
    out.denoiser = make_denoiser(out.unet, out.diffusion)
    return out


def single_file_state(unet: UNetSD, text_encoder: CLIPTextEncoder | None = None, vae=None, *,
                      text_layout: str = "sd1") -> dict[str, torch.Tensor]:
    """The models' weights in the original single-file layout and prefixes (inverse of
    :func:`load_single_file`). ``text_layout``: "sd1" (transformers layout) or "sd2" (OpenCLIP
    layout; the unused last block of SD 2.x's text tower is not recreated)."""
    state = {ORIGINAL_PREFIX + k: v for k, v in from_difflab(unet.state_dict(), original_table(unet.config)).items()}
    if text_encoder is not None:
        if text_layout == "sd1":
            text = {SD1_PREFIX + k: v for k, v in difflab_to_transformers(text_encoder.state_dict()).items()}
        elif text_layout == "sd2":
            text = {SD2_PREFIX + k: v for k, v in difflab_to_open_clip(text_encoder.state_dict()).items()}
        else:
            raise ValueError(f"text_layout={text_layout!r} must be 'sd1' or 'sd2'")
        state.update(text)
    if vae is not None:
        state.update(sd_single_file_state(vae, prefix=VAE_PREFIX))
    return state


def save_single_file(path, unet: UNetSD, text_encoder: CLIPTextEncoder | None = None, vae=None, *,
                     text_layout: str = "sd1") -> Path:
    """Write the models as one original-layout ``.safetensors`` checkpoint, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, single_file_state(unet, text_encoder, vae, text_layout=text_layout))
    return path


__all__ = ["load_single_file", "save_single_file", "single_file_state", "infer_unet_config", "infer_clip_text_config"]
