"""Distances between point clouds and the standard metrics of generated shape sets.

Distances (Fan et al. 2017; as PointFlow, Yang et al. 2019, and Luo & Hu 2021 compute them):

- :func:`chamfer`: Chamfer distance, the mean squared distance from each point of one cloud to
  its nearest point of the other, summed over both directions (0 for identical clouds);
- :func:`emd`: Earth Mover's distance of two clouds of equal size, the mean Euclidean distance
  under the optimal one-to-one matching. Exact by the Hungarian method
  (``scipy.optimize.linear_sum_assignment``, the ``test``/``points`` extra) when scipy is
  installed; otherwise approximated by entropic optimal transport (Sinkhorn iterations, Cuturi
  2013, with a small epsilon and a fixed number of iterations): an approximation, within about
  10% of the exact value on the shapes here (its plan's marginals are not exact, so it is no bound).

Set metrics (Yang et al. 2019, Section 5.1; Achlioptas et al. 2018), from a distance matrix
``D[g, r]`` between a generated set S_g and a reference set S_r:

- :func:`mmd`, minimum matching distance: the mean over references of the distance to the
  closest generated shape (fidelity; lower is better);
- :func:`coverage`: the fraction of references that are the nearest reference of some generated
  shape (diversity; higher is better);
- :func:`one_nna`, 1-nearest-neighbour accuracy: the leave-one-out accuracy of a 1-NN classifier
  telling S_g from S_r in their union (50% when the two are indistinguishable; 100% when every
  sample's nearest neighbour is of its own set; below 50% when samples sit on copies of the
  other set's: a set against an exact copy of itself gives 0%). A tie between the nearest of each
  set counts as half right.
"""
from __future__ import annotations

import torch

SET_DISTANCES = ("chamfer", "emd")


def check_clouds(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 3 or x.shape[-1] != 3 or x.shape[1] < 1:
        raise ValueError(f"{name} must be point clouds (B, N, 3), got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    return x.float()


def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chamfer distance of clouds ``a`` (..., N, 3) and ``b`` (..., M, 3): mean_i min_j |a_i - b_j|^2
    + mean_j min_i |a_i - b_j|^2, shaped like the leading dimensions."""
    d = torch.cdist(a.float(), b.float(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    return d.min(-1).values.mean(-1) + d.min(-2).values.mean(-1)


def pairwise_chamfer(x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The (len(x), len(y)) matrix of Chamfer distances between every cloud of ``x`` and of ``y``."""
    x, y = check_clouds(x, "x"), check_clouds(y, "y")
    out = torch.empty(len(x), len(y))
    for i in range(len(x)):
        for j in range(0, len(y), batch):
            yy = y[j:j + batch]
            out[i, j:j + len(yy)] = chamfer(x[i].expand(len(yy), -1, -1), yy)
    return out


def has_scipy() -> bool:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


def sinkhorn_emd(a: torch.Tensor, b: torch.Tensor, eps: float = 0.002, iters: int = 300) -> float:
    """Entropic approximation of :func:`emd` (Cuturi 2013): log-domain Sinkhorn on the Euclidean
    costs with uniform weights: the mean cost under the (normalized) plan it finds."""
    cost = torch.cdist(a.double(), b.double())
    n, m = cost.shape
    log_mu, log_nu = torch.full((n,), -torch.log(torch.tensor(float(n)))), torch.full((m,), -torch.log(torch.tensor(float(m))))
    f, g = torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    for _ in range(iters):
        f = eps * (log_mu - torch.logsumexp((g[None] - cost) / eps, dim=1))
        g = eps * (log_nu - torch.logsumexp((f[:, None] - cost) / eps, dim=0))
    plan = torch.exp((f[:, None] + g[None] - cost) / eps)
    return float((plan * cost).sum() / plan.sum())


def emd(a: torch.Tensor, b: torch.Tensor, exact: bool | None = None) -> float:
    """Earth Mover's distance of two clouds of the same size (N, 3): the mean distance |a_i - b_pi(i)|
    under the best one-to-one matching pi. ``exact``: the Hungarian method (needs scipy); False:
    :func:`sinkhorn_emd`; None: exact when scipy is installed."""
    if a.ndim != 2 or a.shape != b.shape or a.shape[-1] != 3:
        raise ValueError(f"emd takes two clouds of the same size (N, 3), got {tuple(a.shape)} and {tuple(b.shape)}")
    exact = has_scipy() if exact is None else exact
    if not exact:
        return sinkhorn_emd(a, b)
    from scipy.optimize import linear_sum_assignment
    cost = torch.cdist(a.double(), b.double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def pairwise_emd(x: torch.Tensor, y: torch.Tensor, num_points: int | None = None, exact: bool | None = None) -> torch.Tensor:
    """The (len(x), len(y)) matrix of :func:`emd` between clouds, each first cut to its first
    ``num_points`` points (None: all; clouds are uniform samples, so the first k are a uniform
    subsample) to keep the O(N^3) matching cheap."""
    x, y = check_clouds(x, "x"), check_clouds(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"EMD needs clouds of one size, got {x.shape[1]} and {y.shape[1]} points")
    if num_points is not None:
        x, y = x[:, :num_points], y[:, :num_points]
    return torch.tensor([[emd(a, b, exact) for b in y] for a in x])


def pairwise(x: torch.Tensor, y: torch.Tensor, distance: str = "chamfer", emd_points: int | None = 128) -> torch.Tensor:
    """The distance matrix of ``distance`` (:data:`SET_DISTANCES`)."""
    if distance == "chamfer":
        return pairwise_chamfer(x, y)
    if distance == "emd":
        return pairwise_emd(x, y, emd_points)
    raise ValueError(f"distance={distance!r} must be one of {', '.join(SET_DISTANCES)}")


def mmd(d_gr: torch.Tensor) -> float:
    """Minimum matching distance from ``D[g, r]``: mean over r of min over g."""
    return float(d_gr.min(0).values.mean())


def coverage(d_gr: torch.Tensor) -> float:
    """Coverage from ``D[g, r]``: the fraction of r that are argmin_r D[g, r] for some g."""
    return len(torch.unique(d_gr.argmin(1))) / d_gr.shape[1]


def one_nna(d_gg: torch.Tensor, d_gr: torch.Tensor, d_rr: torch.Tensor) -> float:
    """1-NN accuracy over S_g and S_r from the three distance matrices (leave-one-out: a sample's
    distance to itself is excluded); a tie between the nearest of each set counts as half."""
    inf = torch.tensor(float("inf"))
    own_g = torch.where(torch.eye(len(d_gg), dtype=torch.bool), inf, d_gg).min(1).values
    own_r = torch.where(torch.eye(len(d_rr), dtype=torch.bool), inf, d_rr).min(1).values
    other_g, other_r = d_gr.min(1).values, d_gr.min(0).values
    right = torch.cat([(own_g < other_g).float() + 0.5 * (own_g == other_g).float(),
                       (own_r < other_r).float() + 0.5 * (own_r == other_r).float()])
    return float(right.mean())


def shape_set_metrics(gen: torch.Tensor, ref: torch.Tensor, distance: str = "chamfer", emd_points: int | None = 128) -> dict:
    """MMD, COV and 1-NNA of generated clouds ``gen`` against reference clouds ``ref`` under ``distance``."""
    gen, ref = check_clouds(gen, "gen"), check_clouds(ref, "ref")
    if len(gen) < 2 or len(ref) < 2:
        raise ValueError(f"set metrics need at least 2 clouds a set, got {len(gen)} generated and {len(ref)} reference")
    d_gr = pairwise(gen, ref, distance, emd_points)
    d_gg, d_rr = pairwise(gen, gen, distance, emd_points), pairwise(ref, ref, distance, emd_points)
    return {"mmd": mmd(d_gr), "cov": coverage(d_gr), "1nna": one_nna(d_gg, d_gr, d_rr)}


__all__ = ["chamfer", "pairwise_chamfer", "emd", "sinkhorn_emd", "pairwise_emd", "pairwise", "mmd", "coverage", "one_nna",
           "shape_set_metrics", "has_scipy", "SET_DISTANCES"]
