"""``difflab check`` and :func:`difflab.io.verify.verify_checkpoint`: a good checkpoint passes and
says what it holds; a NaN tensor, a shape that does not fit the spec, a wrong hash and a file that
is not a checkpoint are refused, each named; every kind of file difflab writes is recognised."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from difflab.adapters.lora import inject_lora, save_lora
from difflab.cli import main
from difflab.io.checkpoint import load_checkpoint, save_checkpoint
from difflab.io.spec import build_denoiser, make_spec
from difflab.io.text import save_tiny_text
from difflab.io.verify import KINDS, format_report, sha256_of, verify_checkpoint
from difflab.nn.text import TinyTextConfig, TinyTextEncoder
from difflab.nn.unet import UNetConfig
from difflab.nn.vae import PRESETS as VAE_PRESETS
from difflab.nn.vae import AutoencoderKL
from difflab.io.text_model import KIND as TEXT_MODEL_KIND
from difflab.train.dreambooth import save_text_model
from difflab.train.distill import STUDENT_KIND
from difflab.train.loop import CHECKPOINT_KIND
from difflab.train.textual_inversion import EMBEDS_KIND, save_learned_embeds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny training run (2 steps of the tiny preset on the digits) and its checkpoint."""
    root = tmp_path_factory.mktemp("check")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps({"train": {"steps": 2, "batch_size": 8, "checkpoint_every": 0, "progress": False}}))
    assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(root / "run"), "--device", "cpu"]) == 0
    return root / "run" / "checkpoint.safetensors"


def check(argv, capsys):
    status = main(["check", *map(str, argv)])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_a_good_checkpoint_passes_and_says_what_it_holds(run, capsys):
    status, out, err = check([run.parent], capsys)
    assert status == 0 and err == ""
    assert out.strip().endswith("OK")
    for phrase in ("difflab.train", "step         2", "objective diffusion", "class UNet", "prediction v",
                   "steps 2, batch_size 8", "ema ", "optim ", "rng ", "float32", "uint8", "shapes ok", "finite ok"):
        assert phrase in out, (phrase, out)
    status, out, _ = check([run, "--json"], capsys)
    report = json.loads(out)
    assert status == 0 and report["ok"] and report["step"] == 2 and report["kind"] == CHECKPOINT_KIND
    assert report["network"]["parameters"] == sum(t.numel() for k, t in load_checkpoint(run)[0].items() if k.startswith("model."))
    assert set(report["groups"]) == {"model", "ema", "optim", "rng"}
    assert report["groups"]["rng"]["dtypes"] == ["uint8"]
    assert report["sha256"] == sha256_of(run)


def test_a_nan_tensor_is_named(run, tmp_path, capsys):
    tensors, meta = load_checkpoint(run)
    key = sorted(k for k in tensors if k.startswith("ema.") and k.endswith(".weight"))[3]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[:2] = torch.tensor([math.nan, math.inf])
    bad = save_checkpoint(tmp_path / "nan.safetensors", tensors, meta)
    report = verify_checkpoint(bad)
    assert not report.ok and report.checks["finite"] == "failed" and report.checks["shapes"] == "ok"
    assert report.problems == [f"{key}: not finite (1 NaN, 1 inf of {tensors[key].numel()} values)"]
    status, out, err = check([bad], capsys)
    assert status == 2 and key in err and "not finite" in err and out.strip().endswith("FAILED")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_shape_that_does_not_fit_the_spec_is_named(run, tmp_path, capsys):
    tensors, meta = load_checkpoint(run)
    key = next(k for k in sorted(tensors) if k.startswith("model.") and tensors[k].ndim == 4)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    del tensors[key.replace("model.", "ema.")]
    tensors["ema.extra.weight"] = torch.zeros(3)
    bad = save_checkpoint(tmp_path / "shape.safetensors", tensors, meta)
    report = verify_checkpoint(bad)
    assert report.checks["shapes"] == "failed" and report.checks["finite"] == "ok" and len(report.problems) == 3
    text = "\n".join(report.problems)
    assert f"{key}: shape" in text and key.replace("model.", "ema.") + ": missing" in text and "ema.extra.weight: unexpected" in text
    status, out, err = check([bad], capsys)
    assert status == 2 and "3 checks" in err and key in out

    # a spec that names a different network: its weights do not fit
    tensors, meta = load_checkpoint(run)
    meta["spec"]["network"]["config"]["model_channels"] = 32
    report = verify_checkpoint(save_checkpoint(tmp_path / "spec.safetensors", tensors, meta))
    assert not report.ok and report.checks["shapes"] == "failed" and all(": shape" in p for p in report.problems)
    # a spec that builds nothing is one problem, not a traceback
    meta["spec"]["network"]["config"]["model_chanels"] = 32
    report = verify_checkpoint(save_checkpoint(tmp_path / "typo.safetensors", tensors, meta))
    assert report.checks["shapes"] == "failed" and "model_chanels" in report.problems[0]


def test_the_sha256_must_match(run, capsys):
    right = sha256_of(run)
    status, out, _ = check([run, "--sha256", right.upper()], capsys)
    assert status == 0 and "sha256 ok" in out
    wrong = ("0" if right[0] != "0" else "1") + right[1:]
    status, out, err = check([run, "--sha256", wrong], capsys)
    assert status == 2 and "sha256 mismatch" in err and wrong in err
    assert verify_checkpoint(run, sha256=wrong).checks == {"format": "ok", "sha256": "failed", "finite": "ok", "shapes": "ok"}
    with pytest.raises(SystemExit):
        main(["check", str(run), "--sha256", "abc"])
    assert "64 hexadecimal digits" in capsys.readouterr().err
    with pytest.raises(ValueError, match="sha256"):
        verify_checkpoint(run, sha256="xyz")


def test_files_that_are_not_checkpoints_are_refused(run, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(run.read_bytes()[:-100])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for path, phrase in ((garbage, "safetensors"), (truncated, "safetensors"), (foreign, "not a difflab checkpoint"),
                         (tmp_path, "no checkpoint")):
        report = verify_checkpoint(path)
        assert not report.ok and report.checks["format"] == "failed" and phrase in report.problems[0], (path, report)
        status, out, err = check([path], capsys)
        assert status == 2 and phrase in err and "Traceback" not in err and out.strip().endswith("FAILED")
    status, _, err = check([tmp_path / "missing.safetensors"], capsys)
    assert status == 2 and "does not exist" in err


def test_every_kind_difflab_writes_is_recognised(tmp_path):
    """Training checkpoints, text models, tiny text encoders, VAEs, LoRA files and textual-inversion
    embeddings: each passes, says what it is, and a damaged one is refused."""
    assert {CHECKPOINT_KIND, STUDENT_KIND, TEXT_MODEL_KIND, EMBEDS_KIND} <= set(KINDS)  # the names train writes
    text = TinyTextEncoder(TinyTextConfig(vocab=("<pad>", "<unk>", "a", "cat"), max_length=4, width=16, layers=1, heads=2))
    spec = make_spec("unet", UNetConfig(model_channels=16, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
                                        num_heads=2, context_dim=16, groups=8))
    denoiser = build_denoiser(spec, seed=0)
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    inject_lora(denoiser.net, ["qkv", "proj"], rank=2)
    files = {
        "difflab.text_model": save_text_model(tmp_path / "text_model", denoiser, text, spec, {"size": 8}),
        "TinyTextEncoder": save_tiny_text(text, tmp_path / "text.safetensors"),
        "AutoencoderKL": save_checkpoint(tmp_path / "vae.safetensors", vae.state_dict(),
                                         {"kind": "AutoencoderKL", "config": vae.config.to_dict()}),
        "difflab.lora": save_lora(tmp_path / "lora", denoiser.net),
        "difflab.textual_inversion": save_learned_embeds(tmp_path / "embeds", text, ["cat"]),
        None: save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"note": "hand-made"}),
    }
    for kind, path in files.items():
        report = verify_checkpoint(path)
        assert report.ok and report.facts["kind"] == kind, (kind, report.problems)
        assert format_report(report).endswith("OK")
        if kind is None:
            assert report.checks["shapes"].startswith("skipped") and "not one difflab writes" in report.notes[0]
            continue
        assert report.checks["shapes"] == "ok", kind
        tensors, meta = load_checkpoint(path)
        key = sorted(tensors)[-1]
        tensors[key] = torch.zeros(7, 5)  # a shape no layer of these has
        report = verify_checkpoint(save_checkpoint(tmp_path / f"bad_{kind}.safetensors", tensors, meta))
        assert report.checks["shapes"] == "failed" and report.problems[0].startswith(f"{key}:"), (kind, report.problems)
    assert verify_checkpoint(files["difflab.lora"]).facts["lora"]["rank"] == 2
