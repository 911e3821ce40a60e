"""Memorization check: does a generator emit copies of its training examples?

Carlini et al. 2023 ("Extracting Training Data from Diffusion Models", Sec. 5.1, the
(l2, alpha, delta)-diffusion-extraction definition) call a generated x_hat a copy of its nearest
training example x when its distance to x is far smaller than its distances to the other training
examples near it:

    ratio(x_hat) = ||x_hat - x||_2 / (alpha * mean_{y in S(x_hat)} ||x_hat - y||_2)

with S(x_hat) the ``n`` training examples nearest x_hat after x (we leave x out of the mean, so a
copy's ratio is exactly 0). ``x_hat`` is flagged when ``ratio < delta``. A generated sample that
merely looks like the data lies about as far from its nearest training example as from the next
ones (ratio near 1 / alpha); a copy lies much closer to one of them.

Beside it, :func:`memorization` reports the issue's plainer figure: the fraction of generated
samples that lie closer to their nearest training example than the ``quantile`` (default 1%) of
the nearest-neighbour distances among the training examples themselves (each to its nearest other
training example): about ``quantile`` for samples drawn fresh from the data's distribution, near
1 for copies.

Distances are Euclidean in the space given (pixels by default; pass features for a feature space).
"""
from __future__ import annotations

import dataclasses

import torch

DEFAULT_ALPHA = 0.5
DEFAULT_NEIGHBOURS = 50
DEFAULT_DELTA = 1 / 3
DEFAULT_QUANTILE = 0.01


@dataclasses.dataclass
class Memorization:
    """The check's result. ``flagged``: indices of generated samples with ``ratio < delta``;
    ``rate``: their fraction; ``nearest``: index of each sample's nearest training example and
    ``distance`` its l2 distance; ``ratio``: Carlini et al.'s ratio; ``train_nn_quantile``: the
    ``quantile`` of the training examples' own nearest-neighbour distances and
    ``closer_than_train_rate`` the fraction of samples nearer than it."""
    flagged: torch.Tensor
    rate: float
    nearest: torch.Tensor
    distance: torch.Tensor
    ratio: torch.Tensor
    train_nn_quantile: float
    closer_than_train_rate: float
    alpha: float
    delta: float
    neighbours: int

    def summary(self) -> dict:
        """The scalar figures as a JSON-able dict."""
        return {"memorized_rate": self.rate, "memorized": len(self.flagged), "samples": len(self.ratio),
                "closer_than_train_rate": self.closer_than_train_rate, "train_nn_quantile": self.train_nn_quantile,
                "median_ratio": float(self.ratio.median()), "alpha": self.alpha, "delta": self.delta,
                "neighbours": self.neighbours}


def _flat(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (N, ...), got {type(x).__name__}")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    return x.detach().reshape(len(x), -1).double().cpu()


def _nearest(points: torch.Tensor, train: torch.Tensor, k: int, exclude_self: bool, rows: int = 512):
    """The ``k`` smallest l2 distances (sorted) from each point to ``train`` and their indices;
    ``exclude_self``: points is train and each point's own row is left out."""
    dists, index = [], []
    for i in range(0, len(points), rows):
        d = torch.cdist(points[i:i + rows], train)
        if exclude_self:
            d[torch.arange(len(d)), torch.arange(i, i + len(d))] = float("inf")
        v, j = d.topk(k, dim=1, largest=False)
        dists.append(v)
        index.append(j)
    return torch.cat(dists), torch.cat(index)


def memorization(generated, train, *, alpha: float = DEFAULT_ALPHA, delta: float = DEFAULT_DELTA,
                 neighbours: int = DEFAULT_NEIGHBOURS, quantile: float = DEFAULT_QUANTILE) -> Memorization:
    """Carlini et al. 2023's extraction test (Sec. 5.1, see the module doc) of ``generated`` (N, ...)
    against ``train`` (M, ...), same shape per example: the flagged indices and their rate, and the
    fraction of samples closer to the training set than its own ``quantile`` nearest-neighbour
    distance. ``neighbours`` (n, at most M - 1): the training examples after the nearest whose
    mean distance scales the nearest one."""
    gen, ref = _flat(generated, "generated"), _flat(train, "train")
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"generated examples have {gen.shape[1]} values each and training examples {ref.shape[1]}: "
                         f"shapes {tuple(generated.shape[1:])} vs {tuple(train.shape[1:])} must match")
    if len(ref) < 2:
        raise ValueError(f"train needs at least 2 examples, got {len(ref)}")
    if not (isinstance(neighbours, int) and 1 <= neighbours <= len(ref) - 1):
        raise ValueError(f"neighbours={neighbours!r} must be an int between 1 and len(train) - 1 = {len(ref) - 1}")
    if not alpha > 0 or not delta > 0:
        raise ValueError(f"alpha={alpha} and delta={delta} must both be positive")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile={quantile} must be strictly between 0 and 1")

    d, j = _nearest(gen, ref, neighbours + 1, exclude_self=False)
    ratio = d[:, 0] / (alpha * d[:, 1:].mean(1)).clamp_min(1e-12)
    flagged = (ratio < delta).nonzero().flatten()
    train_nn = _nearest(ref, ref, 1, exclude_self=True)[0][:, 0]
    q = float(torch.quantile(train_nn, quantile))
    return Memorization(flagged=flagged, rate=len(flagged) / len(gen), nearest=j[:, 0], distance=d[:, 0].float(),
                        ratio=ratio.float(), train_nn_quantile=q, closer_than_train_rate=float((d[:, 0] < q).double().mean()),
                        alpha=alpha, delta=delta, neighbours=neighbours)


__all__ = ["memorization", "Memorization", "DEFAULT_ALPHA", "DEFAULT_DELTA", "DEFAULT_NEIGHBOURS", "DEFAULT_QUANTILE"]
