"""DiT weights from local files, offline (Peebles & Xie 2023): diffusers' ``DiTTransformer2DModel``
folders and the original facebookresearch/DiT state dicts saved as safetensors. Pickled ``.pt``
files are never opened: convert one first, e.g.
``safetensors.torch.save_file(torch.load("DiT-XL-2-256x256.pt", weights_only=True), "DiT-XL-2-256x256.safetensors")``.

- :func:`load_diffusers_dit` / :func:`save_diffusers_dit`: a folder ``config.json`` +
  ``diffusion_pytorch_model.safetensors`` (or a ``DiTPipeline`` folder, whose ``transformer/``
  it reads), both ways. The config's ``norm_eps`` and diffusers' timestep frequencies are kept
  (``DiTConfig.mlp_norm_eps``, ``frequency_shift=1``), so the function is diffusers' exactly;
- :func:`load_original_dit`: the original layout; the config is read from the tensor shapes (the
  head count from ``num_heads``, else from the paper's Table 1 for that width and depth);
- :func:`dit_denoiser`: the network wrapped in the frame the paper trained in (DDPM's linear
  schedule, T = 1000, eps prediction; learned sigma when the net outputs 2C channels).

Key names are the tables of :mod:`difflab.io.keymaps.dit`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core import Denoiser
from ..nn.dit import DiT, DiTConfig, SIZES
from .folders import CONFIG_NAME, load_into, read_json, read_safetensors, save_model_folder
from .keymaps import from_difflab, rename_key, to_difflab
from .keymaps.dit import (DIFFUSERS, DIFFUSERS_COPIES, DIFFUSERS_JOINED, DIFFUSERS_SHARED, ORIGINAL, ORIGINAL_COMPUTED)
from .spec import build_frame

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The paper's training diffusion (Section 4, following ADM): linear betas 1e-4..0.02, T = 1000, eps
DIT_DIFFUSION = {"frame": "vp_discrete", "schedule": "linear", "T": 1000, "zero_terminal_snr": False, "prediction": "eps"}

# diffusers config keys and the only values difflab's DiT implements (anything else changes the function)
_DIFFUSERS_REQUIRED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
                       "attention_bias": True}
_DIFFUSERS_DEFAULTS = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
                       "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000, "norm_eps": 1e-5,
                       **_DIFFUSERS_REQUIRED}


# ----------------------------------------------------------------------------------------------
# diffusers' DiTTransformer2DModel


def config_from_diffusers(d: dict) -> DiTConfig:
    """The :class:`DiTConfig` of a diffusers ``DiTTransformer2DModel`` ``config.json`` dict;
    settings it does not implement raise ValueError naming them."""
    get = lambda k: d.get(k, _DIFFUSERS_DEFAULTS[k])  # noqa: E731
    bad = [f"{k}={get(k)!r} (supported: {v!r})" for k, v in _DIFFUSERS_REQUIRED.items() if get(k) != v]
    if bad:
        raise ValueError(f"this diffusers DiTTransformer2DModel config is outside what difflab's DiT implements: {'; '.join(bad)}")
    heads = get("num_attention_heads")
    return DiTConfig(in_channels=get("in_channels"), out_channels=get("out_channels"), sample_size=get("sample_size"),
                     patch_size=get("patch_size"), hidden_size=heads * get("attention_head_dim"), depth=get("num_layers"),
                     num_heads=heads, num_classes=get("num_embeds_ada_norm"), frequency_shift=1,
                     mlp_norm_eps=float(get("norm_eps")))


def config_to_diffusers(c: DiTConfig) -> dict:
    """A diffusers ``DiTTransformer2DModel`` config dict for ``c`` (see :func:`save_diffusers_dit`)."""
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": c.num_heads,
            "attention_head_dim": c.hidden_size // c.num_heads, "in_channels": c.in_channels,
            "out_channels": c.out_channels or c.in_channels, "num_layers": c.depth, "sample_size": c.sample_size,
            "patch_size": c.patch_size, "num_embeds_ada_norm": c.num_classes, "norm_eps": c.mlp_norm_eps, "dropout": 0.0,
            "norm_num_groups": 32, "upcast_attention": False, **_DIFFUSERS_REQUIRED}


def _block_indices(tensors: dict, prefix: str = "transformer_blocks.") -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in tensors for m in [pattern.match(k)] if m})


def diffusers_to_difflab(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``DiTTransformer2DModel`` state dict in difflab's names: block 0's conditioning
    embedding kept as the shared one (every other block's copy must equal it), the q, k, v
    projections of each block fused into ``qkv``, the rest renamed by :data:`DIFFUSERS`."""
    tensors = dict(tensors)
    for i in _block_indices(tensors):
        copy = DIFFUSERS_COPIES.format(i=i)
        for key in [k for k in tensors if k.startswith(copy) and i != 0]:
            shared = DIFFUSERS_SHARED + key[len(copy):]
            if shared not in tensors or not torch.equal(tensors[key], tensors[shared]):
                raise ValueError(f"diffusers DiT weights: {key} differs from {shared}; difflab's DiT shares one time and "
                                 "class embedding across blocks (as the original DiT and converted checkpoints do)")
            del tensors[key]
        for ours, theirs in DIFFUSERS_JOINED:
            names = [t.format(i=i) for t in theirs]
            for leaf in ("weight", "bias"):
                parts = [tensors.pop(n + leaf, None) for n in names]
                if any(p is not None for p in parts):
                    if any(p is None for p in parts):
                        raise ValueError(f"diffusers DiT weights: block {i} lacks one of {[n + leaf for n in names]}")
                    tensors[ours.format(i=i) + leaf] = torch.cat(parts)
    return to_difflab(tensors, DIFFUSERS)


def difflab_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`diffusers_to_difflab`: ``qkv`` split in three, the conditioning
    embedding copied into every block."""
    out = dict(tensors)
    blocks = _block_indices(out, "blocks.")
    for i in blocks:
        for ours, theirs in DIFFUSERS_JOINED:
            for leaf in ("weight", "bias"):
                fused = out.pop(ours.format(i=i) + leaf)
                for name, part in zip(theirs, fused.chunk(len(theirs))):
                    out[name.format(i=i) + leaf] = part.clone()
    out = from_difflab(out, DIFFUSERS)
    shared = {k[len(DIFFUSERS_SHARED):]: v for k, v in out.items() if k.startswith(DIFFUSERS_SHARED)}
    for i in blocks[1:]:
        out.update({DIFFUSERS_COPIES.format(i=i) + k: v.clone() for k, v in shared.items()})
    return out


def load_diffusers_dit(folder, *, variant: str | None = None, dtype: torch.dtype | None = None) -> DiT:
    """A :class:`DiT` from a local diffusers ``DiTTransformer2DModel`` folder (``config.json`` +
    ``diffusion_pytorch_model[.variant].safetensors``) or a ``DiTPipeline`` folder (its
    ``transformer/``), in eval mode, computing what diffusers' model computes."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"
    config = config_from_diffusers(read_json(folder / CONFIG_NAME, "a diffusers DiTTransformer2DModel config"))
    net = DiT(config)
    load_into(net, diffusers_to_difflab(read_safetensors(folder, WEIGHTS_NAME, variant)),
              f"diffusers DiTTransformer2DModel weights in {folder}")
    return net.to(dtype).eval() if dtype is not None else net.eval()


def save_diffusers_dit(net: DiT, folder, *, exact: bool = True) -> Path:
    """Write ``net`` as a diffusers ``DiTTransformer2DModel`` folder; returns the folder.

    diffusers' DiT always uses timestep frequencies with ``frequency_shift = 1`` and has a null
    class row: a net with ``frequency_shift = 0`` (the original DiT's) would compute a slightly
    different function there, so it is a ValueError unless ``exact=False`` (which writes it as
    diffusers' own conversion script does); an unconditional net or a mixture-of-experts one
    (``moe_experts >= 1``) cannot be written."""
    c = net.config
    if c.num_classes is None:
        raise ValueError("diffusers' DiTTransformer2DModel is class-conditional: an unconditional DiT (num_classes=None) cannot be saved as one")
    if c.moe_experts:
        raise ValueError(f"diffusers' DiTTransformer2DModel has dense feed-forwards: a mixture-of-experts DiT "
                         f"(moe_experts={c.moe_experts}) cannot be saved as one")
    if c.frequency_shift != 1 and exact:
        raise ValueError(f"this DiT has frequency_shift={c.frequency_shift}, diffusers' DiT uses 1: its outputs would differ "
                         "slightly; pass exact=False to write it anyway (as diffusers' conversion script does)")
    if c.mlp_ratio != 4.0 or c.frequency_dim != 256:
        raise ValueError(f"diffusers' DiT has mlp_ratio 4 and a 256-wide timestep embedding; this DiT has "
                         f"mlp_ratio={c.mlp_ratio}, frequency_dim={c.frequency_dim}")
    return save_model_folder(folder, WEIGHTS_NAME, difflab_to_diffusers(net.state_dict()), config_to_diffusers(c))


# ----------------------------------------------------------------------------------------------
# The original facebookresearch/DiT layout


def config_from_original(tensors: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """The :class:`DiTConfig` an original-layout state dict was made for, from its tensor shapes.
    The head count is not stored: ``num_heads``, else Table 1's for the width and depth."""
    def shape(key):
        if key not in tensors:
            raise ValueError(f"not an original DiT state dict: no tensor {key!r} (keys start {sorted(tensors)[:5]})")
        return tuple(tensors[key].shape)
    D, C, p, _ = shape("x_embedder.proj.weight")
    depth = len(_block_indices(tensors, "blocks."))
    if num_heads is None:
        found = [heads for d, width, heads in SIZES.values() if (d, width) == (depth, D)]
        if not found:
            raise ValueError(f"the head count of a DiT of depth {depth} and width {D} is not in Table 1: pass num_heads")
        num_heads = found[0]
    tokens = shape("pos_embed")[1] if "pos_embed" in tensors else None
    side = math.isqrt(tokens) * p if tokens else 32
    rows = shape("y_embedder.embedding_table.weight")[0] if "y_embedder.embedding_table.weight" in tensors else None
    return DiTConfig(in_channels=C, out_channels=shape("final_layer.linear.weight")[0] // (p * p), sample_size=side,
                     patch_size=p, hidden_size=D, depth=depth, num_heads=num_heads,
                     mlp_ratio=shape("blocks.0.mlp.fc1.weight")[0] / D, num_classes=None if rows is None else rows - 1,
                     frequency_dim=shape("t_embedder.mlp.0.weight")[1])


def load_original_dit(source, *, num_heads: int | None = None, dtype: torch.dtype | None = None) -> DiT:
    """A :class:`DiT` from an original facebookresearch/DiT state dict: a ``.safetensors`` file or
    a dict of tensors, with or without the ``model.`` / ``ema.`` prefix of training checkpoints
    (``ema.`` is preferred). The stored ``pos_embed`` is checked against the computed one."""
    name = str(source) if not isinstance(source, dict) else "original DiT state dict"
    if not isinstance(source, dict):
        path = Path(source)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors files are read (pickled .pt files are never opened); convert it first")
        if not path.is_file():
            raise FileNotFoundError(f"no DiT weights at {path}")
        source = load_file(str(path))
    tensors = dict(source)
    for prefix in ("ema.", "model."):
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    net = DiT(config_from_original(tensors, num_heads))
    stored = {k: tensors.pop(k) for k in ORIGINAL_COMPUTED if k in tensors}
    if "pos_embed" in stored and not torch.allclose(stored["pos_embed"].float().reshape(net.pos_embed.shape), net.pos_embed, atol=1e-5):
        raise ValueError(f"{name}: its pos_embed is not the fixed 2-D sine-cosine table DiT uses")
    load_into(net, to_difflab(tensors, ORIGINAL), name, lambda k: rename_key(k, ORIGINAL, reverse=True)[0])
    return net.to(dtype).eval() if dtype is not None else net.eval()


# ----------------------------------------------------------------------------------------------
# As a denoiser


def dit_denoiser(net: DiT, diffusion: dict | None = None) -> Denoiser:
    """``D(x, sigma, class_labels=)`` around a DiT in the paper's frame (:data:`DIT_DIFFUSION`, or
    ``diffusion``), with learned variance when the net outputs 2 * in_channels channels."""
    diffusion = dict(diffusion or DIT_DIFFUSION)
    learned = (net.config.out_channels or net.config.in_channels) == 2 * net.config.in_channels
    return Denoiser(net, build_frame(diffusion), prediction=diffusion["prediction"], learned_variance=learned)


__all__ = ["WEIGHTS_NAME", "DIT_DIFFUSION", "config_from_diffusers", "config_to_diffusers", "diffusers_to_difflab",
           "difflab_to_diffusers", "load_diffusers_dit", "save_diffusers_dit", "config_from_original", "load_original_dit",
           "dit_denoiser"]
