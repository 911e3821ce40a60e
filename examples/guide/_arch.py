"""What the architecture chapters of the guide (5, 7, 8, 9, 13, 21) share: the 16x16 digits, a small
KL autoencoder trained on them, the text demo's models at guide scale, and small helpers (parameter
counts, timing). Trained models are cached beside the shared digits model (``_guide.cache_dir()``),
keyed by their settings, so the chapters that use the same one train it once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import math

import torch

import _guide as guide


def count(module: torch.nn.Module) -> int:
    """The number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def _finished(folder, steps: int) -> dict | None:
    """The tensors of the run cached in ``folder`` if it reached ``steps``, else None (train it)."""
    from difflab.io.checkpoint import load_checkpoint, read_metadata

    path = folder / "checkpoint.safetensors"
    if path.exists() and read_metadata(path).get("step") == steps:
        return load_checkpoint(path)[0]
    return None


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digits16(split: str = "train"):
    """The embedded digits upsampled (nearest) to 16x16: ``(images, labels)``."""
    from difflab.data import load_digits

    return load_digits(16, split=split)


VAE_WIDTHS = (16, 32, 32)  # the text demo's autoencoder: factor 4, 16x16x1 <-> 4x4x4


def digits_vae(fast: bool, *, kl_weight: float = 1e-3, steps: int | None = None, widths=VAE_WIDTHS, seed: int = 0):
    """A KL autoencoder (``AutoencoderKL``, the ``digits`` preset at ``widths``) trained on the 16x16
    digits with L1 + ``kl_weight`` KL (summed, LDM's convention; :class:`difflab.train.VAEObjective`),
    then given the latents' shift and scale (zero mean, unit variance; Rombach et al. 2022,
    Section 4.3.2). AdamW at 3e-3 after a 10% warmup, batch 16, full 300 steps, fast 100; cached. Returns the VAE in eval mode."""
    from difflab.demos.text import set_latent_scale
    from difflab.io.checkpoint import load_model_state
    from difflab.nn.vae import PRESETS, AutoencoderKL
    from difflab.train import TrainConfig, VAEObjective, fit

    steps = steps or (100 if fast else 300)
    config = dataclasses.replace(PRESETS["digits"], block_out_channels=tuple(widths), norm_num_groups=8)
    settings = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=round(0.1 * steps),
                           grad_clip=None, ema_decay=None, checkpoint_every=0, log_every=steps, seed=seed, progress=False)
    folder = guide.cache_dir() / f"vae_{_key(config.to_dict(), dataclasses.asdict(settings), kl_weight)}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(config)
    images, _ = digits16("train")
    done = _finished(folder, steps)
    if done is None:
        fit(VAEObjective(vae, reconstruction="l1", kl_weight=kl_weight), {"x": images}, settings, folder)
    else:
        load_model_state(vae, done, "model.")
    vae.eval()
    return set_latent_scale(vae, images, seed)


def text_config(fast: bool, seed: int = 0):
    """The text demo's models at guide scale: U-Net 16 wide, 500 steps at batch 64 (fast: 120)."""
    from difflab.demos.text import TextDemoConfig

    return TextDemoConfig(unet_channels=16, steps=120 if fast else 500, batch_size=64, warmup_steps=20,
                          lr=2e-3, ema_decay=0.99, seed=seed)


def text_model(fast: bool, seed: int = 0) -> dict:
    """The text demo's tiny text encoder and latent U-Net with cross-attention, trained together on
    (latent, caption) pairs of the 16x16 digits with 10% empty captions, in the latent space of
    :func:`digits_vae`; cached. Returns ``vae``, ``text``, ``net``, ``denoiser``, ``config``, ``data``."""
    from difflab.demos.text import EMPTY_CAPTION, build_models, encode_captions, load_caption_data
    from difflab.io.checkpoint import load_model_state
    from difflab.train import TrainConfig, train

    cfg = text_config(fast, seed)
    data = load_caption_data(cfg, lambda _: None)
    vae = digits_vae(fast, kl_weight=cfg.vae_kl_weight)
    _, text, net, denoiser = build_models(cfg, data["vocab"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # one posterior draw per (digit, caption) pair
        latents = torch.cat([vae.encode_latents(data["images"][i], g) for i in data["index"].split(2048)])
    ids = encode_captions(text, data["texts"])
    settings = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                           ema_decay=cfg.ema_decay, cfg_dropout=cfg.cfg_dropout, checkpoint_every=0,
                           log_every=cfg.steps, seed=seed, progress=False)
    folder = guide.cache_dir() / f"text_{_key(dataclasses.asdict(cfg), dataclasses.asdict(settings), vae.config.to_dict())}"
    done = _finished(folder, cfg.steps)
    if done is None:
        state = train(denoiser, (latents, None, {"input_ids": ids}), settings, folder,
                      null_cond={"input_ids": encode_captions(text, [EMPTY_CAPTION])[0]})
        state.ema.copy_to(net)
    else:
        load_model_state(net, done, "ema.")
    net.eval()
    return {"vae": vae, "text": text, "net": net, "denoiser": denoiser.eval(), "config": cfg, "data": data}


class Timer:
    """Wall and process CPU seconds of a ``with`` block: ``.wall``, ``.cpu``."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


def best_time(fn, repeats: int = 5) -> float:
    """The fastest of ``repeats`` wall-clock runs of ``fn()`` in seconds (the least disturbed by load)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def record(net, kind, fn) -> list:
    """Run ``fn()`` with forward hooks on every ``kind`` module of ``net``: ``(name, module, inputs)`` per call."""
    calls, handles = [], []
    for name, m in net.named_modules():
        if isinstance(m, kind):
            handles.append(m.register_forward_hook(lambda mod, a, out, name=name: calls.append((name, mod, a))))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return calls


@torch.no_grad()
def cross_attention_weights(module, x, context, mask) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of a :class:`difflab.nn.layers.CrossAttention` from the pixels of
    ``x`` (B, C, H, W) to ``context`` tokens, padding masked (Rombach et al. 2022, eq. 3): (B, heads, HW, L)."""
    from difflab.nn.layers import split_heads

    q = split_heads(module.q(module.norm(x).flatten(2).transpose(1, 2)), module.num_heads)
    k, _ = (split_heads(z, module.num_heads) for z in module.kv(context).chunk(2, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)


def train_digits(spec: dict, steps: int, seed: int, world: dict, prepare=None):
    """A class-conditional digits denoiser of ``spec`` trained ``steps`` steps with the guide's
    shared settings (batch 64, lr 2e-3, EMA 0.995, 10% null labels), in memory. ``prepare(denoiser)``
    runs before training (e.g. to add hooks). Returns the EMA denoiser in eval mode."""
    from difflab.io.spec import build_denoiser
    from difflab.train import TrainConfig, train

    denoiser = build_denoiser(spec, seed=seed)
    if prepare is not None:
        prepare(denoiser)
    config = TrainConfig(steps=steps, batch_size=64, lr=2e-3, warmup_steps=min(50, steps // 4), ema_decay=0.995,
                         cfg_dropout=0.1, checkpoint_every=0, log_every=steps, progress=False, seed=seed)
    state = train(denoiser, (world["train"], world["train_labels"]), config, None)
    state.ema.copy_to(denoiser.net)
    return denoiser.eval()


@torch.no_grad()
def x0_error(denoiser, images, labels, sigmas, seed: int) -> list[float]:
    """Mean squared error of D(x0 + sigma eps, sigma) against x0, per sigma in ``sigmas``."""
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return [float(((denoiser(images + s * eps, torch.full((len(images),), s), class_labels=labels) - images) ** 2).mean())
            for s in sigmas]
