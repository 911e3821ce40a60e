"""Nothing a run made is lost: non-finite state is never checkpointed (the run rolls back to the
last good one), one run per folder (a lock, stale locks taken over), no debris after a crash
(temporary files, a stale pointer file, log lines past the checkpoint), Ctrl-C writes a
checkpoint and stops, and kill -9 at random moments resumes bit-identically."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from difflab.io import load_checkpoint
from difflab.train import RunLockedError, TrainConfig, TrainingDivergedError, TrainingInterrupted, fit
from difflab.train.run_folder import LOCK_NAME, acquire_lock, release_lock, sync_pointer, truncate_log


def quiet(**kw):
    return TrainConfig(**{"progress": False, "log_every": 1, "checkpoint_every": 2, "batch_size": 8, "lr": 1e-2,
                          "ema_decay": 0.9, **kw})


class Regression:
    """A toy objective: per-example squared error of a small MLP; ``poison`` (a callable run after
    each step) lets a test break the state at a chosen step."""

    name = "regression"

    def __init__(self, poison=None):
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        self.poison, self.steps = poison, 0

    def draw(self, batch, generator):
        return {}

    def loss(self, batch):
        return (self.module(batch["x"])[:, 0] - batch["y"]) ** 2

    def after_step(self):
        self.steps += 1
        if self.poison is not None:
            self.poison(self, self.steps)


def data(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5])}


def logged_steps(folder):
    return [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# 1. Non-finite state is never written; the run rolls back to the last good checkpoint


@pytest.mark.parametrize("where", ["parameter", "ema", "optimizer"])
def test_non_finite_state_is_not_checkpointed_and_the_run_rolls_back(tmp_path, where):
    def poison(obj, step):
        if step == 6:  # after the update of step 6, before its checkpoint
            if where == "parameter":
                obj.module[0].weight.data[0, 0] = float("nan")
            elif where == "ema":
                state.ema.shadow["2.bias"][0] = float("inf")
            else:
                opt = state.optimizer
                opt.state[opt.param_groups[0]["params"][2]]["exp_avg_sq"][0] = float("nan")

    obj = Regression(poison)
    good = fit(Regression(), data(), quiet(steps=4), tmp_path / "good")  # the state of step 4, uninterrupted
    state = None

    def grab(info):
        nonlocal state
        state = info["state"]

    with pytest.raises(TrainingDivergedError) as info:
        fit(obj, data(), quiet(steps=10), tmp_path / "run", callback=grab)
    err = info.value
    name = {"parameter": "model.0.weight", "ema": "ema.2.bias", "optimizer": "optim.state.2.exp_avg_sq"}[where]
    assert name in str(err) and "no checkpoint was written" in str(err)
    assert err.step == 6 and err.good_step == 4 and "step 4" in str(err)
    tensors, meta = load_checkpoint(tmp_path / "run")  # the previous good one is kept, and it is finite
    assert meta["step"] == 4 and json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"] == 4
    if where == "parameter":  # the weights in memory were not finite: rolled back to step 4
        assert err.rolled_back and "rolled back to step 4" in str(err) and state.step == 4
        for k, v in good.module.state_dict().items():
            assert torch.equal(obj.module.state_dict()[k], v)
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_nan_loss_after_non_finite_weights_rolls_back(tmp_path):
    def poison(obj, step):
        if step == 3:
            obj.module[2].weight.data.fill_(float("nan"))

    obj = Regression(poison)
    with pytest.raises(TrainingDivergedError, match="at step 4: loss=nan.*rolled back to step 2") as info:
        fit(obj, data(), quiet(steps=10), tmp_path)
    assert info.value.rolled_back and torch.isfinite(obj.module[2].weight).all()
    assert load_checkpoint(tmp_path)[1]["step"] == 2


# ----------------------------------------------------------------------------------------------
# 2. One run per folder


def test_a_live_run_holds_the_folder(tmp_path):
    lock = acquire_lock(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(RunLockedError, match=f"in use by another run \\(process {other.pid}"):
            fit(Regression(), data(), quiet(steps=2), tmp_path)
        assert not (tmp_path / "checkpoint.safetensors").exists() and lock.exists()
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match="stale lock"):  # its process is gone now
        fit(Regression(), data(), quiet(steps=2), tmp_path)
    assert not lock.exists() and load_checkpoint(tmp_path)[1]["step"] == 2


def test_a_lock_from_another_host_is_refused_and_own_locks_are_released(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now"}))
    with pytest.raises(RunLockedError, match="host elsewhere.*delete"):
        fit(Regression(), data(), quiet(steps=2), tmp_path)
    (tmp_path / LOCK_NAME).unlink()

    def boom(obj, step):
        raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        fit(Regression(boom), data(), quiet(steps=2), tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()  # released however the run ends
    release_lock(acquire_lock(tmp_path))
    assert not (tmp_path / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------
# 3. Debris of a crash


def test_debris_is_cleaned_on_start(tmp_path):
    fit(Regression(), data(), quiet(steps=4), tmp_path)
    # what a kill -9 can leave: temporary files, a pointer naming the step before, log lines past
    # the checkpoint (step 5 logged, not checkpointed) and a torn last line
    (tmp_path / ".checkpoint.safetensors.x1.tmp").write_bytes(b"half")
    (tmp_path / ".checkpoint.json.x2.tmp").write_text("{")
    pointer = json.loads((tmp_path / "checkpoint.json").read_text())
    (tmp_path / "checkpoint.json").write_text(json.dumps({**pointer, "step": 2}))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    fit(Regression(), data(), quiet(steps=6), tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 6


def test_pointer_and_log_helpers(tmp_path):
    fit(Regression(), data(), quiet(steps=2), tmp_path)
    ckpt = tmp_path / "checkpoint.safetensors"
    assert not sync_pointer(ckpt)
    (tmp_path / "checkpoint.json").unlink()
    assert sync_pointer(ckpt) and json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2
    assert truncate_log(tmp_path / "log.jsonl", 1) == 1 and logged_steps(tmp_path) == [1]
    assert truncate_log(tmp_path / "nothing.jsonl", 1) == 0


# ----------------------------------------------------------------------------------------------
# 4. Ctrl-C


def test_sigint_writes_a_checkpoint_and_resumes_bit_identically(tmp_path):
    def interrupt(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="SIGINT after step 3") as info:
        fit(Regression(), data(), quiet(steps=8, checkpoint_every=100), tmp_path / "a", callback=interrupt)
    assert info.value.exit_status == 130 and info.value.step == 3
    assert load_checkpoint(tmp_path / "a")[1]["step"] == 3  # written although checkpoint_every is 100
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = fit(Regression(), data(), quiet(steps=8, checkpoint_every=100), tmp_path / "a")
    straight = fit(Regression(), data(), quiet(steps=8, checkpoint_every=100), tmp_path / "b")
    for k, v in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[k], v)
    assert logged_steps(tmp_path / "a") == list(range(1, 9))


def test_a_second_sigint_stops_at_once(tmp_path):
    def interrupt(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("the second SIGINT should have stopped the run before this line")

    with pytest.raises(KeyboardInterrupt) as info:
        fit(Regression(), data(), quiet(steps=8), tmp_path, callback=interrupt)
    assert not isinstance(info.value, TrainingInterrupted)
    assert load_checkpoint(tmp_path)[1]["step"] == 2  # the newest checkpoint is intact
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------
# 5. kill -9 at random moments


DRIVER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from difflab.train import TrainConfig, fit
    torch.set_num_threads(1)

    class Regression:
        name = "regression"
        def __init__(self):
            self.module = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Dropout(0.1), nn.Linear(256, 256), nn.Tanh(),
                                        nn.Linear(256, 1))
        def draw(self, batch, generator):
            return {"noise": 0.1 * torch.randn(batch["x"].shape, generator=generator)}
        def loss(self, batch):
            return (self.module(batch["x"] + batch["noise"])[:, 0] - batch["y"]) ** 2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    torch.manual_seed(0)
    config = TrainConfig(steps=int(sys.argv[2]), batch_size=16, lr=1e-3, ema_decay=0.99, checkpoint_every=3, log_every=1,
                         progress=False, seed=7)
    fit(Regression(), {"x": x, "y": x.sum(1)}, config, sys.argv[1])
    print("finished", flush=True)
""")


def test_kill_9_at_random_moments_resumes_bit_identically(tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    steps, kills = 40, 4
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def start(folder):
        return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(folder), str(steps)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = start(tmp_path / "straight")  # the uninterrupted run, alongside the killed ones

    run, rng, killed = tmp_path / "run", torch.Generator().manual_seed(0), 0
    log = run / "log.jsonl"
    for _ in range(kills):
        done = len(logged_steps(run)) if log.exists() else 0
        proc = start(run)
        target = done + int(torch.randint(1, 6, (), generator=rng))  # a few steps into this life
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= min(target, steps - 1):
                break
            time.sleep(0.002)
        time.sleep(float(torch.rand((), generator=rng)) * 0.05)  # anywhere in the step: forward, update, write
        if proc.poll() is None:
            proc.kill()
            killed += 1
        proc.wait()
    assert killed >= kills
    last = start(run)
    assert "finished" in last.communicate(timeout=300)[0]
    assert "finished" in straight.communicate(timeout=300)[0]

    a, _ = load_checkpoint(tmp_path / "straight")
    b, meta = load_checkpoint(run)
    assert meta["step"] == steps and a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    assert logged_steps(run) == list(range(1, steps + 1))  # every step logged once
    assert not list(run.glob("*.tmp")) and not (run / LOCK_NAME).exists()
    assert json.loads((run / "checkpoint.json").read_text())["step"] == steps
