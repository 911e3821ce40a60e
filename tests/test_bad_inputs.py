"""The bad-input catalogue: every way a user can hand difflab something wrong, with the exit status
and a phrase the one-line message must hold. No case may print a traceback or leave a temporary
file behind. A new command adds its cases here (docs/design.md, "a command").

Command-line cases run ``difflab.cli.main`` in-process (an exception escaping it is what a user
would see as a traceback); API cases call the library and expect a ``ValueError`` (or subclass)
whose message holds the phrase.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.io.checkpoint import load_checkpoint, save_checkpoint
from difflab.io.spec import DEFAULT_DIFFUSION, build_denoiser
from difflab.nn.text import TinyTextEncoder
from difflab.nn.unet import UNetConfig
from difflab.train.dreambooth import save_text_model

# ----------------------------------------------------------------------------------------------
# Fixtures: one tiny trained run, and the broken things made from it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    run = root / "run"
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps({"train": {"steps": 2, "batch_size": 8, "checkpoint_every": 0, "progress": False}}))
    assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(run), "--device", "cpu"]) == 0
    ckpt = run / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(ckpt)
    key = next(k for k in tensors if k.startswith("ema.") and tensors[k].is_floating_point())
    bad = dict(tensors)
    bad[key] = tensors[key].clone()
    bad[key].view(-1)[0] = math.nan
    save_checkpoint(root / "nan.safetensors", bad, meta)
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file")
    (root / "truncated.safetensors").write_bytes(ckpt.read_bytes()[:200])
    (root / "notes.txt").write_text("hello")
    (root / "a_folder").mkdir()
    (root / "existing_file").write_text("x")
    (root / "empty").mkdir()
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(images / f"{i}.png")
    configs = {
        "typo": {"train": {"lerning_rate": 1e-3}},
        "top": {"trian": {"steps": 2}},
        "type": {"train": {"steps": "abc"}},
        "spec": {"spec": {"unet": {"model_chanels": 8}}},
        "diffusion": {"spec": {"unet": {}, "diffusion": {"frame": "vp_discrete", "shedule": "cosine"}}},
    }
    for name, body in configs.items():
        (root / f"{name}.json").write_text(json.dumps(body))
    (root / "broken.json").write_text("{not json")
    (root / "list.json").write_text("[1, 2]")
    (root / "nan_train.json").write_text('{"train": {"lr": NaN}}')
    # image folders with broken files (data/folder.py), and a tiny text model for dreambooth to reach them
    png = (images / "0.png").read_bytes()
    big = root / "big.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(big)
    broken = {"bad_truncated": {"0.png": png, "cut.png": big.read_bytes()[:1500]},
              "bad_empty": {"0.png": png, "empty.png": b""},
              "bad_text": {"0.png": png, "notes.jpg": b"hello, not a picture"},
              "bad_all": {"cut.png": big.read_bytes()[:1500], "empty.png": b"", "notes.jpg": b"hello"}}
    for folder, files in broken.items():
        (root / folder).mkdir()
        for name, data in files.items():
            (root / folder / name).write_bytes(data)
    unet = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
                      num_heads=2, context_dim=16, groups=4)
    text_spec = {"unet": unet.to_dict(), "diffusion": DEFAULT_DIFFUSION}
    text = TinyTextEncoder.from_texts(["a digit"], max_length=6, width=16, layers=1, heads=2)
    save_text_model(root / "text_base", build_denoiser(text_spec), text, text_spec, {"size": 8})
    return root


# ----------------------------------------------------------------------------------------------
# The catalogue: (id, argv with {root} for the fixture folder, exit status, phrase in the message)

T = ["train", "--preset", "tiny", "--device", "cpu", "--out", "{root}/out_train"]
S = ["sample", "--checkpoint", "{root}/run", "--out", "{root}/s.png", "--steps", "2", "--device", "cpu"]
E = ["eval", "--generated", "{root}/images", "--reference", "{root}/images", "--no-progress", "--device", "cpu"]
DB = ["dreambooth", "--base", "{root}/run", "--images", "{root}/images", "--class-prompt", "a digit",
      "--out", "{root}/db", "--no-progress", "--device", "cpu"]

CLI_CASES = [
    # no command, unknown command
    ("no-command", [], 2, "usage"),
    ("unknown-command", ["paint"], 2, "invalid choice"),
    # train: numbers
    ("train-steps-0", [*T, "--steps", "0"], 2, "--steps"),
    ("train-steps-negative", [*T, "--steps", "-5"], 2, "--steps"),
    ("train-lr-negative", [*T, "--lr", "-1"], 2, "--lr"),
    ("train-lr-nan", [*T, "--lr", "nan"], 2, "--lr"),
    ("train-lr-inf", [*T, "--lr", "inf"], 2, "--lr"),
    ("train-batch-size-0", [*T, "--batch-size", "0"], 2, "--batch-size"),
    ("train-steps-not-a-number", [*T, "--steps", "abc"], 2, "--steps"),
    # train: configs
    ("train-config-missing", [*T, "--config", "{root}/nope.json"], 2, "does not exist"),
    ("train-config-not-json", [*T, "--config", "{root}/broken.json"], 2, "JSON"),
    ("train-config-not-object", [*T, "--config", "{root}/list.json"], 2, "JSON object"),
    ("train-config-typo", [*T, "--config", "{root}/typo.json"], 2, "lerning_rate"),
    ("train-config-top-level-typo", [*T, "--config", "{root}/top.json"], 2, "trian"),
    ("train-config-wrong-type", [*T, "--config", "{root}/type.json"], 2, "steps"),
    ("train-config-spec-typo", [*T, "--config", "{root}/spec.json"], 2, "model_chanels"),
    ("train-config-nested-typo", [*T, "--config", "{root}/diffusion.json"], 2, "shedule"),
    ("train-config-nan", [*T, "--config", "{root}/nan_train.json"], 2, "lr"),
    # train: paths and devices
    ("train-data-is-a-file", [*T, "--data", "{root}/notes.txt", "--size", "8"], 2, "--data"),
    ("train-data-missing", [*T, "--data", "{root}/nowhere", "--size", "8"], 2, "--data"),
    ("train-data-empty-folder", [*T, "--data", "{root}/empty", "--size", "8"], 2, "no images"),
    ("train-folder-needs-size", [*T, "--data", "{root}/images"], 2, "--size"),
    ("train-device-tpu", [*T, "--device", "tpu"], 2, "--device"),
    ("train-out-is-a-file", ["train", "--preset", "tiny", "--out", "{root}/existing_file"], 2, "--out"),
    ("train-preset-unknown", [*T, "--preset", "huge"], 2, "--preset"),
    ("train-precision-unknown", [*T, "--precision", "fp8"], 2, "invalid choice"),
    # sample
    ("sample-checkpoint-missing", [*S[:1], "--checkpoint", "{root}/missing", "--out", "{root}/s.png"], 2, "does not exist"),
    ("sample-sampler-unknown", [*S, "--sampler", "nope"], 2, "nope"),
    ("sample-steps-0", [*S, "--steps", "0"], 2, "--steps"),
    ("sample-steps-negative", [*S, "--steps", "-3"], 2, "--steps"),
    ("sample-guidance-nan", [*S, "--guidance", "nan"], 2, "--guidance"),
    ("sample-guidance-inf", [*S, "--guidance", "inf"], 2, "--guidance"),
    ("sample-eta-without-eta", [*S, "--sampler", "euler", "--eta", "0.5"], 2, "--eta"),
    ("sample-seed-negative", [*S, "--seed", "-1"], 2, "--seed"),
    ("sample-num-0", [*S, "--num", "0"], 2, "--num"),
    ("sample-classes-out-of-range", [*S, "--classes", "3,12"], 2, "[0, 9]"),
    ("sample-classes-not-numbers", [*S, "--classes", "a,b"], 2, "--classes"),
    ("sample-out-is-a-folder", [*S[:-5], "--out", "{root}/a_folder", "--steps", "2", "--device", "cpu"], 2, "--out"),
    ("sample-nan-weights", [*S[:1], "--checkpoint", "{root}/nan.safetensors", "--out", "{root}/s.png"], 2, "not finite"),
    ("sample-not-safetensors", [*S[:1], "--checkpoint", "{root}/garbage.safetensors", "--out", "{root}/s.png"], 2, "safetensors"),
    ("sample-truncated", [*S[:1], "--checkpoint", "{root}/truncated.safetensors", "--out", "{root}/s.png"], 2, "safetensors"),
    ("sample-text-file", [*S[:1], "--checkpoint", "{root}/notes.txt", "--out", "{root}/s.png"], 2, "notes.txt"),
    ("sample-device-tpu", [*S, "--device", "tpu"], 2, "--device"),
    ("sample-weights-unknown", [*S, "--weights", "best"], 2, "invalid choice"),
    # eval
    ("eval-generated-missing", ["eval", "--generated", "{root}/missing"], 2, "does not exist"),
    ("eval-metric-unknown", [*E, "--metrics", "fid,beauty"], 2, "beauty"),
    ("eval-extractor-unknown", [*E, "--extractor", "vgg"], 2, "vgg"),
    ("eval-weights-not-safetensors", [*E, "--weights", "{root}/notes.txt"], 2, "--weights"),
    ("eval-nan-checkpoint", ["eval", "--generated", "{root}/nan.safetensors", "--reference", "digits", "--num", "4", "--no-progress"], 2, "not finite"),
    ("eval-num-0", [*E, "--num", "0"], 2, "--num"),
    ("eval-prompts-missing", [*E, "--metrics", "clip_score", "--prompts", "{root}/nope.txt"], 2, "--prompts"),
    ("eval-steps-0", ["eval", "--generated", "{root}/run", "--steps", "0", "--no-progress"], 2, "--steps"),
    # demo
    ("demo-steps-0", ["demo", "--steps", "0", "--out-dir", "{root}/demo"], 2, "--steps"),
    ("demo-guidance-nan", ["demo", "--guidance", "nan", "--out-dir", "{root}/demo"], 2, "--guidance"),
    ("demo-sampler-unknown", ["demo", "--sampler", "nope"], 2, "invalid choice"),
    # dreambooth
    ("dreambooth-base-missing", [*DB[:1], "--base", "{root}/nope", *DB[3:]], 2, "--base"),
    ("dreambooth-base-not-text-model", DB, 2, "text"),
    ("dreambooth-images-missing", [*DB[:3], "--images", "{root}/nope", *DB[5:]], 2, "--images"),
    ("dreambooth-images-file", [*DB[:3], "--images", "{root}/notes.txt", *DB[5:]], 2, "--images"),
    ("dreambooth-steps-0", [*DB, "--steps", "0"], 2, "--steps"),
    # memory, bench
    ("memory-preset-unknown", ["memory", "--preset", "nope"], 2, "nope"),
    ("memory-batch-size-0", ["memory", "--preset", "tiny", "--batch-size", "0"], 2, "--batch-size"),
    ("bench-workload-unknown", ["bench", "--quick", "--workloads", "warp_drive"], 2, "warp_drive"),
    # image folders (data/folder.py)
    ("train-folder-truncated-png", [*T, "--data", "{root}/bad_truncated", "--size", "8"], 2, "cut.png"),
    ("train-folder-all-bad-skip", [*T, "--data", "{root}/bad_all", "--size", "8", "--bad-images", "skip"], 2, "no readable images"),
    ("train-folder-zero-byte-png", [*T, "--data", "{root}/bad_empty", "--size", "8"], 2, "empty.png"),
    ("train-folder-text-as-jpg", [*T, "--data", "{root}/bad_text", "--size", "8"], 2, "notes.jpg"),
    ("train-bad-images-unknown", [*T, "--data", "{root}/images", "--size", "8", "--bad-images", "ignore"], 2, "invalid choice"),
    ("dreambooth-images-corrupt", [*DB[:1], "--base", "{root}/text_base", "--images", "{root}/bad_truncated", *DB[5:]], 2, "cut.png"),
    ("eval-generated-unreadable-image", ["eval", "--generated", "{root}/bad_all", "--reference", "digits", "--no-progress"], 2, "cut.png"),
]


def _argv(argv, root):
    return [a.replace("{root}", str(root)) for a in argv]


def run_cli(argv, capsys):
    """(status, stdout, stderr) of ``difflab ARGV``; an exception escaping main fails the case
    (a user would have seen a traceback)."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors and --help
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_case(case, world, capsys):
    name, argv, status, phrase = case
    got, out, err = run_cli(_argv(argv, world), capsys)
    assert got == status, f"{name}: exit status {got}, expected {status}; stderr: {err.strip()[-500:]}"
    assert phrase.lower() in (err + out).lower(), f"{name}: {phrase!r} not in the message: {err.strip()[-500:]}"
    assert "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if line.strip()]) <= 3 or "usage" in err, err
    assert not list(world.rglob("*.tmp")), f"{name} left temporary files: {list(world.rglob('*.tmp'))}"


def test_the_catalogue_is_large_enough():
    assert len(CLI_CASES) >= 60
