"""The evaluation harness: batch-size invariance, FID sanity on digits, the demo's judge report
through the harness, reference statistics (.npz round trip, cache reuse, extractor mismatch)
and image folders."""
import numpy as np
import pytest
import torch

from difflab.data import load_digits
from difflab.eval import (DigitsJudge, FeatureStats, FitConfig, JudgeFeatures, compute_stats, evaluate, extract,
                          extractor_identity, judge_report, load_extractor)

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge.fit(fit_config=FitConfig(epochs=8))   # ~97% held-out accuracy, a few seconds


@pytest.fixture(scope="module")
def extractor(judge):
    return JudgeFeatures(judge)


@pytest.fixture(scope="module")
def digits():
    return load_digits(split="train")[0], load_digits(split="test")[0]


def quiet(*args, **kwargs):
    return evaluate(*args, progress=False, **kwargs)


# ---- batch size -----------------------------------------------------------------------------
def test_no_metric_depends_on_the_batch_size(extractor, digits):
    train, test = digits
    runs = [quiet(train[:300], test, extractor, batch_size=b, kid_subsets=20) for b in (1, 7, 64)]
    for r in runs[1:]:
        assert abs(r["fid"] - runs[0]["fid"]) < 1e-6
        assert r == runs[0]   # in fact bit for bit, every metric
    assert runs[0]["fid"] > 0.1


def test_judge_features_are_the_judges_features(judge, extractor, digits):
    f, logits = extract(extractor, digits[1], batch_size=50, logits=True, progress=False)
    assert f.dtype == torch.float64 and f.shape == (len(digits[1]), judge.config.feature_dim)
    torch.testing.assert_close(f, judge.features(digits[1]).double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(1), judge.predict(digits[1]))


# ---- FID sanity -----------------------------------------------------------------------------
def test_fid_of_digits_against_themselves_is_zero(extractor, digits):
    # ~0 up to the eigen-decompositions' rounding: the judge's ReLU features have a singular
    # covariance, and sqrt(eigenvalue ~1e-12 of rounding) ~1e-6
    same = quiet(digits[1], digits[1], extractor, metrics=["fid"])["fid"]
    other = quiet(digits[0], digits[1], extractor, metrics=["fid"])["fid"]
    assert abs(same) < 1e-4 and other > 1e4 * abs(same)


def test_fid_grows_with_noise(extractor, digits):
    train, test = digits
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(train.shape, generator=g)
    fids = [quiet((train + s * eps).clamp(-1, 1), test, extractor, metrics="fid")["fid"] for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert all(b > a for a, b in zip(fids, fids[1:])), fids
    assert fids[-1] > 10 * fids[0]


def test_harness_fid_equals_the_judges_frechet_and_the_demo_report(judge, extractor, digits):
    train, test = digits
    gen = train[:250]
    ours = quiet(gen, test, extractor, metrics=["fid"])["fid"]
    # DigitsJudge.frechet: float32 features, batched; ours: float64, image by image
    assert ours == pytest.approx(judge.frechet(gen, test), rel=1e-5)
    labels = load_digits(split="train")[1][:250]
    report = judge_report(judge, gen, labels, test, load_digits(split="test")[1], real_reference=train)
    assert report["frechet"] == ours
    assert report["class_accuracy"] > 0.9 and report["frechet_real_reference"] > 0


# ---- reference statistics -------------------------------------------------------------------
def test_stats_npz_round_trip_and_reuse(judge, extractor, digits, tmp_path):
    path = tmp_path / "ref.npz"
    stats = compute_stats("digits", extractor, logits=True, cache=path, progress=False)
    assert path.is_file() and stats.n == len(digits[1]) and stats.source == "digits:test:size=8"
    back = FeatureStats.load(path)
    for name in ("mu", "sigma", "features", "logits"):
        assert torch.equal(getattr(back, name), getattr(stats, name)), name
    assert back.extractor == extractor_identity(extractor) and back.n == stats.n
    assert np.load(path)["mu"].dtype == np.float64   # plain numpy can read it

    class Counting(JudgeFeatures):
        calls = 0

        def forward(self, images):
            Counting.calls += 1
            return super().forward(images)

    counting = Counting(judge)
    assert extractor_identity(counting)["fingerprint"] == extractor_identity(extractor)["fingerprint"]
    again = compute_stats("digits", counting, cache=path, progress=False)
    assert Counting.calls == 0 and torch.equal(again.mu, stats.mu)
    # a reference given as the .npz scores exactly as the images themselves
    gen = digits[0][:200]
    assert quiet(gen, path, extractor) == quiet(gen, "digits", extractor)
    with pytest.raises(ValueError, match="not of"):   # the cache holds another source
        compute_stats("digits", extractor, size=16, cache=path, progress=False)


def test_stats_from_another_extractor_are_refused(extractor, digits, tmp_path):
    path = compute_stats(digits[1], extractor, progress=False).save(tmp_path / "judge.npz")
    other = JudgeFeatures(DigitsJudge())   # untrained: other weights, same name
    with pytest.raises(ValueError, match="another feature extractor.*fingerprint"):
        quiet(digits[0][:100], path, other, metrics=["fid"])
    with pytest.raises(ValueError, match="another feature extractor"):
        compute_stats(digits[1], other, cache=path, progress=False)
    mu_only = compute_stats(digits[1], extractor, keep_features=False, progress=False).save(tmp_path / "mu.npz")
    assert quiet(digits[0][:100], mu_only, extractor, metrics=["fid"])["fid"] > 0
    with pytest.raises(ValueError, match="need the features"):
        quiet(digits[0][:100], mu_only, extractor, metrics=["kid"])
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a statistics"):
        FeatureStats.load(tmp_path / "x.npz")


# ---- sources and errors ---------------------------------------------------------------------
def test_a_folder_of_pngs_scores_as_its_tensor(extractor, digits, tmp_path):
    from difflab.io.images import to_uint8
    from PIL import Image

    images = digits[0][:60]
    for i, a in enumerate(to_uint8(images)):
        Image.fromarray(a[..., 0]).save(tmp_path / f"{i:03d}.png")
    quantized = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    from_folder = quiet(tmp_path, "digits", extractor, metrics=["fid", "is"])
    assert from_folder == quiet(quantized, "digits", extractor, metrics=["fid", "is"])
    assert quiet(tmp_path, "digits", extractor, metrics=["fid"], num=20)["n_generated"] == 20


def test_harness_errors_are_clear(extractor, digits, tmp_path):
    gen = digits[0][:50]
    with pytest.raises(ValueError, match="unknown metric.*fid, kid"):
        quiet(gen, "digits", extractor, metrics="fid,bogus")
    with pytest.raises(ValueError, match="need.*a reference"):
        quiet(gen, None, extractor, metrics=["fid"])
    assert quiet(gen, None, extractor, metrics=["is"])["is"] > 1   # IS needs no reference
    with pytest.raises(ValueError, match="clip_score needs an extractor with encode_text"):
        quiet(gen, None, extractor, metrics=["clip_score"], prompts=["a digit"] * 50)
    with pytest.raises(FileNotFoundError, match="neither 'digits' nor"):
        quiet(gen, tmp_path / "missing", extractor, metrics=["fid"])
    with pytest.raises(ValueError, match="extractor 'nope' is unknown; choose one of.*judge"):
        load_extractor("nope")
    with pytest.raises(FileNotFoundError, match="no digits judge at"):
        load_extractor("judge", tmp_path / "missing.safetensors")


def test_a_callable_side_is_sampled_after_the_checks_and_a_checkpoint_path_is_refused(extractor, digits, tmp_path):
    calls = []

    def sample(num):
        calls.append(num)
        return digits[0][:num]

    with pytest.raises(ValueError, match="need.*a reference"):
        quiet(sample, None, extractor, metrics=["fid"])
    assert calls == []   # the inputs are checked before anything is sampled
    assert quiet(sample, digits[1], extractor, metrics=["fid"], num=40) == quiet(digits[0][:40], digits[1], extractor,
                                                                                  metrics=["fid"])
    assert calls == [40]
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="training checkpoint: sample it first.*difflab.pipelines.sample_checkpoint"):
        quiet(ckpt, digits[1], extractor, metrics=["fid"])
