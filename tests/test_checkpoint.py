"""Checkpoints: safetensors + JSON round trips, atomic writes, no pickle, clear errors."""
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import difflab.io.checkpoint as ckpt
from difflab.io import (load_checkpoint, load_model_state, optimizer_state_from_tensors, optimizer_state_to_tensors,
                        read_metadata, save_checkpoint)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(3, 4, generator=g),
        "model.b16": torch.randn(5, generator=g).to(torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64),
        "rng.torch": torch.Generator().manual_seed(3).get_state(),  # uint8
        "transposed": torch.randn(4, 3, generator=g).t(),  # non-contiguous
    }


def test_round_trip_tensors_and_metadata(tmp_path):
    tensors = _tensors()
    meta = {"step": 12, "config": {"lr": 1e-4, "betas": [0.9, 0.999], "name": "x", "flag": None}}
    path = save_checkpoint(tmp_path, tensors, meta)
    assert path == tmp_path / "checkpoint.safetensors"
    loaded, meta2 = load_checkpoint(tmp_path)
    assert meta2 == meta
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    # the JSON beside it is the same document; a file path works as well as a directory
    assert json.loads((tmp_path / "checkpoint.json").read_text()) == meta
    assert read_metadata(path) == meta
    save_checkpoint(tmp_path / "other.safetensors", tensors, {"a": 1})
    assert load_checkpoint(tmp_path / "other.safetensors")[1] == {"a": 1}


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(4, 4)
    save_checkpoint(tmp_path, {"a": w, "b": w, "row": w[1]}, {})
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w) and torch.equal(loaded["row"], w[1])


def test_optimizer_state_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        net(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_state_to_tensors(opt.state_dict(), prefix="optim.")
    assert "optim.state.0.exp_avg" in tensors and "optim.state.3.exp_avg_sq" in tensors
    save_checkpoint(tmp_path, {**tensors, **{f"model.{k}": v for k, v in net.state_dict().items()}}, {"optimizer": meta})
    loaded, meta2 = load_checkpoint(tmp_path)

    net2 = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2))
    load_model_state(net2, loaded, prefix="model.")
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1.0)
    opt2.load_state_dict(optimizer_state_from_tensors(loaded, meta2["optimizer"]))
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]
    assert sd2["param_groups"][0]["betas"] == (0.8, 0.95)
    for i in sd["state"]:
        for name, v in sd["state"][i].items():
            assert torch.equal(v, sd2["state"][i][name]), (i, name)
    # one more identical step gives identical weights
    x = torch.randn(5, 3)
    for n, o in ((net, opt), (net2, opt2)):
        n(x).square().mean().backward()
        o.step()
    for p, p2 in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, p2)


def test_failed_write_leaves_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"step": 1})
    before = sorted(os.listdir(tmp_path))

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 64)  # half a file, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, {"w": torch.zeros(3)}, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == before == ["checkpoint.json", "checkpoint.safetensors"]
    tensors, meta = load_checkpoint(tmp_path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(3))
    assert json.loads((tmp_path / "checkpoint.json").read_text()) == {"step": 1}


def test_file_is_plain_safetensors_and_loading_never_unpickles(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, {"w": torch.arange(6.0).reshape(2, 3)}, {"step": 3})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["w"]["dtype"] == "F32" and header["w"]["shape"] == [2, 3]
    assert json.loads(header["__metadata__"]["difflab.metadata"]) == {"step": 3}
    assert torch.equal(load_file(path)["w"], torch.arange(6.0).reshape(2, 3))  # any safetensors reader

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    tensors, meta = load_checkpoint(tmp_path)
    assert meta == {"step": 3}


def test_clear_errors_for_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a difflab checkpoint"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a difflab checkpoint"):
        load_checkpoint(foreign)


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, {"w": torch.ones(1)}, {"bad": object()})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, {"w": torch.ones(1)}, {"loss": float("nan")})
    assert not any(tmp_path.iterdir())


def test_mismatched_model_names_missing_unexpected_and_shapes(tmp_path):
    src = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2), nn.Linear(2, 2))
    save_checkpoint(tmp_path, {f"model.{k}": v for k, v in src.state_dict().items()}, {})
    tensors, _ = load_checkpoint(tmp_path)
    dst = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 4))  # 1.* has another shape, 2.* is extra
    with pytest.raises(ValueError) as info:
        load_model_state(dst, tensors)
    msg = str(info.value)
    assert "unexpected keys (2): 2.bias, 2.weight" in msg
    assert "1.weight: checkpoint (2, 8) vs model (4, 8)" in msg
    bigger = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"missing keys \(2\): 3.bias, 3.weight"):
        load_model_state(bigger, tensors)
    with pytest.raises(ValueError, match="no tensors under prefix 'ema.'"):
        load_model_state(src, tensors, prefix="ema.")
    fresh = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2), nn.Linear(2, 2))
    load_model_state(fresh, tensors)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), src.parameters()))
