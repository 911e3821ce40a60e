"""What the training chapters of the guide (26-30, 38) share: a digits training run that keeps its
per-step losses, its raw weights and averages at several EMA decays (cached by its settings, like
``_guide.digits_model``), and sampling a trained denoiser for the digits judge.

Everything goes through difflab's public training API: :func:`difflab.train.train` (the diffusion
objective run by :func:`difflab.train.fit`) with a ``callback`` that records each step.
"""
from __future__ import annotations

import hashlib
import json
import time

import torch

import _guide as guide
from difflab.io.checkpoint import TRAINING_BUFFERS, load_checkpoint, save_checkpoint
from difflab.io.spec import build_denoiser
from difflab.pipelines.class_to_image import generate
from difflab.train import EMA, TrainConfig, train


def tiny_spec(model_channels: int = 8, prediction: str = "v", frame: str = "vp_discrete", **diffusion) -> dict:
    """The guide's digits U-Net spec (``_guide.digits_spec``) at ``model_channels`` wide, with
    another frame (``"edm"``, ``"flow"``) or diffusion keys (``learned_variance=True``) when asked."""
    spec = guide.digits_spec(model_channels, prediction=prediction)
    if frame != "vp_discrete":
        spec["diffusion"] = {"frame": frame, "prediction": prediction}
    spec["diffusion"].update(diffusion)
    return spec


def strip_training_buffers(state: dict) -> dict:
    """A state dict without the FP8 layers' scaling buffers (a plain network loads it)."""
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in TRAINING_BUFFERS}


def run(spec: dict, steps: int, *, seed: int = 0, emas: tuple = (), threads: int | None = None, **config) -> dict:
    """Train a class-conditional digits denoiser of ``spec`` for ``steps`` steps with
    :func:`difflab.train.train` and return ``{"raw": denoiser (last weights), "ema": {decay: denoiser},
    "losses": (steps,) per-step mean loss, "wall": s, "cpu": s}``. ``emas``: EMA decays averaged
    beside the run (:class:`difflab.train.EMA`, updated by the step callback, as the loop updates
    its own), each a decay (with the loop's warmup) or a pair ``(decay, warmup)``. ``config``: more :class:`TrainConfig` fields (digits recipe by default: batch 64,
    lr 2e-3, warmup, 10% label dropout, no EMA of the loop's own). Cached by its settings."""
    settings = dict(steps=steps, batch_size=64, lr=2e-3, warmup_steps=min(50, steps // 4), ema_decay=None,
                    cfg_dropout=0.1, checkpoint_every=0, log_every=10_000, progress=False, seed=seed)
    settings.update(config)
    key = hashlib.sha256(json.dumps([spec, settings, list(emas)], sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = guide.cache_dir() / f"training_{key}.safetensors"
    if not path.exists():
        world = guide.digits_world()
        denoiser = build_denoiser(spec, seed=seed)
        averages = [EMA(denoiser.net, *(d if isinstance(d, tuple) else (d,))) for d in emas]
        losses = []

        def record(info):
            losses.append(info["loss"])
            for a in averages:
                a.update(info["state"].module)

        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            train(denoiser, (world["train"], world["train_labels"]), TrainConfig(**settings), None, callback=record)
        finally:
            torch.set_num_threads(old)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tensors = {f"raw.{k}": v.detach().clone() for k, v in strip_training_buffers(denoiser.net.state_dict()).items()}
        for i, a in enumerate(averages):
            tensors.update({f"ema{i}.{k}": v for k, v in strip_training_buffers(a.state_dict()).items()})
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        save_checkpoint(path, tensors, {"wall": wall, "cpu": cpu, "emas": [list(d) if isinstance(d, tuple) else d for d in emas]})
    tensors, meta = load_checkpoint(path)

    def denoiser_from(prefix: str):
        d = build_denoiser(spec, seed=seed)
        d.net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return d.eval()

    return {"raw": denoiser_from("raw."), "ema": {d: denoiser_from(f"ema{i}.") for i, d in enumerate(emas)},
            "losses": tensors["losses"], "wall": meta["wall"], "cpu": meta["cpu"]}


def sample(denoiser, n: int, *, steps: int = 20, seed: int = 0, guidance_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(digits, labels)``: n class-conditional samples, classes 0-9 in turn, DDIM ``steps``."""
    labels = torch.arange(n) % 10
    x = generate(denoiser, labels, shape=(1, 8, 8), steps=steps, seed=seed, guidance_scale=guidance_scale, progress=False)
    return x, labels


def judge(world: dict, denoiser, n: int, *, steps: int = 20, seed: int = 0) -> dict:
    """The digits judge's accuracy and Frechet distance of n samples (``_guide.judge_samples``)."""
    x, labels = sample(denoiser, n, steps=steps, seed=seed)
    return {**guide.judge_samples(world, x, labels), "samples": x}
