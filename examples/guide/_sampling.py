"""Helpers shared by the sampling and guidance chapters of the guide (6, 14, 15, 20, 34, 37): drawing
digits with any sampler from per-sample noise, the unconditional branch of the guide's
class-conditional model, a small noise-aware classifier (trained once, seeded, cached), the
closed-form test bed, and a grid of samples for a picture.
"""
from __future__ import annotations

import torch
from torch import nn

import _guide as guide
from difflab.core import SampleNoise, grids
from difflab.samplers import get_sampler

SHAPE = (1, 8, 8)   # one digit


class WithLabel(nn.Module):
    """A class-conditional denoiser with its label fixed (the null label gives the unconditional
    branch that classifier-free guidance was trained with)."""

    def __init__(self, denoiser, label: int):
        super().__init__()
        self.denoiser, self.label = denoiser, int(label)

    def forward(self, x, sigma, **cond):
        cond = {k: v for k, v in cond.items() if k != "class_labels"}
        return self.denoiser(x, sigma, class_labels=torch.full((x.shape[0],), self.label, dtype=torch.long), **cond)


def null_label(denoiser) -> int:
    """The 'no class' label of a class-conditional digits model (its number of classes)."""
    return int(denoiser.net.config.num_classes)


def base(model):
    """The innermost denoiser (the one with a frame) inside guidance wrappers."""
    while not hasattr(model, "frame"):
        model = model.denoiser
    return model


@torch.no_grad()
def sample(model, n: int, steps: int, *, labels=None, sampler: str = "ddim", seed: int = 0, grid: str = "default",
           batch_size: int = 250, **kwargs) -> torch.Tensor:
    """n digits, sample i from its own noise (seed, i) for the start and for every step of a
    stochastic sampler, so the same seed gives the same image whatever the batch. ``labels``: the
    (n,) classes asked (passed as ``class_labels``); ``grid``: a :func:`difflab.core.grids.for_denoiser`
    grid, or ``karras80``; ``kwargs`` go to the sampler. Clamped to [-1, 1]."""
    den = base(model)
    if grid == "karras80":  # Karras et al.'s rho = 7 grid from EDM's sigma_max = 80 down to the model's sigma_min
        sigmas = grids.karras_sigmas(steps, float(den.sigma_min), 80.0).float()
    else:
        sigmas = grids.for_denoiser(den, steps, grid=grid).float()
    fn = get_sampler(sampler)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = SampleNoise.for_run(seed, b, SHAPE, start=start)
        x = noise() * float(den.prior_std(sigmas[0].double()))
        extra = {} if labels is None else {"class_labels": labels[start:start + b]}
        out.append(fn(model, x, sigmas, noise=noise, extra_args=extra, **kwargs).clamp(-1, 1))
    return torch.cat(out)


def asked_labels(n_per_class: int) -> torch.Tensor:
    """Each of the ten classes asked ``n_per_class`` times: 0 0 .. 1 1 .. 9."""
    return torch.arange(10).repeat_interleave(n_per_class)


def noisy_classifier(frame, *, steps: int, seed: int = 0, width: int = 16):
    """A small noise-aware digits classifier p(y | x, sigma) (:class:`difflab.guidance.NoisyClassifier`,
    Dhariwal & Nichol 2021, sec. 4.3), trained with sigma from ``frame``'s training distribution
    (:func:`difflab.train.train_classifier`), seeded, cached in the guide's cache."""
    from difflab.data import load_digits
    from difflab.guidance import ClassifierConfig, NoisyClassifier
    from difflab.train import train_classifier

    path = guide.cache_dir() / f"noisy_classifier_w{width}_s{steps}_seed{seed}.safetensors"
    if path.exists():
        return NoisyClassifier.load(path)
    images, labels = load_digits(split="train")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = NoisyClassifier(ClassifierConfig(in_channels=1, num_classes=10, model_channels=width, groups=8))
    train_classifier(clf, images, labels, frame, steps=steps, batch_size=128, lr=3e-3, seed=seed)
    clf.save(path)
    return clf


def show_grid(ax, samples: torch.Tensor, ncol: int, title: str = "") -> None:
    """Draw (N, 1, 8, 8) digits as one image of N / ncol rows on ``ax``."""
    n = len(samples) - len(samples) % ncol
    s = samples[:n, 0].reshape(n // ncol, ncol, 8, 8)
    s = torch.nn.functional.pad(s, (1, 1, 1, 1), value=-1)
    img = s.permute(0, 2, 1, 3).reshape((n // ncol) * 10, ncol * 10)
    ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def class_grid(samples: torch.Tensor, n_per_class: int, per_class: int = 4) -> torch.Tensor:
    """The first ``per_class`` samples of each class from samples ordered as :func:`asked_labels`,
    arranged so that :func:`show_grid` with ``ncol = 10`` shows one class per column."""
    s = samples.reshape(10, n_per_class, *samples.shape[1:])[:, :per_class]
    return s.transpose(0, 1).reshape(10 * per_class, *samples.shape[1:])


class Counted(nn.Module):
    """A denoiser that counts its calls (NFE = number of function evaluations)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.calls = denoiser, 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


def oracle(fast: bool, seed: int = 0, *, frame: str = "linear", prediction: str = "eps"):
    """The closed-form test bed: a random Gaussian mixture (16 dimensions and 6 components fast,
    32 and 8 full; fixed by ``seed``; overlapping components, mean scale 0.1, standard deviations
    0.1-0.5, so that no ODE trajectory runs along a boundary between two of them) and its exact
    denoiser as an ``prediction`` model of DDPM's ``frame`` schedule (:mod:`difflab.oracle`).
    Returns ``(mixture, denoiser)``."""
    from difflab.core import Denoiser, VPDiscrete
    from difflab.oracle import GaussianMixture

    gm = GaussianMixture.random(dim=16 if fast else 32, components=6 if fast else 8, seed=seed,
                                mean_scale=0.1, std_range=(0.1, 0.5))
    vp = VPDiscrete.from_name(frame)
    return gm, Denoiser(gm.network(vp, prediction), vp, prediction)
