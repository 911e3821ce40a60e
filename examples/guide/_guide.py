"""What every example of the guide shares: its command line, where its picture goes, how it prints
its figures (one ``name = value`` line each, which ``tests/test_guide.py`` reads and checks against
the example's ``BOUNDS``), and the small digits model and judge that many chapters use, trained once
(seeded, so the same on every CPU run) and cached.

An example is ``examples/guide/NN_slug.py`` with ``BOUNDS = {name: (low, high)}`` (the bounds its
``--fast`` run must print inside) and ``main(argv=None) -> dict`` (the figures it printed).
Run one: ``python examples/guide/03_ddpm.py`` (full, writes ``docs/guide/images/03_ddpm.png``) or
``python examples/guide/03_ddpm.py --fast --out /tmp/guide`` (the test's version).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "docs" / "guide" / "images"


def parse(argv=None, doc: str | None = None, **extra) -> argparse.Namespace:
    """``--fast`` (the test's short version), ``--out DIR`` (where the picture goes; default
    docs/guide/images in a full run, required with ``--fast``), ``--seed``. ``extra``: more options
    as ``name=(type, default, help)``."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--fast", action="store_true", help="the short version the tests run (bounds in BOUNDS)")
    p.add_argument("--out", type=Path, default=None, help="folder for the picture (default docs/guide/images)")
    p.add_argument("--seed", type=int, default=0)
    for name, (kind, default, help_) in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=help_)
    args = p.parse_args(argv)
    if args.fast and args.out is None:
        p.error("--fast needs --out DIR (the committed pictures come from full runs)")
    return args


def picture(args, name: str) -> Path:
    """The path of this example's picture ``name`` (with its suffix: .png, .gif, .wav)."""
    folder = Path(args.out) if args.out is not None else IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def report(figures: dict) -> dict:
    """Print one ``name = value`` line per figure (names are identifiers) and return them."""
    for name, value in figures.items():
        if not name.isidentifier():
            raise ValueError(f"figure name {name!r} must be an identifier")
        v = float(value)
        print(f"{name} = {v:.6g}" if math.isfinite(v) else f"{name} = {v}")
    return figures


@contextlib.contextmanager
def threads(n: int):
    """Run a block with torch on ``n`` threads, restoring the count after (examples whose CPU seconds
    are quoted for one thread; small ops only spin on a second thread of a loaded machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def on_one_thread(run):
    """An example's ``main(argv=None)``: ``run(argv)`` with torch on one thread, its setting restored."""
    def main(argv=None) -> dict:
        with threads(1):
            return run(argv)
    return main


def cache_dir() -> Path:
    """Where trained guide models are kept: $DIFFLAB_GUIDE_CACHE, else ~/.cache/difflab/guide."""
    folder = Path(os.environ.get("DIFFLAB_GUIDE_CACHE", Path.home() / ".cache" / "difflab" / "guide"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def digits_world() -> dict:
    """The digits judge (cached), the training split and the held-out split:
    ``judge, train, train_labels, held, held_labels``."""
    from difflab.data import load_digits
    from difflab.eval import DigitsJudge

    images, labels = load_digits(split="train")
    held, held_labels = load_digits(split="test")
    judge = DigitsJudge.load_or_train(cache_dir() / "digits_judge.safetensors")
    return {"judge": judge, "train": images, "train_labels": labels, "held": held, "held_labels": held_labels}


def digits_spec(model_channels: int = 16, prediction: str = "v", schedule: str = "cosine") -> dict:
    """The guide's class-conditional digits U-Net: the ``digits`` preset at ``model_channels`` wide
    (16: about 0.27 M parameters), DDPM's discrete schedule, no dropout."""
    from difflab.nn.unet import PRESETS

    unet = dataclasses.replace(PRESETS["digits"], dropout=0.0, model_channels=model_channels)
    return {"unet": unet.to_dict(),
            "diffusion": {"frame": "vp_discrete", "schedule": schedule, "T": 1000, "zero_terminal_snr": False,
                          "prediction": prediction}}


def digits_model(fast: bool, *, steps: int | None = None, spec: dict | None = None, seed: int = 0, **train):
    """A class-conditional digits denoiser (EMA weights, eval mode), trained with ``difflab.train``
    and cached by its settings: full 600 steps (about 40 s on the 2-core CPU), fast 80 steps.
    ``train``: more :class:`difflab.train.TrainConfig` fields. Returns ``(denoiser, spec)``."""
    from difflab.data import load_digits
    from difflab.io.checkpoint import read_metadata
    from difflab.io.spec import build_denoiser, load_denoiser
    from difflab.train import TrainConfig
    from difflab.train import train as fit_digits

    spec = spec or digits_spec()
    steps = steps or (80 if fast else 600)
    settings = dict(steps=steps, batch_size=64, lr=2e-3, warmup_steps=min(50, steps // 4), ema_decay=0.995,
                    cfg_dropout=0.1, checkpoint_every=0, log_every=10_000, progress=False, seed=seed)
    settings.update(train)
    key = hashlib.sha256(json.dumps([spec, settings], sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = cache_dir() / f"digits_{key}"
    path = folder / "checkpoint.safetensors"
    if path.exists() and read_metadata(path).get("step") != steps:  # an interrupted run: train it again
        shutil.rmtree(folder)
    if not path.exists():  # train in a folder of this process's own, then move it in place
        images, labels = load_digits(split="train")
        denoiser = build_denoiser(spec, seed=seed)
        scratch = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        fit_digits(denoiser, (images, labels), TrainConfig(**settings), scratch, spec=spec)
        try:
            scratch.rename(folder)
        except OSError:  # another process finished the same (deterministic) run first
            shutil.rmtree(scratch, ignore_errors=True)
    denoiser, _ = load_denoiser(path, weights="ema")
    return denoiser.eval(), spec


def judge_samples(world: dict, samples: torch.Tensor, asked: torch.Tensor) -> dict:
    """``accuracy`` (the judge reads the class asked), ``frechet`` (judge features, samples vs
    held-out) and ``frechet_floor`` (training digits vs held-out, the same number of them)."""
    judge, held = world["judge"], world["held"]
    n = min(len(samples), len(held))
    return {"accuracy": judge.accuracy(samples, asked),
            "frechet": judge.frechet(samples, held),
            "frechet_floor": judge.frechet(world["train"][:max(n, 2)], held)}


def print_time(t0: float, c0: float) -> None:
    """The line ``time: W s wall, C s CPU`` since ``t0 = time.time()``, ``c0 = time.process_time()``."""
    print(f"time: {time.time() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU")


def judge_rows(world: dict, rows: dict, asked: torch.Tensor) -> dict:
    """:func:`judge_samples` for each of ``rows`` (name -> samples, all of one size): ``{name}_accuracy``
    and ``{name}_frechet`` per row, then one ``frechet_floor``."""
    figures = {}
    for name, samples in rows.items():
        j = judge_samples(world, samples, asked)
        figures[f"{name}_accuracy"], figures[f"{name}_frechet"] = j["accuracy"], j["frechet"]
    figures["frechet_floor"] = j["frechet_floor"]
    return figures


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (the ``guide`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Write a matplotlib figure (tight, 110 dpi) and close it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    print(f"picture: {path}")
    return path
