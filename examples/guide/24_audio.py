"""Chapter 24: audio diffusion models (DiffWave on the raw waveform).

Trains the audio demo's class-conditional DiffWave network (8 dilated residual layers, 16 channels, a
511-sample receptive field; here without the class prior the demo adds, so the network alone is seen) briefly on 512-sample crops of the embedded 8 kHz clips, samples whole
half-second clips of every class (the network is fully convolutional) and lets the audio judge read
them; sets the spectral flatness of real, generated and white-noise clips side by side; writes the
waveforms and spectrograms as a PNG and one generated clip per class as a WAV.
``python examples/guide/24_audio.py [--fast --out DIR]`` (full: 35 CPU s with one torch thread, measured on the loaded 2-core CPU).
"""
from __future__ import annotations

import time

import torch

import _guide as guide
import _modal1 as m1
from difflab.core.audio import AudioFrontEnd, mel_image, stft
from difflab.data.audio import CLASSES, LENGTH, NUM_CLASSES, SAMPLE_RATE
from difflab.demos.audio import WAVE_SPEC, random_crops
from difflab.io.spec import make_spec
from difflab.io.audio import save_wav
from difflab.pipelines import SampleOptions
from difflab.pipelines.audio import generate_waveform

FE = AudioFrontEnd(sample_rate=SAMPLE_RATE, n_fft=256, hop=64, n_mels=32)
# the demo's network and diffusion, without its class prior (docs/audio.md, "The waveform route's prior")
SPEC = make_spec("diffwave", {**WAVE_SPEC["network"]["config"], "class_prior": False}, WAVE_SPEC["diffusion"])

BOUNDS = {
    "receptive_field": (511, 511),          # 1 + 2 * (1 + 2 + ... + 128): exact
    "judge_real": (0.9, 1.0),               # the audio judge on real held-out clips
    "loss_drop": (0.05, 1.0),               # (first - last) / first of the training loss, smoothed
    "flatness_real": (0.0, 0.35),           # real clips are tonal or structured: far from flat
    "flatness_noise": (0.45, 0.7),          # white noise: about 0.56
    "generated_accuracy": (0.0, 1.0),       # a few dozen steps in --fast: only that it runs
}


def spectral_flatness(clips: torch.Tensor) -> float:
    """Mean over frames of the geometric over the arithmetic mean of the power spectrum (Wiener
    entropy): about 0.56 for white noise's exponential-distributed periodogram, near 0 for a tone."""
    power = stft(clips[:, 0], FE.n_fft, FE.hop).abs().pow(2) + 1e-10            # (B, F, T)
    loud = power.sum(1) > 1e-6 * power.sum(1).amax(1, keepdim=True)              # skip silent frames
    flat = power.log().mean(1).exp() / power.mean(1)
    return float(flat[loud].mean())


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    t0, c0 = time.time(), time.process_time()
    world = m1.audio_world(args.fast)
    judge, held, held_labels = world["judge"], world["held"], world["held_labels"]

    # 1. DiffWave on random 512-sample crops (its receptive field is 511), class-conditional.
    images = mel_image(world["train"], FE)
    waves, _, labels = random_crops(world["train"], images, world["train_labels"], crops_per_clip=2, seed=args.seed)
    steps = 30 if args.fast else 600
    denoiser, train_cpu, losses = m1.fit(SPEC, (waves, labels), steps=steps, batch_size=16, seed=args.seed, ema_decay=0.995)

    # 2. Whole clips of every class, read by the judge.
    per = 1 if args.fast else 3
    asked = torch.arange(NUM_CLASSES).repeat_interleave(per)
    opts = SampleOptions(sampler="ddim", steps=6 if args.fast else 10, guidance_scale=1.0, seed=args.seed, progress=False)
    c1 = time.process_time()
    clips = generate_waveform(denoiser, asked, sample_rate=SAMPLE_RATE, options=opts)
    sample_cpu = time.process_time() - c1
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(args.seed)) * 0.3
    real = torch.cat([held[held_labels == c][:per] for c in range(NUM_CLASSES)])

    figures = guide.report({
        "receptive_field": denoiser.net.config.receptive_field,
        "parameters": sum(p.numel() for p in denoiser.net.parameters()),
        "judge_real": judge.accuracy(held, held_labels),
        "loss_first": losses[0], "loss_last": losses[-1], "loss_drop": (losses[0] - losses[-1]) / losses[0],
        "generated_accuracy": judge.accuracy(clips, asked),
        "frechet_generated": judge.frechet(clips, held),
        "frechet_real_floor": judge.frechet(m1.balanced(world["train"], world["train_labels"], len(clips)), held),
        "flatness_real": spectral_flatness(real),
        "flatness_generated": spectral_flatness(clips),
        "flatness_noise": spectral_flatness(noise),
        "train_cpu_seconds": train_cpu,
        "sample_cpu_seconds_per_audio_second": sample_cpu / (len(clips) * LENGTH / SAMPLE_RATE),
    })

    # 3. Pictures and sound: waveform and log-mel of a real and a generated clip of four classes; WAVs.
    plt = guide.pyplot()
    show = [CLASSES.index(c) for c in ("sine", "pluck", "drums", "chirp")]
    fig, axes = plt.subplots(4, len(show), figsize=(12, 7))
    t = torch.arange(LENGTH) / SAMPLE_RATE
    for col, c in enumerate(show):
        for row, (name, clip) in enumerate((("real", real[c * per]), ("DiffWave", clips[c * per]))):
            axes[2 * row, col].plot(t, clip[0], lw=0.4)
            axes[2 * row, col].set(ylim=(-1, 1), title=f"{CLASSES[c]}: {name}")
            axes[2 * row, col].set_xticks([])
            axes[2 * row + 1, col].imshow(mel_image(clip[None], FE)[0, 0], origin="lower", aspect="auto", cmap="magma",
                                          vmin=-1, vmax=1)
            axes[2 * row + 1, col].set_xticks([]), axes[2 * row + 1, col].set_yticks([])
            axes[2 * row + 1, col].set_ylabel("log-mel", fontsize=7)
    guide.save(fig, guide.picture(args, "24_audio.png"))
    for c in show[:2]:
        save_wav(guide.picture(args, f"24_audio_{CLASSES[c]}.wav"), clips[c * per], SAMPLE_RATE)
    guide.print_time(t0, c0)
    return figures


# one thread: on a shared CPU two threads spin and cost far more CPU time
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
