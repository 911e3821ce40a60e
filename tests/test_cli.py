"""The command line: help, the demo end to end (short), train -> sample, and clear errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "sample"):
        assert cmd in out


def test_help_gives_every_command_its_help_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for name, module in COMMANDS.items():
        assert module.HELP and "\n" not in module.HELP, name
        assert f" {name} {' '.join(module.HELP.split())}" in out, f"difflab --help does not list {name!r} with its HELP"


# Imported only where used: each costs a second or more at every start (CLI, torchrun worker, subprocess)
SLOW_IMPORTS = ("scipy", "sklearn", "transformers", "diffusers", "matplotlib", "imageio", "torch._dynamo",
                "torch.distributed.tensor")
# Imported at start: a signal that arrives during numpy.random's first import is lost, so it must not
# happen inside a command (the sample-sigterm catalogue case failed once that way)
EARLY_IMPORTS = ("numpy.random",)


def test_python_m_difflab_cli_help_lists_the_commands_and_starts_light():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "difflab.cli", "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: difflab") and all(name in done.stdout for name in COMMANDS)
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert len(imported) > 100, done.stderr[-500:]  # -X importtime did list the imports
    slow = sorted(m for m in imported if m.split(".")[0] in SLOW_IMPORTS or m in SLOW_IMPORTS)
    assert not slow, f"difflab --help imported {slow}: import them inside the function that needs them"
    late = [m for m in EARLY_IMPORTS if m not in imported]
    assert not late, f"difflab --help did not import {late}: a signal during their first import is lost"


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"difflab {version('difflab')}"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A very short training run of the tiny preset on 8x8 digits."""
    out = tmp_path_factory.mktemp("run")
    cfg = out / "config.json"
    cfg.write_text(json.dumps({"train": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "progress": False}}))
    assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(out)]) == 0
    return out


def test_train_then_sample_writes_a_png(trained_run, tmp_path):
    meta = json.loads((trained_run / "checkpoint.json").read_text())
    assert meta["step"] == 6 and meta["spec"]["network"]["config"]["num_classes"] == 10
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(trained_run), "--classes", "0,1,9", "--steps", "3", "--guidance", "2",
                 "--out", str(png)]) == 0
    from PIL import Image

    img = Image.open(png)
    assert img.size[0] > 8 and img.size[1] > 8


def test_sample_errors_are_clear(trained_run, tmp_path, capsys):
    png = str(tmp_path / "s.png")
    assert main(["sample", "--checkpoint", str(tmp_path / "missing"), "--out", png]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(trained_run), "--sampler", "nope", "--out", png]) == 2
    err = capsys.readouterr().err
    assert "sampler='nope' is unknown" in err and "ddim" in err
    assert main(["sample", "--checkpoint", str(trained_run), "--classes", "3,12", "--out", png]) == 2
    assert "[0, 9]" in capsys.readouterr().err


def test_a_checkpoint_that_does_not_match_the_model_names_the_keys(trained_run, tmp_path, capsys):
    from difflab.io.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(trained_run)
    meta["spec"]["network"]["config"]["model_channels"] = 24  # the spec now describes a different network
    save_checkpoint(tmp_path / "bad.safetensors", tensors, meta)
    assert main(["sample", "--checkpoint", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "shape" in err or "missing" in err


def test_train_with_a_missing_config_file_fails_clearly(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "nope.json" in err


@pytest.mark.parametrize("config, key", [({"spec": None, "trian": {}}, "'trian'"),
                                         ({"train": {"stesp": 3}}, "'stesp'"),
                                         ({"train": []}, "train must be a JSON object")])
def test_train_config_unknown_keys_are_a_config_error(tmp_path, capsys, config, key):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab train: error:") and key in err and len(err.strip().splitlines()) == 1


def test_train_config_that_is_not_json_is_a_config_error(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("{spec: 1")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_demo_end_to_end_short(tmp_path, capsys, digits_judge_file):
    from difflab.demos.digits import run_demo

    shutil.copyfile(digits_judge_file, tmp_path / "digits_judge.safetensors")  # the demo finds its judge cached
    report = run_demo(tmp_path, steps=8, sampling_steps=4, samples_per_class=2)
    assert (tmp_path / "samples.png").exists() and (tmp_path / "report.json").exists()
    assert report["n_generated"] == 20 and 0.0 <= report["class_accuracy"] <= 1.0
    assert report["real_accuracy"] > 0.95  # the judge itself is good
    assert torch.isfinite(torch.tensor(report["frechet"]))
    out = capsys.readouterr().out
    assert "judge accuracy on generated digits" in out
    # `difflab eval` measures the demo's checkpoint end to end
    assert main(["eval", "--generated", str(tmp_path), "--reference", "digits", "--num", "20", "--steps", "4",
                 "--metrics", "fid,kid,precision,recall", "--no-progress", "--json",
                 "--weights", str(tmp_path / "digits_judge.safetensors")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_generated"] == 20 and all(torch.isfinite(torch.tensor(float(result[k]))) for k in ("fid", "precision"))


def test_the_same_train_command_twice_gives_the_same_weights(tmp_path):
    """Initialization is seeded from the run's seed: whatever the global random state, two runs of
    one command write bit-identical checkpoints (CPU)."""
    from difflab.io.checkpoint import load_checkpoint

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"steps": 2, "batch_size": 8, "checkpoint_every": 0, "progress": False}}))
    runs = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # a different global state each time
        out = tmp_path / f"r{i}"
        assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(out), "--device", "cpu"]) == 0
        runs.append(load_checkpoint(out)[0])
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        if not k.startswith("rng."):
            assert torch.equal(runs[0][k], runs[1][k]), k
