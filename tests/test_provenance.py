"""Training-data provenance (difflab.data.provenance): every checkpoint the training loop writes
records a hash of its training data, the same across runs and different when the data differ; the
digits' and an image folder's sources; `difflab check` shows it."""
import json

import torch
from PIL import Image

from difflab.cli import main
from difflab.data import load_digits
from difflab.data.provenance import folder_source, provenance
from difflab.io.checkpoint import load_checkpoint
from difflab.io.spec import build_denoiser
from difflab.train import TrainConfig, train

SPEC = {"unet": {"in_channels": 1, "model_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attention_levels": [],
                 "num_heads": 1, "groups": 4, "num_classes": 10},
        "diffusion": {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "eps"}}
STEPS = TrainConfig(steps=2, batch_size=8, checkpoint_every=1, log_every=0, progress=False)


def run(out, data, **kw) -> dict:
    train(build_denoiser(SPEC, seed=0), data, STEPS, out, spec=SPEC, **kw)
    return load_checkpoint(out / "checkpoint.safetensors")[1]["data_provenance"]


def test_every_checkpoint_records_the_data_hash_stable_across_runs_and_changed_by_the_data(tmp_path):
    images, labels = load_digits(split="train")
    images, labels = images[:64], labels[:64]
    first = run(tmp_path / "a", (images, labels), data_source="digits")
    again = run(tmp_path / "b", (images, labels), data_source="digits")
    assert first == again and first["examples"] == 64 and len(first["sha256"]) == 64
    source = first["source"]
    assert source["dataset"] == "digits" and source["sklearn_version"] and len(source["raw_sha256"]) == 64
    changed = images.clone()
    changed[0, 0, 0, 0] += 0.125                                            # one pixel of one digit
    other = run(tmp_path / "c", (changed, labels))
    assert other["sha256"] != first["sha256"] and "source" not in other
    relabelled = run(tmp_path / "d", (images, labels.roll(1)))
    assert relabelled["sha256"] not in (first["sha256"], other["sha256"])
    # difflab check shows it
    assert main(["check", str(tmp_path / "a")]) == 0


def test_check_prints_the_provenance(tmp_path, capsys):
    images, labels = load_digits(split="train")
    record = run(tmp_path / "a", (images[:16], labels[:16]), data_source="digits")
    capsys.readouterr()
    assert main(["check", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("provenance"))
    assert record["sha256"] in line and "digits" in line and record["source"]["raw_sha256"] in line


def test_folder_source_hashes_each_file_and_the_manifest(tmp_path):
    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(tmp_path / f"{i}.png")
    a = folder_source(tmp_path)
    assert a["files"] == 3 and set(a["file_sha256"]) == {"0.png", "1.png", "2.png"}
    assert folder_source(tmp_path) == a
    Image.new("L", (8, 8), color=255).save(tmp_path / "1.png")             # one file changed
    b = folder_source(tmp_path)
    assert b["manifest_sha256"] != a["manifest_sha256"]
    assert b["file_sha256"]["0.png"] == a["file_sha256"]["0.png"] and b["file_sha256"]["1.png"] != a["file_sha256"]["1.png"]
    assert provenance({"x": torch.zeros(3, 2)}, source=tmp_path)["source"]["files"] == 3
    json.dumps(b)
