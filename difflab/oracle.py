"""Closed-form test beds: data whose ideal denoiser and probability-flow ODE are known exactly.

A sampler is right when, given the exact denoiser of the data, it reproduces the exact ODE
solution (deterministic samplers, at their convergence order) or the data distribution itself
(stochastic samplers). Everything here is float64, in the canonical frame x = x0 + sigma eps.

Usage::

    gm = GaussianMixture.random(dim=32, components=8, seed=0)   # the test bed of bench/samplers.py
    frame = VPDiscrete.from_name("linear")
    denoiser = Denoiser(gm.network(frame, "eps"), frame, "eps")   # an exact eps-prediction model
    x = torch.randn(256, 32, dtype=torch.float64) * denoiser.prior_std(frame.sigma_max)
    exact = gm.exact_ode_solution(x, (frame.sigma_max, 0.0))
    rmse_to_exact(sample_ddim(denoiser, x, sigmas), exact)             # the sampler's error
    gm.frechet_to_truth(samples), gm.mean_nll(samples)                 # for stochastic samplers
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .core.denoiser import EDM, Denoiser, VPDiscrete, append_dims
from .core.params import check_prediction, from_x0_eps
from .eval.frechet import feature_stats, frechet_distance
from .samplers.adaptive import sample_adaptive, solve_ode

SIGMA_FLOOR = 1e-7  # exact_ode_solution integrates to here, then takes D (error O((SIGMA_FLOOR / data std)^2))


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, Sigma_k) in d dimensions, with its exact denoiser.

    ``covs`` is (K, d, d), or (K, d) for diagonal covariances, or (K,) for isotropic ones.
    Samples are (B, d); the denoiser accepts any (B, ...) with d elements per sample.
    """

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        K, d = self.means.shape
        if covs.shape == (K,):
            covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif covs.shape == (K, d):
            covs = torch.diag_embed(covs)
        if self.weights.shape != (K,) or covs.shape != (K, d, d):
            raise ValueError(f"need weights (K,), means (K, d), covs (K, d, d); got {tuple(self.weights.shape)}, "
                             f"{tuple(self.means.shape)}, {tuple(covs.shape)}")
        if bool((self.weights < 0).any()) or not math.isclose(float(self.weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must be non-negative and sum to 1, got {self.weights.tolist()}")
        self.covs = covs
        self.chol = torch.linalg.cholesky(covs)
        self.eigvals, self.eigvecs = torch.linalg.eigh(covs)  # Sigma_k = U_k diag(lambda_k) U_k^T

    @classmethod
    def random(cls, dim: int, components: int, seed: int, *, mean_scale: float = 0.25,
               std_range: tuple[float, float] = (0.05, 0.5), weight_spread: float | None = None) -> "GaussianMixture":
        """A random mixture for benchmarks and tests, fixed by ``seed``: weights ~ Dirichlet(1)
        (or, with ``weight_spread`` = s, proportional to exp(s z) with z standard normal),
        means ~ N(0, mean_scale^2 I), covariances U diag(s^2) U^T with U a random rotation and the
        standard deviations s log-uniform in ``std_range`` (data spread over several scales, like
        images: coarse directions with large variance, fine ones with small). The default
        ``mean_scale`` keeps the components overlapping; with well-separated ones (mean_scale 1 in
        32 dimensions) a few ODE trajectories run along the boundary between two components, and
        the RMSE of a few-step sampler then counts which side they fall on rather than its accuracy."""
        g = torch.Generator().manual_seed(seed)
        if weight_spread is None:
            weights = -torch.rand(components, generator=g, dtype=torch.float64).log()
        else:
            weights = (weight_spread * torch.randn(components, generator=g, dtype=torch.float64)).exp()
        weights = weights / weights.sum()
        means = mean_scale * torch.randn(components, dim, generator=g, dtype=torch.float64)
        lo, hi = math.log(std_range[0]), math.log(std_range[1])
        stds = (lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64)).exp()
        q, r = torch.linalg.qr(torch.randn(components, dim, dim, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-distributed rotations
        covs = q @ torch.diag_embed(stds**2) @ q.transpose(-1, -2)
        return cls(weights, means, (covs + covs.transpose(-1, -2)) / 2)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - torch.outer(self.mean, self.mean)

    def denoiser(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """E[x0 | x0 + sigma eps = x]: with C_k = Sigma_k + sigma^2 I and responsibilities
        r_k proportional to w_k N(x; mu_k, C_k), sum_k r_k (mu_k + Sigma_k C_k^-1 (x - mu_k))
        (the Gaussian-mixture posterior mean with alpha = 1; ``cond`` is ignored).

        With Sigma_k = U_k diag(lambda_k) U_k^T, C_k^-1 = U_k diag(1 / (lambda_k + sigma^2)) U_k^T, so
        one evaluation costs O(B K d^2) and ``sigma`` may differ per sample."""
        y = x.reshape(x.shape[0], -1).to(torch.float64)
        dev = y.device
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=dev).expand(x.shape[0]) ** 2
        lam, U, means = self.eigvals.to(dev), self.eigvecs.to(dev), self.means.to(dev)
        if bool((s2 == s2[0]).all()):
            s2 = s2[:1]  # one noise level for the batch: the eigenvalues of C_k once, (1, K, d)
        c = lam + s2[:, None, None]  # eigenvalues of C_k, (B or 1, K, d)
        z = torch.bmm(y[None] - means[:, None], U).transpose(0, 1)  # U_k^T (x - mu_k), (B, K, d)
        logits = self.weights.to(dev).log() - 0.5 * (z**2 / c).sum(-1) - 0.5 * c.log().sum(-1)
        r = torch.softmax(logits, dim=1)  # (B, K)
        post = torch.bmm((lam / c * z).transpose(0, 1), U.transpose(1, 2)).transpose(0, 1)  # Sigma_k C_k^-1 (x - mu_k)
        return ((r @ means) + (r[..., None] * post).sum(1)).reshape(x.shape).to(x.dtype)

    __call__ = denoiser

    def network(self, frame, prediction: str = "eps"):
        """The exact network ``net(x_in, t)`` of a model in ``frame`` (any of :mod:`difflab.core.denoiser`'s
        frames) predicting ``prediction`` (eps, x0, v, score, flow, edm), so that
        ``Denoiser(net, frame, prediction)`` is this mixture's exact denoiser.

        It inverts the frame: sigma = frame.sigma(t), x = x_in / frame.scale(sigma), then encodes
        x0 = D(x, sigma) and eps = (x - x0) / sigma as ``prediction`` at alpha = frame.scale(sigma),
        sigma_in = alpha sigma (:func:`difflab.core.params.from_x0_eps`). A discrete VP model
        accepts fractional timesteps, so diffusers' schedulers can drive it too."""
        check_prediction(prediction)
        sigma_data = getattr(frame, "sigma_data", 0.5)

        def net(x_in: torch.Tensor, t, **cond) -> torch.Tensor:
            t = torch.as_tensor(t, dtype=torch.float64).cpu()
            t = t.expand(x_in.shape[0]) if t.ndim == 0 else t
            sigma = frame.sigma(t).to(x_in.device)
            alpha = append_dims(frame.scale(sigma), x_in.ndim)
            x = x_in.to(torch.float64) / alpha
            x0 = self.denoiser(x, sigma)
            eps = (x - x0) / append_dims(sigma, x.ndim)
            return from_x0_eps(x0, eps, prediction, alpha, alpha * append_dims(sigma, x.ndim), sigma_data).to(x_in.dtype)

        return net

    def noisy(self, sigma: float) -> "GaussianMixture":
        """The marginal of x = x0 + sigma eps: the same mixture with covariances Sigma_k + sigma^2 I."""
        return GaussianMixture(self.weights, self.means, self.covs + sigma**2 * torch.eye(self.dim, dtype=torch.float64))

    def exact_ode_solution(self, x_start: torch.Tensor, sigmas, *, rtol: float = 1e-10, atol: float = 1e-10) -> torch.Tensor:
        """The probability-flow ODE solution (Karras et al. 2022, eq. 4) from ``x_start`` at
        sigma_start to sigma_end, where ``sigmas`` is a pair (sigma_start, sigma_end) or a grid
        (only its ends are used; sigma_end > sigma_start integrates upwards, i.e. encodes). Dormand-Prince
        5(4) in log sigma (:mod:`difflab.samplers.adaptive`) on this mixture's exact denoiser at
        ``rtol``/``atol``, in float64. To reach sigma_end = 0 it integrates down to :data:`SIGMA_FLOOR`
        and takes D there (the limit, up to O(SIGMA_FLOOR^2 / smallest data variance)). Agrees with
        the single-Gaussian closed form to about 1e-10 (the tests check it)."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError(f"sigmas must be (sigma_start, sigma_end) or a grid, got {sigmas.tolist()}")
        start, end = float(sigmas[0]), float(sigmas[-1])
        x = x_start.to(torch.float64)
        if end == 0:
            grid = torch.tensor([start, SIGMA_FLOOR, 0.0], dtype=torch.float64)
            return sample_adaptive(self.denoiser, x, grid, rtol=rtol, atol=atol, max_nfe=10**6).to(x_start.dtype)
        return solve_ode(self.denoiser, x, start, end, rtol=rtol, atol=atol, max_nfe=10**6)[0].to(x_start.dtype)

    def frechet_to_truth(self, samples: torch.Tensor) -> float:
        """Squared Frechet distance between the Gaussian fitted to ``samples`` (n, d) and the
        mixture's own mean and covariance (Heusel et al. 2017, eq. 2; :mod:`difflab.eval.frechet`).
        It compares first and second moments only, so use it with :meth:`mean_nll`."""
        samples = samples.reshape(samples.shape[0], -1)
        return frechet_distance(*feature_stats(samples), self.mean, self.covariance)

    def mean_nll(self, samples: torch.Tensor) -> float:
        """Mean negative log-likelihood of ``samples`` under the true density p(x0), in nats. For
        true samples it estimates the entropy of the mixture; a sampler that is too sharp scores
        lower, one that is too diffuse or misses modes' shapes higher. Compare with a true sample's."""
        return -self.log_prob(samples.reshape(samples.shape[0], -1)).mean().item()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0, shape (n, d)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (self.chol[k] @ z[..., None])[..., 0]

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log p(x0) for x0 of shape (B, d)."""
        x0 = x0.to(torch.float64)
        diff = x0[:, None, :] - self.means  # (B, K, d)
        z = torch.linalg.solve_triangular(self.chol, diff[..., None], upper=False)[..., 0]
        log_det = 2 * torch.diagonal(self.chol, dim1=-2, dim2=-1).log().sum(-1)
        log_n = -0.5 * (z**2).sum(-1) - 0.5 * log_det - 0.5 * self.dim * math.log(2 * math.pi)
        return torch.logsumexp(self.weights.log() + log_n, dim=1)


# ----------------------------------------------------------------------------------------------
# A family of closed-form models, drawn at random: what a rule that must work without knowing the data is checked on

FAMILY_FRAMES = ("vp_linear", "vp_scaled_linear", "vp_cosine", "edm")
FAMILY_PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class OracleModel:
    """One member of :func:`random_family`: a mixture, the frame of the model trained on it, and
    what its network predicts. ``params`` are the drawn values (for a report)."""

    mixture: GaussianMixture
    frame: object
    prediction: str
    params: dict

    def network(self):
        return self.mixture.network(self.frame, self.prediction)

    def denoiser(self) -> Denoiser:
        """The member's exact model, wrapped as difflab wraps any network."""
        return Denoiser(self.network(), self.frame, self.prediction)

    def describe(self) -> str:
        p = self.params
        return (f"d={p['dim']} K={p['components']} stds {p['std_lo']:.3g}-{p['std_hi']:.3g} "
                f"mean scale {p['mean_scale']:.2g} weight spread {p['weight_spread']:.2f} {p['frame']} {p['prediction']}")


def _log_uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand((), generator=g, dtype=torch.float64).item())


def random_family(n: int, seed: int, *, dims: tuple[int, int] = (2, 64), components: tuple[int, int] = (2, 32),
                  std_range: tuple[float, float] = (0.01, 0.5), mean_scale: float = 0.25,
                  weight_spreads: tuple[float, float] = (0.0, 1.5), frames=FAMILY_FRAMES,
                  predictions=FAMILY_PREDICTIONS) -> list[OracleModel]:
    """``n`` closed-form models drawn at random, fixed by ``seed``; member i depends only on
    (seed, i), so a larger family extends a smaller one.

    Each member draws: the dimension and the number of components, log-uniform integers in
    ``dims`` and ``components``; a band of component scales [lo, hi], two log-uniform draws in
    ``std_range`` sorted, inside which every component's standard deviations are log-uniform
    (:meth:`GaussianMixture.random`: random rotations, so each component is an ellipsoid with
    axes between lo and hi; the means are N(0, ``mean_scale``^2 I), :meth:`GaussianMixture.random`'s
    default); a weight spread s,
    uniform in ``weight_spreads`` (weights proportional to exp(s z): s = 0 is equal weights, 1.5
    makes the largest about 20 times the smallest); a frame, one of ``frames`` (a discrete VP model,
    T = 1000, with linear / scaled-linear / cosine betas, or EDM's frame, sigma 0.002 to 80); and a
    prediction, one of ``predictions``."""
    members = []
    for i in range(n):
        g = torch.Generator().manual_seed(1_000_003 * seed + i)
        dim = round(_log_uniform(g, dims[0], dims[1]))
        k = round(_log_uniform(g, components[0], components[1]))
        lo, hi = sorted(_log_uniform(g, *std_range) for _ in range(2))
        spread = weight_spreads[0] + (weight_spreads[1] - weight_spreads[0]) * torch.rand((), generator=g).item()
        frame_name = frames[int(torch.randint(len(frames), (), generator=g))]
        prediction = predictions[int(torch.randint(len(predictions), (), generator=g))]
        mixture_seed = int(torch.randint(2**31 - 1, (), generator=g))
        gm = GaussianMixture.random(dim, k, mixture_seed, mean_scale=mean_scale, std_range=(lo, hi), weight_spread=spread)
        frame = EDM() if frame_name == "edm" else VPDiscrete.from_name(frame_name[3:], 1000)
        params = dict(index=i, dim=dim, components=k, std_lo=lo, std_hi=hi, mean_scale=mean_scale, weight_spread=spread,
                      frame=frame_name, prediction=prediction, mixture_seed=mixture_seed)
        members.append(OracleModel(gm, frame, prediction, params))
    return members


def single_gaussian_ode(x_start: torch.Tensor, sigma_start: float, sigma_end: float, mu, s: float) -> torch.Tensor:
    """Exact probability-flow ODE solution for data N(mu, s^2 I) (Karras et al. 2022, eq. 4):
    x(sigma_end) = mu + (x(sigma_start) - mu) sqrt((s^2 + sigma_end^2) / (s^2 + sigma_start^2))."""
    mu = torch.as_tensor(mu, dtype=x_start.dtype, device=x_start.device)
    return mu + (x_start - mu) * math.sqrt((s**2 + sigma_end**2) / (s**2 + sigma_start**2))


def rmse_to_exact(x: torch.Tensor, x_exact: torch.Tensor) -> float:
    """Root-mean-square error per coordinate, sqrt(mean((x - x_exact)^2)) over every sample and
    coordinate, in float64: how far a sampler lands from the exact ODE solution of the same noise."""
    if x.shape != x_exact.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(x_exact.shape)}")
    return (x.to(torch.float64) - x_exact.to(torch.float64)).pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------------------------
# The exact classifier of the closed-form test bed


class MixtureClassifier(nn.Module):
    """The exact noise-aware classifier of a :class:`GaussianMixture`'s components:
    logits_k(x, sigma) = log w_k + log N(x; mu_k, Sigma_k + sigma^2 I), so softmax(logits) are the
    responsibilities p(k | x0 + sigma eps = x). With the mixture's exact denoiser,
    ``difflab.guidance.ClassifierGuidance(scale=1)`` gives E[x0 | x, k], the denoiser of
    component k alone (Dhariwal & Nichol 2021, eq. 14, exact)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        gm = self.mixture
        y = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        sigma = sigma.expand(y.shape[0]) if sigma.ndim == 0 else sigma
        rows = []
        for s in sigma.unique():  # one noisy mixture per distinct noise level
            noisy = gm.noisy(float(s))
            idx = (sigma == s).nonzero()[:, 0]
            log_n = torch.stack([GaussianMixture([1.0], noisy.means[k:k + 1], noisy.covs[k:k + 1]).log_prob(y[idx])
                                 for k in range(len(gm.weights))], dim=1)
            rows.append((idx, gm.weights.log() + log_n))
        order = torch.cat([idx for idx, _ in rows]).argsort()
        return torch.cat([logits for _, logits in rows])[order].to(x.dtype)
