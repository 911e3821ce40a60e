"""The Frechet distance and the digits judge."""
import numpy as np
import pytest
import torch

from difflab.data import load_digits
from difflab.eval import DigitsJudge, FitConfig, feature_stats, frechet_distance, judge_report

pytest.importorskip("sklearn")


def _random_cov(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 1e-3 * torch.eye(d, dtype=torch.float64)


# ---- Frechet distance -----------------------------------------------------------------------
def test_frechet_diagonal_closed_form():
    # diagonal Gaussians: d^2 = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2, s the standard deviations
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(5, generator=g), torch.randn(5, generator=g)
    s1, s2 = torch.rand(5, generator=g) + 0.1, torch.rand(5, generator=g) + 0.1
    want = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2)) == pytest.approx(want.item(), rel=1e-6)


def test_frechet_zero_and_symmetric():
    g = torch.Generator().manual_seed(1)
    mu, c1, c2 = torch.randn(16, generator=g), _random_cov(16, g), _random_cov(16, g)
    assert abs(frechet_distance(mu, c1, mu, c1)) < 1e-9
    d12 = frechet_distance(mu, c1, mu + 1, c2)
    assert d12 > 0 and d12 == pytest.approx(frechet_distance(mu + 1, c2, mu, c1), rel=1e-10)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(2)
    for d in (3, 32):
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        c1, c2 = _random_cov(d, g).numpy(), _random_cov(d, g).numpy()
        covmean = linalg.sqrtm(c1 @ c2).real
        want = ((mu1 - mu2) ** 2).sum().item() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-8)


def test_feature_stats_matches_numpy():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(3))
    mu, cov = feature_stats(f)
    assert mu.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-10)


# ---- the judge ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge(digits_judge_file):
    return DigitsJudge.load(digits_judge_file)  # DigitsJudge.fit(), trained once per run (conftest)


@pytest.fixture(scope="module")
def digits():
    return load_digits(split="train"), load_digits(split="test")


def test_judge_heldout_accuracy(judge, digits):
    _, (x, y) = digits
    assert judge.accuracy(x, y) >= 0.97
    assert judge.features(x).shape == (len(x), judge.config.feature_dim)
    # upsampled digits are area-averaged back to 8x8 and judged the same
    x32, _ = load_digits(32, split="test")
    assert torch.equal(judge.predict(x32), judge.predict(x))


def test_judge_penalises_noise(judge, digits):
    (xtr, ytr), (x, y) = digits
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2000, 1, 8, 8, generator=g) * 2 - 1
    chance_labels = torch.randint(0, 10, (2000,), generator=g)
    assert judge.accuracy(noise, chance_labels) < 0.2
    eps = torch.randn(xtr.shape, generator=g)
    accs = [judge.accuracy(xtr + s * eps, ytr) for s in (0.0, 0.5, 1.0, 2.0)]
    dists = [judge.frechet(xtr + s * eps, x) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert accs == sorted(accs, reverse=True) and accs[-1] < 0.3
    assert dists == sorted(dists) and dists[1] > 2 * dists[0]


def test_judge_report(judge, digits):
    (xtr, ytr), (x, y) = digits
    r = judge_report(judge, xtr[:500], ytr[:500], x, y, real_reference=xtr)
    assert r["class_accuracy"] >= 0.97 and r["real_accuracy"] >= 0.97
    assert r["n_generated"] == 500 and r["n_real"] == len(x)
    assert 0 < r["frechet"] < r["frechet_real_halves"]            # halves are smaller sets: a higher floor
    assert 0 < r["frechet_real_reference"] < 10
    wrong = judge_report(judge, xtr[:500], (ytr[:500] + 1) % 10, x, y)
    assert wrong["class_accuracy"] < 0.05


def test_judge_save_load_round_trip(judge, digits, tmp_path):
    _, (x, _) = digits
    path = tmp_path / "judge.safetensors"
    judge.save(path)
    loaded = DigitsJudge.load(path)
    assert loaded.config == judge.config and loaded.fit_config == judge.fit_config
    assert torch.equal(loaded.logits(x), judge.logits(x))
    assert torch.equal(loaded.predict(x), judge.predict(x))
    # load_or_train finds the cached file in a folder, and retrains when the settings differ
    judge.save(tmp_path / "cache" / "digits_judge.safetensors")
    cached = DigitsJudge.load_or_train(tmp_path / "cache")
    assert torch.equal(cached.logits(x), judge.logits(x))


def test_judge_training_is_deterministic_and_leaves_global_rng(digits):
    (xtr, ytr), _ = digits
    state = torch.random.get_rng_state()
    fit = FitConfig(epochs=1, seed=5)
    a = DigitsJudge.fit(xtr[:256], ytr[:256], fit_config=fit)
    b = DigitsJudge.fit(xtr[:256], ytr[:256], fit_config=fit)
    c = DigitsJudge.fit(xtr[:256], ytr[:256], fit_config=FitConfig(epochs=1, seed=6))
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_judge_rejects_bad_shapes(judge):
    with pytest.raises(ValueError, match="N, 1, H, W"):
        judge.predict(torch.zeros(2, 3, 8, 8))
