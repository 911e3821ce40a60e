"""``difflab distill``: every method end to end on a tiny teacher; the student's checkpoint carries
its sampler, steps and grid, so ``difflab sample`` and ``difflab check`` take it as it is; a rerun
resumes to the same weights as a straight run."""
from __future__ import annotations

import json

import pytest
import torch

from difflab.cli import main
from difflab.io import load_checkpoint
from difflab.io.checkpoint import read_metadata
from difflab.io.spec import load_denoiser
from difflab.train.distill import DistillConfig, consistency_grid

TINY = {"steps": 2, "batch_size": 8, "checkpoint_every": 0, "progress": False}


def _train(root, name, spec=None):
    cfg = root / f"{name}.json"
    cfg.write_text(json.dumps({"train": TINY, **({"spec": spec} if spec else {})}))
    assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(root / name), "--device", "cpu"]) == 0
    return root / name


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    flow = {"network": {"kind": "unet", "config": {}}, "diffusion": {"frame": "flow", "prediction": "flow"}}
    return {"vp": _train(root, "vp"), "flow": _train(root, "flow", flow)}


def distill_argv(teacher, out, method, *extra):
    return ["distill", "--method", method, "--teacher", str(teacher), "--out", str(out), "--steps", "2",
            "--batch-size", "8", "--device", "cpu", "--no-progress", *extra]


CASES = {  # method -> (teacher, extra flags, the sampler and steps the student names)
    "progressive": ("vp", ["--teacher-steps", "4", "--student-steps", "1", "--guidance", "1.5"], "ddim", 1),
    "guided": ("vp", ["--teacher-steps", "4", "--student-steps", "2", "--guidance", "2"], "ddim", 2),
    "consistency": ("vp", ["--student-steps", "2", "--levels", "6", "--guidance", "1.5"], "consistency", 2),
    "reflow": ("flow", ["--student-steps", "1", "--pairs", "16", "--teacher-steps", "4"], "flow_euler", 1),
}


@pytest.mark.parametrize("method", list(CASES))
def test_each_method_distils_a_student_that_difflab_sample_and_check_take(method, teachers, tmp_path, capsys):
    teacher, extra, sampler, steps = CASES[method]
    out = tmp_path / "student"
    assert main(distill_argv(teachers[teacher], out, method, *extra)) == 0
    meta = read_metadata(out)
    assert meta["kind"] == "difflab.student" and meta["method"] == method
    assert meta["sampling"]["sampler"] == sampler and meta["sampling"]["steps"] == steps
    if method == "guided":
        assert meta["spec"]["student"]["guidance_input"] and meta["sampling"]["guidance_scale"] == 2.0
    if method == "consistency":
        assert meta["spec"]["student"]["consistency"]["form"] == "lcm"
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "--classes", "0,1,2", "--out", str(tmp_path / "s.png"),
                 "--device", "cpu"]) == 0
    assert f"sampling with {sampler}, {steps} steps" in capsys.readouterr().out
    assert (tmp_path / "s.png").exists()
    assert main(["check", str(out)]) == 0
    assert "shapes ok" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["progressive", "guided", "consistency"])
def test_a_rerun_with_more_steps_resumes_to_the_weights_of_a_straight_run(method, teachers, tmp_path):
    teacher, extra, _, _ = CASES[method]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*distill_argv(teachers[teacher], straight, method, *extra), "--steps", "4"]) == 0
    assert main(distill_argv(teachers[teacher], resumed, method, *extra)) == 0  # 2 steps a run
    assert main([*distill_argv(teachers[teacher], resumed, method, *extra), "--steps", "4"]) == 0
    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_student_loads_as_the_denoiser_it_was_trained_as(teachers, tmp_path):
    out = tmp_path / "cm"
    assert main(distill_argv(teachers["vp"], out, "consistency", "--levels", "6")) == 0
    student, meta = load_denoiser(out)
    # a consistency function: at its boundary it returns its input exactly (Song et al. 2023, eq. 5)
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.full((2,), student.boundary_sigma)
    with torch.no_grad():
        f = student(x, sigma, class_labels=torch.tensor([1, 2]))
    torch.testing.assert_close(f, x * student.frame.scale(sigma)[:, None, None, None], rtol=0, atol=1e-6)
    grid = consistency_grid(student, 3, 6)
    assert grid[0] == pytest.approx(float(student.sigma_max)) and grid[-1] == 0.0 and len(grid) == 4
    assert all(a > b for a, b in zip(grid, grid[1:]))


def test_config_checks():
    with pytest.raises(ValueError, match="power of two"):
        DistillConfig(method="progressive", teacher_steps=6, student_steps=4)
    with pytest.raises(ValueError, match="method='magic'"):
        DistillConfig(method="magic")
