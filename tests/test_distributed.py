"""Data parallelism over processes (PyTorch DDP, Li et al. 2020; FSDP, Zhao et al. 2023) on 2 CPU
processes with gloo: after N steps the parameters, EMA and AdamW moments equal those of one process
with the same global batch (up to the order of floating-point sums), and checkpoints resume
across world sizes (2 -> 1 and 1 -> 2).

One ``torchrun`` launch (loopback only) runs every 2-process job of the file: this file is also
its worker script (``python -m torch.distributed.run --nproc_per_node=2 tests/test_distributed.py DIR``).
The net is the tiny U-Net computing in float64, so only the reduction order differs between runs.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from difflab.core import Denoiser, VPDiscrete
from difflab.io import load_checkpoint
from difflab.nn.unet import PRESETS, UNet
from difflab.train import TrainConfig, draw_batch, train
from difflab.train.distributed import Parallel, fsdp_units, local_slice

N_STEPS, HALF = 4, 2
MODES = ("ddp", "fsdp")
# float64 reduction-order noise (~1e-16) grows to ~1e-11 through AdamW's division by sqrt(v) + eps
# where gradients are tiny; a wrong slice or gradient scale changes entries by O(1) of their scale.
RTOL = 1e-9


class Float64UNet(nn.Module):
    """PRESETS["tiny"] with 3 classes (+ the null class), computing in float64."""

    def __init__(self):
        super().__init__()
        self.unet = UNet(replace(PRESETS["tiny"], num_classes=3)).double()
        self.config = self.unet.config
        self.labels_seen = []  # the class labels of every forward call: which examples this process trained on

    def forward(self, x, t, class_labels=None):
        self.labels_seen.append(class_labels.tolist())
        return self.unet(x.double(), t.double(), class_labels=class_labels)


def _make() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(Float64UNet(), VPDiscrete.from_name("linear", 100), "eps")


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(24, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (24,), generator=g)


def _config(steps: int, parallel: str = "none", **kw) -> TrainConfig:
    # labels with label dropout (its mask is sliced too), two micro-batches per rank (no_sync), warmup, weight decay
    return TrainConfig(**{"steps": steps, "batch_size": 8, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.01,
                          "ema_decay": 0.9, "cfg_dropout": 0.25, "checkpoint_every": 0, "log_every": 2, "seed": 3,
                          "progress": False, "parallel": parallel, **kw})


# ----------------------------------------------------------------------------------------------
# The worker: every 2-process job, run by torchrun


def _worker(root: Path) -> None:
    from difflab.train.distributed import init_distributed

    init_distributed()
    rank = dist.get_rank()
    for mode in MODES:
        d = _make()
        train(d, _data(), _config(N_STEPS, mode), root / mode)
        (root / f"{mode}_labels{rank}.json").write_text(json.dumps(d.net.labels_seen))
        train(_make(), _data(), _config(HALF, mode), root / f"{mode}_half")   # the test resumes it in one process
        train(_make(), _data(), _config(N_STEPS, mode), root / f"{mode}_from_1")  # resumes a one-process checkpoint
    try:
        train(_make(), _data(), _config(N_STEPS, "ddp", batch_size=6), root / "bad")
    except ValueError as e:
        (root / f"bad{rank}.txt").write_text(str(e))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The runs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    # 1. One process: the reference, and a half-way checkpoint for the 2-process runs to resume
    train(_make(), _data(), _config(N_STEPS), root / "single")
    train(_make(), _data(), _config(HALF), root / "single_half")
    for mode in MODES:
        shutil.copytree(root / "single_half", root / f"{mode}_from_1")
    # 2. Two processes on the loopback interface
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, str(root)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session started for them
        out, _ = proc.communicate()
        pytest.fail("the 2-process run timed out:\n" + out[-4000:])
    assert proc.returncode == 0, out[-6000:]
    return root


def _kind(key: str) -> str:
    return key.split(".", 1)[0] if not key.startswith("optim.") else "optim." + key.rsplit(".", 1)[1]


def _compare(a: Path, b: Path) -> tuple[float, float]:
    """Compare every model, EMA and AdamW tensor of two checkpoints: each may differ by at most
    RTOL times the largest entry of its kind (parameters, EMA, exp_avg, exp_avg_sq, step). Returns
    the largest parameter difference, absolute and relative to that scale."""
    ta, ma = load_checkpoint(a)
    tb, mb = load_checkpoint(b)
    assert ma["step"] == mb["step"] == N_STEPS and ma["ema"] == mb["ema"]
    keys = sorted(k for k in tb if not k.startswith("rng."))
    assert keys == sorted(k for k in ta if not k.startswith("rng.")) and any(k.startswith("optim.state.") for k in keys)
    scale = {}
    for k in keys:
        scale[_kind(k)] = max(scale.get(_kind(k), 0.0), float(tb[k].double().abs().max()))
    worst = 0.0
    for k in keys:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        diff = float((ta[k].double() - tb[k].double()).abs().max())
        assert diff <= RTOL * scale[_kind(k)], (k, diff, scale[_kind(k)])
        if k.startswith("model."):
            worst = max(worst, diff)
    # the weights moved far more than the tolerance, so a wrong slice or scale would show
    start = _make().net.state_dict()
    assert max(float((tb["model." + k] - v).abs().max()) for k, v in start.items()) > 1e-3
    return worst, worst / scale["model"]


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one(runs, mode):
    worst, relative = _compare(runs / mode, runs / "single")
    print(f"\n{mode}: max |parameter difference| to one process after {N_STEPS} steps = {worst:.3g} "
          f"({relative:.3g} of the largest parameter)")
    meta = json.loads((runs / mode / "checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["train_config"]["parallel"] == mode
    # rank 0 alone logged, the loss and gradient norm of the whole batch
    log = [json.loads(line) for line in (runs / mode / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (runs / "single" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [e["step"] for e in ref] == [2, 4]
    for e, r in zip(log, ref):
        assert abs(e["loss"] - r["loss"]) <= 1e-6 * r["loss"] and abs(e["grad_norm"] - r["grad_norm"]) <= 1e-9 * r["grad_norm"]
        assert e["loss_by_sigma"].keys() == r["loss_by_sigma"].keys()


@pytest.mark.parametrize("mode", MODES)
def test_each_process_trains_on_its_slice(runs, mode):
    """Rank r of 2 gets examples [4r, 4r + 4) of each global batch of 8, in 2 micro-batches of 2."""
    images, labels = _data()
    cfg = _config(N_STEPS)
    frame = _make().frame
    batches = [draw_batch(images, labels, frame, cfg, step, null_class=3)["class_labels"].tolist() for step in range(N_STEPS)]
    assert any(3 in b for b in batches)  # label dropout happened, and its mask was sliced with the batch
    for rank in (0, 1):
        seen = json.loads((runs / f"{mode}_labels{rank}.json").read_text())
        assert seen == [b[4 * rank + 2 * i: 4 * rank + 2 * i + 2] for b in batches for i in range(2)]


@pytest.mark.parametrize("mode", MODES)
def test_resume_two_processes_in_one(runs, mode, tmp_path):
    half = runs / f"{mode}_half"
    tensors, meta = load_checkpoint(half)
    assert meta["step"] == HALF and meta["world_size"] == 2 and "rng.torch.rank1" in tensors
    shutil.copytree(half, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # parallel="none" now: a change that keeps the math, so no warning
        state = train(_make(), _data(), _config(N_STEPS), tmp_path / "run")
    assert state.step == N_STEPS
    _compare(tmp_path / "run", runs / "single")


@pytest.mark.parametrize("mode", MODES)
def test_resume_one_process_in_two(runs, mode):
    assert load_checkpoint(runs / "single_half")[1]["world_size"] == 1
    _compare(runs / f"{mode}_from_1", runs / "single")


def test_batch_must_split_over_processes(runs):
    for rank in (0, 1):  # raised on every rank, before any collective
        assert "divisible by world_size * grad_accum = 2 * 2" in (runs / f"bad{rank}.txt").read_text()
    assert not (runs / "bad" / "checkpoint.safetensors").exists()


def test_local_slices_and_config_errors(tmp_path):
    slices = [local_slice(12, 3, r, 2) for r in range(2)]
    assert [list(range(12))[s] for s in slices] == [list(range(6)), list(range(6, 12))]
    with pytest.raises(ValueError, match="divisible by world_size"):
        local_slice(12, 2, 0, 4)
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="zero3")
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun"):  # no process group in a plain pytest process
        train(_make(), _data(), _config(1, "ddp"), tmp_path)
    p = Parallel()
    batch = {"x0": torch.zeros(4, 2), "class_labels": None}
    assert p.local(batch) is batch and p.no_sync is None and p.is_main and p.world_size == 1


def test_fsdp_units_are_the_blocks():
    net = Float64UNet()
    units = fsdp_units(net)
    names = {m: n for n, m in net.named_modules()}
    assert units and all(not isinstance(u, nn.ModuleList) for u in units)
    assert {type(u).__name__ for u in units} >= {"ResBlock", "SelfAttention", "Downsample", "Upsample"}
    # every unit comes after the units inside it (fully_shard goes innermost first)
    for i, u in enumerate(units):
        assert not any(names[v].startswith(names[u] + ".") for v in units[i + 1:])


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))
