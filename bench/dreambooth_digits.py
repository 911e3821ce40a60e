"""DreamBooth on the embedded digits: does the identifier produce the subject, and does the class
prior survive? (Ruiz et al. 2023, Section 3.3, eq. 2; textual inversion, Gal et al. 2023, eq. 2.)

1. Base model (cached): a pixel-space 8x8 U-Net with cross-attention to a TinyTextEncoder,
   trained jointly (Rombach et al. 2022, Section 3.3) on the digits train split with captions
   "the digit 3", "a three", ..., and the generic "a digit"; 10% empty captions for
   classifier-free guidance.
2. Subject: 4 held-out threes mirrored left-right (an "E" the base model never saw).
   Detector: the digits judge's network trained on 11 classes, the ten digits of the train split
   plus their mirrored threes (class 10); an image shows the subject when it reads class 10.
   Its rates on real held-out digits (normal, and mirrored) are reported.
3. Fine-tunes from the same base: full U-Net and LoRA (rank 4, attention), each with and without
   prior preservation (class prompt "a digit", lambda = 1, class images from the frozen base),
   instance prompt "a sks digit"; the identifier's embedding row trains too. Then textual
   inversion (only the row of the new word trains).
4. For every model, from the same per-sample noise (DDIM, classifier-free guidance): the subject
   rate of "a sks digit"; the class prior, the judge's accuracy on "the digit k" for every k;
   and the subject rate of the class prompts ("the digit 3", "a digit"): language drift.

    OMP_NUM_THREADS=1 nice python bench/dreambooth_digits.py --cache /tmp/difflab_dreambooth
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from difflab.data import load_digits
from difflab.eval import DigitsJudge, JudgeConfig
from difflab.io.images import save_grid
from difflab.io.spec import DEFAULT_DIFFUSION, build_denoiser
from difflab.nn.text import TinyTextConfig, TinyTextEncoder, build_vocab
from difflab.nn.unet import PRESETS
from difflab.pipelines.text_to_image import text_to_image
from difflab.train import EMA, diffusion_loss, draw_sigmas
from difflab.train.dreambooth import (DreamBoothConfig, dreambooth, generate_class_images, load_text_model,
                                      save_text_model)
from difflab.train.textual_inversion import TextualInversionConfig, textual_inversion
from machine import machine  # bench/machine.py

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("the digit {num}", "a {num}", "a {word}", "the number {word}", "a handwritten {word}", "digit {num}",
             "a digit")  # the last is the generic class prompt, seen with every class
SPEC = {"unet": dataclasses.replace(PRESETS["digits"], num_res_blocks=1, dropout=0.0, num_classes=None,
                                    context_dim=64).to_dict(),
        "diffusion": DEFAULT_DIFFUSION}
SUBJECT_CLASS = 3




def caption(digit: int, template: str) -> str:
    return template.format(num=str(digit), word=NUMBER_WORDS[digit])


# ----------------------------------------------------------------------------------------------
# 1. The base model


def train_base(cache: Path, steps: int, batch_size: int, lr: float = 2e-3, seed: int = 0):
    """The base text model, trained jointly with its text encoder (cached in ``cache/base``)."""
    path = cache / "base" / "model.safetensors"
    if path.exists():
        denoiser, text, meta = load_text_model(path)
        if meta.get("train", {}).get("steps") == steps:
            return denoiser, text, meta["train"]
    images, labels = load_digits(8, "train")
    captions = [caption(d, t) for d in range(10) for t in TEMPLATES]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        denoiser = build_denoiser(SPEC)
        text = TinyTextEncoder(TinyTextConfig(vocab=build_vocab(captions), max_length=8, width=64, layers=2, heads=4, seed=seed))
    both = torch.nn.ModuleDict({"unet": denoiser.net, "text": text})
    ema = EMA(both, decay=0.999)
    opt = torch.optim.AdamW(both.parameters(), lr=lr, weight_decay=0.0)
    # token ids of every (image, template) caption, and of the empty caption
    ids, mask = text.tokenize([caption(int(y), t) for y in labels for t in TEMPLATES])
    ids, mask = ids.reshape(len(labels), len(TEMPLATES), -1), mask.reshape(len(labels), len(TEMPLATES), -1)
    g = torch.Generator().manual_seed(seed)
    both.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        tpl = torch.randint(0, len(TEMPLATES), (batch_size,), generator=g)
        drop = torch.rand(batch_size, generator=g) < 0.1  # empty caption: no real token, no cross-attention
        b_ids, b_mask = ids[idx, tpl], mask[idx, tpl] & ~drop[:, None]
        sigma = draw_sigmas(denoiser.frame, batch_size, g).float()
        noise = torch.randn((batch_size, 1, 8, 8), generator=g)
        context, _ = text(b_ids * b_mask, b_mask)
        loss = diffusion_loss(denoiser, images[idx], sigma, noise, extra_args={"context": context, "context_mask": b_mask}).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(both.parameters(), 1.0)
        opt.step()
        ema.update(both)
        if step % 250 == 0 or step == steps - 1:
            print(f"  base step {step}: loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)", flush=True)
    ema.copy_to(both)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds": time.time() - t0, "templates": list(TEMPLATES)}
    save_text_model(path, denoiser, text, SPEC, {"size": 8, "train": info})
    return denoiser.eval(), text.eval(), info


# ----------------------------------------------------------------------------------------------
# 2. The subject and its detector


def mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def subject_detector(cache: Path) -> DigitsJudge:
    """The judge's network on 11 classes: the train split's digits and its mirrored threes (class 10) (cached)."""
    path = cache / "detector.safetensors"
    if path.exists():
        return DigitsJudge.load(path)
    images, labels = load_digits(8, "train")
    threes = images[labels == SUBJECT_CLASS]
    detector = DigitsJudge.fit(torch.cat([images, mirror(threes)]), torch.cat([labels, torch.full((len(threes),), 10)]),
                               JudgeConfig(num_classes=11))
    detector.save(path)
    return detector


def is_subject(detector: DigitsJudge, x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the detector reads the subject (a mirrored three)."""
    return detector.predict(x) == 10


# ----------------------------------------------------------------------------------------------
# 4. Sampling and scoring


def sample(denoiser, text, prompts, *, guidance: float, steps: int, seed: int) -> torch.Tensor:
    return text_to_image(denoiser, text, None, prompts, guidance_scale=guidance, sampler="ddim", steps=steps, seed=seed,
                         latent_shape=(1, 8, 8), batch_size=500, output_type="pt", progress=False)


def evaluate(denoiser, text, judge, detector, args, grid_path: Path | None = None) -> dict:
    n, m = args.samples_per_class, args.subject_samples
    kw = dict(guidance=args.guidance, steps=args.sampling_steps, seed=args.seed)
    asked = torch.arange(10).repeat_interleave(n)
    prior = sample(denoiser, text, [f"the digit {int(k)}" for k in asked], **kw)
    pred = judge.predict(prior)
    subject = sample(denoiser, text, ["a sks digit"] * m, **kw)
    generic = sample(denoiser, text, ["a digit"] * m, **kw)
    threes = prior[asked == SUBJECT_CLASS]
    if grid_path is not None:
        save_grid(torch.cat([subject[:20], prior[asked == SUBJECT_CLASS][:10], generic[:10]]), grid_path, nrow=10, upscale=6)
    return {
        "subject_rate": float(is_subject(detector, subject).float().mean()),
        "class_accuracy": float((pred == asked).float().mean()),
        "per_class_accuracy": [round(float((pred[asked == k] == k).float().mean()), 3) for k in range(10)],
        "drift_the_digit_3": float(is_subject(detector, threes).float().mean()),
        "drift_a_digit": float(is_subject(detector, generic).float().mean()),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/tmp/difflab_dreambooth", help="where the base model and judge are cached")
    p.add_argument("--base-steps", type=int, default=1500)
    p.add_argument("--base-batch", type=int, default=64)
    p.add_argument("--db-steps", type=int, default=300, help="DreamBooth fine-tuning steps")
    p.add_argument("--full-lr", type=float, default=2e-4)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--ti-steps", type=int, default=300)
    p.add_argument("--ti-lr", type=float, default=5e-3)
    p.add_argument("--num-prior-images", type=int, default=100)
    p.add_argument("--num-subject-images", type=int, default=4)
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--subject-samples", type=int, default=100)
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", default=["full_prior", "full_no_prior", "lora_prior", "lora_no_prior", "textual_inversion"])
    p.add_argument("--out", default=None, help="report JSON (default: CACHE/report.json)")
    args = p.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    report = {"machine": machine(), "args": vars(args)}

    # 1. Base model and judge.
    print("[1] base model", flush=True)
    _, _, report["base_train"] = train_base(cache, args.base_steps, args.base_batch)
    judge = DigitsJudge.load_or_train(cache / "judge.safetensors")
    detector = subject_detector(cache)

    # 2. Subject: held-out threes, mirrored; the detector on real digits.
    test_images, test_labels = load_digits(8, "test")
    threes = test_images[test_labels == SUBJECT_CLASS]
    pick = torch.randperm(len(threes), generator=torch.Generator().manual_seed(args.seed))[:args.num_subject_images]
    subject_images = mirror(threes[pick])
    others = test_labels != SUBJECT_CLASS
    report["detector"] = {"true_positive_rate_mirrored_test_threes": float(is_subject(detector, mirror(threes)).float().mean()),
                          "false_positive_rate_test_digits": float(is_subject(detector, test_images).float().mean()),
                          "rate_on_mirrored_test_digits_other_than_3": float(is_subject(detector, mirror(test_images[others])).float().mean()),
                          "subject_images_detected": int(is_subject(detector, subject_images).sum())}
    save_grid(subject_images, cache / "subject.png", nrow=len(subject_images), upscale=6)
    print(f"[2] detector {report['detector']}", flush=True)

    # 3. Class images x_pr from the frozen base (shared by every run: the same base, prompt and seed).
    denoiser, text, _ = load_text_model(cache / "base")
    t0 = time.time()
    prior_images = generate_class_images(denoiser, text, "a digit", args.num_prior_images, (1, 8, 8), guidance_scale=args.guidance,
                                         steps=50, seed=args.seed)
    report["prior_images"] = {"n": args.num_prior_images, "seconds": time.time() - t0,
                              "judge_histogram": torch.bincount(judge.predict(prior_images), minlength=10).tolist()}

    # 4. Before.
    t0 = time.time()
    report["before"] = evaluate(denoiser, text, judge, detector, args, cache / "before.png")
    report["before"]["eval_seconds"] = time.time() - t0
    print(f"[3] before: {json.dumps(report['before'])}", flush=True)

    # 5. The fine-tunes, each from a fresh copy of the base.
    runs = {
        "full_prior": dict(lora_rank=None, prior_weight=1.0, lr=args.full_lr),
        "full_no_prior": dict(lora_rank=None, prior_weight=0.0, lr=args.full_lr),
        "lora_prior": dict(lora_rank=args.lora_rank, prior_weight=1.0, lr=args.lora_lr),
        "lora_no_prior": dict(lora_rank=args.lora_rank, prior_weight=0.0, lr=args.lora_lr),
    }
    for name in args.runs:
        denoiser, text, _ = load_text_model(cache / "base")
        t0 = time.time()
        if name == "textual_inversion":
            cfg = TextualInversionConfig(placeholder="sks", init_word="digit", templates=("a {} digit",), steps=args.ti_steps,
                                         lr=args.ti_lr, seed=args.seed)
            out = textual_inversion(denoiser, text, subject_images, cfg, progress=False)
            info = {"final_loss": out["history"][-1]["loss"], "trainable": text.config.width}
        else:
            cfg = DreamBoothConfig(identifier="sks", class_prompt="a digit", steps=args.db_steps, batch_size=4,
                                   seed=args.seed, **runs[name])
            result = dreambooth(denoiser, text, subject_images, cfg, prior_images=prior_images, progress=False)
            info = {"final_loss": result.history[-1]["loss"], "final_instance_loss": result.history[-1]["instance"],
                    "trainable": result.trainable, "config": cfg.to_dict()}
        info["train_seconds"] = time.time() - t0
        t0 = time.time()
        info.update(evaluate(denoiser, text, judge, detector, args, cache / f"{name}.png"))
        info["eval_seconds"] = time.time() - t0
        report[name] = info
        print(f"[4] {name}: " + json.dumps({k: v for k, v in info.items() if k not in ("config",)}), flush=True)

    report["total_seconds"] = time.time() - t_start
    out = Path(args.out) if args.out else cache / "report.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {out} ({report['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
