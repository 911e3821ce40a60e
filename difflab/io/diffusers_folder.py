"""A local diffusers Stable Diffusion folder in, difflab components out (and back). Offline only.

A folder written by ``StableDiffusionPipeline.save_pretrained`` (or downloaded earlier) holds::

    model_index.json                      which component lives in which sub-folder
    unet/config.json + diffusion_pytorch_model.safetensors      -> UNetSD          (diffusers names)
    text_encoder/config.json + model.safetensors                -> CLIPTextEncoder (transformers names)
    tokenizer/vocab.json + merges.txt                           -> transformers' CLIPTokenizer
    vae/config.json + diffusion_pytorch_model.safetensors       -> AutoencoderKL   (difflab.io.diffusers_vae)
    scheduler/scheduler_config.json                             -> frame + prediction (a Denoiser)

:func:`load_diffusers_folder` reads it into :class:`StableDiffusionComponents`; the scheduler is
not a sampler in difflab but a noise schedule and a parameterization: ``beta_schedule`` /
``beta_start`` / ``beta_end`` / ``num_train_timesteps`` / ``rescale_betas_zero_snr`` give the
:class:`~difflab.core.VPDiscrete` frame, ``prediction_type`` the prediction (``epsilon`` -> eps,
``v_prediction`` -> v, ``sample`` -> x0), and ``timestep_spacing`` / ``steps_offset`` are kept as
hints for the sampling grid (:func:`difflab.core.grids.discrete_timesteps`).

Pickled ``.bin`` / ``.ckpt`` files are never opened; a missing file raises FileNotFoundError
naming the file expected; weights that do not fit the config raise ValueError naming the missing
and unexpected keys. :func:`save_diffusers_folder` and the per-component ``save_*`` functions
write the same layout back, which diffusers and transformers load.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import Denoiser
from ..core.params import check_prediction
from ..nn.text import CLIPTextEncoder, CLIPTextEncoderConfig, load_clip_tokenizer
from ..nn.unet_sd import UNetSD, UNetSDConfig
from .diffusers_vae import load_diffusers_vae, save_diffusers_vae
from .folders import CONFIG_NAME, load_into, read_json, read_safetensors, save_model_folder, write_config
from .keymaps.clip_text import difflab_to_transformers, transformers_to_difflab
from .spec import build_frame

MODEL_INDEX = "model_index.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")

# diffusers beta_schedule -> difflab discrete schedule name (difflab.core.schedules)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
# diffusers prediction_type -> difflab prediction (difflab.core.params)
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Stable Diffusion 1.x / 2.x training schedule (single files record none)
SD_DIFFUSION = {"frame": "vp_discrete", "schedule": "scaled_linear", "T": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "zero_terminal_snr": False, "prediction": "eps"}
SD_SAMPLING = {"scheduler": "PNDMScheduler", "timestep_spacing": "leading", "steps_offset": 1}


@dataclass
class StableDiffusionComponents:
    """What a Stable Diffusion checkpoint holds, as difflab objects (None where not loaded).

    ``denoiser`` wraps ``unet`` into ``D(x, sigma, context=...)``; ``diffusion`` is its difflab
    diffusion spec (:mod:`difflab.io.spec`); ``sampling`` the scheduler's hints
    (``scheduler`` class name, ``timestep_spacing``, ``steps_offset``, ...); ``scheduler_config``
    the raw diffusers scheduler config when there was one (written back unchanged on export).
    """

    unet: UNetSD | None = None
    text_encoder: CLIPTextEncoder | None = None
    vae: torch.nn.Module | None = None
    denoiser: Denoiser | None = None
    diffusion: dict = field(default_factory=lambda: dict(SD_DIFFUSION))
    sampling: dict = field(default_factory=lambda: dict(SD_SAMPLING))
    scheduler_config: dict | None = None

    @property
    def tokenizer(self):
        return None if self.text_encoder is None else self.text_encoder.tokenizer


# ----------------------------------------------------------------------------------------------
# Components


def load_diffusers_unet(folder, *, variant: str | None = None, dtype: torch.dtype | None = None) -> UNetSD:
    """A :class:`UNetSD` from a diffusers ``UNet2DConditionModel`` folder, in eval mode."""
    folder = Path(folder)
    config = UNetSDConfig.from_diffusers_config(read_json(folder / CONFIG_NAME, "a diffusers UNet2DConditionModel config"))
    unet = UNetSD(config)
    load_into(unet, read_safetensors(folder, UNET_WEIGHTS, variant), f"diffusers UNet2DConditionModel weights in {folder}")
    return unet.to(dtype).eval() if dtype is not None else unet.eval()


def save_diffusers_unet(unet: UNetSD, folder) -> Path:
    """Write ``unet`` as a diffusers ``UNet2DConditionModel`` folder (config.json + weights); returns the folder."""
    return save_model_folder(folder, UNET_WEIGHTS, unet.state_dict(), unet.config.to_diffusers_config())


def load_diffusers_text_encoder(folder, *, tokenizer=None, variant: str | None = None, dtype: torch.dtype | None = None,
                                clip_skip: int = 0, norm_hidden: bool = True) -> CLIPTextEncoder:
    """A :class:`CLIPTextEncoder` from a transformers ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection`` folder (config.json + model.safetensors; a ``text_projection``
    in the weights gives the projection), in eval mode. ``tokenizer``: a tokenizer folder, a
    tokenizer object, or None. ``clip_skip`` and ``norm_hidden`` as :class:`CLIPTextEncoder`'s."""
    folder = Path(folder)
    config = CLIPTextEncoderConfig.from_transformers_config(read_json(folder / CONFIG_NAME, "a transformers CLIPTextModel config"))
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_clip_tokenizer(tokenizer)
    raw = read_safetensors(folder, TEXT_WEIGHTS, variant)
    projection = raw.get("text_projection.weight")
    config = dataclasses.replace(config, projection_dim=None if projection is None else int(projection.shape[0]))
    encoder = CLIPTextEncoder(config, tokenizer=tokenizer, clip_skip=clip_skip, norm_hidden=norm_hidden)
    prefix = "text_model." if any(k.startswith("text_model.") for k in raw) else ""
    load_into(encoder, transformers_to_difflab(raw), f"transformers CLIPTextModel weights in {folder}",
              lambda k: k if k.startswith("text_projection.") else prefix + k)
    return encoder.to(dtype).eval() if dtype is not None else encoder.eval()


def save_diffusers_text_encoder(encoder: CLIPTextEncoder, folder, *, tokenizer_folder=None) -> Path:
    """Write ``encoder`` as a transformers ``CLIPTextModel`` folder (config.json + model.safetensors
    in the ``text_model.*`` layout); its tokenizer too when ``tokenizer_folder`` is given."""
    folder = save_model_folder(folder, TEXT_WEIGHTS, difflab_to_transformers(encoder.state_dict()),
                               encoder.config.to_transformers_config())
    if tokenizer_folder is not None:
        if encoder.tokenizer is None:
            raise ValueError("tokenizer_folder given, but the encoder has no tokenizer to save")
        encoder.tokenizer.save_pretrained(str(tokenizer_folder))
    return folder


def diffusion_from_scheduler_config(config: dict, prediction: str | None = None) -> tuple[dict, dict]:
    """``(diffusion spec, sampling hints)`` from a diffusers scheduler config.

    The spec builds the frame with :func:`difflab.io.spec.build_frame`. ``prediction`` overrides
    the config's ``prediction_type``. Unsupported schedules raise ValueError naming them.
    """
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler config has trained_betas: explicit beta lists are not supported (only named beta_schedule)")
    name = config.get("beta_schedule", "linear")
    if name not in BETA_SCHEDULES:
        raise ValueError(f"scheduler beta_schedule={name!r} is not supported; choose one of {sorted(BETA_SCHEDULES)}")
    ptype = config.get("prediction_type", "epsilon")
    if prediction is None and ptype not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type={ptype!r} is not supported; choose one of {sorted(PREDICTION_TYPES)}")
    diffusion = {"frame": "vp_discrete", "schedule": BETA_SCHEDULES[name], "T": int(config.get("num_train_timesteps", 1000)),
                 "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False)),
                 "prediction": check_prediction(prediction or PREDICTION_TYPES[ptype])}
    if name != "squaredcos_cap_v2":
        diffusion.update(beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)))
    sampling = {"scheduler": config.get("_class_name"), "timestep_spacing": config.get("timestep_spacing", "leading"),
                "steps_offset": int(config.get("steps_offset", 0))}
    for key in ("use_karras_sigmas", "clip_sample", "set_alpha_to_one", "thresholding"):
        if key in config:
            sampling[key] = config[key]
    return diffusion, sampling


def scheduler_config_from_diffusion(diffusion: dict, sampling: dict) -> dict:
    """A diffusers scheduler config for a discrete VP diffusion spec (inverse of :func:`diffusion_from_scheduler_config`)."""
    if diffusion.get("frame") != "vp_discrete":
        raise ValueError(f"only vp_discrete diffusion specs have a diffusers scheduler config, got frame={diffusion.get('frame')!r}")
    schedules = {v: k for k, v in BETA_SCHEDULES.items()}
    predictions = {v: k for k, v in PREDICTION_TYPES.items()}
    config = {"_class_name": sampling.get("scheduler") or "DDIMScheduler", "beta_schedule": schedules[diffusion["schedule"]],
              "num_train_timesteps": diffusion["T"], "prediction_type": predictions[diffusion["prediction"]],
              "rescale_betas_zero_snr": diffusion.get("zero_terminal_snr", False),
              "timestep_spacing": sampling.get("timestep_spacing", "leading"), "steps_offset": sampling.get("steps_offset", 0),
              "clip_sample": sampling.get("clip_sample", False), "set_alpha_to_one": sampling.get("set_alpha_to_one", False)}
    if "beta_start" in diffusion:
        config.update(beta_start=diffusion["beta_start"], beta_end=diffusion["beta_end"])
    return config


def make_denoiser(unet: UNetSD, diffusion: dict) -> Denoiser:
    """``Denoiser(unet, frame, prediction)`` for a diffusion spec."""
    return Denoiser(unet, build_frame(diffusion), prediction=diffusion["prediction"])


# ----------------------------------------------------------------------------------------------
# The pipeline folder


def _component_folder(root: Path, index: dict, name: str, allowed: tuple[str, ...] | None = None) -> Path:
    """``root / name`` after checking that model_index.json lists it with a class in ``allowed`` (None: any)."""
    entry = index.get(name)
    if not entry or entry[0] is None:
        raise FileNotFoundError(f"{root / MODEL_INDEX} lists no {name!r} component")
    library, cls = entry
    if allowed is not None and cls not in allowed:
        raise ValueError(f"{root / MODEL_INDEX}: component {name!r} is a {library}.{cls}; difflab reads {' or '.join(allowed)}")
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no {name}/ folder in {root} (model_index.json lists {library}.{cls})")
    return folder


def read_scheduler_and_unet(out, root: Path, index: dict, components, prediction, variant, dtype, device) -> None:
    """Fill ``out`` (components of an SD-family folder) with the scheduler's frame, prediction and
    grid hints, and the U-Net and its denoiser, for the components asked."""
    if "scheduler" in components:
        sched = _component_folder(root, index, "scheduler")
        out.scheduler_config = read_json(sched / SCHEDULER_CONFIG, "a diffusers scheduler config")
        out.diffusion, out.sampling = diffusion_from_scheduler_config(out.scheduler_config, prediction)
    elif prediction is not None:
        out.diffusion["prediction"] = check_prediction(prediction)
    if "unet" in components:
        out.unet = load_diffusers_unet(_component_folder(root, index, "unet", ("UNet2DConditionModel",)), variant=variant,
                                       dtype=dtype).to(device)
        out.denoiser = make_denoiser(out.unet, out.diffusion)


def load_diffusers_folder(folder, *, components=COMPONENTS, variant: str | None = None, dtype: torch.dtype | None = None,
                          device="cpu", prediction: str | None = None, clip_skip: int = 0) -> StableDiffusionComponents:
    """Read a local diffusers Stable Diffusion 1.x / 2.x pipeline folder (never the network).

    ``components``: which of unet, text_encoder, tokenizer, vae, scheduler to read (the rest are
    None). ``variant``: e.g. ``"fp16"`` for ``*.fp16.safetensors`` files. Models come back in eval
    mode on ``device``, cast to ``dtype`` when given. ``prediction`` overrides the scheduler's.
    """
    root = Path(folder)
    index = read_json(root / MODEL_INDEX, "a diffusers pipeline folder")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    if index.get("_class_name", "").startswith("StableDiffusion3"):
        raise ValueError(f"{root} is a {index['_class_name']}: read it with difflab.io.sd3_folder.load_sd3_folder")
    if index.get("text_encoder_2") or index.get("_class_name", "").startswith("StableDiffusionXL"):
        raise ValueError(f"{root} is a {index.get('_class_name')} (two text encoders): load SDXL folders with "
                         "difflab.io.load_sdxl_folder (load_diffusers_folder reads SD 1.x / 2.x)")
    out = StableDiffusionComponents()

    # 1. Scheduler -> frame, prediction, grid hints; 2. U-Net
    read_scheduler_and_unet(out, root, index, components, prediction, variant, dtype, device)

    # 3. Tokenizer and text encoder
    tokenizer = None
    if "tokenizer" in components:
        tokenizer = load_clip_tokenizer(_component_folder(root, index, "tokenizer", ("CLIPTokenizer", "CLIPTokenizerFast")))
    if "text_encoder" in components:
        folder = _component_folder(root, index, "text_encoder", ("CLIPTextModel",))
        out.text_encoder = load_diffusers_text_encoder(folder, tokenizer=tokenizer, variant=variant, dtype=dtype, clip_skip=clip_skip).to(device)

    # 4. Autoencoder (difflab.io.diffusers_vae)
    if "vae" in components:
        out.vae = load_diffusers_vae(_component_folder(root, index, "vae", ("AutoencoderKL",)), variant=variant, dtype=dtype).to(device)
    return out


def save_diffusers_folder(components: StableDiffusionComponents, folder, *, pipeline_class: str = "StableDiffusionPipeline") -> Path:
    """Write the components that are present as a diffusers pipeline folder (model_index.json,
    unet/, text_encoder/, tokenizer/, vae/, scheduler/); returns the folder."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1", "requires_safety_checker": False,
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    if components.unet is not None:
        save_diffusers_unet(components.unet, root / "unet")
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    if components.text_encoder is not None:
        tok = root / "tokenizer" if components.tokenizer is not None else None
        save_diffusers_text_encoder(components.text_encoder, root / "text_encoder", tokenizer_folder=tok)
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        if tok is not None:
            index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    if components.vae is not None:
        save_diffusers_vae(components.vae, root / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    sched = components.scheduler_config or scheduler_config_from_diffusion(components.diffusion, components.sampling)
    (root / "scheduler").mkdir(exist_ok=True)
    write_config(root / "scheduler", SCHEDULER_CONFIG, sched)
    index["scheduler"] = ["diffusers", sched["_class_name"]]
    write_config(root, MODEL_INDEX, index)
    return root


__all__ = ["StableDiffusionComponents", "load_diffusers_folder", "save_diffusers_folder", "load_diffusers_unet",
           "save_diffusers_unet", "load_diffusers_text_encoder", "save_diffusers_text_encoder",
           "diffusion_from_scheduler_config", "scheduler_config_from_diffusion", "make_denoiser", "read_safetensors",
           "SD_DIFFUSION", "SD_SAMPLING"]
