"""ControlNet and IP-Adapter trained and measured on the embedded digits (16x16, pixel space).

Trains (and caches) three things, each with :func:`difflab.train.train`:

1. a base model: a tiny SD U-Net (:class:`difflab.nn.unet_sd.UNetSD`, ``in_channels=1``) on the
   16x16 digits of the train split, v-prediction on the cosine schedule (the demo's diffusion),
   with no prompt: its cross-attention context is a learned constant "empty prompt" of 4 tokens;
2. a ControlNet (Zhang et al. 2023) copied from its encoder, with the base frozen, trained to
   follow edge maps (Sobel magnitude of the digit, thresholded) as the control;
3. an IP-Adapter (Ye et al. 2023) on a copy of the base, trained with the reference image =
   *another* digit of the same class (so it must carry the class, not the pixels). Its image
   encoder is a frozen digits classifier trained with a different seed from the judge (its
   64-d penultimate features), standing in for the paper's frozen CLIP image encoder.

Then measures, on references and controls from the held-out split, with the same per-sample
noise for every configuration (DDIM, trailing timestep grid):

- ControlNet: edge IoU between the control and the edges of the generated digit, controlled vs
  uncontrolled (the base from the same noise), at several conditioning scales and start/end
  windows; a fresh ControlNet's outputs against the base's (zero convolutions: identical);
- IP-Adapter: the judge's class agreement between generated digit and reference (chance 10%),
  at scales 0 (the base), 0.5 and 1; the scale-0 outputs against the base's (identical); and a
  copy check: pixel distance of the samples to their reference vs to another digit of the class.

    OMP_NUM_THREADS=1 nice python bench/control_digits.py --cache /tmp/difflab_control
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difflab.adapters.controlnet import ControlledDenoiser, ControlledUNet, ControlNet
from difflab.adapters.ip_adapter import (ImageProjection, IPAdapterUNet, mark_only_ip_adapter_trainable,
                                         set_ip_adapter_scale)
from difflab.core import Denoiser, SampleNoise, grids
from difflab.data import load_digits, same_class_partner
from difflab.demos.digits import DEMO_SPEC
from difflab.eval import DigitsJudge
from difflab.eval.judge import FitConfig
from difflab.io.spec import build_frame
from difflab.nn.unet_sd import UNetSD, UNetSDConfig
from difflab.samplers import sample_ddim
from difflab.train import TrainConfig, train
from machine import machine  # bench/machine.py

SIZE = 16
UNET = UNetSDConfig(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
                    down_attention=(False, True, True), up_attention=(True, True, False), num_heads=(2, 4, 4),
                    cross_attention_dim=32, norm_num_groups=8, sample_size=SIZE)
PROMPT_TOKENS = 4  # the learned "empty prompt"
IMAGE_TOKENS = 4  # IP-Adapter's N
DIFFUSION = DEMO_SPEC["diffusion"]  # vp_discrete, cosine, T = 1000, v-prediction




# ----------------------------------------------------------------------------------------------
# Edges (the control) and the models


def sobel_edges(images: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """Edge maps (N, 1, H, W) in {0, 1}: the Sobel gradient magnitude of the images mapped to [0, 1]
    (kernels divided by 4, so a 0 -> 1 step scores 1 on the two pixels beside it), above ``threshold``."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    return (g.square().sum(1, keepdim=True).sqrt() > threshold).float()


def edge_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample intersection over union of two {0, 1} edge maps (1 where both are empty)."""
    inter, union = (a * b).flatten(1).sum(1), ((a + b) > 0).float().flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class PromptedUNet(nn.Module):
    """The base model: a UNetSD whose context is a learned constant "empty prompt" (n tokens)."""

    def __init__(self, config: UNetSDConfig, n_tokens: int):
        super().__init__()
        self.unet = UNetSD(config)
        self.prompt = nn.Parameter(torch.randn(1, n_tokens, config.cross_attention_dim))

    def forward(self, x, t, **cond):
        return self.unet(x, t, context=self.prompt.expand(x.shape[0], -1, -1), **cond)


class FeatureEncoder(nn.Module):
    """An image encoder for IP-Adapter: a digits classifier's penultimate features (N, 64)."""

    def __init__(self, classifier: DigitsJudge):
        super().__init__()
        self.classifier = classifier

    def forward(self, images):
        return self.classifier.embed(self.classifier.prepare(images))


def train_cached(denoiser, data, config: TrainConfig, out_dir: Path):
    t0 = time.time()
    state = train(denoiser, data, config, out_dir, resume=True)
    state.ema.copy_to(denoiser.net)
    return denoiser.eval(), round(time.time() - t0, 1)


# ----------------------------------------------------------------------------------------------
# Sampling


def sample(model, frame_denoiser, n: int, steps: int, cond: dict, seed: int = 0, batch_size: int = 200) -> torch.Tensor:
    """n samples with DDIM on the trailing timestep grid; sample i from noise seed (seed, i);
    ``cond`` holds per-sample tensors (sliced per batch) and anything else (passed as it is)."""
    sigmas = grids.for_denoiser(frame_denoiser, steps).float()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = SampleNoise.for_run(seed, b, (1, SIZE, SIZE), start=start)() * float(frame_denoiser.prior_std(sigmas[0].double()))
        extra = {k: (v[start:start + b] if torch.is_tensor(v) and len(v) == n else v) for k, v in cond.items()}
        with torch.no_grad():
            out.append(sample_ddim(model, x, sigmas, extra_args=extra).clamp(-1, 1))
    return torch.cat(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/tmp/difflab_control")
    p.add_argument("--base-steps", type=int, default=1200)
    p.add_argument("--controlnet-steps", type=int, default=600)
    p.add_argument("--ip-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=300, help="held-out controls / references used")
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--out", default=None, help="report JSON (default: CACHE/report.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "args": vars(args), "unet": UNET.to_dict()}
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    frame = build_frame(DIFFUSION)

    # 1. Data, the judge, the IP-Adapter's image encoder (another classifier, another seed)
    images, labels = load_digits(SIZE, "train")
    held, held_labels = load_digits(SIZE, "test")
    judge = DigitsJudge.load_or_train(cache / "digits_judge.safetensors")
    encoder_clf = DigitsJudge.load_or_train(cache / "image_encoder.safetensors", FitConfig(seed=1))
    report["judge_heldout_accuracy"] = judge.accuracy(held, held_labels)
    report["image_encoder_heldout_accuracy"] = encoder_clf.accuracy(held, held_labels)
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(held), generator=g)[: args.samples]
    ref, ref_labels = held[pick], held_labels[pick]
    log(f"[data] {len(images)} train, {len(held)} held out; judge {report['judge_heldout_accuracy']:.3f}, "
        f"image encoder {report['image_encoder_heldout_accuracy']:.3f}")

    # 2. The base model (the empty prompt is learned with it)
    base_cfg = TrainConfig(steps=args.base_steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                           checkpoint_every=250, log_every=100, progress=False, seed=0)
    torch.manual_seed(0)
    base_net = PromptedUNet(UNET, PROMPT_TOKENS)
    base, report["base_train_seconds"] = train_cached(Denoiser(base_net, frame, "v"), images, base_cfg, cache / "base")
    unet, prompt = base_net.unet.requires_grad_(False), base_net.prompt.detach()
    ctx = lambda n: prompt.expand(n, -1, -1).contiguous()  # noqa: E731
    base_d = Denoiser(unet, frame, "v").eval()
    log(f"[base] {sum(q.numel() for q in unet.parameters())} parameters, {report['base_train_seconds']}s")

    # 3. ControlNet on edge maps, the base frozen
    controls = sobel_edges(images)
    torch.manual_seed(1)
    controlnet = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(16,))
    fresh = copy.deepcopy(controlnet)
    cn_cfg = dataclasses.replace(base_cfg, steps=args.controlnet_steps, lr=1e-3, warmup_steps=50, ema_decay=0.99)
    controlled_net = ControlledUNet(unet, controlnet)
    _, report["controlnet_train_seconds"] = train_cached(Denoiser(controlled_net, frame, "v"),
                                                         (images, None, {"context": ctx(len(images)), "control": controls}),
                                                         cn_cfg, cache / "controlnet")
    log(f"[controlnet] {sum(q.numel() for q in controlnet.parameters())} parameters, {report['controlnet_train_seconds']}s")

    # 4. IP-Adapter on a copy of the base: reference = another digit of the same class, 4 per example
    ip_unet = copy.deepcopy(unet)
    torch.manual_seed(2)
    encoder = FeatureEncoder(encoder_clf).requires_grad_(False).eval()
    ip_net = IPAdapterUNet(ip_unet, ImageProjection(encoder_clf.config.feature_dim, UNET.cross_attention_dim, IMAGE_TOKENS), encoder)
    report["ip_adapter_trainable_parameters"] = mark_only_ip_adapter_trainable(ip_net)
    partners = torch.cat([same_class_partner(labels, g) for _ in range(4)])
    ip_images = images.repeat(4, 1, 1, 1)
    embeds = encoder_clf.features(images[partners])
    ip_cfg = dataclasses.replace(base_cfg, steps=args.ip_steps, lr=1e-3, warmup_steps=50, ema_decay=0.99)
    _, report["ip_adapter_train_seconds"] = train_cached(Denoiser(ip_net, frame, "v"),
                                                         (ip_images, None, {"context": ctx(len(ip_images)), "image_embeds": embeds}),
                                                         ip_cfg, cache / "ip_adapter")
    log(f"[ip-adapter] {report['ip_adapter_trainable_parameters']} trainable parameters, {report['ip_adapter_train_seconds']}s")

    # 5. Identity at initialization / at scale 0: outputs against the base's, bit for bit
    xb, tb = torch.randn(16, 1, SIZE, SIZE, generator=g), torch.linspace(1, 999, 16)
    with torch.no_grad():
        y_base = unet(xb, tb, context=ctx(16))
        y_fresh = ControlledUNet(unet, fresh)(xb, tb, context=ctx(16), control=sobel_edges(held[:16]))
        set_ip_adapter_scale(ip_unet, 0.0)
        y_ip0 = ip_net(xb, tb, context=ctx(16), image=held[16:32])
        set_ip_adapter_scale(ip_unet, 1.0)
        y_ip1 = ip_net(xb, tb, context=ctx(16), image=held[16:32])
    report["identity"] = {"fresh_controlnet_equals_base": torch.equal(y_fresh, y_base),
                          "ip_scale0_equals_base": torch.equal(y_ip0, y_base),
                          "ip_scale1_max_abs_change": float((y_ip1 - y_base).abs().max())}
    log(f"[identity] {report['identity']}")

    # 6. ControlNet: edge IoU with the control
    n, steps = len(ref), args.sampling_steps
    control = sobel_edges(ref)
    sigmas = grids.for_denoiser(base_d, steps).float()
    partner_real = held[same_class_partner(held_labels, g)][pick]
    cn = report["controlnet"] = {"real_same_class_other_digit": {"edge_iou": float(edge_iou(sobel_edges(partner_real), control).mean())}}
    controlled_d = Denoiser(controlled_net, frame, "v").eval()
    runs = {"uncontrolled (base)": (base_d, {}),
            "controlled, scale 1": (controlled_d, {"control": control}),
            "controlled, scale 0.5": (ControlledDenoiser(controlled_d, 0.5), {"control": control}),
            "controlled, first half of the steps": (ControlledDenoiser(controlled_d, start=0.0, end=0.5, sigmas=sigmas), {"control": control}),
            "controlled, second half of the steps": (ControlledDenoiser(controlled_d, start=0.5, end=1.0, sigmas=sigmas), {"control": control})}
    for name, (model, cond) in runs.items():
        t0 = time.time()
        s = sample(model, base_d, n, steps, {"context": ctx(n), **cond})
        iou = edge_iou(sobel_edges(s), control)
        cn[name] = {"edge_iou": float(iou.mean()), "edge_iou_std_error": float(iou.std() / n ** 0.5),
                    "judge_accuracy_vs_control_digit": judge.accuracy(s, ref_labels), "seconds": round(time.time() - t0, 1)}
        log(f"[controlnet] {name}: {cn[name]}")

    # 7. IP-Adapter: the judge's class agreement between sample and reference
    ip = report["ip_adapter"] = {}
    ip_d = Denoiser(ip_net, frame, "v").eval()
    ref_pred = judge.predict(ref)
    other = held[same_class_partner(held_labels, g)][pick]  # another held-out digit of the reference's class
    for scale in (0.0, 0.5, 1.0):
        set_ip_adapter_scale(ip_unet, scale)
        t0 = time.time()
        s = sample(ip_d, base_d, n, steps, {"context": ctx(n), "image": ref})
        pred = judge.predict(s)
        ip[f"scale {scale:g}"] = {
            "class_agreement_with_reference": float((pred == ref_pred).float().mean()),
            "accuracy_vs_reference_label": float((pred == ref_labels).float().mean()),
            "mse_to_reference": float((s - ref).square().mean()),
            "mse_to_other_digit_of_class": float((s - other).square().mean()),
            "class_histogram": torch.bincount(pred, minlength=10).tolist(),
            "seconds": round(time.time() - t0, 1)}
        log(f"[ip-adapter] scale {scale:g}: {ip[f'scale {scale:g}']}")

    out = Path(args.out) if args.out else cache / "report.json"
    out.write_text(json.dumps(report, indent=2))
    log(f"report written to {out}")
    return report


if __name__ == "__main__":
    main()
