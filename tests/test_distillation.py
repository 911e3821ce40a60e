"""Distillation objectives for fit: progressive distillation (Salimans & Ho 2022), guided
distillation (Meng et al. 2023), rectified-flow reflow (Liu et al. 2023).

On the oracle's Gaussian mixture the teacher is exact (``gm.network``): the target of progressive
distillation is checked against its closed form and against Algorithm 2 written in VP notation;
a student that outputs the target samples in N/2 DDIM steps what the teacher samples in N; a
tiny MLP trained one round gets close to the teacher's N-step map, closer as it trains; the
round driver resumes and skips finished rounds; the guided student approaches the guided
teacher; the reflowed student's one-step samples beat the teacher's; every objective resumes
bit-exactly."""
import copy
import math

import pytest
import torch
from torch import nn

from difflab.core import Denoiser, Flow, VPDiscrete, grids
from difflab.io import load_checkpoint, read_metadata
from difflab.nn import GuidanceEmbedding, UNet, UNetConfig, timestep_embedding
from difflab.oracle import GaussianMixture, rmse_to_exact
from difflab.samplers.ddim import sample_ddim
from difflab.samplers.flow import sample_flow_euler
from difflab.train import TrainConfig, fit
from difflab.train.objectives import progressive as progressive_module
from difflab.train.objectives.guided import GuidedDistillation, UniformScale, guided_student, guided_x0
from difflab.train.objectives.progressive import (ProgressiveDistillation, progressive_distillation, progressive_target,
                                                  snr_weight)
from difflab.train.objectives.reflow import Reflow, reflow_pairs, straightness

FRAME = VPDiscrete.from_name("linear")
K = 3  # mixture components, also the classes (K is the null class)
GM = GaussianMixture.random(dim=2, components=K, seed=1, mean_scale=1.0, std_range=(0.1, 0.3))


def config(steps, **kw):
    return TrainConfig(**{"steps": steps, "batch_size": 128, "lr": 3e-3, "warmup_steps": 20, "ema_decay": None,
                          "progress": False, "log_every": 0, "checkpoint_every": 0, "seed": 0, **kw})


class EmbNet(nn.Module):
    """net(x_in, t, class_labels=None): an MLP whose time embedding is a submodule ``time_embed``
    (as the U-Net's), so GuidanceEmbedding can add to it."""

    def __init__(self, dim=2, hidden=64, num_classes=None, t_scale=1.0):
        super().__init__()
        self.t_scale = t_scale
        self.time_embed = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp, self.mid, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, dim)

    def forward(self, x, t, class_labels=None):
        h = self.inp(x) + self.time_embed(timestep_embedding(t * self.t_scale, 32).to(x.dtype))
        if self.label_embed is not None and class_labels is not None:
            h = h + self.label_embed(class_labels)
        return self.out(nn.functional.silu(self.mid(nn.functional.silu(h))))


class ClassMixtureNet(nn.Module):
    """The exact class-conditional network of GM: label k is component k alone, the null label K
    (or none) the whole mixture."""

    def __init__(self, frame, prediction):
        super().__init__()
        self.full = GM.network(frame, prediction)
        self.parts = [GaussianMixture([1.0], GM.means[k:k + 1], GM.covs[k:k + 1]).network(frame, prediction) for k in range(K)]

    def forward(self, x, t, class_labels=None):
        out = self.full(x, t)
        for k in range(K if class_labels is not None else 0):
            rows = class_labels == k
            if rows.any():
                out[rows] = self.parts[k](x[rows], t[rows])
        return out


def mixture_data(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(GM.weights, n, replacement=True, generator=g)
    x0 = GM.means[k] + (GM.chol[k] @ torch.randn(n, 2, 1, generator=g, dtype=torch.float64))[..., 0]
    return {"x0": x0.float(), "class_labels": k}


def student_of(net):
    torch.manual_seed(0)
    return Denoiser(net(), FRAME, "v")


# ----------------------------------------------------------------------------------------------
# Progressive distillation: the target


def ddim_vp_two_steps(teacher, x, s, s1, s2):
    """Algorithm 2 of Salimans & Ho 2022 line by line in VP notation: z_t = a_t x0 + s_t eps with
    a = 1 / sqrt(1 + sigma^2), s = a sigma, x_hat(z_t) = D(z_t / a_t; sigma_t); returns x~."""
    a = lambda sigma: 1 / math.sqrt(1 + sigma**2)  # noqa: E731
    (a0, a1, a2), (v0, v1, v2) = (a(s), a(s1), a(s2)), (a(s) * s, a(s1) * s1, a(s2) * s2)
    z = a0 * x
    x_hat = teacher(z / a0, torch.full((len(x),), s, dtype=x.dtype))
    z1 = a1 * x_hat + v1 / v0 * (z - a0 * x_hat)
    x_hat1 = teacher(z1 / a1, torch.full((len(x),), s1, dtype=x.dtype))
    z2 = a2 * x_hat1 + v2 / v1 * (z1 - a1 * x_hat1)
    return (z2 - v2 / v0 * z) / (a2 - v2 / v0 * a0)


def test_the_target_is_algorithm_2_and_has_the_closed_form_of_a_gaussian():
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    full = lambda n: torch.full((64,), n, dtype=torch.float64)  # noqa: E731
    for s, s1, s2 in [(5.0, 2.0, 0.7), (80.0, 10.0, 1.0), (1.0, 0.5, 0.0)]:
        # on the mixture: the canonical target equals the paper's VP formula
        torch.testing.assert_close(progressive_target(GM, x, full(s), full(s1), full(s2)),
                                   ddim_vp_two_steps(GM, x, s, s1, s2), rtol=1e-12, atol=1e-12)
        # data N(mu, c^2 I): D(x; s) - mu = c^2 / (c^2 + s^2) (x - mu), so a DDIM step s -> s' multiplies
        # x - mu by (c^2 + s s') / (c^2 + s^2); two of them by g, and x~ - mu = (g - r) / (1 - r) (x - mu)
        mu, c = torch.tensor([0.3, -1.0], dtype=torch.float64), 0.4
        gauss = GaussianMixture([1.0], mu[None], [c**2])
        gain = (c**2 + s * s1) / (c**2 + s**2) * (c**2 + s1 * s2) / (c**2 + s1**2)
        r = s2 / s
        torch.testing.assert_close(progressive_target(gauss, x, full(s), full(s1), full(s2)),
                                   mu + (gain - r) / (1 - r) * (x - mu), rtol=1e-12, atol=1e-12)


class PerfectStudent(nn.Module):
    """A student that outputs the progressive target exactly at the levels of its grid."""

    def __init__(self, teacher, sigmas):
        super().__init__()
        self.teacher, self.sigmas = teacher, sigmas

    def forward(self, x, sigma):
        i = 2 * int((self.sigmas[::2] - float(sigma[0])).abs().argmin())
        level = lambda j: torch.full_like(sigma, float(self.sigmas[j]))  # noqa: E731
        return progressive_target(self.teacher, x, sigma, level(i + 1), level(i + 2))


def test_a_student_that_meets_the_target_samples_in_half_the_steps_what_the_teacher_does():
    teacher = Denoiser(GM.network(FRAME, "eps"), FRAME, "eps")
    sigmas = grids.for_denoiser(teacher, 16)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * teacher.prior_std(sigmas[0])
    torch.testing.assert_close(sample_ddim(PerfectStudent(teacher, sigmas), x, sigmas[::2]), sample_ddim(teacher, x, sigmas),
                               rtol=1e-10, atol=1e-10)


def test_the_weightings_and_snr_plus_one_is_the_v_loss():
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(snr_weight("truncated_snr", sigma), torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(snr_weight("snr+1", sigma), torch.tensor([5.0, 2.0, 1.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="weighting"):
        snr_weight("min_snr", sigma)
    # (SNR + 1) |x0^ - x~|^2 = |v^ - v~|^2 for a v-predicting student (Salimans & Ho 2022, section 4)
    student = student_of(EmbNet).double()
    x, target = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    out, x_in, alpha, sigma_in = student.net_output(x, sigma)
    v_target = student.target(target, (x - target) / sigma[:, None], sigma)
    torch.testing.assert_close(snr_weight("snr+1", sigma) * ((student(x, sigma) - target) ** 2).mean(1),
                               ((out - v_target) ** 2).mean(1))


# ----------------------------------------------------------------------------------------------
# Progressive distillation: training


def test_one_round_brings_the_half_step_map_close_to_the_teacher_and_the_error_falls(tmp_path):
    teacher = Denoiser(GM.network(FRAME, "v"), FRAME, "v")
    sigmas = grids.for_denoiser(teacher, 8)
    student = student_of(EmbNet)
    objective = ProgressiveDistillation(teacher, sigmas, student=student)
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(123)) * float(teacher.prior_std(sigmas[0]))
    reference = sample_ddim(teacher, x, sigmas)  # the teacher's 8-step DDIM map
    naive = rmse_to_exact(sample_ddim(teacher, x, sigmas[::2]), reference)  # the teacher at 4 steps: 0.24
    errors = [rmse_to_exact(sample_ddim(student, x, sigmas[::2]), reference)]
    for steps in (150, 600):
        fit(objective, mixture_data(), config(steps), tmp_path)
        errors.append(rmse_to_exact(sample_ddim(student, x, sigmas[::2]), reference))
    # measured: 0.71 at init, 0.29 after 150 steps, 0.098 after 600 (the teacher at 4 steps: 0.24)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.5 * naive, (errors, naive)


def test_rounds_halve_the_steps_resume_and_skip_finished_rounds(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = Denoiser(EmbNet(), FRAME, "v")
    data = mixture_data(256)
    cfg = config(6, batch_size=16, ema_decay=0.9)
    rounds = progressive_distillation(teacher, data["x0"], cfg, tmp_path, start_steps=4)
    assert [r.steps for r in rounds] == [2, 1]
    sigmas = grids.for_denoiser(teacher, 4)
    assert torch.equal(rounds[0].sigmas, sigmas[::2]) and torch.equal(rounds[1].sigmas, sigmas[::4])
    assert [r.out_dir.name for r in rounds] == ["round01_2steps", "round02_1steps"]
    meta = read_metadata(rounds[1].out_dir)
    assert meta["objective"] == "progressive_distillation" and meta["metadata"]["student_steps"] == 1
    tensors, _ = load_checkpoint(rounds[1].out_dir)  # the student is the EMA of its round
    assert all(torch.equal(v, tensors[f"ema.{k}"]) for k, v in rounds[1].denoiser.net.state_dict().items())
    assert not any(p.requires_grad is False for p in rounds[1].denoiser.parameters())
    x = torch.randn(8, 2)
    assert sample_ddim(rounds[1].denoiser, x, rounds[1].sigmas).shape == (8, 2)
    # a rerun trains nothing; with round 2 gone it trains round 2 alone, to the same weights
    (rounds[1].out_dir / "checkpoint.safetensors").rename(tmp_path / "round2.safetensors")
    calls = []
    real_fit = progressive_module.fit
    monkeypatch.setattr(progressive_module, "fit", lambda objective, *a, **kw: calls.append(1) or real_fit(objective, *a, **kw))
    again = progressive_distillation(teacher, data["x0"], cfg, tmp_path, start_steps=4)
    assert len(calls) == 1
    for r, s in zip(rounds, again):
        assert all(torch.equal(v, s.denoiser.net.state_dict()[k]) for k, v in r.denoiser.net.state_dict().items())
    progressive_distillation(teacher, data["x0"], cfg, tmp_path, start_steps=4)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="another grid"):
        progressive_distillation(teacher, data["x0"], cfg, tmp_path, start_steps=4, grid="karras")
    with pytest.raises(ValueError, match="halved 2 times"):
        progressive_distillation(teacher, data["x0"], cfg, tmp_path, start_steps=4, rounds=3)


# ----------------------------------------------------------------------------------------------
# Guided distillation


def test_the_guidance_embedding_starts_as_the_wrapped_net_and_copies_with_its_hook():
    unet = UNet(UNetConfig(model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(), num_heads=1,
                           num_classes=3, groups=4))
    with torch.no_grad():
        for p in unet.parameters():  # the U-Net's zero-initialized layers would hide every difference
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    wrapped = GuidanceEmbedding(copy.deepcopy(unet))
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, guidance_scale=4.0, class_labels=labels), unet(x, t, class_labels=labels))
        nn.init.normal_(wrapped.guidance_embed[2].weight)
        copied = copy.deepcopy(wrapped)
        a = copied(x, t, guidance_scale=torch.tensor([1.0, 4.0]), class_labels=labels)
        assert torch.equal(a, wrapped(x, t, guidance_scale=torch.tensor([1.0, 4.0]), class_labels=labels))
        nn.init.zeros_(copied.guidance_embed[2].weight)
        nn.init.zeros_(copied.guidance_embed[2].bias)  # the copy's hook reads the copy's embedding
        assert torch.equal(copied(x, t, guidance_scale=2.0, class_labels=labels), unet(x, t, class_labels=labels))
        assert not torch.equal(wrapped(x, t, guidance_scale=2.0, class_labels=labels), unet(x, t, class_labels=labels))
    assert set(wrapped.state_dict()) == {f"net.{k}" for k in unet.state_dict()} | {
        f"guidance_embed.{k}" for k in wrapped.guidance_embed.state_dict()}
    with pytest.raises(ValueError, match="guidance_scale"):
        wrapped(x, t)
    with pytest.raises(ValueError, match="no submodule"):
        GuidanceEmbedding(EmbNet(), "time_embedding")


def test_stage_one_student_approaches_the_guided_teacher(tmp_path):
    teacher = Denoiser(ClassMixtureNet(FRAME, "v"), FRAME, "v")
    student = student_of(lambda: GuidanceEmbedding(EmbNet(num_classes=K)))
    objective = GuidedDistillation(teacher, {"class_labels": K}, w_min=1.0, w_max=3.0, student=student)
    data = mixture_data()
    n = 512
    g = torch.Generator().manual_seed(5)
    sigma = torch.tensor([0.3, 1.0, 3.0, 10.0])[torch.arange(n) % 4]
    x, labels = data["x0"][:n] + sigma[:, None] * torch.randn(n, 2, generator=g), data["class_labels"][:n]

    def errors(w):  # the student's x0 and the conditional teacher's, each to the guided teacher's
        w = torch.full((n,), w)
        guided = guided_x0(teacher, x, sigma, w, {"class_labels": K}, class_labels=labels)
        return (rmse_to_exact(student(x, sigma, guidance_scale=w, class_labels=labels), guided),
                rmse_to_exact(teacher(x, sigma, class_labels=labels), guided))

    with torch.no_grad():
        # guided_x0 is classifier-free guidance: scale 0 is the unconditional teacher, 1 the conditional
        torch.testing.assert_close(guided_x0(teacher, x, sigma, torch.zeros(n), {"class_labels": K}, class_labels=labels),
                                   teacher(x, sigma))
        before = [errors(w) for w in (1.5, 3.0)]
    history = []
    for steps in (150, 600):
        fit(objective, data, config(steps), tmp_path)
        with torch.no_grad():
            history.append([errors(w)[0] for w in (1.5, 3.0)])
    # measured: w=1.5: 0.90 at init, 0.093 after 150 steps, 0.051 after 600 (conditional teacher: 0.29);
    #           w=3:   1.74, 0.28, 0.17 (conditional teacher: 1.17)
    for j, (start, baseline) in enumerate(before):
        assert start > history[0][j] > history[1][j] and history[1][j] < 0.25 * baseline, (before, history)


# ----------------------------------------------------------------------------------------------
# Reflow


def test_the_reflowed_student_samples_better_in_one_and_two_steps_than_its_teacher(tmp_path):
    frame = Flow()
    teacher = Denoiser(GM.network(frame, "flow"), frame, "flow")
    pairs = reflow_pairs(teacher, 2000, 16, seed=0, shape=(2,))
    # the pairs are the teacher's ODE map, per-sample seeded: another batch size gives the same pairs
    few = reflow_pairs(teacher, 6, 16, seed=0, shape=(2,), batch_size=4)
    assert torch.equal(few["noise"], pairs["noise"][:6])
    torch.testing.assert_close(few["x0"], pairs["x0"][:6])
    torch.manual_seed(0)
    student = Denoiser(EmbNet(t_scale=1000.0), frame, "flow")
    fit(Reflow(student), pairs, config(500), tmp_path)
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(9))

    def judge(denoiser):
        with torch.no_grad():
            one, two = (sample_flow_euler(denoiser, z * float(denoiser.prior_std(s[0])), s)
                        for s in (grids.flow_sigmas(1), grids.flow_sigmas(2)))
            return GM.frechet_to_truth(one), GM.frechet_to_truth(two), straightness(denoiser, z, 16)

    teacher_scores, student_scores = judge(teacher), judge(student)
    # measured: Frechet 1.26 -> 0.003 (one step), 0.26 -> 0.001 (two), straightness 0.33 -> 0.011
    assert all(s < 0.2 * t for s, t in zip(student_scores, teacher_scores)), (teacher_scores, student_scores)


# ----------------------------------------------------------------------------------------------
# Every objective resumes bit-exactly


def progressive_case():
    teacher = Denoiser(GM.network(FRAME, "v"), FRAME, "v")
    return lambda: ProgressiveDistillation(teacher, grids.for_denoiser(teacher, 8), student=Denoiser(EmbNet(), FRAME, "v")), \
        mixture_data(64)


def guided_case():
    teacher = Denoiser(ClassMixtureNet(FRAME, "v"), FRAME, "v")
    return lambda: GuidedDistillation(teacher, {"class_labels": K}, student=guided_student(
        Denoiser(EmbNet(num_classes=K), FRAME, "v"))), mixture_data(64)


def guided_stage_two_case():
    torch.manual_seed(0)
    stage_one = guided_student(Denoiser(EmbNet(num_classes=K), FRAME, "v"))
    nn.init.normal_(stage_one.net.guidance_embed[2].weight, std=0.1)
    sigmas = grids.for_denoiser(stage_one, 4)
    return lambda: ProgressiveDistillation(stage_one, sigmas, student=guided_student(
        Denoiser(EmbNet(num_classes=K), FRAME, "v")), draw_cond=UniformScale(1.0, 3.0)), mixture_data(64)


def reflow_case():
    teacher = Denoiser(GM.network(Flow(), "flow"), Flow(), "flow")
    return lambda: Reflow(Denoiser(EmbNet(t_scale=1000.0), Flow(), "flow")), reflow_pairs(teacher, 64, 4, seed=0, shape=(2,))


@pytest.mark.parametrize("case", [progressive_case, guided_case, guided_stage_two_case, reflow_case],
                         ids=["progressive", "guided", "guided_stage_two", "reflow"])
def test_each_objective_resumes_bit_exactly(tmp_path, case):
    make, data = case()
    cfg = lambda steps: config(steps, batch_size=16, grad_accum=2, ema_decay=0.9, warmup_steps=2, seed=3)  # noqa: E731
    torch.manual_seed(0)
    a = make()
    initial = copy.deepcopy(a.module.state_dict())
    torch.manual_seed(0)
    b = make()
    straight = fit(a, data, cfg(6), tmp_path / "a")
    fit(b, data, cfg(3), tmp_path / "b")
    torch.manual_seed(1)
    c = make()  # other initial weights: everything must come from the checkpoint
    resumed = fit(c, data, cfg(6), tmp_path / "b")
    assert straight.step == resumed.step == 6
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, c.module.state_dict()[k]), k
    ta, _ = load_checkpoint(tmp_path / "a")
    tb, _ = load_checkpoint(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(v, initial[k]) for k, v in a.module.state_dict().items())  # it trained
