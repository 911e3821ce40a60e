"""What the editing chapters of the guide (16, 17, 18, 19, 33, 46) share: per-sample noise, a
grid for the digits model, and a row-of-digits drawing helper. Nothing here is a method; the
methods are difflab's."""
from __future__ import annotations

import shutil

import torch

from difflab.core import SampleNoise
from difflab.core import grids
from difflab.io.checkpoint import read_metadata

NULL_CLASS = 10  # the digits model's unconditional class (it was trained with label dropout)


def noise_for(seed: int, n: int, shape=(1, 8, 8)) -> SampleNoise:
    """Per-sample noise of samples 0 .. n-1 of a run seeded ``seed`` (same image whatever the batch)."""
    return SampleNoise.for_run(seed, n, shape)


def grid(denoiser, steps: int) -> torch.Tensor:
    """The denoiser's default sampling grid of ``steps`` steps (trailing timesteps), ending in 0."""
    return grids.for_denoiser(denoiser, steps)


def labels(n: int, value: int = NULL_CLASS) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long)


def draw_rows(fig, rows: list[tuple[str, torch.Tensor]], columns: int, top: int = 0, total_rows: int | None = None):
    """Draw ``rows`` of (title, images (N, 1, H, W) in [-1, 1]) as a grid of ``columns`` digits each,
    starting at subplot row ``top`` of ``total_rows``."""
    total_rows = total_rows or len(rows)
    for r, (title, images) in enumerate(rows):
        for c in range(columns):
            ax = fig.add_subplot(total_rows, columns, (top + r) * columns + c + 1)
            ax.imshow(images[c, 0].detach().numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")


def trained(name: str, spec: dict, data, fast: bool, steps: tuple[int, int], seed: int = 0, **train_kwargs):
    """A denoiser built from ``spec`` and trained with ``difflab.train.train`` on ``data`` for
    ``steps[0]`` (fast) or ``steps[1]`` steps (batch 64, lr 2e-3, EMA 0.995), cached in the guide's
    cache by its settings as guide.digits_model caches the digits model. Returns the EMA denoiser."""
    import hashlib
    import json

    import _guide as guide
    from difflab.io.spec import build_denoiser, load_denoiser
    from difflab.train import TrainConfig, train

    n = steps[0] if fast else steps[1]
    settings = dict(steps=n, batch_size=64, lr=2e-3, warmup_steps=min(50, n // 4), ema_decay=0.995, cfg_dropout=0.0,
                    checkpoint_every=0, log_every=10_000, progress=False, seed=seed)
    key = hashlib.sha256(json.dumps([name, spec, settings, sorted(train_kwargs)], sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = guide.cache_dir() / f"{name}_{key}"
    path = folder / "checkpoint.safetensors"
    if path.exists() and read_metadata(path).get("step") != n:  # an interrupted run: train it again
        shutil.rmtree(folder)
    if not path.exists():
        denoiser = build_denoiser(spec, seed=seed)
        train(denoiser, data, TrainConfig(**settings), folder, spec=spec, **train_kwargs)
    denoiser, _ = load_denoiser(path, weights="ema")
    return denoiser.eval()


def trained_module(name: str, denoiser, data, fast: bool, steps: tuple[int, int], seed: int = 0, lr: float = 2e-3,
                   **train_kwargs):
    """Train ``denoiser`` (whose trainable parameters are already chosen, e.g. an adapter around a
    frozen base) with ``difflab.train.train`` for ``steps[0]`` (fast) or ``steps[1]`` steps, cached
    in the guide's cache by name, settings and initial weights; loads the EMA weights into it."""
    import hashlib
    import json

    import _guide as guide
    from difflab.io.checkpoint import load_checkpoint, load_model_state
    from difflab.train import TrainConfig, train

    n = steps[0] if fast else steps[1]
    settings = dict(steps=n, batch_size=64, lr=lr, warmup_steps=min(50, n // 4), ema_decay=0.99, cfg_dropout=0.0,
                    checkpoint_every=0, log_every=10_000, progress=False, seed=seed)
    start = sum(float(p.detach().double().sum()) for p in denoiser.net.parameters())  # the initial weights, in brief
    key = hashlib.sha256(json.dumps([name, settings, round(start, 6)], sort_keys=True).encode()).hexdigest()[:16]
    folder = guide.cache_dir() / f"{name}_{key}"
    path = folder / "checkpoint.safetensors"
    if path.exists() and read_metadata(path).get("step") != n:  # an interrupted run: train it again
        shutil.rmtree(folder)
    if not path.exists():
        train(denoiser, data, TrainConfig(**settings), folder, **train_kwargs)
    tensors, _ = load_checkpoint(path)
    load_model_state(denoiser.net, tensors, "ema.")
    return denoiser.eval()


SD_CONTEXT_TOKENS, SD_CONTEXT_DIM = 4, 32


def sd_base(fast: bool, seed: int = 0):
    """The small Stable-Diffusion-style digits model that the adapter chapters (18, 19) steer:
    a ``UNetSD`` (widths 16/32, attention at 4x4, 0.25 M parameters) at 8x8, unconditional,
    its cross-attention fed one fixed "empty prompt" (4 tokens, seeded). Trained with
    ``difflab.train.train`` (v-prediction, cosine) and cached: fast 120 steps, full 600.
    Returns ``(denoiser, context)`` with ``context`` (1, 4, 32)."""
    from difflab.data import load_digits
    from difflab.io.spec import make_spec
    from difflab.nn.unet_sd import UNetSDConfig

    unet = UNetSDConfig(in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                        down_attention=(False, True), up_attention=(True, False), num_heads=(2, 4),
                        cross_attention_dim=SD_CONTEXT_DIM, norm_num_groups=8, sample_size=8)
    spec = make_spec("unet_sd", unet, {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"})
    context = torch.randn(1, SD_CONTEXT_TOKENS, SD_CONTEXT_DIM, generator=torch.Generator().manual_seed(1234))
    images, _ = load_digits(split="train")
    data = (images, None, {"context": context.expand(len(images), -1, -1).contiguous()})
    return trained("sd_digits", spec, data, fast, (120, 600), seed=seed), context
