"""`difflab demo --cascade`, end to end in a few steps (the real run's figures are in docs/super_resolution.md)."""
import json
import math

from difflab.cli import main
from difflab.eval import DigitsJudge
from difflab.eval.judge import FitConfig


def test_cascade_demo_end_to_end_short(tmp_path, capsys):
    DigitsJudge.fit(fit_config=FitConfig(epochs=2)).save(tmp_path / "digits_judge.safetensors")  # a quick judge
    argv = ["demo", "--cascade", "--steps", "3", "--sr-steps", "3", "--sampling-steps", "2", "--samples-per-class", "2",
            "--aug-sigma", "0.3", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert (tmp_path / "base" / "checkpoint.safetensors").exists() and (tmp_path / "sr_x2" / "checkpoint.safetensors").exists()
    assert report["n_generated"] == 20 and report["aug_sigma"] == 0.3 and report["truncated"] is False
    assert report["base_steps"] == 3 and report["sr_steps"] == 3
    for key in ("class_accuracy", "base_class_accuracy", "frechet", "frechet_real_reference", "consistency_rmse", "cpu_seconds"):
        assert math.isfinite(report[key]), key
    assert "judge accuracy at 16x16" in capsys.readouterr().out
    # the same run again with --resume and truncated augmentation samples from the saved stages
    assert main([*argv, "--resume", "--truncated"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["truncated"] is True
