"""`difflab demo --text`: latent text-to-image diffusion on the embedded digits (Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sections 3 and 3.3).

The digits, upscaled to 16x16, get captions from templates ("a handwritten seven", "the digit
3", ...). A small KL autoencoder maps them to 4x4x4 latents (factor 4), a tiny word-level text
encoder and a latent U-Net with cross-attention to its tokens are trained together on
(latent, caption) pairs with 10% empty captions for classifier-free guidance, and the result is
sampled from prompts, inpainted, outpainted and inverted; the digits judge scores every step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn

from ..core import Denoiser
from ..data import load_digits
from ..eval import DigitsJudge, judge_report
from ..io.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from ..io.images import make_grid, save_grid
from ..io.spec import build_frame
from ..io.text import save_tiny_text
from ..io.text_model import save_text_model
from ..nn.text import TinyTextConfig, TinyTextEncoder, build_vocab, words
from ..nn.text_unet import TextConditionedUNet
from ..nn.unet import UNet, UNetConfig
from ..nn.vae import PRESETS as VAE_PRESETS
from ..nn.vae import AutoencoderKL, VAEConfig, estimate_scaling_factor
from ..pipelines import inpaint, outpaint, text_to_image
from ..pipelines.edit import psnr, reconstruct
from ..train import TrainConfig, VAEObjective, fit, train

# ----------------------------------------------------------------------------------------------
# Captions

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: the number's name, {num}: its numeral. Each class is seen with both forms in training.
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {num}",
    "a {num}",
    "number {word}",
    "the number {num}",
    "digit {word}",
    "a picture of a {word}",
    "handwritten digit {num}",
)
# New combinations of the training words, never seen as captions: do the prompts generalize?
HELD_OUT_TEMPLATES = (
    "the handwritten {num}",
    "a digit {word}",
    "number {num}",
    "a picture of the number {word}",
)
EMPTY_CAPTION = ""  # the unconditional prompt of classifier-free guidance


def caption(digit: int, template: str) -> str:
    """``template`` filled for ``digit``: ``caption(7, "a handwritten {word}") == "a handwritten seven"``."""
    return template.format(word=NUMBER_WORDS[digit], num=str(digit))


def digit_named(text: str) -> int | None:
    """The digit a caption names (its first number word or numeral), or None."""
    for w in words(text):
        if w in NUMBER_WORDS:
            return NUMBER_WORDS.index(w)
        if len(w) == 1 and w.isdigit():
            return int(w)
    return None


def caption_dataset(labels: torch.Tensor, templates=TRAIN_TEMPLATES) -> tuple[torch.Tensor, list[str]]:
    """Every (example, template) pair: ``(example index (N T,), captions)``, example-major."""
    n, t = len(labels), len(templates)
    index = torch.arange(n).repeat_interleave(t)
    texts = [caption(int(labels[i]), templates[j]) for i in range(n) for j in range(t)]
    return index, texts


# ----------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass(frozen=True)
class TextDemoConfig:
    """The demo's models and training. The defaults take about 275 s of CPU time on one thread
    (690 s of wall time on a shared, loaded 2-core machine; see docs/demo_text.md)."""

    size: int = 16                              # digits upscaled (nearest) to size x size
    vae_channels: tuple[int, ...] = (16, 32, 32)  # factor 4: 16x16x1 <-> 4x4x4
    vae_steps: int = 500
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-3                 # on summed L1 (LDM's convention, see train/vae_loss.py)
    text_width: int = 64
    text_layers: int = 2
    unet_channels: int = 32
    unet_mult: tuple[int, ...] = (1, 2)         # 4x4 and 2x2 latents
    unet_res_blocks: int = 1
    unet_heads: int = 4
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1                    # empty captions, for classifier-free guidance
    seed: int = 0


DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "zero_terminal_snr": False, "prediction": "v"}


def build_models(cfg: TextDemoConfig, vocab) -> tuple[AutoencoderKL, TinyTextEncoder, TextConditionedUNet, Denoiser]:
    """Untrained VAE, text encoder, joint net, and the denoiser over the joint net, seeded from ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(dataclasses.replace(VAE_PRESETS["digits"], block_out_channels=cfg.vae_channels, norm_num_groups=8))
        text = TinyTextEncoder(TinyTextConfig(vocab=vocab, max_length=8, width=cfg.text_width, layers=cfg.text_layers,
                                              heads=4, seed=cfg.seed))
        unet = UNet(UNetConfig(in_channels=vae.config.latent_channels, model_channels=cfg.unet_channels,
                               channel_mult=cfg.unet_mult, num_res_blocks=cfg.unet_res_blocks,
                               attention_levels=tuple(range(len(cfg.unet_mult))), num_heads=cfg.unet_heads,
                               context_dim=cfg.text_width, groups=8))
    net = TextConditionedUNet(unet, text)
    return vae, text, net, Denoiser(net, build_frame(DIFFUSION), prediction=DIFFUSION["prediction"])


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: TextDemoConfig, progress: bool = True) -> list[float]:
    """The KL autoencoder's loss (L1 + ``vae_kl_weight`` KL; Rombach et al. 2022, appendix G,
    without LPIPS or a discriminator; :class:`difflab.train.VAEObjective`) trained by
    :func:`difflab.train.fit`: AdamW, one-cycle LR rising over the first 10% of the steps, no
    EMA, in memory, seeded with ``cfg.seed``. Returns the reconstruction L1 per pixel, logged
    every 100 steps."""
    config = TrainConfig(steps=cfg.vae_steps, batch_size=cfg.vae_batch, lr=cfg.vae_lr, lr_schedule="one_cycle",
                         warmup_steps=round(0.1 * cfg.vae_steps), grad_clip=None, ema_decay=None,
                         log_every=min(100, cfg.vae_steps), seed=cfg.seed, progress=progress)
    state = fit(VAEObjective(vae, reconstruction="l1", kl_weight=cfg.vae_kl_weight), {"x": images}, config)
    vae.eval()
    return [entry["reconstruction"] / images[0].numel() for entry in state.history]


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0) -> AutoencoderKL:
    """Set the VAE's ``shift_factor`` to the latents' mean and ``scaling_factor`` to 1 / their std
    (Rombach et al. 2022, Section 4.3.2; the shift as in SD3), so the diffusion model sees
    latents of zero mean and unit variance."""
    g = torch.Generator().manual_seed(seed)
    z = torch.cat([vae.encode(chunk).sample(g) for chunk in images.split(256)])
    scale = estimate_scaling_factor(vae, images, generator=torch.Generator().manual_seed(seed), batch_size=256)
    vae.config = dataclasses.replace(vae.config, shift_factor=float(z.double().mean()), scaling_factor=scale)
    return vae


@torch.no_grad()
def encode_captions(text: TinyTextEncoder, texts: list[str]) -> torch.Tensor:
    """Token ids (N, max_length) long of ``texts`` (0 pads)."""
    return text.tokenize(texts)[0]


def mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean over images of their PSNR in dB (:func:`difflab.pipelines.edit.psnr`)."""
    return float(psnr(a, b).mean())


# ----------------------------------------------------------------------------------------------
# The demo

DEMO = TextDemoConfig()


def run_text_demo(out_dir="demo_text_out", *, steps: int | None = None, vae_steps: int | None = None,
                  sampler: str = "ddim", sampling_steps: int = 50, guidance_scale: float = 2.0,
                  samples_per_prompt: int = 5, edit_digits: int = 100, seed: int = 0, resume: bool = False,
                  threads: int | None = None, progress: bool = True, config: TextDemoConfig = DEMO) -> dict:
    """Train a latent text-to-image model on captioned digits, sample it from prompts, inpaint,
    outpaint and invert with it, and let the digits judge read the results.

    ``steps`` / ``vae_steps`` override the U-Net's and the VAE's training steps of ``config``;
    ``samples_per_prompt`` images per (digit, template) prompt are judged; ``edit_digits``
    held-out digits are inpainted, outpainted and inverted. Writes ``out_dir/samples.png``,
    ``out_dir/editing.png``, ``out_dir/report.json`` and the models; returns the report.
    """
    if threads:
        torch.set_num_threads(threads)
    cfg = dataclasses.replace(config, **{k: v for k, v in (("steps", steps), ("vae_steps", vae_steps)) if v is not None})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start, times = time.time(), {}
    say = print if progress else (lambda *a, **k: None)

    data = load_caption_data(cfg, say)                                                      # 1. data
    t0 = time.time()                                                                        # 2. the judge
    judge = DigitsJudge.load_or_train(out_dir / "digits_judge.safetensors")
    real_accuracy = judge.accuracy(data["held_images"], data["held_labels"])
    say(f"[2/7] judge ready in {time.time() - t0:.1f}s: {real_accuracy:.1%} on held-out real digits")
    vae, text_encoder, net, denoiser = build_models(cfg, data["vocab"])
    vae_report, recon = autoencoder_step(vae, data, judge, cfg, out_dir, resume=resume, progress=progress, say=say)  # 3.
    times["vae"] = vae_report["seconds"]
    state, steps_run, times["train"] = text_unet_step(vae, text_encoder, net, denoiser, data, cfg, out_dir,  # 4.
                                                      resume=resume, progress=progress, say=say)
    sampling_denoiser = Denoiser(net.unet, denoiser.frame, prediction=denoiser.prediction).eval()
    save_text_model(out_dir, sampling_denoiser, text_encoder,  # model.safetensors: what `difflab sample --model` reads
                    {"network": {"kind": "unet", "config": net.unet.config.to_dict()}, "diffusion": DIFFUSION},
                    {"demo": "text", "data": "captioned_digits", "size": cfg.size}, vae=vae,
                    sampling={"sampler": sampler, "steps": sampling_steps, "guidance_scale": guidance_scale,
                              "height": cfg.size, "width": cfg.size})
    common = dict(sampler=sampler, steps=sampling_steps, output_type="pt", progress=progress, batch_size=250)
    models = (sampling_denoiser, text_encoder, vae)
    text_report, samples_path, times["sample"] = prompts_step(*models, judge, data, cfg, out_dir,  # 5. and 6.
                                                              samples_per_prompt=samples_per_prompt,
                                                              guidance_scale=guidance_scale, seed=seed, say=say, **common)
    text_report["real_accuracy"] = real_accuracy
    edits, edit_files, times["edit"] = editing_step(*models, judge, data, cfg, out_dir, recon=recon, n=edit_digits,  # 7.
                                                    guidance_scale=guidance_scale, seed=seed, say=say, **common)

    ms_per_step = 1000 * times["train"] / max(len(steps_run), 1)
    result = {
        "text_to_image": text_report, **edits, "vae": vae_report,
        "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": round(times["train"], 1),
                  "steps_run": len(steps_run), "ms_per_step": round(ms_per_step, 1),
                  "unet_parameters": _count(net.unet), "text_encoder_parameters": _count(text_encoder),
                  "final_loss": state.history[-1]["loss"] if state.history else None},
        "sampler": sampler, "sampling_steps": sampling_steps, "guidance_scale": guidance_scale,
        "templates": {"train": list(TRAIN_TEMPLATES), "held_out": list(HELD_OUT_TEMPLATES)},
        "seconds": {k: round(v, 1) for k, v in times.items()} | {"total": round(time.time() - t_start, 1)},
        "threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "files": {"samples": str(samples_path), **edit_files},
    }
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    say(format_text_report(result))
    return result


def load_caption_data(cfg: TextDemoConfig, say) -> dict:
    """Step 1: 16x16 digits (nearest upsampling), one caption per (digit, training template), the vocabulary."""
    images, labels = load_digits(cfg.size, split="train")
    held_images, held_labels = load_digits(cfg.size, split="test")
    index, texts = caption_dataset(labels, TRAIN_TEMPLATES)
    vocab = build_vocab(texts)
    say(f"[1/7] data: {len(images)} training digits x {len(TRAIN_TEMPLATES)} caption templates = {len(texts)} pairs, "
        f"{len(held_images)} held out; {len(vocab) - 2} words; e.g. {texts[0]!r}, {texts[1]!r}")
    return {"images": images, "labels": labels, "held_images": held_images, "held_labels": held_labels,
            "index": index, "texts": texts, "vocab": vocab}


def autoencoder_step(vae: AutoencoderKL, data: dict, judge: DigitsJudge, cfg: TextDemoConfig, out_dir: Path, *,
                     resume: bool, progress: bool, say) -> tuple[dict, torch.Tensor]:
    """Step 3: the autoencoder (16x16x1 <-> 4x4x4), then the latent shift and scale from data
    (or both from ``out_dir/vae.safetensors`` when resuming). Returns its report and its
    reconstructions of the held-out digits."""
    images, held_images, held_labels = data["images"], data["held_images"], data["held_labels"]
    f = vae.downsample_factor
    say(f"[3/7] training a KL autoencoder (factor {f}: {cfg.size}x{cfg.size}x1 <-> {cfg.size // f}x{cfg.size // f}x"
        f"{vae.config.latent_channels}, {_count(vae)} parameters) for {cfg.vae_steps} steps")
    t0 = time.time()
    vae_path = out_dir / "vae.safetensors"
    if resume and vae_path.exists():
        _load_vae(vae, vae_path)
    else:
        train_vae(vae, images, cfg, progress)
        set_latent_scale(vae, images, cfg.seed)
        _save_vae(vae, vae_path)
    seconds = time.time() - t0
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(x).mode()) for x in held_images.split(256)]).clamp(-1, 1)
    report = {"psnr_heldout": mean_psnr(recon, held_images), "judge_accuracy_reconstructed": judge.accuracy(recon, held_labels),
              "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor,
              "parameters": _count(vae), "steps": cfg.vae_steps, "seconds": round(seconds, 1)}
    say(f"      {seconds:.0f}s; held-out reconstructions: PSNR {report['psnr_heldout']:.1f} dB, judge "
        f"{report['judge_accuracy_reconstructed']:.1%}; scaling factor {vae.config.scaling_factor:.3f}, "
        f"shift {vae.config.shift_factor:.3f}")
    return report, recon


def text_unet_step(vae, text_encoder, net, denoiser, data: dict, cfg: TextDemoConfig, out_dir: Path, *, resume: bool,
                   progress: bool, say):
    """Step 4: the text encoder and the latent U-Net, trained together on (latent, caption) pairs
    (one posterior draw per pair), with ``cfg_dropout`` empty captions; the EMA weights are
    loaded into ``net`` after. Returns ``(state, one callback entry per step run, seconds)``."""
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():  # one posterior draw per pair
        latents = torch.cat([vae.encode_latents(data["images"][i], g) for i in data["index"].split(2048)])
    ids = encode_captions(text_encoder, data["texts"])
    train_config = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                               ema_decay=cfg.ema_decay, cfg_dropout=cfg.cfg_dropout, checkpoint_every=500,
                               log_every=max(cfg.steps // 8, 1), seed=cfg.seed, progress=progress)
    say(f"[4/7] training the text encoder ({_count(text_encoder)} parameters) and a latent U-Net with cross-attention "
        f"({_count(net.unet)} parameters) for {cfg.steps} steps (batch {cfg.batch_size}, {cfg.cfg_dropout:.0%} empty captions)")
    t0, steps_run = time.time(), []
    state = train(denoiser, (latents, None, {"input_ids": ids}), train_config, out_dir / "unet", resume=resume,
                  null_cond={"input_ids": encode_captions(text_encoder, [EMPTY_CAPTION])[0]}, callback=steps_run.append,
                  metadata={"demo": "text", "config": _jsonable(dataclasses.asdict(cfg)), "vocab": list(data["vocab"])})
    seconds = time.time() - t0
    state.ema.copy_to(net)
    net.eval()
    save_tiny_text(text_encoder, out_dir / "text_encoder.safetensors")
    say(f"      {seconds:.0f}s for {len(steps_run)} steps ({1000 * seconds / max(len(steps_run), 1):.0f} ms per step)")
    return state, steps_run, seconds


def prompts_step(denoiser, text_encoder, vae, judge: DigitsJudge, data: dict, cfg: TextDemoConfig, out_dir: Path, *,
                 samples_per_prompt: int, guidance_scale: float, seed: int, say, **common) -> tuple[dict, Path, float]:
    """Steps 5 and 6: sample every digit with every template, training and held-out, with and
    without guidance, and let the judge say whether each image is the digit its prompt names.
    Returns ``(report, path of samples.png, seconds)``."""
    templates = TRAIN_TEMPLATES + HELD_OUT_TEMPLATES
    prompts, asked, held = [], [], []
    for d in range(10):
        for j, tpl in enumerate(templates):
            for _ in range(samples_per_prompt):
                prompts.append(caption(d, tpl))
                asked.append(d)
                held.append(j >= len(TRAIN_TEMPLATES))
    asked, held = torch.tensor(asked), torch.tensor(held)
    say(f"[5/7] sampling {len(prompts)} images from {len(prompts) // samples_per_prompt} prompts: {common['sampler']}, "
        f"{common['steps']} steps, guidance {guidance_scale}")
    t0 = time.time()
    samples = text_to_image(denoiser, text_encoder, vae, prompts, guidance_scale=guidance_scale,
                            height=cfg.size, width=cfg.size, seed=seed, **common)
    unguided = text_to_image(denoiser, text_encoder, vae, prompts[::samples_per_prompt], guidance_scale=1.0,
                             height=cfg.size, width=cfg.size, seed=seed, **common)
    seconds = time.time() - t0
    first = samples.reshape(10, len(templates), samples_per_prompt, 1, cfg.size, cfg.size)[:, :, 0]
    samples_path = save_prompt_grid(first.reshape(-1, 1, cfg.size, cfg.size), out_dir / "samples.png", templates,
                                    n_train=len(TRAIN_TEMPLATES))
    report = judge_report(judge, samples, asked, data["held_images"], data["held_labels"], real_reference=data["images"])
    correct = judge.predict(samples) == asked
    text_report = {
        "accuracy": float(correct.float().mean()),
        "accuracy_train_templates": float(correct[~held].float().mean()),
        "accuracy_heldout_templates": float(correct[held].float().mean()),
        "accuracy_by_digit": [float(correct[asked == d].float().mean()) for d in range(10)],
        "frechet": report["frechet"], "frechet_real_reference": report.get("frechet_real_reference"),
        "n_generated": len(samples), "guidance_scale": guidance_scale,
        "accuracy_unguided": judge.accuracy(unguided, asked[::samples_per_prompt]),
    }
    say(f"[6/7] the judge reads {text_report['accuracy']:.1%} of the generated digits as the digit named "
        f"(training templates {text_report['accuracy_train_templates']:.1%}, held-out templates "
        f"{text_report['accuracy_heldout_templates']:.1%}; without guidance {text_report['accuracy_unguided']:.1%})")
    return text_report, samples_path, seconds


def editing_step(denoiser, text_encoder, vae, judge: DigitsJudge, data: dict, cfg: TextDemoConfig, out_dir: Path, *,
                 recon: torch.Tensor, n: int, guidance_scale: float, seed: int, say, **common) -> tuple[dict, dict, float]:
    """Step 7: inpaint, outpaint and invert ``n`` held-out digits under the prompt naming each.
    Returns ``({"inpainting", "outpainting", "inversion"} reports, their image files, seconds)``."""
    t0 = time.time()
    edit = _edit_set(data["held_labels"], n, cfg.seed)
    x_edit, y_edit = data["held_images"][edit], data["held_labels"][edit]
    models = (denoiser, text_encoder, vae, [caption(int(d), "the digit {num}") for d in y_edit], x_edit)
    inpaint_report, filled, masked = inpainting_check(*models, judge, y_edit, guidance_scale=guidance_scale, seed=seed, **common)
    outpaint_report, wide = outpainting_check(*models, pad=vae.downsample_factor, guidance_scale=guidance_scale, seed=seed,
                                              **common)
    inversion_report, inverted = inversion_check(*models, judge, y_edit, vae_recon=recon[edit], steps=common["steps"])
    seconds = time.time() - t0
    editing_path = save_grid(torch.cat([x_edit[:10], masked[:10], filled[:10], inverted[:10]]), out_dir / "editing.png",
                             nrow=10, upscale=6)
    wide_path = save_grid(wide[:10], out_dir / "outpainting.png", nrow=10, upscale=6)
    say(f"[7/7] editing {len(edit)} held-out digits in {seconds:.0f}s: inpainting keeps the known half "
        f"(max |diff| {inpaint_report['known_max_abs_diff']:g}) and the judge reads {inpaint_report['judge_accuracy']:.1%} "
        f"as asked; outpainting keeps the original pixels (max |diff| {outpaint_report['known_max_abs_diff']:g}); "
        f"inversion + resampling: PSNR {inversion_report['psnr']:.1f} dB")
    reports = {"inpainting": inpaint_report, "outpainting": outpaint_report, "inversion": inversion_report}
    return reports, {"editing": str(editing_path), "outpainting": str(wide_path)}, seconds


def inpainting_check(denoiser, text_encoder, vae, prompts, images, judge, labels, **kwargs):
    """Replacement inpainting (RePaint-style, :func:`difflab.pipelines.inpaint`) of the right half
    of ``images``: the largest change to a known pixel (0 when they are kept exactly) and the
    judge's accuracy on the filled digits, beside its accuracy on the left halves alone.
    Returns ``(report, filled, masked inputs)``."""
    size = images.shape[-1]
    mask = torch.zeros(1, 1, *images.shape[-2:])
    mask[..., size // 2:] = 1.0
    filled = inpaint(denoiser, text_encoder, vae, prompts, images, mask, mode="replace", **kwargs)
    keep = (mask == 0).expand_as(images)
    masked = torch.where(keep, images, torch.full_like(images, -1.0))
    return {"known_max_abs_diff": float((filled - images)[keep].abs().max()), "judge_accuracy": judge.accuracy(filled, labels),
            "judge_accuracy_left_half_only": judge.accuracy(masked, labels), "n": len(images), "mask": "right half"}, filled, masked


def outpainting_check(denoiser, text_encoder, vae, prompts, images, *, pad: int, **kwargs):
    """Outpainting (:func:`difflab.pipelines.outpaint`) by ``pad`` pixels on every side: the largest
    change to an original pixel (0 when kept exactly) and the mean of the new border (the
    digits' background is -1). Returns ``(report, canvases)``."""
    wide = outpaint(denoiser, text_encoder, vae, prompts, images, left=pad, right=pad, top=pad, bottom=pad, fill=-1.0,
                    mode="replace", **kwargs)
    h, w = images.shape[-2:]
    border = torch.ones(wide.shape[-2:], dtype=torch.bool)
    border[pad:pad + h, pad:pad + w] = False
    centre = wide[..., pad:pad + h, pad:pad + w]
    return {"known_max_abs_diff": float((centre - images).abs().max()), "border_mean": float(wide[..., border].mean()),
            "canvas": list(wide.shape[-2:]), "n": len(images)}, wide


def inversion_check(denoiser, text_encoder, vae, prompts, images, judge, labels, *, vae_recon, steps: int):
    """DDIM inversion of ``images`` under ``prompts`` and resampling under the same prompts
    (:func:`difflab.pipelines.edit.reconstruct`, no guidance, ``steps`` DDIM steps each way): the
    mean PSNR of the result against the input, beside that of the VAE's own reconstructions
    ``vae_recon``, the ceiling through the autoencoder. Returns ``(report, reconstructions)``."""
    recon, quality = reconstruct(denoiser, text_encoder, vae, images, prompts, guidance_scale=1.0, steps=steps)
    return {"psnr": float(quality.mean()), "psnr_min": float(quality.min()), "psnr_vae_only": mean_psnr(vae_recon, images),
            "judge_accuracy": judge.accuracy(recon, labels), "steps": steps, "n": len(images)}, recon


def _edit_set(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` examples, as many of each class as possible, cycling through the classes."""
    g = torch.Generator().manual_seed(seed)
    per = -(-n // 10)
    picks = [torch.nonzero(labels == d).flatten()[torch.randperm(int((labels == d).sum()), generator=g)[:per]] for d in range(10)]
    return torch.stack([p[i] for i in range(per) for p in picks if i < len(p)])[:n]


def save_prompt_grid(images: torch.Tensor, path, templates, n_train: int, upscale: int = 4) -> Path:
    """One row per digit, one column per template, with the prompts printed: the digit on the
    left of each row, the numbered templates under the grid (held-out ones marked '*')."""
    cols = len(templates)
    grid = make_grid(images, nrow=cols, upscale=upscale)
    line, left = 12, 48
    legend = [f"{j + 1:>2}: {t}" + ("   * held out" if j >= n_train else "") for j, t in enumerate(templates)]
    canvas = Image.new("L", (grid.width + left, grid.height + line * (len(legend) + 2)), 0)
    canvas.paste(grid, (left, line))
    draw = ImageDraw.Draw(canvas)
    cell = grid.width / cols
    for j in range(cols):
        draw.text((left + j * cell + cell / 2 - 4, 0), str(j + 1), fill=255)
    for d in range(10):
        draw.text((2, line + d * grid.height / 10 + grid.height / 20 - 5), NUMBER_WORDS[d], fill=255)
    for k, text in enumerate(legend):
        draw.text((2, grid.height + line * (k + 2)), text, fill=255)
    path = Path(path)
    canvas.save(path)
    return path


def _save_vae(vae: AutoencoderKL, path) -> Path:
    return save_checkpoint(path, vae.state_dict(), {"kind": "AutoencoderKL", "config": vae.config.to_dict()})


def _load_vae(vae: AutoencoderKL, path) -> None:
    tensors, meta = load_checkpoint(path)
    load_model_state(vae, tensors, prefix="")
    vae.config = VAEConfig.from_dict(meta["config"])
    vae.eval()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def format_text_report(r: dict) -> str:
    """The report as a table, like the class demo's."""
    t, i, o, v, vae, s = r["text_to_image"], r["inpainting"], r["outpainting"], r["inversion"], r["vae"], r["seconds"]
    rows = [
        ("judge accuracy, generated vs digit named", f"{t['accuracy']:.1%}",
         f"{t['n_generated']} samples, guidance {t['guidance_scale']}"),
        ("  training / held-out templates", f"{t['accuracy_train_templates']:.1%} / {t['accuracy_heldout_templates']:.1%}", ""),
        ("  without guidance", f"{t['accuracy_unguided']:.1%}", "one sample per prompt"),
        ("judge accuracy on real held-out digits", f"{t['real_accuracy']:.1%}", "the ceiling"),
        ("Frechet distance, generated vs held-out", f"{t['frechet']:.2f}", f"real train: {t['frechet_real_reference']:.2f}"),
        ("VAE reconstructions: PSNR / judge", f"{vae['psnr_heldout']:.1f} dB / {vae['judge_accuracy_reconstructed']:.1%}",
         "held-out digits"),
        ("inpainting: known pixels max |diff|", f"{i['known_max_abs_diff']:g}", f"{i['n']} digits, {i['mask']} filled"),
        ("inpainting: judge accuracy, digit asked", f"{i['judge_accuracy']:.1%}",
         f"left half alone: {i['judge_accuracy_left_half_only']:.1%}"),
        ("outpainting: original pixels max |diff|", f"{o['known_max_abs_diff']:g}",
         f"canvas {o['canvas'][0]}x{o['canvas'][1]}, border mean {o['border_mean']:.2f}"),
        ("inversion + resampling: PSNR", f"{v['psnr']:.1f} dB",
         f"VAE alone {v['psnr_vae_only']:.1f} dB; judge {v['judge_accuracy']:.1%}"),
        ("time: vae / train / sample / edit / total",
         f"{s['vae']:.0f}s / {s['train']:.0f}s / {s['sample']:.0f}s / {s['edit']:.0f}s / {s['total']:.0f}s",
         f"{r['threads']} threads, {r['train']['ms_per_step']:.0f} ms per training step"),
    ]
    w = max(len(a) for a, _, _ in rows)
    return "\n".join(f"  {a:<{w}}  {b:>16}  {c}" for a, b, c in rows)
