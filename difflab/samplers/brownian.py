"""Brownian noise for SDE samplers: a virtual Brownian tree, and the one place that turns any
``noise`` argument into a per-interval noise source.

A stochastic step from ``sigma`` to ``sigma_next`` needs a standard normal z. With independent
draws (the contract's plain ``noise()`` callable) a finer grid gives an unrelated path. A
Brownian tree instead fixes one Brownian motion W per sample and answers every step with its
normalised increment ``z = (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``, so the
increments of a refined grid sum exactly to those of the coarse one: samples converge as the
grid is refined, as in k-diffusion's ``BrownianTreeNoiseSampler`` (which uses torchsde).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..core.rng import sample_seed
from .common import noise_source


class BrownianTreeNoise:
    """A virtual Brownian tree (Li et al. 2020, "Scalable Gradients for Stochastic Differential
    Equations"; torchsde's BrownianTree) over time t = sigma in [sigma_min, sigma_max], one
    independent Brownian motion per sample.

    W(sigma_min) = 0 and W(sigma_max) ~ N(0, sigma_max - sigma_min). W at any other time comes
    from recursive bisection: an interval [a, b] with known W(a), W(b) has its midpoint m drawn
    from the Brownian bridge, W(m) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) z_node. Node n's
    children are 2n and 2n + 1, and z_node of sample i is drawn from a generator seeded with a
    hash of (seeds[i], n), so nothing needs storing and every query is reproducible. The
    descent stops after ``depth`` levels (interval width <= ``tol``); inside that last interval W
    is interpolated linearly, so an increment's variance is |t - s| to within ``tol``.

    API:

    - ``W(t)``: the (B, ...) float64 value of the path at time t (a sigma in the range);
    - ``increment(s, t)`` = W(t) - W(s), float64;
    - ``noise(sigma, sigma_next)``: the increment divided by sqrt(|sigma_next - sigma|), i.e. a
      standard normal in ``dtype`` on ``device`` -- this is how the SDE samplers call it.

    Because W is a fixed function of t, increments over a refined grid telescope to the coarse
    increment exactly (up to float64 rounding), and sample i depends on ``seeds[i]`` only, never
    on the batch it is in.
    """

    def __init__(self, x_shape: Sequence[int], sigma_min: float, sigma_max: float, seeds: Sequence[int], *,
                 tol: float = 1e-6, device="cpu", dtype=torch.float32):
        x_shape, seeds = tuple(x_shape), [int(s) for s in seeds]
        if len(x_shape) < 1 or len(seeds) != x_shape[0]:
            raise ValueError(f"need one seed per sample: x_shape={x_shape}, {len(seeds)} seeds")
        if not 0 <= sigma_min < sigma_max or not math.isfinite(sigma_max):
            raise ValueError(f"need 0 <= sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if tol <= 0:
            raise ValueError(f"tol={tol} must be positive")
        self.t0, self.t1 = float(sigma_min), float(sigma_max)
        self.shape, self.seeds, self.device, self.dtype = x_shape[1:], seeds, torch.device(device), dtype
        self.depth = max(1, math.ceil(math.log2((self.t1 - self.t0) / tol)))
        self._generator = torch.Generator()
        self._w1 = math.sqrt(self.t1 - self.t0) * self._normal(0)  # W(sigma_max): node 0
        self._path: dict[int, torch.Tensor] = {}  # W at the midpoints of the last query's path

    @classmethod
    def for_run(cls, seed: int, batch_size: int, shape: Sequence[int], sigma_min: float, sigma_max: float,
                start: int = 0, **kwargs) -> "BrownianTreeNoise":
        """Samples ``start .. start + batch_size - 1`` of a run seeded ``seed``, with the per-sample
        seeds of :class:`difflab.core.SampleNoise` (``shape`` excludes the batch dimension)."""
        seeds = [sample_seed(seed, start + i) for i in range(batch_size)]
        return cls((batch_size, *shape), sigma_min, sigma_max, seeds, **kwargs)

    def _normal(self, node: int) -> torch.Tensor:
        """z_node of every sample, (B, ...) float64, each from its own seed (seed_i, node)."""
        out = torch.empty((len(self.seeds), *self.shape), dtype=torch.float64)
        for i, seed in enumerate(self.seeds):
            self._generator.manual_seed(_node_seed(seed, node))
            torch.randn(self.shape, generator=self._generator, dtype=torch.float64, out=out[i])
        return out

    def W(self, t: float) -> torch.Tensor:
        """The path at time ``t`` (a sigma in [sigma_min, sigma_max]), shape (B, ...), float64."""
        t = float(t)
        slack = 1e-12 * self.t1
        if not self.t0 - slack <= t <= self.t1 + slack:
            raise ValueError(f"sigma={t} is outside the tree's range [{self.t0}, {self.t1}]")
        t = min(max(t, self.t0), self.t1)
        a, b, wa, wb, node = self.t0, self.t1, torch.zeros_like(self._w1), self._w1, 1
        path = {}
        for _ in range(self.depth):
            if t == a:
                break
            if t == b:
                wa, a = wb, b
                break
            m = 0.5 * (a + b)
            wm = self._path.get(node)
            if wm is None:
                wm = 0.5 * (wa + wb) + math.sqrt((b - a) / 4) * self._normal(node)
            path[node] = wm
            if t < m:
                b, wb, node = m, wm, 2 * node
            else:
                a, wa, node = m, wm, 2 * node + 1
        self._path = path
        if t == a:
            return wa
        return wa + (t - a) / (b - a) * (wb - wa)

    def increment(self, s: float, t: float) -> torch.Tensor:
        """W(t) - W(s), float64."""
        return self.W(t) - self.W(s)

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        """Standard normal increment for the step sigma -> sigma_next, in ``dtype`` on ``device``."""
        sigma, sigma_next = float(sigma), float(sigma_next)
        if sigma == sigma_next:
            raise ValueError(f"an increment needs two different times, got sigma = sigma_next = {sigma}")
        z = self.increment(sigma, sigma_next) / math.sqrt(abs(sigma_next - sigma))
        return z.to(self.device, self.dtype)


_MASK64 = (1 << 64) - 1


def _node_seed(seed: int, node: int) -> int:
    """A 63-bit seed for tree node ``node`` of a sample seeded ``seed``: splitmix64 (Steele et al.
    2014) of the pair -- cheap, as a query visits ``depth`` nodes per sample."""
    z = (seed * 0x9E3779B97F4A7C15 + node) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def interval_noise(noise, x: torch.Tensor) -> Callable[[float, float], torch.Tensor]:
    """The sampler's noise as a function of the step, ``draw(sigma, sigma_next)``, standard normal
    in the dtype and device of ``x``: a :class:`BrownianTreeNoise` is asked for the increment over
    the step; a plain contract ``noise()`` callable (or ``None``: ``torch.randn_like``) is called
    with no arguments and gives independent draws."""
    if isinstance(noise, BrownianTreeNoise):
        return lambda sigma, sigma_next: noise(sigma, sigma_next).to(x.device, x.dtype)
    draw = noise_source(noise, x)
    return lambda sigma, sigma_next: draw()
