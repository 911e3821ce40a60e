"""`difflab eval` end to end: a tiny class-conditional model trained for a few steps, sampled and
measured against the held-out digits; the table, the JSON, the statistics cache and the errors."""
import json
import math

import pytest

from difflab.cli import main
from difflab.eval import DigitsJudge, FitConfig

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny U-Net trained 20 steps on 8x8 digits (a demo-like checkpoint), and a quickly fitted judge."""
    out = tmp_path_factory.mktemp("run")
    cfg = out / "config.json"
    cfg.write_text(json.dumps({"train": {"steps": 20, "batch_size": 16, "checkpoint_every": 0, "progress": False}}))
    assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(out), "--device", "cpu"]) == 0
    judge = out / "judge.safetensors"
    DigitsJudge.fit(fit_config=FitConfig(epochs=8)).save(judge)
    return out, judge


def test_eval_a_checkpoint_against_the_digits_as_json(run, capsys, tmp_path):
    ckpt, judge = run
    cache = tmp_path / "digits_stats.npz"
    args = ["eval", "--generated", str(ckpt / "checkpoint.safetensors"), "--reference", "digits", "--num", "50",
            "--steps", "10", "--weights", str(judge), "--cache", str(cache), "--json", "--no-progress"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    for key in ("fid", "kid", "kid_std", "precision", "recall", "is", "is_std"):
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
    assert results["extractor"] == "digits-judge" and results["n_generated"] == 50 and results["n_reference"] == 359
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1 and 1 <= results["is"] <= 10
    assert results["fid"] > 0 and cache.is_file()
    # the run folder, the cached statistics as the reference, a table instead of JSON
    assert main(["eval", "--generated", str(ckpt), "--reference", str(cache), "--num", "50", "--steps", "10",
                 "--weights", str(judge), "--metrics", "fid,is", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "digits-judge" in table and "FID" in table and "Inception Score" in table and "KID" not in table
    assert f"{results['fid']:.6g}" in table   # the same samples and statistics, the same FID


def test_eval_errors_are_clear(run, capsys, tmp_path):
    ckpt, judge = run
    base = ["eval", "--generated", str(ckpt), "--reference", "digits", "--weights", str(judge), "--no-progress"]
    assert main(["eval", "--generated", str(tmp_path / "missing"), "--reference", "digits"]) == 2
    assert "--generated" in (err := capsys.readouterr().err) and "does not exist" in err
    assert main(base[:3] + ["--reference", str(tmp_path / "nope.npz")]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(base + ["--metrics", "fid,sharpness"]) == 2
    err = capsys.readouterr().err
    assert "sharpness" in err and "fid, kid, precision, recall, is, clip_score" in err
    assert main(base + ["--extractor", "resnet"]) == 2
    err = capsys.readouterr().err
    assert "'resnet' is unknown" in err and "clip, dinov2, inception, judge" in err
    assert main(base + ["--weights", str(tmp_path / "judge.safetensors")]) == 2
    assert "--weights" in (err := capsys.readouterr().err) and "judge.safetensors does not exist" in err
    assert main(base + ["--metrics", "clip_score"]) == 2
    assert "clip_score needs an extractor with encode_text" in capsys.readouterr().err
    # the Inception extractor with no weights: an error naming what is missing, never a fallback
    assert main(base + ["--extractor", "inception", "--weights", str(tmp_path / "pt_inception.pth")]) == 2
    err = capsys.readouterr().err
    assert "inception" in err.lower() and ("pt_inception.pth" in err or "lacks" in err)


def test_eval_help_lists_the_extractors_and_metrics(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--generated", "--reference", "--extractor", "--metrics", "--json", "inception", "clip_score"):
        assert word in out, word
