"""A model's spec: the JSON that, with its weights, fully rebuilds a denoiser.

::

    {"network": {"kind": "unet", "config": {...UNetConfig...}},
     "diffusion": {"frame": "vp_discrete", "schedule": "cosine", "T": 1000,
                   "zero_terminal_snr": false, "prediction": "v"}}

``kind`` is a key of :data:`NETWORKS` (one plain dict of the network kinds a spec can name) and
``config`` that kind's config (``to_dict`` of its JSONConfig). The older form
``{"unet": {...UNetConfig...}, "diffusion": {...}}`` is read as kind ``"unet"``, so every
checkpoint written before stays loadable. :func:`make_spec` writes the current form.

``frame`` is a key of :data:`difflab.core.FRAMES`; the other diffusion keys are that frame's
arguments (:data:`FRAME_ARGS`: ``schedule``/``T``/``zero_terminal_snr`` for vp_discrete,
``schedule``/``time_scale`` for vp, ``sigma_min``/``sigma_max`` for ve, ``sigma_data`` for edm,
``time_scale`` for flow) plus ``prediction`` and ``"learned_variance": true`` (vp_discrete only),
which doubles the network's output channels for the variance interpolation of improved DDPM
(Nichol & Dhariwal 2021, Section 3.1). An unknown key anywhere is a :class:`~difflab.config.ConfigError`
naming its section (``spec``, ``spec.network``, ``spec.diffusion``, ``spec.network.config``).

A distilled student adds an optional ``"student"`` section (:data:`STUDENT_KEYS`) saying what
distillation put around the base network: ``"guidance_input"`` (the keywords of
:class:`difflab.nn.GuidanceEmbedding`: the net takes the guidance scale as an input, Meng et al.
2023) and ``"consistency"`` (the keywords of :class:`difflab.core.ConsistencyFunction`: the
denoiser is a consistency function, Song et al. 2023).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, check_keys
from ..core import FRAMES, Denoiser, VPDiscrete
from ..core.consistency import ConsistencyFunction
from ..core.params import check_prediction
from ..nn.diffwave import DiffWave, DiffWaveConfig
from ..nn.dit import MOE_PRESETS as MOE_DIT_PRESETS
from ..nn.dit import PRESETS as DIT_PRESETS
from ..nn.dit import DiT, DiTConfig
from ..nn.guidance_embedding import GuidanceEmbedding
from ..nn.mdm import MDM, MDMConfig, motion_shape
from ..nn.mmdit import MMDiT, MMDiTConfig
from ..nn.motion import PRESETS as MOTION_PRESETS
from ..nn.motion import MotionUNet, MotionUNetConfig
from ..nn.point_transformer import (
    PointTransformer,
    PointTransformerConfig,
    points_shape,
)
from ..nn.sr import SRUNet, SRUNetConfig
from ..nn.temporal_unet import TemporalUNet, TemporalUNetConfig, sequence_shape
from ..nn.unet import PRESETS as UNET_PRESETS
from ..nn.unet import UNet, UNetConfig
from ..nn.unet_sd import PRESETS as UNET_SD_PRESETS
from ..nn.unet_sd import UNetSD, UNetSDConfig
from ..nn.vae import AutoencoderKL, VAEConfig
from ..nn.video_unet import PRESETS as VIDEO_UNET_PRESETS
from ..nn.video_unet import VideoUNet, VideoUNetConfig
from ..nn.stft_unet import StftUNet, StftUNetConfig
from ..nn.wave_unet import WaveUNet, WaveUNetConfig
from .checkpoint import (
    load_checkpoint,
    load_model_state,
    read_metadata,
    without_training_buffers,
)

DEFAULT_DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "zero_terminal_snr": False, "prediction": "v"}


# ----------------------------------------------------------------------------------------------
# Network kinds


@dataclass(frozen=True)
class NetworkKind:
    """One kind of network a spec can name. ``cls(config_cls.from_dict(d))`` builds it;
    ``output`` says what one sample of a denoiser around it is (``"image"``: pixels a PNG can
    show; ``"latent"``: latents a codec decodes; ``"codec"``: not a denoiser at all; later kinds
    add ``"sequence"``, ``"video"``, ``"points"``, ...); ``sample_shape(config, meta)`` is the
    shape of one sample from the config and the checkpoint's metadata (None for a codec);
    ``presets`` its named configs (``difflab train --network KIND --preset NAME``)."""

    cls: type
    config_cls: type
    output: str
    sample_shape: Callable[[object, dict], tuple] | None = None
    presets: dict = dataclasses.field(default_factory=dict)


def image_shape(config, meta: dict) -> tuple:
    """(in_channels, S, S) with S the training images' size recorded in the checkpoint's metadata
    (``metadata.size``, 8 when absent: the digits), else the config's ``sample_size``."""
    size = (meta or {}).get("metadata", {}).get("size") or getattr(config, "sample_size", None) or 8
    return (int(config.in_channels), int(size), int(size))


def audio_shape(config, meta: dict) -> tuple:
    """(in_channels, sample_length): a mono clip of the length the config records."""
    return (int(config.in_channels), int(config.sample_length))


def latent_shape(config, meta: dict) -> tuple:
    """(in_channels, s, s) with s the config's ``sample_size`` (the latent size it was trained at)."""
    return (int(config.in_channels), int(config.sample_size), int(config.sample_size))


def video_shape(config, meta: dict) -> tuple:
    """(in_channels, F, S, S) of a video network's clips: F the frame count recorded in the
    checkpoint's metadata (``metadata.frames``), else the config's ``num_frames`` (motion modules)
    or ``max_frames`` (the space-time U-Net); S ``metadata.size``, else ``sample_size``, else 8."""
    recorded = (meta or {}).get("metadata", {})
    size = recorded.get("size") or config.sample_size or 8
    frames = recorded.get("frames") or getattr(config, "num_frames", None) or config.max_frames
    return (int(config.in_channels), int(frames), int(size), int(size))


# One plain dict: adding a kind is one import and one entry.
NETWORKS: dict[str, NetworkKind] = {
    "unet": NetworkKind(UNet, UNetConfig, "image", image_shape, UNET_PRESETS),
    "unet_sd": NetworkKind(UNetSD, UNetSDConfig, "latent", latent_shape, UNET_SD_PRESETS),
    "dit": NetworkKind(DiT, DiTConfig, "image", image_shape, DIT_PRESETS),
    "moe-dit": NetworkKind(DiT, DiTConfig, "image", image_shape, MOE_DIT_PRESETS),  # DiT with MoE feed-forwards (moe_experts)
    "vae": NetworkKind(AutoencoderKL, VAEConfig, "codec"),
    "mmdit": NetworkKind(MMDiT, MMDiTConfig, "latent", latent_shape),
    "sr_unet": NetworkKind(SRUNet, SRUNetConfig, "image", image_shape),  # super-resolution: low_res= conditioning (SR3, CDM)
    "motion_unet": NetworkKind(MotionUNet, MotionUNetConfig, "video", video_shape, MOTION_PRESETS),  # AnimateDiff motion modules
    "temporal_unet": NetworkKind(TemporalUNet, TemporalUNetConfig, "sequence", sequence_shape),  # action chunks / trajectories: obs=
    "diffwave": NetworkKind(DiffWave, DiffWaveConfig, "audio", audio_shape),  # waveforms (B, 1, L); mel= as a vocoder
    "video_unet": NetworkKind(VideoUNet, VideoUNetConfig, "video", video_shape, VIDEO_UNET_PRESETS),  # (B, C, F, H, W) clips
    "mdm": NetworkKind(MDM, MDMConfig, "motion", motion_shape),  # (B, frames, joints, 3) motions: MDM's transformer, class_labels=
    "point_transformer": NetworkKind(PointTransformer, PointTransformerConfig, "points", points_shape),  # point clouds (B, N, 3)
    "wave_unet": NetworkKind(WaveUNet, WaveUNetConfig, "audio", audio_shape),  # waveforms (B, 1, L): strided 1-D U-Net (CRASH)
    "stft_unet": NetworkKind(StftUNet, StftUNetConfig, "audio", audio_shape),  # waveforms (B, 1, L): 2-D U-Net on their STFT (SGMSE)
}


def network_kind(name: str) -> NetworkKind:
    """The entry of :data:`NETWORKS` named ``name``; a ConfigError listing the kinds otherwise."""
    if name not in NETWORKS:
        raise ConfigError(f"network kind {name!r} is unknown; choose one of {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name]


def kinds_with_output(output: str) -> list[str]:
    """The names of the network kinds whose samples are ``output`` (e.g. "image")."""
    return sorted(name for name, kind in NETWORKS.items() if kind.output == output)


# ----------------------------------------------------------------------------------------------
# Reading and writing specs


def read_spec(spec: dict) -> tuple[str, dict, dict]:
    """``(kind, config, diffusion)`` of a spec in either form, every section checked for unknown
    keys; ``diffusion`` defaults to :data:`DEFAULT_DIFFUSION`."""
    check_keys(spec, ("network", "unet", "diffusion", "student"), "spec")
    if ("network" in spec) == ("unet" in spec):
        raise ConfigError(f"spec needs exactly one of 'network' ({{\"kind\": ..., \"config\": ...}}) or the older "
                          f"'unet', got keys {sorted(spec)}")
    if "unet" in spec:
        kind, config = "unet", spec["unet"]
    else:
        check_keys(spec["network"], ("kind", "config"), "spec.network")
        if "kind" not in spec["network"]:
            raise ConfigError(f"spec.network needs a 'kind': one of {', '.join(sorted(NETWORKS))}")
        kind, config = spec["network"]["kind"], spec["network"].get("config", {})
    network_kind(kind)
    check_keys(config, [f.name for f in dataclasses.fields(NETWORKS[kind].config_cls)], "spec.network.config")
    diffusion = dict(spec.get("diffusion") or DEFAULT_DIFFUSION)
    check_diffusion(diffusion)
    student_section(spec)
    return kind, dict(config), diffusion


# What a spec's "student" section may hold, and the keywords of each entry.
STUDENT_KEYS = {"guidance_input": ("embed", "dim", "features", "w_scale"),
                "consistency": ("form", "sigma_min", "sigma_data", "timestep_scaling")}


def student_section(spec: dict) -> dict:
    """The spec's ``"student"`` section (``{}`` for a model that was not distilled), checked."""
    student = spec.get("student") or {}
    if not isinstance(student, dict):
        raise ConfigError(f"spec.student must be a JSON object, got {type(student).__name__}")
    check_keys(student, tuple(STUDENT_KEYS), "spec.student")
    for name, keys in STUDENT_KEYS.items():
        if name in student:
            if not isinstance(student[name], dict):
                raise ConfigError(f"spec.student.{name} must be a JSON object, got {type(student[name]).__name__}")
            check_keys(student[name], keys, f"spec.student.{name}")
    return dict(student)


def make_spec(kind: str, config, diffusion: dict | None = None) -> dict:
    """A spec in the current form: ``config`` a config object or its dict."""
    network_kind(kind)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {"network": {"kind": kind, "config": config}, "diffusion": dict(diffusion or DEFAULT_DIFFUSION)}


def spec_kind(spec: dict) -> str:
    """The network kind a spec names (``"unet"`` for the older form)."""
    return read_spec(spec)[0]


# ----------------------------------------------------------------------------------------------
# Frames


def _vp_discrete(schedule: str = "cosine", T: int = 1000, **kwargs) -> VPDiscrete:
    return VPDiscrete.from_name(schedule, T, **kwargs)


# How a spec builds the frames whose constructor is not FRAMES[name](**args), and the arguments
# each frame takes in a spec (schedule keywords included).
FRAME_BUILDERS = {"vp_discrete": _vp_discrete}
FRAME_ARGS = {
    "vp_discrete": ("schedule", "T", "zero_terminal_snr", "beta_start", "beta_end", "s", "max_beta"),
    "vp": ("schedule", "time_scale", "t_min", "t_max", "s", "beta_min", "beta_max", "start", "end", "tau", "shift"),
    "ve": ("sigma_min", "sigma_max", "time"),
    "edm": ("sigma_data", "sigma_min", "sigma_max"),
    "flow": ("time_scale", "t_min", "t_max"),
}
DIFFUSION_KEYS = ("frame", "prediction", "learned_variance")


def check_diffusion(diffusion: dict) -> None:
    """A ConfigError for an unknown frame or a key the frame does not take (section spec.diffusion)."""
    if not isinstance(diffusion, dict):
        raise ConfigError(f"spec.diffusion must be a JSON object (a dict), got {type(diffusion).__name__}")
    frame = diffusion.get("frame", "vp_discrete")
    if frame not in FRAMES:
        raise ConfigError(f"diffusion frame={frame!r} is unknown; choose one of {', '.join(FRAMES)}")
    if frame in FRAME_ARGS:
        check_keys(diffusion, DIFFUSION_KEYS + FRAME_ARGS[frame], f"spec.diffusion (frame {frame!r})")


def build_frame(diffusion: dict):
    """The frame object a diffusion spec names: :data:`difflab.core.FRAMES` ``[frame](**args)``
    (or its :data:`FRAME_BUILDERS` entry)."""
    check_diffusion(diffusion)
    args = {k: v for k, v in diffusion.items() if k not in DIFFUSION_KEYS}
    name = diffusion.get("frame", "vp_discrete")
    return FRAME_BUILDERS.get(name, FRAMES[name])(**args)


# ----------------------------------------------------------------------------------------------
# Building and loading


def build_network(kind: str, config) -> nn.Module:
    """The untrained network of ``kind`` (a key of :data:`NETWORKS`) from its config (object or dict)."""
    entry = network_kind(kind)
    if isinstance(config, dict):
        config = entry.config_cls.from_dict(config, "spec.network.config")
    return entry.cls(config)


def build_denoiser(spec: dict, seed: int | None = None) -> Denoiser:
    """Build an untrained denoiser (network + frame + parameterization) from a spec of any kind,
    wrapped as its ``"student"`` section says (a :class:`~difflab.core.ConsistencyFunction`). ``seed`` fixes the initial weights (drawn from torch's generator seeded with it, the caller's
    random state left untouched); None draws them from the global generator as it stands."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_denoiser(spec)
    net = spec_network(spec)
    _, _, diffusion = read_spec(spec)
    denoiser = Denoiser(net, build_frame(diffusion), prediction=check_prediction(diffusion.get("prediction", "eps")),
                        learned_variance=bool(diffusion.get("learned_variance", False)))
    consistency = student_section(spec).get("consistency")
    return ConsistencyFunction(denoiser, **consistency) if consistency is not None else denoiser


def spec_network(spec: dict) -> nn.Module:
    """The untrained network of the denoiser a spec names, without its frame (output channels
    doubled for a learned variance). Built under ``torch.device("meta")`` it gives the shapes of a
    checkpoint's weights without allocating them (:func:`difflab.io.verify.verify_checkpoint`)."""
    kind, config, diffusion = read_spec(spec)
    entry = NETWORKS[kind]
    if entry.output == "codec":
        raise ConfigError(f"network kind {kind!r} is a codec, not a denoiser: build it with build_network({kind!r}, config)")
    config = entry.config_cls.from_dict(config, "spec.network.config")
    if diffusion.get("learned_variance", False):  # the network also outputs the variance interpolation v (improved DDPM)
        if not {"in_channels", "out_channels"} <= {f.name for f in dataclasses.fields(config)}:
            raise ConfigError(f"learned_variance needs a network with in_channels and out_channels; kind {kind!r} has not")
        config = dataclasses.replace(config, out_channels=2 * config.in_channels)
    guidance = student_section(spec).get("guidance_input")
    return GuidanceEmbedding(entry.cls(config), **guidance) if guidance is not None else entry.cls(config)


def checkpoint_spec(path) -> tuple[str, dict]:
    """``(kind, metadata)`` of a training checkpoint, read without its tensors; a ValueError when
    it holds no spec."""
    meta = read_metadata(path)
    if not meta.get("spec"):
        raise ValueError(f"checkpoint {path} has no model spec: it was not written by difflab train (or train() got no spec=)")
    return spec_kind(meta["spec"]), meta


def load_denoiser(path, weights: str = "ema", device="cpu") -> tuple[Denoiser, dict]:
    """Rebuild a trained denoiser of any kind from a training checkpoint (a ``.safetensors`` file
    or the run directory holding ``checkpoint.safetensors``). ``weights`` is ``"ema"`` or
    ``"model"``. Returns (denoiser in eval mode, checkpoint metadata). The FP8 scaling state of
    a run trained with ``fp8`` (:data:`~difflab.io.checkpoint.TRAINING_BUFFERS`) is dropped: the
    network runs from its fp32 weights."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r} must be 'ema' or 'model'")
    tensors, meta = load_checkpoint(path, device=device)
    if not meta.get("spec"):
        raise ValueError(f"checkpoint {path} has no model spec: it was not written by difflab train (or train() got no spec=)")
    denoiser = build_denoiser(meta["spec"])
    load_model_state(denoiser.net, without_training_buffers(tensors), prefix=f"{weights}.")
    return denoiser.to(device).eval(), meta


def sample_shape(spec: dict, meta: dict | None = None) -> tuple:
    """The shape of one sample of the denoiser ``spec`` builds (its kind's ``sample_shape``)."""
    kind, config, _ = read_spec(spec)
    entry = NETWORKS[kind]
    if entry.sample_shape is None:
        raise ConfigError(f"network kind {kind!r} ({entry.output}) has no samples")
    return tuple(entry.sample_shape(entry.config_cls.from_dict(config, "spec.network.config"), meta or {}))


__all__ = [
    "DEFAULT_DIFFUSION",
    "FRAME_ARGS",
    "FRAME_BUILDERS",
    "NETWORKS",
    "STUDENT_KEYS",
    "NetworkKind",
    "build_denoiser",
    "build_frame",
    "build_network",
    "check_diffusion",
    "checkpoint_spec",
    "image_shape",
    "kinds_with_output",
    "latent_shape",
    "load_denoiser",
    "make_spec",
    "network_kind",
    "read_spec",
    "sample_shape",
    "spec_kind",
    "spec_network",
    "student_section",
    "video_shape",
]
