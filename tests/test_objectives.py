"""The one training loop, fit(objective, data, config): an objective written here and nowhere else
trains, checkpoints and resumes bit-exactly with EMA; the diffusion objective takes data of any
rank; flow matching is the diffusion objective in the Flow frame; two trained modules and a frozen
teacher; divergence stops the run; the learning-rate schedules; TrainConfig's keys are checked."""
import dataclasses
import math

import pytest
import torch
from torch import nn

from difflab.config import ConfigError
from difflab.core import Denoiser, Flow, VPContinuous, VPDiscrete
from difflab.io import load_checkpoint
from difflab.train import DiffusionObjective, TrainConfig, TrainingDivergedError, fit, lr_at


def quiet(**kw):
    return TrainConfig(**{"progress": False, "log_every": 0, "checkpoint_every": 0, **kw})


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------------------------
# (a) A toy objective, defined here only: noisy-input linear regression


class JitterRegression:
    """Per-example squared error of ``module(x + jitter)`` against ``y``; the jitter is drawn in
    ``draw`` from the loop's generator, the module has dropout (the loop's own RNG)."""

    name = "jitter_regression"

    def __init__(self, dim=3, jitter=0.1):
        self.module = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
        self.jitter = jitter

    def draw(self, batch, generator):
        return {"jitter": self.jitter * torch.randn(batch["x"].shape, generator=generator)}

    def loss(self, batch):
        pred = self.module(batch["x"] + batch["jitter"])[:, 0]
        err = (pred - batch["y"]) ** 2
        return {"loss": err, "abs_error": err.sqrt()}


def regression_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3}


def test_a_new_objective_trains_checkpoints_and_resumes_bit_exactly(tmp_path):
    data = regression_data()
    cfg = lambda steps: quiet(steps=steps, batch_size=8, grad_accum=2, lr=3e-2, warmup_steps=2, ema_decay=0.9,  # noqa: E731
                              weight_decay=0.01, log_every=2, seed=5)
    torch.manual_seed(0)
    a = JitterRegression()
    torch.manual_seed(0)
    b = JitterRegression()
    rng = torch.get_rng_state()
    straight = fit(a, data, cfg(8), tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    fit(b, data, cfg(4), tmp_path / "b")
    torch.manual_seed(1)
    c = JitterRegression()  # other initial weights: everything must come from the checkpoint
    resumed = fit(c, data, cfg(8), tmp_path / "b")
    assert straight.step == resumed.step == 8 and resumed.ema.num_updates == 8
    assert_same_state(a.module, c.module)
    assert straight.ema.state_dict().keys() == a.module.state_dict().keys()
    for k, v in straight.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k
    ta, ma = load_checkpoint(tmp_path / "a")
    tb, mb = load_checkpoint(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ma["objective"] == "jitter_regression" and ma["step"] == 8 and ma["ema"]["num_updates"] == 8
    assert {k.split(".")[0] for k in ta} == {"model", "ema", "optim", "rng"}
    # it learned, and its extra term is logged beside the loss
    assert straight.history[-1]["loss"] < 0.75 * straight.history[0]["loss"]
    assert "abs_error" in straight.history[0] and "loss_by_sigma" not in straight.history[0]
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == 4
    # a decaying schedule spans the run's steps: resuming it with other steps is not the same run
    fit(JitterRegression(), data, dataclasses.replace(cfg(4), lr_schedule="cosine"), tmp_path / "cos")
    with pytest.warns(UserWarning, match="changed config.*steps"):
        fit(JitterRegression(), data, dataclasses.replace(cfg(8), lr_schedule="cosine"), tmp_path / "cos")


def test_in_memory_fit_writes_nothing_and_may_skip_ema(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    obj = JitterRegression()
    state = fit(obj, regression_data(), quiet(steps=3, batch_size=8, ema_decay=None, log_every=1))
    assert state.ema is None and state.checkpoint is None and len(state.history) == 3
    assert not list(tmp_path.iterdir())


def test_results_do_not_depend_on_grad_accum():
    data = regression_data()
    runs = []
    for accum in (1, 4):
        torch.manual_seed(0)
        obj = JitterRegression()
        obj.module[2].p = 0.0  # dropout draws differ per micro-batch; the objective's draws must not
        fit(obj, data, quiet(steps=3, batch_size=8, grad_accum=accum, lr=1e-2))
        runs.append(obj.module)
    for p1, p2 in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# (b) The diffusion objective on data of any rank


class FlatNet(nn.Module):
    """net(x_in, t): a two-layer MLP on the flattened example, with the time as an input."""

    def __init__(self, shape, hidden=32):
        super().__init__()
        d = math.prod(shape)
        self.inp, self.out = nn.Linear(d + 1, hidden), nn.Linear(hidden, d)

    def forward(self, x, t):
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), t.to(x.dtype)[:, None] / 100], 1)))
        return self.out(h).reshape(x.shape)


class ConvNet(nn.Module):
    """net(x_in, t): Conv1d or Conv3d layers over (B, C, ...) data, the time added as a bias."""

    def __init__(self, channels, dims):
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
        self.a, self.b, self.t = conv(channels, 8, 3, padding=1), conv(8, channels, 3, padding=1), nn.Linear(1, 8)
        self.dims = dims

    def forward(self, x, t):
        bias = self.t(t.to(x.dtype)[:, None] / 100).reshape(len(x), 8, *([1] * self.dims))
        return self.b(torch.tanh(self.a(x) + bias))


RANKS = {
    "audio (B, C, L)": ((2, 16), lambda: ConvNet(2, 1)),
    "video (B, C, F, H, W)": ((1, 3, 4, 4), lambda: ConvNet(1, 3)),
    "points (B, N, 3)": ((5, 3), lambda: FlatNet((5, 3))),
}


@pytest.mark.parametrize("kind", list(RANKS))
def test_diffusion_objective_on_any_rank_steps_and_resumes(kind, tmp_path):
    shape, make = RANKS[kind]
    data = {"x0": torch.rand(12, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1}
    cfg = lambda steps: quiet(steps=steps, batch_size=4, lr=1e-2, ema_decay=0.9, log_every=1)  # noqa: E731

    def run(steps, out, seed=0):
        torch.manual_seed(seed)
        denoiser = Denoiser(make(), VPDiscrete.from_name("linear", 100), "eps")
        return denoiser, fit(DiffusionObjective(denoiser), data, cfg(steps), out)

    before = make()
    d1, s1 = run(2, tmp_path / "straight")
    assert s1.step == 2 and "loss_by_sigma" in s1.history[0] and math.isfinite(s1.history[-1]["loss"])
    assert any(not torch.equal(p, q) for p, q in zip(before.state_dict().values(), d1.net.state_dict().values()))
    run(1, tmp_path / "resumed")
    d2, s2 = run(2, tmp_path / "resumed", seed=3)
    assert_same_state(d1.net, d2.net)
    tensors, meta = load_checkpoint(tmp_path / "resumed")
    assert meta["objective"] == "diffusion" and meta["step"] == 2 and meta["net_class"] == type(d1.net).__name__
    assert all(torch.equal(v, d1.net.state_dict()[k[len("model."):]]) for k, v in tensors.items() if k.startswith("model."))


class Recorder(nn.Module):
    """net(x_in, t): linear, remembering its inputs and output."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d + 1, d)

    def forward(self, x, t):
        self.seen = (x, t, self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1)))
        return self.seen[2]


def test_flow_matching_is_the_diffusion_objective_in_the_flow_frame():
    """Conditional flow matching (Lipman et al. 2023, eq. 23; Liu et al. 2023, eq. 1): x_t = (1 - t) x0 + t eps,
    the net regresses the velocity eps - x0 at time t; the diffusion objective computes exactly that."""
    torch.manual_seed(0)
    net = Recorder().double()
    obj = DiffusionObjective(Denoiser(net, Flow(), "flow"))
    g = torch.Generator().manual_seed(1)
    batch = obj.draw({"x0": torch.randn(6, 4, generator=g, dtype=torch.float64)}, torch.Generator().manual_seed(2))
    batch = {k: (v.double() if v is not None else None) for k, v in batch.items()}
    loss = obj.loss(batch)
    x0, eps, sigma = batch["x0"], batch["noise"], batch["sigma"]
    t = sigma / (1 + sigma)
    x_t, t_in, out = net.seen
    torch.testing.assert_close(x_t, (1 - t)[:, None] * x0 + t[:, None] * eps)
    torch.testing.assert_close(t_in, t)
    torch.testing.assert_close(loss, ((out - (eps - x0)) ** 2).mean(1))
    assert 0 < float(t.min()) and float(t.max()) < 1  # logit-normal times (Esser et al. 2024)


# ----------------------------------------------------------------------------------------------
# (c) Two trained modules and a frozen teacher


class StudentPair:
    """A student (encoder + head, an nn.ModuleDict, each with its own learning rate) regressing a
    frozen teacher's output on noisy inputs: the shape of a distillation objective."""

    name = "student_pair"

    def __init__(self):
        self.teacher = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).requires_grad_(False)
        self.module = nn.ModuleDict({"encoder": nn.Linear(3, 8), "head": nn.Linear(8, 2)})

    def param_groups(self, config):
        return [{"params": self.module["encoder"].parameters()},
                {"params": self.module["head"].parameters(), "lr": 10 * config.lr}]

    def draw(self, batch, generator):
        return {"sigma": torch.rand(len(batch["x"]), generator=generator),
                "noise": torch.randn(batch["x"].shape, generator=generator)}

    def loss(self, batch):
        x = batch["x"] + batch["sigma"][:, None] * batch["noise"]
        with torch.no_grad():
            target = self.teacher(x)
        return ((self.module["head"](torch.tanh(self.module["encoder"](x))) - target) ** 2).mean(1)


def test_two_trained_modules_and_a_frozen_teacher(tmp_path):
    data = {"x": torch.randn(32, 3, generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(0)
    obj = StudentPair()
    teacher = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    cfg = quiet(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, log_every=3)
    state = fit(obj, data, cfg, tmp_path)
    assert all(torch.equal(obj.teacher.state_dict()[k], v) for k, v in teacher.items())  # the teacher never moved
    assert [g["lr"] for g in state.optimizer.param_groups] == [lr_at(cfg, 5), 10 * lr_at(cfg, 5)]
    tensors, meta = load_checkpoint(tmp_path)
    assert {k for k in tensors if k.startswith("model.")} == {f"model.{k}" for k in obj.module.state_dict()}
    assert not any("teacher" in k for k in tensors) and meta["net_class"] == "ModuleDict"
    assert "loss_by_sigma" in state.history[-1]  # the drawn batch has a sigma: the log bins by it
    # and the pair resumes: a fresh pair continued from step 3 ends where the straight run did
    torch.manual_seed(0)
    half = StudentPair()
    fit(half, data, dataclasses.replace(cfg, steps=3), tmp_path / "half")
    torch.manual_seed(1)
    again = StudentPair()
    again.teacher.load_state_dict(obj.teacher.state_dict())
    fit(again, data, cfg, tmp_path / "half")
    assert_same_state(again.module, obj.module)


# ----------------------------------------------------------------------------------------------
# (d) Divergence


class Exploding(JitterRegression):
    def loss(self, batch):
        out = super().loss(batch)["loss"]
        return out * float("nan") if self.explode else out


def test_nan_stops_before_the_bad_update_through_fit(tmp_path):
    torch.manual_seed(0)
    obj = Exploding()
    obj.explode = False
    good = {}

    def callback(info):
        if info["step"] == 3:
            good.update({k: v.clone() for k, v in obj.module.state_dict().items()})
            obj.explode = True

    with pytest.raises(TrainingDivergedError, match="step 4") as info:
        fit(obj, regression_data(), quiet(steps=10, batch_size=8, lr=1e-2, checkpoint_every=2), tmp_path, callback=callback)
    assert info.value.checkpoint.endswith("checkpoint.safetensors")
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 2
    for k, v in good.items():
        assert torch.equal(obj.module.state_dict()[k], v)  # the NaN step changed nothing


def test_bad_objectives_are_named():
    class NoTrainable(JitterRegression):
        def __init__(self):
            super().__init__()
            self.module.requires_grad_(False)

    with pytest.raises(ValueError, match="nothing to train"):
        fit(NoTrainable(), regression_data(), quiet(steps=1, batch_size=4))

    class Scalar(JitterRegression):
        def loss(self, batch):
            return super().loss(batch)["loss"].mean()

    with pytest.raises(ValueError, match="one loss per example"):
        fit(Scalar(), regression_data(), quiet(steps=1, batch_size=4))

    class ShortDraw(JitterRegression):
        def draw(self, batch, generator):
            return {"jitter": torch.zeros(1, 3)}

    with pytest.raises(ValueError, match="ShortDraw|jitter_regression.*jitter"):
        fit(ShortDraw(), regression_data(), quiet(steps=1, batch_size=4))
    with pytest.raises(ValueError, match="one row per example"):
        fit(JitterRegression(), {"x": torch.zeros(4, 3), "y": torch.zeros(5)}, quiet(steps=1, batch_size=4))


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules and (e) the config's keys


def test_one_cycle_matches_torchs_one_cycle_lr():
    for steps, pct in ((690, 0.3), (500, 0.1), (40, 0.25)):
        net = nn.Linear(1, 1)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=pct)
        cfg = TrainConfig(steps=steps, lr=2e-3, lr_schedule="one_cycle", warmup_steps=round(pct * steps))
        for step in range(steps):
            assert lr_at(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), (steps, step)
            opt.step()
            sched.step()


def test_cosine_matches_torchs_cosine_annealing_and_warms_up():
    net = nn.Linear(1, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    cfg = TrainConfig(steps=50, lr=1.0, lr_schedule="cosine")
    for step in range(50):
        assert lr_at(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    warm = TrainConfig(steps=10, lr=1.0, lr_schedule="cosine", warmup_steps=4)
    assert [lr_at(warm, s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(warm, 9) < 0.1
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_train_config_from_dict_rejects_a_typo_naming_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat' in train.*did you mean 'lr'|'learning_rat'"):
        TrainConfig.from_dict({"learning_rat": 1e-3})
    with pytest.raises(ConfigError, match="'warmup_step'.*did you mean 'warmup_steps'"):
        TrainConfig.from_dict({"steps": 10, "warmup_step": 5})
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig.from_dict({"steps": "ten"})
    cfg = TrainConfig(betas=(0.8, 0.9), ema_decay=None, lr_schedule="one_cycle")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # a checkpoint's config of another version still reads: unknown keys are dropped there only
    assert TrainConfig.from_checkpoint({**cfg.to_dict(), "retired_field": 1}) == cfg
