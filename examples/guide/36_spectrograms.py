"""Chapter 36: spectrogram diffusion for audio (Riffusion-style log-mel images, made audible by Griffin-Lim).

Measures what the spectrogram route loses before any generation: real held-out clips are turned into
their 32 x 64 log-mel images and back, with the true phase and with Griffin-Lim's (0, 8, 32, 64
iterations), and the audio judge reads the round trips. Then trains the demo's mel U-Net briefly on
the training clips' log-mels, samples every class, decodes them by Griffin-Lim and judges them.
``python examples/guide/36_spectrograms.py [--fast --out DIR]`` (full: 56 CPU s with one torch thread, measured on the loaded 2-core CPU; writes a PNG and a WAV).
"""
from __future__ import annotations

import time

import torch

import _guide as guide
import _modal1 as m1
from difflab.core.audio import (AudioFrontEnd, griffin_lim, image_to_mel, istft, log_mel, mel_image, mel_to_linear,
                                spectral_convergence, stft)
from difflab.data.audio import CLASSES, LENGTH, NUM_CLASSES, SAMPLE_RATE
from difflab.io.audio import save_wav
from difflab.io.spec import make_spec
from difflab.nn.unet import UNetConfig
from difflab.pipelines import SampleOptions
from difflab.pipelines.audio import generate_mel, griffin_lim_decode

FE = AudioFrontEnd(sample_rate=SAMPLE_RATE, n_fft=256, hop=64, n_mels=32)   # the audio demo's front end
SPEC = make_spec("unet", UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                                    attention_levels=(2,), num_heads=1, num_classes=NUM_CLASSES),
                 {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"})

BOUNDS = {
    "judge_real": (0.9, 1.0),                    # the judge on real held-out clips (3-epoch judge in --fast)
    "mel_loss_true_phase": (0.02, 0.3),          # log-mel distance (nats): mel -> linear, true phase
    "mel_loss_griffin_lim_0": (0.3, 1.5),        # random phase, no iterations
    "mel_loss_griffin_lim_32": (0.1, 0.35),      # the demo's 32 iterations (it measured 0.192)
    "spectral_convergence_32": (0.05, 0.5),
    "judge_griffin_lim_32": (0.7, 1.0),          # the judge still reads the round trip
    "judge_generated": (0.05, 1.0),              # a few dozen steps of training: above chance is all --fast asks
}


def mel_distance(clips: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean |log-mel difference| (nats) of clips to the clips whose mels they were made from."""
    return float((log_mel(clips, FE) - log_mel(reference, FE)).abs().mean())


def round_trips(real: torch.Tensor, iters: list[int], seed: int) -> tuple[dict, dict]:
    """Real clips -> log-mel image -> clip: with the true STFT phase (only the mel projection lost)
    and with Griffin-Lim's phase after each number of ``iters``; ``(clips, spectral convergences)``."""
    linear = mel_to_linear(image_to_mel(mel_image(real, FE), FE), FE)         # what the mel image keeps
    true_phase = torch.angle(stft(real[:, 0], FE.n_fft, FE.hop))
    out = {"true_phase": istft(torch.polar(linear, true_phase), FE.n_fft, FE.hop, LENGTH)[:, None].clamp(-1, 1)}
    convergence = {}
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(linear.shape, generator=g) * (2 * torch.pi)
    for n in iters:
        history = []
        clip = griffin_lim(linear, FE.n_fft, FE.hop, LENGTH, iters=n, phase=phase, history=history)
        out[f"griffin_lim_{n}"] = clip[:, None].clamp(-1, 1)
        convergence[n] = float(spectral_convergence(stft(clip, FE.n_fft, FE.hop).abs(), linear).mean())
    return out, convergence


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    t0, c0 = time.time(), time.process_time()
    world = m1.audio_world(args.fast)
    judge, held, held_labels = world["judge"], world["held"], world["held_labels"]

    # 1. The round trip on real clips: how much the spectrogram and Griffin-Lim lose.
    per = 2 if args.fast else 6
    real = torch.cat([held[held_labels == c][:per] for c in range(NUM_CLASSES)])
    real_labels = torch.arange(NUM_CLASSES).repeat_interleave(per)
    iters = [0, 32] if args.fast else [0, 8, 32, 64]
    trips, convergence = round_trips(real, iters, args.seed)

    # 2. A mel U-Net (the audio demo's, briefly trained), sampled per class, decoded by Griffin-Lim.
    images = mel_image(world["train"], FE)
    denoiser, train_cpu, _ = m1.fit(SPEC, (images, world["train_labels"]), steps=8 if args.fast else 150, batch_size=16,
                                 seed=args.seed)
    n_gen = 1 if args.fast else 4
    asked = torch.arange(NUM_CLASSES).repeat_interleave(n_gen)
    opts = SampleOptions(sampler="ddim", steps=8 if args.fast else 20, seed=args.seed, progress=False)
    mels = generate_mel(denoiser, asked, front_end=FE, length=LENGTH, options=opts)
    clips = griffin_lim_decode(mels, FE, LENGTH, iters=32, seed=args.seed)

    figures = {"judge_real": judge.accuracy(real, real_labels),
               "mel_loss_true_phase": mel_distance(trips["true_phase"], real)}
    for n in iters:
        figures[f"mel_loss_griffin_lim_{n}"] = mel_distance(trips[f"griffin_lim_{n}"], real)
    figures["spectral_convergence_32"] = convergence[32]
    figures["judge_griffin_lim_0"] = judge.accuracy(trips["griffin_lim_0"], real_labels)
    figures["judge_griffin_lim_32"] = judge.accuracy(trips["griffin_lim_32"], real_labels)
    figures["judge_generated"] = judge.accuracy(clips, asked)
    figures["frechet_generated"] = judge.frechet(clips, held)
    figures["frechet_real_floor"] = judge.frechet(m1.balanced(world["train"], world["train_labels"], len(clips)), held)
    figures["train_cpu_seconds"] = train_cpu
    guide.report(figures)

    # 3. The picture: real mels, their Griffin-Lim round trips, generated mels and their Griffin-Lim clips.
    plt = guide.pyplot()
    show = list(range(0, NUM_CLASSES))
    rows = [("real clip", mel_image(real[torch.arange(NUM_CLASSES) * per], FE)),
            ("real, Griffin-Lim 32", mel_image(trips["griffin_lim_32"][torch.arange(NUM_CLASSES) * per], FE)),
            ("generated mel", mels[torch.arange(NUM_CLASSES) * n_gen]),
            ("generated, Griffin-Lim 32", mel_image(clips[torch.arange(NUM_CLASSES) * n_gen], FE))]
    fig, axes = plt.subplots(len(rows) + 1, NUM_CLASSES, figsize=(13, 7.5),
                             gridspec_kw={"height_ratios": [1] * len(rows) + [1.6]})
    for r, (name, pics) in enumerate(rows):
        for c in show:
            ax = axes[r, c]
            ax.imshow(pics[c, 0], origin="lower", aspect="auto", cmap="magma", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(CLASSES[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    for c in show:
        axes[-1, c].remove()
    ax = fig.add_subplot(len(rows) + 1, 2, 2 * len(rows) + 1)
    ax.plot(iters, [figures[f"mel_loss_griffin_lim_{n}"] for n in iters], "o-", label="Griffin-Lim phase")
    ax.axhline(figures["mel_loss_true_phase"], color="gray", ls="--", label="true phase (mel loss only)")
    ax.set(xlabel="Griffin-Lim iterations", ylabel="log-mel distance (nats)"), ax.legend(fontsize=7)
    ax = fig.add_subplot(len(rows) + 1, 2, 2 * len(rows) + 2)
    ax.bar(["real", "GL 0", "GL 32", "generated"], [figures["judge_real"], figures["judge_griffin_lim_0"],
                                                    figures["judge_griffin_lim_32"], figures["judge_generated"]])
    ax.set(ylabel="judge accuracy", ylim=(0, 1.05))
    guide.save(fig, guide.picture(args, "36_spectrograms.png"))
    bell = int((asked == CLASSES.index("bell")).nonzero()[0]) if "bell" in CLASSES else 0
    save_wav(guide.picture(args, "36_spectrograms_generated_bell.wav"), clips[bell], SAMPLE_RATE)
    guide.print_time(t0, c0)
    return figures


# one thread: on a shared CPU two threads spin and cost far more CPU time
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
