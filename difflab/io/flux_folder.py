"""A local diffusers Flux folder in, difflab components out. Offline only.

A folder written by ``FluxPipeline.save_pretrained`` (FLUX.1-dev, FLUX.1-schnell, or a tiny one) holds::

    model_index.json                                   which component lives in which sub-folder
    transformer/config.json + diffusion_pytorch_model[-0000i-of-0000n].safetensors -> FluxTransformer
    text_encoder/   transformers CLIPTextModel        -> CLIPTextEncoder (its pooled vector only)
    tokenizer/      CLIPTokenizer
    text_encoder_2/ transformers T5EncoderModel       -> T5TextEncoder (transformers' own module)
    tokenizer_2/    T5TokenizerFast (tokenizer.json; no sentencepiece needed)
    vae/            AutoencoderKL, 16 latent channels, shift_factor and scaling_factor
    scheduler/scheduler_config.json                   -> the flow grid's shift settings

:func:`load_flux_folder` reads it into :class:`FluxComponents`. The scheduler is not a sampler in
difflab: a ``FlowMatchEulerDiscreteScheduler`` config says the model is a rectified flow
(``Flow`` frame, velocity prediction) and how its sampling grid is shifted: a fixed ``shift``, or
with ``use_dynamic_shifting`` a shift that grows with the image size (``base_shift``,
``max_shift``, ``base_image_seq_len``, ``max_image_seq_len``; see
:func:`difflab.core.grids.resolution_shift`). Those settings are kept in ``sampling``.
Pickled ``.bin`` files are never opened.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import Denoiser, Flow
from ..nn.flux import FluxConfig, FluxTransformer
from ..nn.t5 import T5TextEncoder
from ..nn.text import SD_EXTRA, CLIPTextEncoder, load_clip_tokenizer
from .diffusers_folder import MODEL_INDEX, SCHEDULER_CONFIG, UNET_WEIGHTS, _component_folder, load_diffusers_text_encoder
from .diffusers_vae import load_diffusers_vae
from .folders import CONFIG_NAME, load_into, read_json, read_safetensors, save_model_folder

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler")
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# FLUX.1-dev's scheduler config (FLUX.1-schnell: use_dynamic_shifting false, shift 1)
FLUX_SAMPLING = {"scheduler": SCHEDULER_CLASS, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
# diffusers' defaults of the settings kept, for a config that omits them
_SCHEDULER_DEFAULTS = {"shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                       "base_image_seq_len": 256, "max_image_seq_len": 4096}
# scheduler settings that would change the grid in ways difflab does not reproduce: their neutral values
_NEUTRAL = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "shift_terminal": None,
            "invert_sigmas": False, "stochastic_sampling": False, "time_shift_type": "exponential", "use_flow_sigmas": False}


@dataclass
class FluxComponents:
    """What a Flux checkpoint holds, as difflab objects (None where not loaded).

    ``denoiser`` wraps ``transformer`` into ``D(x, sigma, context=, pooled=[, guidance_scale=])``
    (``Flow`` frame, velocity prediction) on unpacked latents (B, C, H, W); ``text_encoder``
    (CLIP) gives the pooled vector, ``text_encoder_2`` (T5) the token sequence; ``sampling`` the
    grid's shift settings (:data:`FLUX_SAMPLING` when the folder has no scheduler).
    """

    transformer: FluxTransformer | None = None
    text_encoder: CLIPTextEncoder | None = None
    text_encoder_2: T5TextEncoder | None = None
    vae: torch.nn.Module | None = None
    denoiser: Denoiser | None = None
    sampling: dict = field(default_factory=lambda: dict(FLUX_SAMPLING))
    scheduler_config: dict | None = None


def flux_denoiser(transformer: FluxTransformer) -> Denoiser:
    """``Denoiser(transformer, Flow(), "flow")``: the network sees x_t = (1 - t) x0 + t eps and t in [0, 1]."""
    return Denoiser(transformer, Flow(time_scale=1.0), prediction="flow")


def sampling_from_scheduler_config(config: dict) -> dict:
    """The grid's shift settings of a diffusers ``FlowMatchEulerDiscreteScheduler`` config; settings
    that change the grid otherwise (Karras or beta sigmas, a terminal stretch, ...) raise a
    ValueError naming them."""
    cls = config.get("_class_name", SCHEDULER_CLASS)
    if cls != SCHEDULER_CLASS:
        raise ValueError(f"scheduler is a {cls!r}; a Flux folder's is a {SCHEDULER_CLASS!r}")
    odd = [f"{k}={config[k]!r}" for k, v in _NEUTRAL.items() if config.get(k) not in (None, v)]
    if odd:
        raise ValueError(f"unsupported {SCHEDULER_CLASS} settings: {', '.join(odd)} (difflab reproduces the shifted "
                         f"uniform grid: {', '.join(f'{k}={v!r}' for k, v in _NEUTRAL.items())})")
    return {"scheduler": cls, **{k: type(v)(v if config.get(k) is None else config[k]) for k, v in _SCHEDULER_DEFAULTS.items()}}


def load_flux_transformer(folder, *, variant: str | None = None, dtype: torch.dtype | None = None) -> FluxTransformer:
    """A :class:`FluxTransformer` from a diffusers ``FluxTransformer2DModel`` folder (config.json +
    safetensors, sharded or not), in eval mode, its parameters in ``dtype`` (default float32).

    The network is built on the meta device and takes the file's tensors (cast one by one) as its
    parameters: a 12B model never allocates a random copy of itself first."""
    folder = Path(folder)
    config = FluxConfig.from_diffusers_config(read_json(folder / CONFIG_NAME, "a diffusers FluxTransformer2DModel config"))
    with torch.device("meta"):
        net = FluxTransformer(config)
    state = read_safetensors(folder, UNET_WEIGHTS, variant)
    state = {k: v.to(dtype or torch.float32) for k, v in state.items()}
    load_into(net, state, f"diffusers FluxTransformer2DModel weights in {folder}", lambda k: k, assign=True)
    return net.eval()


def save_flux_transformer(net: FluxTransformer, folder) -> Path:
    """Write ``net`` as a diffusers ``FluxTransformer2DModel`` folder; returns the folder."""
    return save_model_folder(folder, UNET_WEIGHTS, net.state_dict(), net.config.to_diffusers_config())


def load_t5_tokenizer(folder):
    """transformers' T5 tokenizer from a local folder (``tokenizer.json``; sentencepiece's
    ``spiece.model`` needs the sentencepiece package); never downloads."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
        raise FileNotFoundError(f"no T5 tokenizer files in {folder}: expected tokenizer.json (or spiece.model)")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(f"the T5 tokenizer needs transformers: {SD_EXTRA}") from e
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_t5_encoder(folder, *, tokenizer=None, variant: str | None = None, dtype: torch.dtype | None = None,
                    max_length: int = 512) -> T5TextEncoder:
    """A :class:`T5TextEncoder` around transformers' ``T5EncoderModel`` read from a local folder
    (config.json + safetensors only), in eval mode. ``tokenizer``: a folder, a tokenizer, or None."""
    folder = Path(folder)
    read_json(folder / CONFIG_NAME, "a transformers T5EncoderModel config")
    try:
        from transformers import T5EncoderModel
    except ImportError as e:
        raise ImportError(f"the T5 text encoder needs transformers: {SD_EXTRA}") from e
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        read_safetensors(folder, "model.safetensors", variant)  # raises, naming any pickle files found
    model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, variant=variant,
                                           dtype=dtype)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_t5_tokenizer(tokenizer)
    return T5TextEncoder(model.eval(), tokenizer, max_length)


def load_flux_folder(folder, *, components=COMPONENTS, variant: str | None = None, dtype: torch.dtype | None = None,
                     device="cpu") -> FluxComponents:
    """Read a local diffusers Flux pipeline folder (never the network). ``components``: which of
    :data:`COMPONENTS` to read (the rest are None); ``variant``: e.g. ``"fp16"``; models come back
    in eval mode on ``device``, cast to ``dtype`` when given."""
    root = Path(folder)
    index = read_json(root / MODEL_INDEX, "a diffusers pipeline folder")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    out = FluxComponents()
    # 1. Scheduler -> grid settings
    if "scheduler" in components:
        out.scheduler_config = read_json(_component_folder(root, index, "scheduler") / SCHEDULER_CONFIG, "a diffusers scheduler config")
        out.sampling = sampling_from_scheduler_config(out.scheduler_config)
    # 2. Transformer -> denoiser
    if "transformer" in components:
        folder = _component_folder(root, index, "transformer", ("FluxTransformer2DModel",))
        out.transformer = load_flux_transformer(folder, variant=variant, dtype=dtype).to(device)
        out.denoiser = flux_denoiser(out.transformer)
    # 3. CLIP (pooled) and T5 (sequence), with their tokenizers
    if "text_encoder" in components:
        tok = load_clip_tokenizer(_component_folder(root, index, "tokenizer")) if "tokenizer" in components else None
        out.text_encoder = load_diffusers_text_encoder(_component_folder(root, index, "text_encoder", ("CLIPTextModel",)),
                                                       tokenizer=tok, variant=variant, dtype=dtype).to(device)
    if "text_encoder_2" in components:
        tok = load_t5_tokenizer(_component_folder(root, index, "tokenizer_2")) if "tokenizer_2" in components else None
        out.text_encoder_2 = load_t5_encoder(_component_folder(root, index, "text_encoder_2", ("T5EncoderModel",)),
                                             tokenizer=tok, variant=variant, dtype=dtype).to(device)
    # 4. Autoencoder
    if "vae" in components:
        out.vae = load_diffusers_vae(_component_folder(root, index, "vae", ("AutoencoderKL",)), variant=variant, dtype=dtype).to(device)
    return out


def is_flux_folder(folder) -> bool:
    """Whether ``folder`` is a diffusers pipeline folder whose transformer is a Flux one."""
    index = Path(folder) / MODEL_INDEX
    try:
        entry = read_json(index, "a diffusers pipeline folder").get("transformer") if index.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(entry, list) and len(entry) == 2 and entry[1] == "FluxTransformer2DModel"


__all__ = ["FluxComponents", "load_flux_folder", "load_flux_transformer", "save_flux_transformer", "load_t5_encoder",
           "load_t5_tokenizer", "flux_denoiser", "sampling_from_scheduler_config", "is_flux_folder", "FLUX_SAMPLING",
           "COMPONENTS"]
