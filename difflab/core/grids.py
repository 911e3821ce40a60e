"""Inference grids: the decreasing noise levels a sampler walks through.

A grid is a 1-D tensor of canonical sigmas, decreasing, ending in 0 (or in the last level when
``final`` says so), exactly as in k-diffusion: any grid works with any sampler. Grids are for
*sampling*; the noise levels drawn in *training* live in :mod:`difflab.core.noise_levels`.
"""
from __future__ import annotations

import math

import torch

from .denoiser import FLOW_SIGMA_ONE, SIGMA_MAX_FINITE, Flow, VPDiscrete

SPACINGS = ("leading", "trailing", "linspace")


def check_sigmas(sigmas) -> torch.Tensor:
    """Validate a sampling grid (1-D, finite, non-negative, strictly decreasing) and return it as
    a float64 CPU tensor."""
    sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
    if bool((sigmas < 0).any()):
        raise ValueError(f"sigmas must be non-negative, got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing (largest noise level first), got {sigmas.tolist()}")
    return sigmas


def discrete_timesteps(T: int, n: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """``n`` of a discrete model's ``T`` training steps, largest first.

    ``leading`` (DDIM's original, Song et al. 2021 appendix C.2: 0, T/n, 2T/n, ... plus
    ``steps_offset``), ``trailing`` (T-1, T-1-T/n, ...; Lin et al. 2024, Table 2, always starts at
    the last step) or ``linspace`` (round(linspace(0, T-1, n))). Same values as diffusers'
    ``timestep_spacing`` of the same name.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r} is unknown; choose one of {list(SPACINGS)}")
    if not 1 <= n <= T:
        raise ValueError(f"steps={n} must be between 1 and the model's {T} training steps")
    if spacing == "leading":
        ts = torch.arange(n, dtype=torch.float64) * (T // n)
        ts = ts.round() + steps_offset
    elif spacing == "trailing":
        ts = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
        return ts.long()
    else:
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
    return ts.long().flip(0)


def lcm_timesteps(T: int, n: int, original_steps: int = 50) -> torch.Tensor:
    """``n`` timesteps of a latent consistency model, largest first (Luo et al. 2023, section 4.3,
    "skipping-step" schedule; diffusers' ``LCMScheduler.set_timesteps``): the distillation schedule
    of ``original_steps`` steps k - 1, 2k - 1, ..., original_steps k - 1 with k = T // original_steps,
    and of it, counted from its largest, the entries floor(j original_steps / n), j = 0 .. n - 1.
    T = 1000, n = 4: 999, 759, 499, 259. ``TCDScheduler`` gives the same; with an explicit
    ``original_inference_steps`` it picks from every step instead, i.e. ``original_steps=T``."""
    if not 1 <= original_steps <= T:
        raise ValueError(f"original_steps={original_steps} must be between 1 and the model's {T} training steps")
    if not 1 <= n <= original_steps:
        raise ValueError(f"steps={n} must be between 1 and original_steps={original_steps} (LCM picks its steps "
                         f"from that schedule)")
    k = T // original_steps
    origin = (torch.arange(1, original_steps + 1) * k - 1).flip(0)
    index = (torch.arange(n, dtype=torch.float64) * (original_steps / n)).floor().long()  # numpy's linspace, endpoint=False
    return origin[index]


def timestep_sigmas(frame, timesteps: torch.Tensor, final: float | None = 0.0) -> torch.Tensor:
    """Sigmas of a discrete frame at ``timesteps``, followed by ``final`` (0 = step to the clean
    sample, like diffusers' ``set_alpha_to_one=True``; ``None`` = stop at the last timestep)."""
    sigmas = frame.sigmas[timesteps.long()]
    if final is not None:
        sigmas = torch.cat([sigmas, sigmas.new_tensor([final])])
    return sigmas


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    then 0 (Karras et al. 2022, eq. 5)."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma, i.e. uniform in log-SNR (Lu et al. 2022, DPM-Solver section 3.3), then 0."""
    _check(n, sigma_min, sigma_max)
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def flow_sigmas(n: int, shift: float = 1.0, t_max: float = 1.0, t_min: float | None = None,
                exact_one: bool = False) -> torch.Tensor:
    """Flow-matching grid: t uniform from ``t_max`` to ``t_min`` (default 1/n), time-shifted
    t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, SD3, eq. 23), as canonical sigmas
    t'/(1 - t'), then 0. t = 1 is clamped to the largest finite sigma (see core.denoiser), or,
    with ``exact_one``, held exactly as ``FLOW_SIGMA_ONE`` (for the flow samplers only)."""
    t_min = 1.0 / n if t_min is None else t_min
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    sig = (t / (1 - t)).clamp(max=SIGMA_MAX_FINITE)
    if exact_one:
        sig = torch.where(t >= 1, torch.full_like(sig, FLOW_SIGMA_ONE), sig)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def resolution_shift(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift of the flow grid: mu linear in the number of image tokens,
    from ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (extrapolated
    outside), returned as the shift exp(mu) of :func:`flow_sigmas` (Esser et al. 2024, SD3,
    Section 5.3.2: more tokens need more noise; diffusers' ``calculate_shift``). The time shift
    exp(mu) / (exp(mu) + (1/t - 1)) of diffusers' ``use_dynamic_shifting`` is eq. 23 with shift
    exp(mu). Defaults: FLUX.1's scheduler config; 1024 x 1024 images (4096 tokens) get exp(1.15)."""
    if seq_len < 1 or max_seq_len == base_seq_len:
        raise ValueError(f"need seq_len >= 1 and max_seq_len != base_seq_len, got {seq_len}, {base_seq_len}, {max_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + m * (seq_len - base_seq_len))


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's polyexponential grid: log sigma = log sigma_min + r^rho (log sigma_max - log sigma_min)
    with r uniform from 1 to 0 (k-diffusion ``get_sigmas_polyexponential``), then 0. rho = 1 is
    :func:`exponential_sigmas`; rho > 1 puts more levels at low noise."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    s = (ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp()
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def uniform_time_sigmas(frame, n: int, t_max: float | None = None, t_min: float | None = None) -> torch.Tensor:
    """Uniform in the frame's own time: t linearly from ``t_max`` to ``t_min`` (default: the times of
    the frame's sigma_max and sigma_min), sigma = frame.sigma(t), then 0. DPM-Solver's
    "time_uniform" (Lu et al. 2022, section 3.3 and appendix D.1), and for a discrete model
    k-diffusion's default ``get_sigmas`` (t = linspace(T-1, 0, n), fractional steps interpolated in
    log sigma: A1111's "Normal"). Works for every frame: VP (discrete and continuous), VE with
    time "sigma" (uniform sigma), EDM (uniform log sigma), flow (uniform t)."""
    t_max = float(frame.time(torch.tensor(frame.sigma_max, dtype=torch.float64))) if t_max is None else t_max
    t_min = float(frame.time(torch.tensor(frame.sigma_min, dtype=torch.float64))) if t_min is None else t_min
    if n < 1:
        raise ValueError(f"steps={n} must be at least 1")
    if n > 1 and not t_min < t_max:
        raise ValueError(f"need t_min < t_max, got t_min={t_min}, t_max={t_max}")
    s = frame.sigma(torch.linspace(t_max, t_min, n, dtype=torch.float64)).to(torch.float64)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def custom_sigmas(sigmas, final: float | None = 0.0) -> torch.Tensor:
    """A user-given grid, validated (1-D, finite, non-negative, strictly decreasing; see
    :func:`check_sigmas`) as float64, with ``final`` appended unless it is already the last level
    (``None``: keep the grid as given, e.g. to stop at a positive sigma)."""
    sigmas = check_sigmas(sigmas)
    if final is not None and float(sigmas[-1]) != final:
        sigmas = check_sigmas(torch.cat([sigmas, sigmas.new_tensor([final])]))
    return sigmas


def leap_sigmas(n: int, sigma_min: float, sigma_max: float, sigma_leap: float) -> torch.Tensor:
    """sigma_max, then n - 1 levels uniform in log sigma (log-SNR) from ``sigma_leap`` down to
    ``sigma_min``, then 0: one leap over the high-noise range, then an exponential grid
    (Lu et al. 2022, section 3.3) where the data are being resolved.

    Why the leap: once sigma is well above the data's scale, D(x, sigma) barely changes along the
    trajectory (it tends to the data mean), so a data-prediction exponential integrator
    (DPM-Solver++, UniPC, DDIM) crosses that whole range in one step almost exactly, and the
    evaluations are better spent below. With n = 2 the grid is [sigma_max, sigma_min, 0]."""
    _check(n, sigma_min, sigma_max)
    if n == 1:
        inner = torch.zeros(0, dtype=torch.float64)
    elif n == 2:
        inner = torch.tensor([sigma_min], dtype=torch.float64)
    else:
        if not sigma_min < sigma_leap < sigma_max:
            raise ValueError(f"need sigma_min < sigma_leap < sigma_max, got {sigma_min}, {sigma_leap}, {sigma_max}")
        inner = torch.linspace(math.log(sigma_leap), math.log(sigma_min), n - 1, dtype=torch.float64).exp()
    return torch.cat([torch.tensor([sigma_max], dtype=torch.float64), inner, torch.zeros(1, dtype=torch.float64)])


# (sigma_leap, sigma_min) of :func:`optimized_sigmas` for n levels, tuned with UniPC-3 (bh2) by minimising
# the RMSE to the exact ODE solution on four Gaussian-mixture test beds (difflab.oracle.GaussianMixture
# .random(32, 8, seed=1..4, mean_scale=0.25): data of per-coordinate std about 0.35 with scales from 0.05
# to 0.5, like images in [-1, 1]) under a discrete VP model (linear betas, T = 1000). bench/samplers.py
# scores it on seed 0, which the tuning never saw.
OPTIMIZED = {5: (1.8, 0.1), 10: (2.0, 0.023), 20: (2.5, 0.013), 50: (6.0, 0.01)}


def optimized_sigmas(n: int, sigma_max: float, sigma_min: float = 0.0) -> torch.Tensor:
    """A tuned :func:`leap_sigmas` grid ("Align Your Steps"-style, Sabour et al. 2024, but tuned on
    closed-form test beds): (sigma_leap, sigma_min) from :data:`OPTIMIZED`, interpolated linearly in
    log n between the tuned n and held constant outside them. The levels are absolute sigmas for
    data of unit-ish scale. ``sigma_min`` is the model's smallest level: the grid never goes below
    it (a discrete model knows nothing under its first training step). If the model's range does
    not contain the leap, it is an exponential grid over that range."""
    if n < 1:
        raise ValueError(f"steps={n} must be at least 1")
    keys = sorted(OPTIMIZED)
    u = min(max(math.log(n), math.log(keys[0])), math.log(keys[-1]))
    hi = next(k for k in keys if math.log(k) >= u - 1e-12)
    lo = keys[max(keys.index(hi) - 1, 0)]
    w = 0.0 if hi == lo else (u - math.log(lo)) / (math.log(hi) - math.log(lo))
    leap, last = (math.exp((1 - w) * math.log(a) + w * math.log(b)) for a, b in zip(OPTIMIZED[lo], OPTIMIZED[hi]))
    last = max(last, sigma_min)
    if last < leap < sigma_max:
        return leap_sigmas(n, last, sigma_max, leap)
    return exponential_sigmas(n, min(last, sigma_max / 2), sigma_max)


def density_sigmas(n: int, sigma_max: float, sigma_first: float, sigma_last: float, log_density=(0.0,)) -> torch.Tensor:
    """sigma_max, then n - 1 levels from ``sigma_first`` down to ``sigma_last`` at equal quantiles of a
    step density in log sigma, then 0: the grids that :func:`difflab.samplers.fit_grid.fit_sigmas`
    fits to a model (four numbers describe one).

    The density is log-linear between knots spaced evenly in log sigma from ``sigma_first`` (the
    first value of ``log_density``) to ``sigma_last`` (the last); one value is a uniform density,
    i.e. :func:`exponential_sigmas` between the two ends. Level j of the n - 1 is where the
    integral of the density from ``sigma_first`` reaches j / (n - 2) of the whole (computed in
    closed form per segment). The first step, sigma_max to sigma_first, is a leap as in
    :func:`leap_sigmas`. With n = 2 the grid is [sigma_max, sigma_first, 0]."""
    if n < 1:
        raise ValueError(f"steps={n} must be at least 1")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    if not 0 < sigma_first < sigma_max or (n > 2 and not 0 < sigma_last < sigma_first):
        raise ValueError(f"need 0 < sigma_last < sigma_first < sigma_max, got {sigma_last}, {sigma_first}, {sigma_max}")
    c = [float(v) for v in log_density]
    if not c or not all(math.isfinite(v) for v in c):
        raise ValueError(f"log_density must be one or more finite numbers, got {log_density}")
    m = n - 1
    if m == 1:
        inner = [0.0]
    elif len(c) == 1:
        inner = [j / (m - 1) for j in range(m)]
    else:
        width = 1.0 / (len(c) - 1)  # knots at t_k = k * width, t = 0 at sigma_first, 1 at sigma_last
        masses = [width * (math.exp(c1) - math.exp(c0)) / (c1 - c0) if c1 != c0 else width * math.exp(c0)
                  for c0, c1 in zip(c[:-1], c[1:])]
        total, inner = sum(masses), []
        for j in range(m):
            r, k = j / (m - 1) * total, 0
            while k < len(masses) - 1 and r > masses[k]:
                r, k = r - masses[k], k + 1
            g = (c[k + 1] - c[k]) / width  # d log(density) / dt on segment k
            dt = r / math.exp(c[k]) if g == 0 else math.log1p(g * r / math.exp(c[k])) / g
            inner.append(min(k * width + dt, 1.0))
        inner[-1] = 1.0  # the last quantile is the end, whatever the rounding
    log_first, log_last = math.log(sigma_first), math.log(sigma_last) if n > 2 else math.log(sigma_first)
    levels = [math.exp(log_first + t * (log_last - log_first)) for t in inner]
    return torch.tensor([sigma_max, *levels, 0.0], dtype=torch.float64)


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"steps={n} must be at least 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


GRIDS = ("default", "timesteps", "uniform_time", "karras", "exponential", "log_snr", "polyexponential", "flow",
         "optimized", "lcm")


def for_denoiser(denoiser, steps: int, grid: str = "default", spacing: str = "trailing", rho: float = 7.0, *,
                 poly_rho: float = 1.0, original_steps: int = 50) -> torch.Tensor:
    """The sampling grid ``grid`` with ``steps`` levels for a wrapped model, ending in 0.

    ``default`` picks the natural grid of the model's frame: its training timesteps for a
    discrete VP model (``spacing`` trailing by default, as Lin et al. 2024 recommend), the
    shifted-uniform flow grid for a flow model, Karras et al.'s rho=7 grid otherwise.
    ``timesteps``: the discrete model's own steps (``spacing``); ``uniform_time``: uniform in the
    frame's time (:func:`uniform_time_sigmas`); ``karras`` (``rho``); ``exponential`` or its
    synonym ``log_snr``: uniform in log-SNR; ``polyexponential`` (``poly_rho``, 1 as in k-diffusion
    and A1111); ``flow``: the flow-matching grid; ``optimized``: :func:`optimized_sigmas`; ``lcm``: a
    discrete model's :func:`lcm_timesteps` (``original_steps``). All but ``flow``, ``optimized`` and
    ``lcm`` span the frame's sigma_min to sigma_max.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is unknown; choose one of {list(GRIDS)}")
    frame = denoiser.frame
    if grid == "default":
        grid = "timesteps" if isinstance(frame, VPDiscrete) else "flow" if isinstance(frame, Flow) else "karras"
    if grid in ("timesteps", "lcm"):
        if not isinstance(frame, VPDiscrete):
            raise ValueError(f"grid={grid!r} needs a discrete-time model (VPDiscrete frame)")
        if grid == "lcm":
            return timestep_sigmas(frame, lcm_timesteps(frame.T, steps, original_steps))
        return timestep_sigmas(frame, discrete_timesteps(frame.T, steps, spacing))
    if grid == "flow":
        return flow_sigmas(steps)
    if grid == "uniform_time":
        return uniform_time_sigmas(frame, steps)
    if grid == "karras":
        return karras_sigmas(steps, frame.sigma_min, frame.sigma_max, rho)
    if grid == "polyexponential":
        return polyexponential_sigmas(steps, frame.sigma_min, frame.sigma_max, poly_rho)
    if grid == "optimized":
        return optimized_sigmas(steps, frame.sigma_max, frame.sigma_min)
    return exponential_sigmas(steps, frame.sigma_min, frame.sigma_max)
