"""A model's spec: the JSON that, with its weights, fully rebuilds a denoiser.

::

    {"unet": {...UNetConfig...},
     "diffusion": {"frame": "vp_discrete", "schedule": "cosine", "T": 1000,
                   "zero_terminal_snr": false, "prediction": "v"}}

``"learned_variance": true`` (vp_discrete only) doubles the U-Net's output channels for the
variance interpolation of improved DDPM. ``frame`` is a key of :data:`difflab.core.FRAMES`; the other diffusion keys are that frame's
arguments (``schedule``/``T``/``zero_terminal_snr`` for vp_discrete, ``schedule``/``time_scale``
for vp, ``sigma_min``/``sigma_max`` for ve, ``sigma_data`` for edm, ``time_scale`` for flow).
"""
from __future__ import annotations

import dataclasses

from ..core import EDM, VE, Denoiser, Flow, VPContinuous, VPDiscrete
from ..core.params import check_prediction

DEFAULT_DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "zero_terminal_snr": False, "prediction": "v"}


def build_frame(diffusion: dict):
    """The frame object a diffusion spec names."""
    d = dict(diffusion)
    kind = d.pop("frame", "vp_discrete")
    d.pop("prediction", None)
    d.pop("learned_variance", None)
    if kind == "vp_discrete":
        return VPDiscrete.from_name(d.pop("schedule", "cosine"), d.pop("T", 1000), zero_terminal_snr=d.pop("zero_terminal_snr", False), **d)
    if kind == "vp":
        return VPContinuous(**d)
    if kind == "ve":
        return VE(**d)
    if kind == "edm":
        return EDM(**d)
    if kind == "flow":
        return Flow(**d)
    raise ValueError(f"diffusion frame={kind!r} is unknown; choose one of vp_discrete, vp, ve, edm, flow")


def build_denoiser(spec: dict) -> Denoiser:
    """Build an untrained denoiser (U-Net + frame + parameterization) from a spec."""
    from ..nn.unet import UNet, UNetConfig

    if "unet" not in spec:
        raise ValueError(f"model spec needs a 'unet' entry, got keys {sorted(spec)}")
    diffusion = dict(spec.get("diffusion") or DEFAULT_DIFFUSION)
    config = UNetConfig.from_dict(spec["unet"])
    learned = bool(diffusion.get("learned_variance", False))
    if learned:  # the network also outputs the variance interpolation v (improved DDPM)
        config = dataclasses.replace(config, out_channels=2 * config.in_channels)
    return Denoiser(UNet(config), build_frame(diffusion), prediction=check_prediction(diffusion.get("prediction", "eps")),
                    learned_variance=learned)


def load_denoiser(path, weights: str = "ema", device="cpu") -> tuple[Denoiser, dict]:
    """Rebuild a trained denoiser from a training checkpoint (a ``.safetensors`` file or the run
    directory holding ``checkpoint.safetensors``). ``weights`` is ``"ema"`` or ``"model"``.
    Returns (denoiser in eval mode, checkpoint metadata)."""
    from .checkpoint import load_checkpoint, load_model_state

    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r} must be 'ema' or 'model'")
    tensors, meta = load_checkpoint(path, device=device)
    if not meta.get("spec"):
        raise ValueError(f"checkpoint {path} has no model spec: it was not written by difflab train (or train() got no spec=)")
    denoiser = build_denoiser(meta["spec"])
    load_model_state(denoiser.net, tensors, prefix=f"{weights}.")
    return denoiser.to(device).eval(), meta
