"""Metrics on feature sets: FID, KID, IS, precision/recall and CLIP score -- closed forms,
unbiasedness, edge cases, and parity with torchmetrics (FID, KID, IS) and prdc (precision/recall)
on the very same features."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from difflab.eval.frechet import feature_stats
from difflab.eval.metrics import (clip_fid, clip_score, fid, inception_score, kid, knn_radii, mmd2_unbiased,
                                  polynomial_kernel, precision_recall)


def gauss(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


# ---- FID ------------------------------------------------------------------------------------
def test_fid_of_a_set_against_itself_is_zero():
    f = gauss(400, 16, 0)
    assert abs(fid(f, f)) < 1e-9
    assert fid(f, gauss(400, 16, 1)) > 0.1   # two samples of one Gaussian: small but positive bias


def test_fid_of_a_translated_set_is_the_squared_shift():
    # same covariance, means differing by v: d^2 = |v|^2 exactly
    f = gauss(300, 8, 2)
    v = torch.linspace(-1, 1, 8, dtype=torch.float64)
    assert fid(f, f + v) == pytest.approx((v @ v).item(), rel=1e-9)


def test_fid_takes_features_pairs_or_stats_alike():
    a, b = gauss(200, 6, 3), gauss(150, 6, 4, shift=0.3)
    mu, sigma = feature_stats(b)

    class Stats:  # anything with .mu and .sigma
        pass

    s = Stats()
    s.mu, s.sigma = mu, sigma
    want = fid(a, b)
    assert fid(a, (mu, sigma)) == want and fid(a, s) == want and fid(a.numpy(), b.numpy()) == want
    assert clip_fid(a, b) == want


# ---- KID ------------------------------------------------------------------------------------
def test_mmd2_unbiased_is_the_u_statistic_double_sum():
    x, y = gauss(5, 3, 5), gauss(7, 3, 6, shift=0.5)

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m, n = len(x), len(y)
    want = (sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
            + sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n))
    assert mmd2_unbiased(x, y) == pytest.approx(want.item(), rel=1e-12)
    assert polynomial_kernel(x, y).shape == (5, 7)


def test_kid_estimator_is_unbiased_and_the_biased_one_is_not():
    # 300 independent pairs of small samples of one distribution: the U-statistic averages to
    # 0 within its standard error; the V-statistic (diagonal kept) is biased upward.
    unbiased, biased = [], []
    for t in range(300):
        x, y = gauss(16, 8, 1000 + 2 * t), gauss(16, 8, 1001 + 2 * t)
        unbiased.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        biased.append((kxx.mean() + kyy.mean() - 2 * kxy.mean()).item())
    u, b = np.array(unbiased), np.array(biased)
    sem = u.std() / math.sqrt(len(u))
    assert abs(u.mean()) < 3 * sem
    assert b.mean() > 10 * sem


def test_kid_over_subsets_same_vs_different_distributions():
    a, b = gauss(1000, 16, 7), gauss(1000, 16, 8)
    mean, std = kid(a, b, subsets=50, subset_size=200)
    assert std > 0 and abs(mean) < 3 * std
    mean_d, std_d = kid(a, gauss(1000, 16, 9, shift=0.5), subsets=50, subset_size=200)
    assert mean_d > 5 * std_d and mean_d > 20 * abs(mean)


def test_kid_is_seeded_and_caps_the_subset_size():
    a, b = gauss(60, 4, 10), gauss(40, 4, 11, shift=0.2)
    assert kid(a, b, subsets=5, seed=3) == kid(a, b, subsets=5, seed=3)
    assert kid(a, b, subsets=5, seed=3) != kid(a, b, subsets=5, seed=4)
    # subsets of size min(1000, 60, 40) = 40: every subset of b is all of b
    mean, _ = kid(a[:40], b, subsets=3)
    assert mean == pytest.approx(mmd2_unbiased(a[:40], b), rel=1e-12)


# ---- Inception Score ------------------------------------------------------------------------
def test_is_of_uniform_or_identical_predictions_is_one():
    assert inception_score(probs=torch.full((100, 10), 0.1)) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert inception_score(torch.zeros(100, 10), splits=1)[0] == pytest.approx(1.0, abs=1e-12)
    same = torch.zeros(100, 10)
    same[:, 3] = 30.0   # confident but always the same class: p(y) = p(y|x), KL = 0
    assert inception_score(same, splits=4)[0] == pytest.approx(1.0, abs=1e-9)


def test_is_of_confident_balanced_predictions_is_the_number_of_classes():
    K, n = 10, 500
    probs = torch.nn.functional.one_hot(torch.arange(n) % K, K).double()
    assert inception_score(probs=probs, splits=1)[0] == pytest.approx(K, rel=1e-12)
    # in order, parts of 50 interleaved labels are balanced too: IS = K in each, std 0
    assert inception_score(probs=probs, splits=10, seed=None) == pytest.approx((K, 0.0), abs=1e-9)
    assert inception_score(50.0 * probs, splits=1)[0] == pytest.approx(K, rel=1e-12)   # logits
    # class-sorted samples split in order would be single-class parts (IS 1): the seeded shuffle mixes them
    sorted_probs = torch.nn.functional.one_hot(torch.arange(n) // (n // K), K).double()
    assert inception_score(probs=sorted_probs, splits=10, seed=None)[0] == pytest.approx(1.0)
    assert inception_score(probs=sorted_probs, splits=10)[0] > 0.8 * K


def test_is_splits_average_the_parts():
    logits = gauss(120, 5, 12, scale=3.0)
    parts = [inception_score(logits[i * 30:(i + 1) * 30], splits=1)[0] for i in range(4)]
    mean, std = inception_score(logits, splits=4, seed=None)
    assert mean == pytest.approx(np.mean(parts), rel=1e-12) and std == pytest.approx(np.std(parts), rel=1e-9)
    with pytest.raises(ValueError, match="exactly one"):
        inception_score(logits, probs=logits.softmax(1))


# ---- precision and recall -------------------------------------------------------------------
def test_precision_recall_of_identical_sets_is_one():
    f = gauss(200, 10, 13)
    assert precision_recall(f, f.clone()) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    assert precision_recall(gauss(100, 10, 14), gauss(100, 10, 15, shift=100.0)) == (0.0, 0.0)


def test_a_subset_is_precise_but_misses_recall():
    # real: two far-apart clusters; generated: only one of them
    real = torch.cat([gauss(150, 6, 16), gauss(150, 6, 17, shift=50.0)])
    fake = gauss(150, 6, 18)
    precision, recall = precision_recall(real, fake)
    assert precision > 0.8 and recall < 0.55   # cluster 2 (half of the real points) is missed
    # a strict subset of the real points: every one inside the real manifold, recall below 1
    precision, recall = precision_recall(real, real[:150])
    assert precision == 1.0 and recall < 0.55


def test_knn_radii_are_the_k_th_neighbour_and_blocks_change_nothing():
    f = gauss(57, 4, 19)
    d2 = torch.cdist(f, f) ** 2
    want = d2.sort(dim=1).values[:, 3]   # column 0 is the point itself
    torch.testing.assert_close(knn_radii(f, k=3), want, rtol=1e-9, atol=1e-12)
    real, fake = f, gauss(41, 4, 20, shift=0.3)
    results = {precision_recall(real, fake, batch_size=b) for b in (1, 7, None)}
    assert len(results) == 1


# ---- CLIP score -----------------------------------------------------------------------------
def test_clip_score_is_100_times_the_clamped_cosine():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    txt = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, math.sqrt(3.0)]], dtype=torch.float64)
    # per pair: cos 1 -> 100, 0 -> 0, -1 -> clamped to 0, 0.5 -> 50
    assert clip_score(img, txt) == pytest.approx((100 + 0 + 0 + 50) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="both be"):
        clip_score(img, txt[:3])


# ---- parity with torchmetrics and prdc ------------------------------------------------------
class LinearFeatures(nn.Module):
    """A fixed linear map of flattened images, as torchmetrics' custom `feature` network."""

    def __init__(self, in_dim, out_dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(in_dim, out_dim, generator=g, dtype=torch.float64) / math.sqrt(in_dim))
        self.num_features = out_dim

    def forward(self, imgs):
        return imgs.flatten(1).double() @ self.w


@pytest.fixture
def torchmetrics_image(monkeypatch):
    """``torchmetrics.image`` (skip if absent). torchmetrics imports torch-fidelity whenever that
    is installed, and torch-fidelity imports torchvision, which does not import here; our tests
    give torchmetrics a custom feature network, which needs neither, so torchmetrics is told
    torch-fidelity is absent (its availability flag is computed on first use)."""
    imports = pytest.importorskip("lightning_utilities.core.imports")
    check = imports.RequirementCache._check_requirement

    def without_torch_fidelity(self):
        check(self)
        if self.requirement in ("torch_fidelity", "torch-fidelity"):
            self.available = False

    monkeypatch.setattr(imports.RequirementCache, "_check_requirement", without_torch_fidelity)
    pytest.importorskip("torchmetrics.image")
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    return FrechetInceptionDistance, KernelInceptionDistance, InceptionScore


def _images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1 + shift


def test_fid_matches_torchmetrics(torchmetrics_image):
    FrechetInceptionDistance = torchmetrics_image[0]
    net = LinearFeatures(48, 12)
    real, fake = _images(300, 21), _images(250, 22, shift=0.2)
    metric = FrechetInceptionDistance(feature=net)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = metric.compute().item()
    assert fid(net(fake), net(real)) == pytest.approx(theirs, rel=1e-9)


def test_kid_matches_torchmetrics(torchmetrics_image):
    from torchmetrics.image.kid import poly_mmd

    KernelInceptionDistance = torchmetrics_image[1]
    net = LinearFeatures(48, 12, seed=1)
    real, fake = _images(120, 23), _images(120, 24, shift=0.1)
    # one subset of all samples: their random permutation cannot change the MMD
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=net, subsets=1, subset_size=120)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = metric.compute()[0].item()
    assert kid(net(real), net(fake), subsets=1, subset_size=120)[0] == pytest.approx(theirs, rel=1e-10)
    # and subset by subset: their kernel and estimator on our subsets
    fr, ff = net(real), net(fake)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ir, i_f = torch.randperm(120, generator=g)[:50], torch.randperm(120, generator=g)[:50]
        assert mmd2_unbiased(fr[ir], ff[i_f]) == pytest.approx(poly_mmd(fr[ir], ff[i_f]).item(), rel=1e-10)


def test_inception_score_matches_torchmetrics(torchmetrics_image):
    InceptionScore = torchmetrics_image[2]
    net = LinearFeatures(48, 10, seed=2)
    imgs = _images(200, 25) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "will save all extracted features in buffer"
        metric = InceptionScore(feature=net, splits=1)   # one split: their shuffle changes nothing
    metric.update(imgs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # their std of one split
        theirs = metric.compute()[0].item()
    assert inception_score(net(imgs), splits=1)[0] == pytest.approx(theirs, rel=1e-10)


def test_precision_recall_match_prdc():
    prdc = pytest.importorskip("prdc")
    pytest.importorskip("sklearn")
    real, fake = gauss(300, 16, 26).numpy(), gauss(250, 16, 27, shift=0.3, scale=1.2).numpy()
    theirs = prdc.compute_prdc(real, fake, nearest_k=3)
    precision, recall = precision_recall(real, fake, k=3)
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95   # a case that tells them apart
    assert precision == pytest.approx(theirs["precision"], abs=1e-12)
    assert recall == pytest.approx(theirs["recall"], abs=1e-12)
