"""A local diffusers Stable Diffusion 3 folder in, difflab components out. Offline only.

A folder written by ``StableDiffusion3Pipeline.save_pretrained`` holds::

    model_index.json
    transformer/      SD3Transformer2DModel            -> MMDiT          (difflab.nn.mmdit, diffusers names)
    text_encoder/     CLIPTextModelWithProjection (L)  -> CLIPTextEncoder with its projection
    text_encoder_2/   CLIPTextModelWithProjection (G)  -> CLIPTextEncoder with its projection
    text_encoder_3/   T5EncoderModel (optional)         -> transformers' T5EncoderModel, run as it is
    tokenizer/, tokenizer_2/ (CLIP), tokenizer_3/ (T5)
    vae/              AutoencoderKL, 16 channels, shift_factor and scaling_factor
    scheduler/        FlowMatchEulerDiscreteScheduler  -> the Flow frame (time_scale = num_train_timesteps),
                                                          prediction "flow", and the grid's ``shift``

:func:`load_sd3_folder` reads it into :class:`SD3Components`. The three encoders become one
:class:`~difflab.nn.sd3_text.SD3TextEncoder`; an encoder not loaded (not asked for, or absent
from the folder, as T5 often is) contributes zeros, as in SD3's training and diffusers' pipeline.
transformers is imported only to read T5 and the tokenizers. Pickled ``.bin`` files are never opened.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import Denoiser
from ..nn.mmdit import MMDiT, MMDiTConfig
from ..nn.sd3_text import SD3_CLIP_WIDTHS, SD3TextEncoder
from ..nn.text import SD_EXTRA, CLIPTextEncoder
from .diffusers_folder import MODEL_INDEX, SCHEDULER_CONFIG, TEXT_WEIGHTS, UNET_WEIGHTS, _component_folder, load_diffusers_text_encoder
from .diffusers_vae import load_diffusers_vae
from .folders import CONFIG_NAME, load_into, read_json, read_safetensors, save_model_folder
from .spec import build_frame

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "scheduler")
# SD3's training frame (Esser et al. 2024, Section 2: x_t = (1 - t) x0 + t eps, t in [0, 1] fed as 1000 t)
SD3_DIFFUSION = {"frame": "flow", "time_scale": 1000.0, "t_min": 1e-3, "prediction": "flow"}
SD3_SHIFT = 3.0
# FlowMatchEulerDiscreteScheduler settings difflab reads, and those whose only supported value is this one
_SCHEDULER_UNSUPPORTED = {"use_dynamic_shifting": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                          "use_beta_sigmas": False, "invert_sigmas": False, "shift_terminal": None,
                          "stochastic_sampling": False}


@dataclass
class SD3Components:
    """What a Stable Diffusion 3 folder holds, as difflab objects (None where not loaded).

    ``denoiser`` wraps ``transformer`` into ``D(x, sigma, context=, pooled=)``; ``diffusion`` is
    its spec (:mod:`difflab.io.spec`); ``sampling`` the scheduler's hints: ``shift`` (the time
    shift of the grid, Esser et al. 2024, eq. 23) and ``scheduler`` (its class name).
    """

    transformer: MMDiT | None = None
    text_encoder: SD3TextEncoder | None = None
    vae: torch.nn.Module | None = None
    denoiser: Denoiser | None = None
    diffusion: dict = field(default_factory=lambda: dict(SD3_DIFFUSION))
    sampling: dict = field(default_factory=lambda: {"scheduler": "FlowMatchEulerDiscreteScheduler", "shift": SD3_SHIFT})
    scheduler_config: dict | None = None


def is_sd3_folder(folder) -> bool:
    """Whether ``folder`` holds a model_index.json of a ``StableDiffusion3*`` pipeline."""
    path = Path(folder) / MODEL_INDEX
    return path.is_file() and read_json(path, "a diffusers pipeline folder").get("_class_name", "").startswith("StableDiffusion3")


def diffusion_from_flow_scheduler(config: dict) -> tuple[dict, dict]:
    """``(diffusion spec, sampling hints)`` from a diffusers ``FlowMatchEulerDiscreteScheduler`` config:
    the Flow frame with ``time_scale = num_train_timesteps``, prediction ``flow`` (u = eps - x0) and
    the grid's ``shift``. Settings difflab does not reproduce raise a ValueError naming them."""
    if not str(config.get("_class_name", "FlowMatchEulerDiscreteScheduler")).startswith("FlowMatch"):
        raise ValueError(f"scheduler {config.get('_class_name')!r} is not a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)")
    bad = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in _SCHEDULER_UNSUPPORTED.items() if config.get(k, v) != v]
    if bad:
        raise ValueError(f"unsupported FlowMatchEulerDiscreteScheduler settings: {'; '.join(bad)}")
    T = int(config.get("num_train_timesteps", 1000))
    diffusion = {**SD3_DIFFUSION, "time_scale": float(T), "t_min": 1.0 / T}
    return diffusion, {"scheduler": config.get("_class_name"), "shift": float(config.get("shift", 1.0))}


def load_sd3_transformer(folder, *, variant: str | None = None, dtype: torch.dtype | None = None) -> MMDiT:
    """An :class:`MMDiT` from a diffusers ``SD3Transformer2DModel`` folder, in eval mode."""
    folder = Path(folder)
    net = MMDiT(MMDiTConfig.from_diffusers_config(read_json(folder / CONFIG_NAME, "a diffusers SD3Transformer2DModel config")))
    load_into(net, read_safetensors(folder, UNET_WEIGHTS, variant), f"diffusers SD3Transformer2DModel weights in {folder}")
    return net.to(dtype).eval() if dtype is not None else net.eval()


def save_sd3_transformer(net: MMDiT, folder) -> Path:
    """Write ``net`` as a diffusers ``SD3Transformer2DModel`` folder (config.json + weights); returns the folder."""
    return save_model_folder(folder, UNET_WEIGHTS, net.state_dict(), net.config.to_diffusers_config())


def load_clip_with_projection(folder, *, tokenizer=None, variant: str | None = None,
                              dtype: torch.dtype | None = None) -> CLIPTextEncoder:
    """A :class:`~difflab.nn.text.CLIPTextEncoder` with its ``text_projection`` from a transformers
    ``CLIPTextModelWithProjection`` folder, in eval mode; ``tokenizer``: a folder, a tokenizer, or None."""
    encoder = load_diffusers_text_encoder(folder, tokenizer=tokenizer, variant=variant, dtype=dtype)
    if encoder.config.projection_dim is None:
        raise ValueError(f"{folder} holds no text_projection: SD3's CLIPs are CLIPTextModelWithProjection")
    return encoder


def load_t5_encoder(folder, tokenizer_folder, *, variant: str | None = None, dtype: torch.dtype | None = None):
    """``(transformers' T5EncoderModel, its tokenizer)`` from local folders (safetensors only), in eval mode."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"the T5 text encoder needs transformers: {SD_EXTRA}") from e
    name = TEXT_WEIGHTS if variant is None else TEXT_WEIGHTS.replace(".safetensors", f".{variant}.safetensors")
    if not ((Path(folder) / name).is_file() or (Path(folder) / (name + ".index.json")).is_file()):
        raise FileNotFoundError(f"no {name} (or its shard index) in {folder}: T5 is read from safetensors only, never a pickle")
    kwargs = {} if dtype is None else {"dtype": dtype}  # loaded in dtype (T5-XXL is 19 GB in float32)
    model = transformers.T5EncoderModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, variant=variant,
                                                        **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    return (model.to(dtype) if dtype is not None else model).eval(), tokenizer


def _clip_widths(root: Path, index: dict) -> list[tuple[int, int]]:
    """(hidden, projection) widths of CLIP-L and CLIP-G from their config.json (SD3's when absent)."""
    widths = []
    for name, default in zip(("text_encoder", "text_encoder_2"), SD3_CLIP_WIDTHS):
        path = root / name / CONFIG_NAME
        if index.get(name) and index[name][0] is not None and path.is_file():
            raw = read_json(path, "a transformers CLIPTextModelWithProjection config")
            raw = raw.get("text_config", raw)
            widths.append((int(raw["hidden_size"]), int(raw.get("projection_dim", raw["hidden_size"]))))
        else:
            widths.append(default)
    return widths


def load_sd3_folder(folder, *, components=COMPONENTS, variant: str | None = None, dtype: torch.dtype | None = None,
                    device="cpu", max_sequence_length: int = 256) -> SD3Components:
    """Read a local diffusers Stable Diffusion 3 / 3.5 pipeline folder (never the network).

    ``components``: which of transformer, text_encoder (CLIP-L), text_encoder_2 (CLIP-G),
    text_encoder_3 (T5), vae, scheduler to read; each text encoder comes with its tokenizer. A
    text encoder not read (or listed as null in model_index.json) is zeros in ``text_encoder``.
    ``max_sequence_length``: T5's token count (diffusers' default 256). Models come back in eval
    mode on ``device``, cast to ``dtype`` when given.
    """
    root = Path(folder)
    index = read_json(root / MODEL_INDEX, "a diffusers pipeline folder")
    if not index.get("_class_name", "").startswith("StableDiffusion3"):
        raise ValueError(f"{root} is a {index.get('_class_name')!r} folder, not a StableDiffusion3Pipeline")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    out = SD3Components()

    # 1. Scheduler -> frame, prediction, the grid's shift
    if "scheduler" in components:
        out.scheduler_config = read_json(_component_folder(root, index, "scheduler") / SCHEDULER_CONFIG, "a diffusers scheduler config")
        out.diffusion, out.sampling = diffusion_from_flow_scheduler(out.scheduler_config)

    # 2. Transformer
    joint_dim = 4096
    if "transformer" in components:
        folder = _component_folder(root, index, "transformer", ("SD3Transformer2DModel",))
        out.transformer = load_sd3_transformer(folder, variant=variant, dtype=dtype).to(device)
        out.denoiser = Denoiser(out.transformer, build_frame(out.diffusion), prediction=out.diffusion["prediction"])
        joint_dim = out.transformer.config.joint_attention_dim
    elif (root / "transformer" / CONFIG_NAME).is_file():
        joint_dim = MMDiTConfig.from_diffusers_config(read_json(root / "transformer" / CONFIG_NAME, "")).joint_attention_dim

    # 3. Text encoders, each with its tokenizer (absent ones are zeros)
    wanted = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if n in components]
    if wanted:
        clips = []
        for n, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            listed = bool(index.get(n)) and index[n][0] is not None
            clips.append(load_clip_with_projection(
                _component_folder(root, index, n, ("CLIPTextModelWithProjection",)), variant=variant, dtype=dtype,
                tokenizer=_component_folder(root, index, tok)).to(device) if n in wanted and listed else None)
        t5 = t5_tok = None
        if "text_encoder_3" in wanted and index.get("text_encoder_3") and index["text_encoder_3"][0] is not None:
            t5, t5_tok = load_t5_encoder(_component_folder(root, index, "text_encoder_3", ("T5EncoderModel",)),
                                         _component_folder(root, index, "tokenizer_3"), variant=variant, dtype=dtype)
            t5 = t5.to(device)
        out.text_encoder = SD3TextEncoder(*clips, t5, t5_tok, joint_dim=joint_dim, max_sequence_length=max_sequence_length,
                                          clip_widths=_clip_widths(root, index))

    # 4. Autoencoder: 16 channels, latents = (z - shift_factor) * scaling_factor
    if "vae" in components:
        out.vae = load_diffusers_vae(_component_folder(root, index, "vae", ("AutoencoderKL",)), variant=variant, dtype=dtype).to(device)
    return out


__all__ = ["SD3Components", "load_sd3_folder", "load_sd3_transformer", "save_sd3_transformer", "load_clip_with_projection", "load_t5_encoder",
           "diffusion_from_flow_scheduler", "is_sd3_folder", "SD3_DIFFUSION", "SD3_SHIFT", "COMPONENTS"]
