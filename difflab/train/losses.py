"""Diffusion training losses, one value per example, and the training noise levels they use.

Every loss is computed in the network's *own* parameterization (eps, x0, v, flow, EDM's F):
the canonical noisy sample ``x = x0 + sigma * noise`` goes through
:meth:`difflab.core.Denoiser.net_output`, and the target is :meth:`Denoiser.target`. So one
function gives the eps-MSE of DDPM, the v-loss, the x0-MSE, flow matching and EDM's loss; the
``weighting`` only changes how much each noise level counts.

Losses return shape (B,): the caller reduces (mean for training, bins by sigma for the log).
"""
from __future__ import annotations

import torch

from difflab.core import EDM, VE, Flow, VPContinuous, VPDiscrete, append_dims, noise_levels, params

WEIGHTINGS = ("simple", "min_snr", "edm")


# ----------------------------------------------------------------------------------------------
# Loss weightings


def loss_weight(weighting: str, prediction: str, alpha, sigma_in, *, sigma_data: float = 0.5, min_snr_gamma: float = 5.0):
    """The weight w on the squared error of the network's own output at frame levels
    (alpha, sigma_in), where the network input is ``x_in = alpha x0 + sigma_in eps``.

    - ``"simple"``: w = 1 in the network's parameterization: L_simple of Ho et al. 2020 (eq. 14)
      for eps, the v-loss of Salimans & Ho 2022 for v, conditional flow matching
      (Lipman et al. 2023, eq. 23; Liu et al. 2023, eq. 1) for flow.
    - ``"min_snr"``: Min-SNR-gamma (Hang et al. 2023, eq. 7 and section 3.4): weight
      min(SNR, gamma) on the x0 error, SNR = alpha^2 / sigma_in^2 = 1 / sigma^2. Moved onto the
      network's error with k = :func:`difflab.core.params.x0_error_scale`:
      w = min(SNR, gamma) k^2, which is min(SNR, gamma)/SNR for eps and min(SNR, gamma)/(SNR+1) for v.
    - ``"edm"``: lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0 error
      (Karras et al. 2022, eq. 8 and Table 1), i.e. an effective weight of 1 on EDM's F.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is unknown; choose one of {list(WEIGHTINGS)}")
    if weighting == "simple":
        return torch.ones_like(torch.as_tensor(sigma_in))
    k = params.x0_error_scale(prediction, alpha, sigma_in, sigma_data)
    if weighting == "min_snr":
        snr = (alpha / sigma_in) ** 2
        return snr.clamp(max=min_snr_gamma) * k**2
    sigma = sigma_in / alpha  # the canonical sigma
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return lam * k**2


# ----------------------------------------------------------------------------------------------
# The loss


def diffusion_loss(denoiser, x0: torch.Tensor, sigma, noise: torch.Tensor, *, weighting: str = "simple",
                   min_snr_gamma: float = 5.0, extra_args: dict | None = None,
                   element_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example denoising loss mean(w * (out - target)^2) of shape (B,), in the network's own
    parameterization (Ho et al. 2020, Algorithm 1; Karras et al. 2022, eq. 2 and 8).

    ``x0`` is clean data (B, ...), ``sigma`` a scalar or (B,) canonical noise level, ``noise``
    a standard normal draw shaped like ``x0``; ``extra_args`` go to the network (``class_labels=``).
    ``element_weight``: a fixed weight broadcastable to ``x0`` (e.g. per frame of a clip,
    (1, 1, F, 1, 1)) on each squared error, on top of ``w``; None: uniform (1).
    """
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x0.shape[0])
    x = x0 + append_dims(sigma, x0.ndim) * noise
    out, x_in, alpha, sigma_in = denoiser.net_output(x, sigma, **(extra_args or {}))
    target = denoiser.target(x0, noise, sigma)
    return weighted_mse(denoiser, out, target, alpha, sigma_in, weighting=weighting, min_snr_gamma=min_snr_gamma,
                        element_weight=element_weight)


def weighted_mse(denoiser, out: torch.Tensor, target: torch.Tensor, alpha, sigma_in, *, weighting: str = "simple",
                 min_snr_gamma: float = 5.0, element_weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean(w * (out - target)^2) per example, w = :func:`loss_weight` at frame levels
    (alpha, sigma_in), times ``element_weight`` where given: the denoising term of
    :func:`diffusion_loss` and of the hybrid loss (:func:`difflab.train.vlb.hybrid_loss`), given one network output."""
    w = loss_weight(weighting, denoiser.prediction, alpha, sigma_in, sigma_data=denoiser.sigma_data, min_snr_gamma=min_snr_gamma)
    if element_weight is not None:
        w = w * element_weight.to(out)
    return (w * (out - target) ** 2).reshape(out.shape[0], -1).mean(1)


# ----------------------------------------------------------------------------------------------
# Training noise levels: which sigma each example is noised to


def _discrete_uniform(frame, n, generator, **kw):
    return noise_levels.discrete_uniform(frame, n, generator, **kw)


def _continuous_uniform(frame, n, generator, **kw):
    return noise_levels.continuous_uniform(frame, n, generator, **kw)


def _log_normal(frame, n, generator, **kw):
    return noise_levels.log_normal(n, generator=generator, **kw)


def _logit_normal(frame, n, generator, **kw):
    return noise_levels.logit_normal(n, generator=generator, **kw)


# name -> fn(frame, n, generator, **kwargs) -> (n,) float64 canonical sigmas
NOISE_LEVELS = {
    "discrete_uniform": _discrete_uniform,      # DDPM (Ho et al. 2020, Algorithm 1)
    "continuous_uniform": _continuous_uniform,  # VDM (Kingma et al. 2021, eq. 13)
    "log_normal": _log_normal,                  # EDM (Karras et al. 2022, Table 1)
    "logit_normal": _logit_normal,              # SD3 flow matching (Esser et al. 2024, eq. 19)
}


def default_noise_level(frame) -> str:
    """The usual training distribution for a frame: VPDiscrete -> discrete_uniform,
    VPContinuous -> continuous_uniform, Flow -> logit_normal, VE and EDM -> log_normal."""
    if isinstance(frame, VPDiscrete):
        return "discrete_uniform"
    if isinstance(frame, VPContinuous):
        return "continuous_uniform"
    if isinstance(frame, Flow):
        return "logit_normal"
    if isinstance(frame, (VE, EDM)):
        return "log_normal"
    raise ValueError(f"no default training noise level for frame {type(frame).__name__}; name one of {sorted(NOISE_LEVELS)}")


def draw_sigmas(frame, n: int, generator: torch.Generator | None = None, name: str | None = None, **kwargs) -> torch.Tensor:
    """n canonical training sigmas (float64, CPU) from :data:`NOISE_LEVELS` ``[name]``
    (default: :func:`default_noise_level` of the frame)."""
    name = name or default_noise_level(frame)
    if name not in NOISE_LEVELS:
        raise ValueError(f"noise level {name!r} is unknown; choose one of {sorted(NOISE_LEVELS)}")
    return NOISE_LEVELS[name](frame, n, generator, **kwargs)


# ----------------------------------------------------------------------------------------------
# Loss by noise level, for the training log

SIGMA_BIN_EDGES = (0.01, 0.1, 1.0, 10.0, 100.0)


def _bin_labels(edges) -> list[str]:
    fmt = lambda v: f"{v:g}"  # noqa: E731
    labels = [f"<={fmt(edges[0])}"]
    labels += [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]
    return labels + [f">{fmt(edges[-1])}"]


class SigmaBinnedLoss:
    """Accumulates per-example losses in log-spaced sigma bins (default: decades from 0.01 to
    100, plus the two open ends); bin i holds edges[i-1] < sigma <= edges[i]."""

    def __init__(self, edges=SIGMA_BIN_EDGES):
        self.edges = torch.tensor(sorted(edges), dtype=torch.float64)
        self.labels = _bin_labels(self.edges.tolist())
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.labels), dtype=torch.float64)
        self.counts = torch.zeros(len(self.labels), dtype=torch.float64)

    def add(self, sigma: torch.Tensor, losses: torch.Tensor) -> None:
        sigma = torch.as_tensor(sigma).detach().to("cpu", torch.float64).reshape(-1)
        losses = losses.detach().to("cpu", torch.float64).reshape(-1)
        idx = torch.bucketize(sigma, self.edges)
        self.sums.index_add_(0, idx, losses)
        self.counts.index_add_(0, idx, torch.ones_like(losses))

    def means(self) -> dict[str, float]:
        """Mean loss per non-empty bin, keyed by the bin's label (e.g. ``"0.1-1"``)."""
        return {label: float(s / c) for label, s, c in zip(self.labels, self.sums, self.counts) if c > 0}


def loss_by_sigma_bins(sigma: torch.Tensor, losses: torch.Tensor, edges=SIGMA_BIN_EDGES) -> dict[str, float]:
    """Mean loss per log-spaced sigma bin (see :class:`SigmaBinnedLoss`)."""
    acc = SigmaBinnedLoss(edges)
    acc.add(sigma, losses)
    return acc.means()

