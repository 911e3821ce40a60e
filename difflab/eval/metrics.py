"""Sample-quality metrics on feature sets, in float64.

Every function takes features already extracted (N, D) (numpy or torch); which network made them
decides what the number is called: FID with Inception-v3 features, CLIP-FID with CLIP image
features, FD-DINOv2 with DINOv2 features, "judge FID" with the digits judge.

- :func:`fid` -- Frechet distance of Gaussian fits (Heusel et al. 2017), via :mod:`.frechet`;
- :func:`kid` -- unbiased MMD^2 with the cubic polynomial kernel over subsets (Binkowski et al. 2018);
- :func:`inception_score` -- exp E KL(p(y|x) || p(y)) over splits (Salimans et al. 2016);
- :func:`precision_recall` -- k-NN manifolds (Kynkaanniemi et al. 2019);
- :func:`clip_score` -- 100 max(cos(image, text), 0) (Hessel et al. 2021);
- :func:`clip_fid` -- :func:`fid` on CLIP image features (Kynkaanniemi et al. 2023).
"""
from __future__ import annotations

import torch

from .frechet import _float64, feature_stats, frechet_distance


# ----------------------------------------------------------------------------------------------
# FID


def _gaussian(x) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, Sigma) of features (N, D), of an object with ``.mu`` and ``.sigma``, or of a pair."""
    if hasattr(x, "mu") and hasattr(x, "sigma"):
        return _float64(x.mu), _float64(x.sigma)
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return _float64(x[0]), _float64(x[1])
    return feature_stats(x)


def fid(a, b) -> float:
    """Heusel et al. 2017: d^2 = |mu_a - mu_b|^2 + tr(Sigma_a + Sigma_b - 2 (Sigma_a Sigma_b)^(1/2)).

    ``a``, ``b``: features (N, D), ``(mu, Sigma)`` pairs, or statistics with ``.mu``/``.sigma``
    (:class:`~difflab.eval.stats.FeatureStats`). Sigma is the unbiased covariance (N - 1)."""
    return frechet_distance(*_gaussian(a), *_gaussian(b))


def clip_fid(a, b) -> float:
    """Kynkaanniemi et al. 2023 (sec. 5): the Frechet distance in CLIP image-feature space, i.e.
    :func:`fid` on features of a CLIP extractor; less sensitive to ImageNet class content."""
    return fid(a, b)


# ----------------------------------------------------------------------------------------------
# KID


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """Binkowski et al. 2018 (sec. 4): k(x, y) = (x.y / d + coef)^degree, d the feature dimension."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def mmd2_unbiased(x, y, degree: int = 3, coef: float = 1.0) -> float:
    """Binkowski et al. 2018, eq. 3: the unbiased estimator of MMD^2 between samples x (m, D), y (n, D):

        1/(m(m-1)) sum_{i != i'} k(x_i, x_i') + 1/(n(n-1)) sum_{j != j'} k(y_j, y_j') - 2/(mn) sum_{i,j} k(x_i, y_j)
    """
    x, y = _float64(x), _float64(y)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD^2 needs at least 2 samples per set, got {m} and {n}")
    k_xx, k_yy, k_xy = (polynomial_kernel(a, b, degree, coef) for a, b in ((x, x), (y, y), (x, y)))
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return (within_x + within_y - 2 * k_xy.mean()).item()


def kid(a, b, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0, degree: int = 3,
        coef: float = 1.0) -> tuple[float, float]:
    """Binkowski et al. 2018 (sec. 4): Kernel Inception Distance, the unbiased MMD^2
    (:func:`mmd2_unbiased`) with the cubic polynomial kernel, averaged over ``subsets`` pairs of
    random subsets of ``min(subset_size, len(a), len(b))`` features each (drawn without
    replacement from a local generator seeded by ``seed``). Returns (mean, std); std is the
    population standard deviation over subsets, as the authors' code, torchmetrics and clean-fid."""
    a, b = _float64(a), _float64(b)
    size = min(subset_size, len(a), len(b))
    if subsets < 1:
        raise ValueError(f"subsets={subsets} must be positive")
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([
        mmd2_unbiased(a[torch.randperm(len(a), generator=g)[:size]], b[torch.randperm(len(b), generator=g)[:size]],
                      degree, coef)
        for _ in range(subsets)
    ], dtype=torch.float64)
    return values.mean().item(), values.std(correction=0).item()


# ----------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits=None, *, probs=None, splits: int = 10, seed: int | None = 0) -> tuple[float, float]:
    """Salimans et al. 2016 (sec. 4): IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x)
    over the split, computed on each of ``splits`` equal parts (as the authors' code) and
    returned as (mean, population std) over the parts.

    Give ``logits`` (N, K) or probabilities ``probs`` (N, K). The rows are first shuffled with a
    generator seeded by ``seed`` (so that parts of class-sorted samples are not single-class);
    ``seed=None`` keeps their order. Ranges from 1 (uniform or identical predictions) to K."""
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits= or probs=")
    if logits is not None:
        log_p = torch.log_softmax(_float64(logits), dim=1)
    else:
        p = _float64(probs)
        if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-6):
            raise ValueError("probs must be non-negative rows summing to 1")
        log_p = p.clamp_min(1e-300).log()
    n = len(log_p)
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be between 1 and the number of samples ({n})")
    if seed is not None:
        log_p = log_p[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        p_yx = part.exp()
        log_p_y = p_yx.mean(0).clamp_min(1e-300).log()
        kl = (p_yx * (part - log_p_y)).sum(1)   # KL(p(y|x) || p(y)) per x; 0 log 0 = 0 as p_yx = 0
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(correction=0).item()


# ----------------------------------------------------------------------------------------------
# Precision and recall


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 (rows of a, b) in float64, clamped at 0."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min(0)


def _rows(n_cols: int, batch_size: int | None) -> int:
    """Rows per block of a distance matrix: about 2^24 float64 entries (128 MB) by default."""
    return batch_size or max(1, 2**24 // max(1, n_cols))


def knn_radii(x, k: int = 3, batch_size: int | None = None) -> torch.Tensor:
    """Kynkaanniemi et al. 2019 (eq. 1): squared distance of each x_i to its k-th nearest
    neighbour in x, itself excluded (the (k+1)-th smallest distance, itself included)."""
    x = _float64(x)
    if not 1 <= k < len(x):
        raise ValueError(f"k={k} must be between 1 and the number of samples - 1 ({len(x) - 1})")
    rows = _rows(len(x), batch_size)
    return torch.cat([_squared_distances(x[i:i + rows], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), rows)])


def _in_manifold(points: torch.Tensor, manifold: torch.Tensor, radii2: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """Kynkaanniemi et al. 2019, eq. 1: f(phi, Phi) = 1 if |phi - phi'| <= |phi' - NN_k(phi')| for some phi' in Phi."""
    rows = _rows(len(manifold), batch_size)
    return torch.cat([(_squared_distances(points[i:i + rows], manifold) <= radii2[None, :]).any(1)
                      for i in range(0, len(points), rows)])


def precision_recall(real, fake, *, k: int = 3, batch_size: int | None = None) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, eq. 2: precision = mean over fake phi_g of f(phi_g, Phi_r),
    recall = mean over real phi_r of f(phi_r, Phi_g), each manifold the union of balls reaching
    every sample's k-th nearest neighbour (k = 3 in the paper). Distances are computed in blocks
    of ``batch_size`` rows (default: ~128 MB per block), which changes no result."""
    real, fake = _float64(real), _float64(fake)
    precision = _in_manifold(fake, real, knn_radii(real, k, batch_size), batch_size).double().mean().item()
    recall = _in_manifold(real, fake, knn_radii(fake, k, batch_size), batch_size).double().mean().item()
    return precision, recall


# ----------------------------------------------------------------------------------------------
# CLIP score


def clip_score(image_embeddings, text_embeddings, *, w: float = 100.0) -> float:
    """Hessel et al. 2021, eq. 1: CLIP-S = w max(cos(E_I, E_C), 0), averaged over the N pairs
    (image i, caption i). ``w = 100`` as torchmetrics and text-to-image papers (the paper: 2.5)."""
    img, txt = _float64(image_embeddings), _float64(text_embeddings)
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"image and text embeddings must both be (N, D), got {tuple(img.shape)} and {tuple(txt.shape)}")
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=1)
    return (w * cos.clamp_min(0)).mean().item()

