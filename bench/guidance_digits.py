"""Guidance on the embedded digits: classifier guidance, safety and reward guidance, SAG and PAG.

Trains (and caches) an *unconditional* digits U-Net (the demo's model with no labels) and a
noise-aware classifier, then measures with the digits judge (:class:`difflab.eval.DigitsJudge`):

1. classifier guidance: judge accuracy for the asked class (each of the 10 classes asked
   equally often; chance is about 10%) and the Frechet distance to held-out digits, per scale;
2. safety guidance away from one class (default 7): the rate at which the judge reads that
   class, and the Frechet distance to held-out digits (all of them, and those without that
   class) before and after; the same with reward guidance on a clean-image reward;
3. SAG and PAG: mean absolute change of the samples against unguided samples from the same
   noise, and the Frechet distance with and without.

Every configuration samples from the same per-sample noise (DDIM, trailing timesteps).

    OMP_NUM_THREADS=1 nice python bench/guidance_digits.py --cache /tmp/difflab_guidance
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from difflab.core import SampleNoise, grids
from difflab.data import load_digits
from difflab.demos.digits import DEMO_SPEC, DEMO_TRAIN
from difflab.eval import DigitsJudge
from difflab.guidance import (ClassifierConfig, ClassifierGuidance, NoisyClassifier, PerturbedAttentionGuidance,
                              RewardGuidance, SafetyGuidance, SelfAttentionGuidance, classifier_accuracy)
from difflab.guidance.safety import unwanted_log_probs
from difflab.io.spec import build_denoiser
from difflab.nn.unet import PRESETS
from difflab.samplers import sample_ddim
from difflab.train import train, train_classifier
from machine import machine  # bench/machine.py

UNCOND_SPEC = {"unet": dataclasses.replace(PRESETS["digits"], dropout=0.0, num_classes=None).to_dict(),
               "diffusion": DEMO_SPEC["diffusion"]}




# ----------------------------------------------------------------------------------------------
# Models


def unconditional_model(cache: Path, steps: int):
    """The demo's U-Net and diffusion with no labels, trained on the digits train split (cached)."""
    images, _ = load_digits(split="train")
    denoiser = build_denoiser(UNCOND_SPEC)
    config = dataclasses.replace(DEMO_TRAIN, steps=steps, cfg_dropout=0.0, progress=False)
    t0 = time.time()
    state = train(denoiser, images, config, cache / "uncond", spec=UNCOND_SPEC, resume=True)
    state.ema.copy_to(denoiser.net)
    return denoiser.eval(), time.time() - t0


def noisy_classifier(cache: Path, frame, steps: int):
    """A noise-aware classifier on the digits train split, sigma from the model's training distribution (cached)."""
    path = cache / f"noisy_classifier_{steps}.safetensors"
    if path.exists():
        return NoisyClassifier.load(path), 0.0
    images, labels = load_digits(split="train")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clf = NoisyClassifier(ClassifierConfig(in_channels=1, num_classes=10, model_channels=32))
    t0 = time.time()
    train_classifier(clf, images, labels, frame, steps=steps, batch_size=128, lr=2e-3, seed=0)
    clf.save(path)
    return clf, time.time() - t0


# ----------------------------------------------------------------------------------------------
# Sampling and scoring


def sample(model, n: int, steps: int, *, labels=None, seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """n samples with DDIM on the model's trailing timestep grid; sample i from noise seed (seed, i)."""
    sigmas = grids.for_denoiser(_base(model), steps).float()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = SampleNoise.for_run(seed, b, (1, 8, 8), start=start)
        x = noise() * float(_base(model).prior_std(sigmas[0].double()))
        extra = {} if labels is None else {"class_labels": labels[start:start + b]}
        out.append(sample_ddim(model, x, sigmas, extra_args=extra).clamp(-1, 1))
    return torch.cat(out)


def _base(model):
    while not hasattr(model, "frame"):
        model = model.denoiser
    return model


def score(judge, samples, held, held_no_class, unwanted: int, asked=None, reference=None) -> dict:
    pred = judge.predict(samples)
    r = {"frechet": judge.frechet(samples, held), "frechet_without_unwanted": judge.frechet(samples, held_no_class),
         "unwanted_rate": float((pred == unwanted).float().mean()),
         "class_histogram": torch.bincount(pred, minlength=10).tolist()}
    if asked is not None:
        r["asked_accuracy"] = float((pred == asked).float().mean())
    if reference is not None:
        r["mean_abs_change"] = float((samples - reference).abs().mean())
    return r


def real_floors(judge, n: int, unwanted: int) -> dict:
    """Frechet distances of n real training digits (with, and without the unwanted class) to the
    held-out digits (all, and without that class): what a perfect sampler would score."""
    held, held_labels = load_digits(split="test")
    images, labels = load_digits(split="train")
    without = images[labels != unwanted]
    g = torch.Generator().manual_seed(0)
    real, real_without = images[torch.randperm(len(images), generator=g)[:n]], without[torch.randperm(len(without), generator=g)[:n]]
    return {"frechet_real_train_vs_heldout": judge.frechet(real, held),
            "frechet_real_train_vs_heldout_without_unwanted": judge.frechet(real, held[held_labels != unwanted]),
            "frechet_real_without_unwanted_vs_heldout": judge.frechet(real_without, held),
            "frechet_real_without_unwanted_vs_heldout_without_unwanted": judge.frechet(real_without, held[held_labels != unwanted])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/tmp/difflab_guidance", help="where trained models are cached")
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--classifier-steps", type=int, default=3000)
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--unwanted", type=int, default=7)
    p.add_argument("--sigma-max", type=float, default=1000.0, help="classifier and safety guidance only at sigma <= this")
    p.add_argument("--cg-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--safety-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--reward-scales", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--sag-scales", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--pag-scales", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--out", default=None, help="report JSON (default: CACHE/report.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "args": vars(args)}
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    # 1. Data and the judge
    held, held_labels = load_digits(split="test")
    held_no_class = held[held_labels != args.unwanted]
    judge = DigitsJudge.load_or_train(cache / "digits_judge.safetensors")
    report["judge_heldout_accuracy"] = judge.accuracy(held, held_labels)

    # 2. The unconditional model and the noise-aware classifier
    denoiser, train_s = unconditional_model(cache, args.train_steps)
    clf, clf_s = noisy_classifier(cache, denoiser.frame, args.classifier_steps)
    report["train_seconds"], report["classifier_train_seconds"] = round(train_s, 1), round(clf_s, 1)
    report["classifier_heldout_accuracy"] = {s: classifier_accuracy(clf, held, held_labels, s)
                                            for s in (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)}
    log(f"[models] train {train_s:.0f}s, classifier {clf_s:.0f}s; classifier accuracy by sigma "
        f"{report['classifier_heldout_accuracy']}")

    n = 10 * args.samples_per_class
    asked = torch.arange(10).repeat_interleave(args.samples_per_class)
    report.update(real_floors(judge, n, args.unwanted))
    results = report["results"] = {}

    def run(name, model, labels=None, reference=None):
        t0 = time.time()
        s = sample(model, n, args.sampling_steps, labels=labels)
        r = score(judge, s, held, held_no_class, args.unwanted, asked=asked, reference=reference)
        r["seconds"] = round(time.time() - t0, 1)
        results[name] = r
        log(f"[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        return s

    # 3. Unguided baseline
    base = run("unguided", denoiser)

    # 4. Classifier guidance towards the asked class, below sigma_max (the cosine schedule's top
    #    level, sigma ~ 2e4, is left unguided: see ClassifierGuidance), and once at every level
    for s in args.cg_scales:
        run(f"classifier s={s:g}", ClassifierGuidance(denoiser, clf, s, sigma_max=args.sigma_max), labels=asked, reference=base)
    run("classifier s=2, every level", ClassifierGuidance(denoiser, clf, 2.0), labels=asked, reference=base)

    # 5. Safety guidance away from the unwanted class, and reward guidance on a clean-image reward:
    #    r(x0_hat) = log p(y != unwanted | x0_hat) from the noise-aware classifier at sigma = 0.05
    for s in args.safety_scales:
        run(f"safety complement s={s:g}", SafetyGuidance(denoiser, clf, args.unwanted, s, sigma_max=args.sigma_max),
            reference=base)
    run("safety negative s=1", SafetyGuidance(denoiser, clf, args.unwanted, 1.0, mode="negative", sigma_max=args.sigma_max),
        reference=base)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[args.unwanted] = True

    def reward(x0):
        return unwanted_log_probs(clf(x0, torch.full((len(x0),), 0.05)), mask)[1]

    for s in args.reward_scales:
        run(f"reward s={s:g}", RewardGuidance(denoiser, reward, s), reference=base)

    # 6. SAG and PAG on the middle self-attention
    for s in args.sag_scales:
        run(f"SAG s={s:g}", SelfAttentionGuidance(denoiser, s), reference=base)
    run("SAG x0-space s=1", SelfAttentionGuidance(denoiser, 1.0, space="x0"), reference=base)
    for s in args.pag_scales:
        run(f"PAG s={s:g}", PerturbedAttentionGuidance(denoiser, s), reference=base)
    run("PAG all layers s=1", PerturbedAttentionGuidance(denoiser, 1.0, layers="*"), reference=base)

    out = Path(args.out) if args.out else cache / "report.json"
    out.write_text(json.dumps(report, indent=2))
    log(f"report written to {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
