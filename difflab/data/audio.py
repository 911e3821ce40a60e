"""An embedded audio data set: ten classes of short synthetic clips, generated deterministically.

Every clip is 4,032 samples at 8 kHz (0.504 s: 63 hops of 64, so 64 STFT frames of the
default :class:`difflab.core.audio.AudioFrontEnd`), mono, float32 in [-1, 1]. 8 kHz and half a
second, not the 16 kHz and 1 s one might want, keep the demo's three models within 15 minutes of a
2-core CPU. Clip ``i`` of class ``c`` is drawn from ``numpy.random.default_rng([seed, c, i])``
alone, so it is the same whatever else is asked; pitch, envelope and loudness vary within a class:

| label | class | how it is made |
| --- | --- | --- |
| 0 | sine | one partial, 200-800 Hz, ADSR envelope |
| 1 | square | odd harmonics 1/k up to Nyquist, 150-600 Hz, ADSR |
| 2 | sawtooth | all harmonics 1/k up to Nyquist, 150-600 Hz, ADSR |
| 3 | pluck | Karplus-Strong string (Karplus & Strong 1983), 110-440 Hz |
| 4 | bell | FM synthesis (Chowning 1973), inharmonic ratio 1.4, decaying index, 300-900 Hz |
| 5 | chord | major triad of sines (root, 5/4, 3/2), root 200-400 Hz, ADSR |
| 6 | noise burst | white noise through a one-pole band filter, fast attack, exponential decay |
| 7 | drums | a kick (pitch falling 160 -> 50 Hz) and a noise hat, alternating at 4-7 beats per second |
| 8 | chirp | a sine sweeping up 1.5-2.5 octaves from 150-300 Hz, ADSR |
| 9 | clicks | a train of 2 ms clicks at 10-25 per second |

``load_audio(split=...)``: the first ``round(per_class * test_fraction)`` clips of each class are
held out (``"test"``), the rest are ``"train"``.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

SAMPLE_RATE = 8000
LENGTH = 4032           # 0.504 s
CLASSES = ("sine", "square", "sawtooth", "pluck", "bell", "chord", "noise burst", "drums", "chirp", "clicks")
NUM_CLASSES = len(CLASSES)
SPLITS = ("all", "train", "test")


def adsr(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random attack (5-60 ms), decay to a sustain of 0.5-1, release (50-200 ms) envelope."""
    sr = SAMPLE_RATE
    a = int(rng.uniform(0.005, 0.06) * sr)
    d = int(rng.uniform(0.02, 0.1) * sr)
    s = rng.uniform(0.5, 1.0)
    r = int(rng.uniform(0.05, 0.2) * sr)
    env = np.full(n, s)
    env[:a] = np.linspace(0, 1, a, endpoint=False)
    env[a:a + d] = np.linspace(1, s, len(env[a:a + d]), endpoint=False)
    env[n - r:] *= np.linspace(1, 0, r)
    return env


def harmonics(f0, t: np.ndarray, odd_only: bool) -> np.ndarray:
    """Band-limited sum of sin(2 pi k f0 t) / k over harmonics k below Nyquist (odd k only for a square)."""
    out = np.zeros_like(t)
    k = 1
    while k * f0 < SAMPLE_RATE / 2:
        out += np.sin(2 * np.pi * k * f0 * t) / k
        k += 2 if odd_only else 1
    return out


def karplus_strong(rng: np.random.Generator, f0: float, n: int) -> np.ndarray:
    """A plucked string (Karplus & Strong 1983): a noise burst of one period fed back through a
    two-tap average with loss ``rho``; one period at a time (every tap is at least a period back)."""
    p = max(2, int(round(SAMPLE_RATE / f0)))
    rho = rng.uniform(0.985, 0.998)
    y = np.zeros(n + p + 1)
    y[1:p + 1] = rng.uniform(-1, 1, p)
    for start in range(p + 1, len(y), p):
        stop = min(start + p, len(y))
        y[start:stop] = rho * 0.5 * (y[start - p:stop - p] + y[start - p - 1:stop - p - 1])
    return y[p + 1:]


def one_clip(c: int, rng: np.random.Generator) -> np.ndarray:
    """Clip of class ``c`` (float64, LENGTH samples, peak 1 before loudness)."""
    n, sr = LENGTH, SAMPLE_RATE
    t = np.arange(n) / sr
    name = CLASSES[c]
    if name == "sine":
        x = np.sin(2 * np.pi * rng.uniform(200, 800) * t + rng.uniform(0, 2 * np.pi)) * adsr(rng, n)
    elif name in ("square", "sawtooth"):
        x = harmonics(rng.uniform(150, 600), t + rng.uniform(0, 0.01), odd_only=name == "square") * adsr(rng, n)
    elif name == "pluck":
        x = karplus_strong(rng, rng.uniform(110, 440), n)
    elif name == "bell":
        f0, index = rng.uniform(300, 900), rng.uniform(2, 5)
        decay = np.exp(-t / rng.uniform(0.1, 0.3))
        x = np.sin(2 * np.pi * f0 * t + index * decay * np.sin(2 * np.pi * 1.4 * f0 * t)) * decay
    elif name == "chord":
        f0 = rng.uniform(200, 400)
        x = sum(np.sin(2 * np.pi * f0 * r * t + rng.uniform(0, 2 * np.pi)) for r in (1.0, 1.25, 1.5)) * adsr(rng, n)
    elif name == "noise burst":
        w = rng.normal(size=n)
        alpha = rng.uniform(0.3, 0.9)  # one-pole smoothing: lower alpha, brighter
        from scipy.signal import lfilter  # here, not at the top: scipy is the demo extra's, and slow to import

        y = lfilter([1.0], [1.0, -alpha], w)
        x = np.diff(y, prepend=0.0) * np.exp(-t / rng.uniform(0.05, 0.2))
    elif name == "drums":
        beat = int(sr / rng.uniform(4, 7))
        x = np.zeros(n)
        start = int(rng.uniform(0, 0.03) * sr)
        for k, onset in enumerate(range(start, n, beat)):
            m = n - onset
            tt = t[:m]
            if k % 2 == 0:
                f = 50 + 110 * np.exp(-tt / 0.03)
                x[onset:] += np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-tt / 0.08)
            else:
                x[onset:] += 0.6 * rng.normal(size=m) * np.exp(-tt / 0.02)
    elif name == "chirp":
        f0, octaves = rng.uniform(150, 300), rng.uniform(1.5, 2.5)
        f = f0 * 2.0 ** (octaves * t / t[-1])
        x = np.sin(2 * np.pi * np.cumsum(f) / sr) * adsr(rng, n)
    elif name == "clicks":
        period = int(sr / rng.uniform(10, 25))
        x = np.zeros(n)
        width = int(0.002 * sr)
        click = np.hanning(width) * np.sign(rng.uniform(-1, 1))
        for onset in range(int(rng.uniform(0, period)), n - width, period):
            x[onset:onset + width] += click
    else:  # pragma: no cover - CLASSES and the branches are one list
        raise AssertionError(name)
    return x / max(np.abs(x).max(), 1e-9) * rng.uniform(0.3, 0.9)


@functools.lru_cache(maxsize=4)
def _clips(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    waves = np.stack([one_clip(c, np.random.default_rng([seed, c, i])) for c in range(NUM_CLASSES)
                      for i in range(per_class)]).astype(np.float32)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    waves.setflags(write=False)
    return waves, labels


def load_audio(split: str = "all", *, per_class: int = 120, test_fraction: float = 0.2,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(waves (N, 1, LENGTH) float32 in [-1, 1] at :data:`SAMPLE_RATE`, labels (N,) long): ``per_class``
    clips of each of the :data:`CLASSES`; ``split`` ``"test"`` holds the first
    ``round(per_class * test_fraction)`` of each class, ``"train"`` the rest, ``"all"`` both."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {list(SPLITS)}")
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 2:
        raise ValueError(f"per_class={per_class!r} must be an integer >= 2")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be strictly between 0 and 1")
    waves, labels = _clips(per_class, int(seed))
    n_test = min(max(1, round(per_class * test_fraction)), per_class - 1)
    held = np.tile(np.arange(per_class) < n_test, NUM_CLASSES)
    keep = {"all": np.ones_like(held), "train": ~held, "test": held}[split]
    return torch.from_numpy(waves[keep].copy()).unsqueeze(1), torch.from_numpy(labels[keep].copy())


__all__ = ["SAMPLE_RATE", "LENGTH", "CLASSES", "NUM_CLASSES", "load_audio", "one_clip", "karplus_strong"]
