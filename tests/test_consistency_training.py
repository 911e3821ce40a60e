"""Consistency distillation and consistency training through the one loop: their pieces on closed
forms, a small MLP student on the Gaussian-mixture oracle getting closer to the exact ODE map
(noise -> data) as it trains, bit-exact resume (the EMA target and the curriculum included), the
boundary condition after training, and a NaN stopping the run."""
import math

import pytest
import torch
from torch import nn

from difflab.core import EDM, ConsistencyFunction, append_dims
from difflab.core.noise_levels import adjacent_levels, karras_levels
from difflab.io import load_checkpoint
from difflab.oracle import GaussianMixture, rmse_to_exact, single_gaussian_ode
from difflab.train import ConsistencyDistillation, ConsistencyTraining, TrainConfig, TrainingDivergedError, fit
from difflab.train.objectives.consistency import discretization_steps, huber_c, pseudo_huber, teacher_ode_step

F64 = torch.float64
SIGMA_MAX = 10.0
GM = GaussianMixture.random(2, 3, seed=0)


class MLP(nn.Module):
    """F(x_in, t): two hidden SiLU layers on (x_in, t) for 2-D data."""

    def __init__(self, d=2, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, d))

    def forward(self, x_in, t):
        return self.net(torch.cat([x_in, t.to(x_in.dtype)[:, None]], 1))


def student(seed=0):
    torch.manual_seed(seed)
    return ConsistencyFunction(MLP(), EDM(sigma_data=0.5, sigma_min=0.002, sigma_max=SIGMA_MAX))


def quiet(**kw):
    return TrainConfig(**{"progress": False, "log_every": 0, "checkpoint_every": 0, "ema_decay": None, **kw})


def data(n=4096):
    return {"x0": GM.sample(n, torch.Generator().manual_seed(0)).float()}


# ----------------------------------------------------------------------------
# The pieces

def test_pseudo_huber_curriculum_and_levels():
    a, b = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64), torch.zeros(2, 2, dtype=F64)
    c = huber_c(a)
    assert c == pytest.approx(0.00054 * math.sqrt(2))
    torch.testing.assert_close(pseudo_huber(a, b, c), torch.tensor([math.sqrt(25 + c**2) - c, 0.0], dtype=F64))
    # N(k) doubles from s0 + 1 to s1 + 1 over K steps (K' = K / 8 for 10 -> 1280)
    assert [discretization_steps(k, 800) for k in (0, 99, 100, 250, 699, 700, 799)] == [11, 11, 21, 41, 641, 1281, 1281]
    assert [discretization_steps(k, 8) for k in range(9)] == [11, 21, 41, 81, 161, 321, 641, 1281, 1281]
    levels = karras_levels(18, 0.002, 80.0)
    assert float(levels[0]) == pytest.approx(0.002, rel=1e-12) and float(levels[-1]) == pytest.approx(80.0, rel=1e-12)
    assert bool((levels.diff() > 0).all())
    # iCT's discretized log-normal: the frequency of pair i is the mass of ln sigma in [ln s_i, ln s_{i+1}]
    i = adjacent_levels(levels, 40000, torch.Generator().manual_seed(0), p_mean=-1.1, p_std=2.0)
    cdf = torch.distributions.Normal(-1.1, 2.0).cdf(levels.log())
    p = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    torch.testing.assert_close(torch.bincount(i, minlength=17).double() / 40000, p, rtol=0, atol=0.01)
    assert set(adjacent_levels(levels, 1000, torch.Generator().manual_seed(0)).tolist()) == set(range(17))


def test_teacher_step_is_the_ode_solvers_step():
    """On N(mu, s^2 I) data the ODE is closed-form (Karras et al. 2022, eq. 4): Heun's step is
    third-order accurate locally, Euler's second."""
    mu, s = torch.tensor([0.3, -0.2], dtype=F64), 0.5
    teacher = lambda x, sigma: mu + (x - mu) * append_dims(s**2 / (s**2 + sigma**2), x.ndim)  # noqa: E731
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    hi = torch.full((4,), 1.0, dtype=F64)

    def error(solver, h):
        exact = single_gaussian_ode(x, 1.0, 1.0 - h, mu, s)
        return float((teacher_ode_step(teacher, x, hi, hi - h, solver) - exact).abs().max())

    assert error("heun", 0.1) / error("heun", 0.05) == pytest.approx(8, rel=0.15)  # local error O(h^3)
    assert error("euler", 0.1) / error("euler", 0.05) == pytest.approx(4, rel=0.15)  # O(h^2)
    assert error("heun", 0.1) < 0.1 * error("euler", 0.1)


def test_consistency_training_loss_is_the_formula():
    f = student().double()
    obj = ConsistencyTraining(f, total_steps=100)
    x0 = GM.sample(6, torch.Generator().manual_seed(1))
    batch = {"x0": x0, **obj.draw({"x0": x0}, torch.Generator().manual_seed(2))}
    lo, hi, z = batch["sigma_lower"], batch["sigma"], batch["noise"]
    assert bool((hi > lo).all()) and torch.isin(hi, karras_levels(11, 0.002, SIGMA_MAX)).all()
    with torch.no_grad():
        a, b = f(x0 + hi[:, None] * z, hi), f(x0 + lo[:, None] * z, lo)
        expected = (((a - b) ** 2).sum(1) + huber_c(x0) ** 2).sqrt().sub(huber_c(x0)) / (hi - lo)
        torch.testing.assert_close(obj.loss(batch), expected, rtol=1e-12, atol=0)
    # the draws come from the generator alone
    again = obj.draw({"x0": x0}, torch.Generator().manual_seed(2))
    assert all(torch.equal(again[k], batch[k]) for k in again)


# ----------------------------------------------------------------------------
# Learning the exact ODE map of the oracle

def one_step_errors():
    """The RMSE of f(x, sigma) against the exact ODE solution to 0, at sigma_max and at sigma = 2."""
    cases = []
    for sigma in (SIGMA_MAX, 2.0):
        x = GM.sample(512, torch.Generator().manual_seed(1)) + sigma * torch.randn(
            512, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
        cases.append((sigma, x, GM.exact_ode_solution(x, (sigma, 0.0), rtol=1e-8, atol=1e-8)))

    @torch.no_grad()
    def errors(f):
        return [rmse_to_exact(f(x.float(), sigma).double(), exact) for sigma, x, exact in cases]

    return errors


def train_and_record(objective, f, steps, record_at, lr=3e-3):
    errors = one_step_errors()
    seen = {0: errors(f)}
    callback = lambda info: seen.update({info["step"]: errors(f)}) if info["step"] in record_at else None  # noqa: E731
    state = fit(objective, data(), quiet(steps=steps, batch_size=256, lr=lr, lr_schedule="cosine", grad_clip=None,
                                         log_every=steps // 4), callback=callback)
    return seen, state


def test_distillation_from_the_exact_teacher_approaches_the_exact_ode_map():
    f = student()
    seen, _ = train_and_record(ConsistencyDistillation(f, GM.denoiser, N=18), f, 600, {150, 600})
    (e0, _), (e150, _), (e600, _) = seen[0], seen[150], seen[600]
    assert e150 < 0.6 * e0 and e600 < 0.8 * e150, seen  # measured: 0.218, 0.101, 0.062
    x = torch.randn(8, 2)
    assert torch.equal(f(x, 0.002), x)  # the boundary condition, after training too


def test_consistency_training_without_a_teacher_improves_the_one_step_map():
    f = student()
    seen, state = train_and_record(ConsistencyTraining(f, total_steps=800), f, 800, {800})
    (e0, e0_mid), (e800, e800_mid) = seen[0], seen[800]
    assert e800 < 0.5 * e0 and e800_mid < 0.5 * e0_mid, seen  # measured: (0.218, 0.139) -> (0.075, 0.047)
    assert int(state.module.step) == 800 and state.history[-1]["loss"] < state.history[0]["loss"]


# ----------------------------------------------------------------------------
# The loop: resume, NaN

@pytest.mark.parametrize("kind", ["distillation", "training"])
def test_resume_is_bit_exact(kind, tmp_path):
    def objective(seed):
        f = student(seed)
        if kind == "distillation":  # an EMA target, updated in after_step
            return ConsistencyDistillation(f, GM.denoiser, N=10, target_ema=0.9, solver="euler")
        return ConsistencyTraining(f, total_steps=8)  # the curriculum doubles N every step

    cfg = lambda steps: quiet(steps=steps, batch_size=16, lr=1e-2, ema_decay=0.9, seed=3)  # noqa: E731
    rows = data(64)
    fit(objective(0), rows, cfg(8), tmp_path / "straight")
    fit(objective(0), rows, cfg(4), tmp_path / "resumed")
    state = fit(objective(1), rows, cfg(8), tmp_path / "resumed")  # other weights: all must come from the checkpoint
    ta, ma = load_checkpoint(tmp_path / "straight")
    tb, mb = load_checkpoint(tmp_path / "resumed")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert int(ta["model.step"]) == 8 and ma["objective"] == mb["objective"] == f"consistency_{kind}"
    assert int(state.module.step) == 8
    if kind == "distillation":
        assert not torch.equal(ta["model.target.denoiser.net.net.0.weight"], ta["model.student.denoiser.net.net.0.weight"])


def test_a_nan_from_the_teacher_stops_the_run():
    obj = ConsistencyDistillation(student(), lambda x, sigma: x * math.nan, N=5)
    with pytest.raises(TrainingDivergedError, match="step 1"):
        fit(obj, data(32), quiet(steps=3, batch_size=8))
    with pytest.raises(ValueError, match="solver"):
        ConsistencyDistillation(student(), GM.denoiser, solver="rk4")
    with pytest.raises(ValueError, match="distance"):
        ConsistencyTraining(student(), total_steps=10, distance="lpips")
