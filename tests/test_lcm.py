"""Latent consistency distillation (Luo et al. 2023, Algorithm 1) and LCM-LoRA on a tiny latent
text-to-image model: the loss equals Algorithm 1 written in VP notation as diffusers' LCD scripts
compute it (float64), the boundary holds, resume is bit-exact, training lowers the loss, the
student samples in the text-to-image pipeline at 1-4 steps with one evaluation per step, and an
LCM-LoRA file in diffusers' layout plugs into the base model (difflab's) and into diffusers' U-Net."""
import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from difflab.adapters import inject_lora, lora_parameters, lora_state_dict
from difflab.core import ConsistencyFunction, Denoiser, VPDiscrete, grids
from difflab.data import load_digits
from difflab.demos import text as dt
from difflab.io import load_checkpoint
from difflab.nn.text import build_vocab
from difflab.nn.unet import UNet, UNetConfig
from difflab.pipelines import text_to_image
from difflab.pipelines.common import encode_prompts
from difflab.train import TrainConfig, fit
from difflab.train.loop import draw_step
from difflab.train.objectives.lcm import (LatentConsistencyDistillation, apply_lcm_lora, caption_conditioning,
                                          lcm_lora_student, lcm_student, save_lcm_lora, skipping_timesteps)

F64 = torch.float64
TINY = dataclasses.replace(dt.DEMO, vae_channels=(8, 16, 16), text_width=16, text_layers=1, unet_channels=16)
PROMPTS = ["a handwritten seven", "the digit 3", "digit zero"]


def perturb(module: nn.Module, std: float, seed: int) -> None:
    """Move every weight off its init (zero-initialized output layers included), so the random nets matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture(scope="module")
def model():
    """A random latent text model in the text demo's layout: VAE (16x16x1 <-> 4x4x4), TinyTextEncoder,
    ADM U-Net with cross-attention predicting v in a cosine VP frame of T = 1000; 32 captioned digits."""
    images, labels = load_digits(16, split="train")
    images, labels = images[:32], labels[:32]
    vocab = build_vocab([dt.caption(d, t) for d in range(10) for t in dt.TRAIN_TEMPLATES])
    vae, text, net, denoiser = dt.build_models(TINY, vocab)
    perturb(net, 0.1, 0)
    teacher = Denoiser(net.unet, denoiser.frame, "v").eval()
    with torch.no_grad():
        latents = vae.encode_latents(images, torch.Generator().manual_seed(0))
    captions = [dt.caption(int(d), dt.TRAIN_TEMPLATES[i % len(dt.TRAIN_TEMPLATES)]) for i, d in enumerate(labels)]
    cond, uncond = caption_conditioning(text, captions)
    return {"vae": vae.eval(), "text": text.eval(), "teacher": teacher, "data": {"x0": latents, **cond}, "uncond": uncond}


def config(steps, **kw):
    return TrainConfig(**{**dict(steps=steps, batch_size=8, lr=1e-3, ema_decay=None, checkpoint_every=0, log_every=0,
                                 progress=False, seed=0), **kw})


# ----------------------------------------------------------------------------------------------
# The math


def test_skipping_schedule_is_lcms():
    start, end = skipping_timesteps(1000, 50)
    assert start[0] == 19 and start[-1] == 999 and bool((start.diff() == 20).all())
    assert end[0] == 0 and bool((start[1:] - end[1:] == 20).all())  # k = 20; the first pair ends at the boundary
    assert set(grids.lcm_timesteps(1000, 50).tolist()) == set(start.tolist())  # what the LCM sampler picks from
    with pytest.raises(ValueError, match="original_steps"):
        skipping_timesteps(1000, 2000)


def reference_lcd_loss(teacher_net, student_net, frame, batch, n, k=20, takes_w=False):
    """Algorithm 1 in VP notation, as diffusers' train_lcm_distill_*_sd_wds.py compute it: z = a x0 + s eps,
    v-prediction, the teacher's CFG in LCM's form with omega = w - 1 on x0 and eps, a DDIM step, the
    boundary scalings of the timesteps, mean squared error per example."""
    a, s = frame.alpha_bars.sqrt(), (1 - frame.alpha_bars).sqrt()
    start = (torch.arange(1, 51) * k - 1)[n]
    end = (start - k).clamp(min=0)
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    ctx, mask, w = batch["context"], batch["context_mask"], batch["guidance_scale"]
    w_in = {"guidance_scale": w} if takes_w else {}

    def x0_eps(net, z, t, **kw):
        v = net(z, t.to(F64), **kw)
        return col(a[t]) * z - col(s[t]) * v, col(a[t]) * v + col(s[t]) * z

    def scalings(t):
        u = 10.0 * t.to(F64)
        return col(0.25 / (u**2 + 0.25)), col(u / (u**2 + 0.25).sqrt())

    z = col(a[start]) * batch["x0"] + col(s[start]) * batch["noise"]
    c_skip, c_out = scalings(start)
    model_pred = c_skip * z + c_out * x0_eps(student_net, z, start, context=ctx, context_mask=mask, **w_in)[0]
    c_x0, c_eps = x0_eps(teacher_net, z, start, context=ctx, context_mask=mask)
    u_x0, u_eps = x0_eps(teacher_net, z, start, context=torch.zeros_like(ctx), context_mask=torch.zeros_like(mask))
    omega = col(w - 1)
    pred_x0, pred_eps = c_x0 + omega * (c_x0 - u_x0), c_eps + omega * (c_eps - u_eps)
    x_prev = col(a[end]) * pred_x0 + col(s[end]) * pred_eps
    c_skip, c_out = scalings(end)
    target = c_skip * x_prev + c_out * x0_eps(student_net, x_prev, end, context=ctx, context_mask=mask, **w_in)[0]
    return (model_pred - target).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("w_input", [True, False], ids=["lcm-w-embedding", "lcm-lora-style"])
def test_loss_is_algorithm_1_in_vp_notation(w_input):
    torch.manual_seed(0)
    frame = VPDiscrete.from_name("cosine", 1000)
    unet = UNet(UNetConfig(in_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                           num_heads=4, context_dim=8, groups=8)).to(F64)
    perturb(unet, 0.1, 1)
    teacher = Denoiser(unet, frame, "v")
    if w_input:
        student = lcm_student(teacher)
    else:
        student = ConsistencyFunction(Denoiser(copy.deepcopy(unet), frame, "v"), form="lcm")
    perturb(student, 0.05, 2)  # the student differs from the teacher (and its w-embedding is not zero)
    objective = LatentConsistencyDistillation(teacher, {"context": torch.zeros(6, 8, dtype=F64),
                                                        "context_mask": torch.zeros(6, dtype=torch.bool)},
                                              student=student, target_ema=0.0)
    g = torch.Generator().manual_seed(3)
    n = torch.tensor([0, 1, 25, 49])  # the boundary pair (t_n = 0), the first inner one, the middle, t_{n+k} = 999
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    start, end = skipping_timesteps(1000, 50)
    batch = {"x0": torch.randn(4, 4, 4, 4, generator=g, dtype=F64), "noise": torch.randn(4, 4, 4, 4, generator=g, dtype=F64),
             "sigma": frame.sigmas[start[n]], "sigma_lower": frame.sigmas[end[n]],
             "guidance_scale": torch.tensor([1.0, 2.5, 4.0, 7.5], dtype=F64),
             "context": torch.randn(4, 6, 8, generator=g, dtype=F64), "context_mask": mask}
    with torch.no_grad():
        ours = objective.loss(batch)
        want = reference_lcd_loss(unet, student.net, frame, batch, n, takes_w=w_input)
    assert bool((want > 1e-6).all())
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=0)


def test_the_boundary_holds(model):
    """f(x, sigma(t = 0)) is the VP input x / sqrt(1 + sigma^2) whatever the network says, so the
    first pair's target is the teacher's DDIM point itself."""
    frame = VPDiscrete.from_name("cosine", 1000)

    class Wild(nn.Module):
        def forward(self, x_in, t, **cond):
            return 1e6 * torch.sin(7 * x_in + t.reshape(-1, 1, 1, 1))

    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    f = ConsistencyFunction(Denoiser(Wild(), frame, "v"), form="lcm")
    s0 = frame.sigmas[0]
    torch.testing.assert_close(f(x, s0), x / (1 + s0**2).sqrt(), rtol=1e-12, atol=1e-9)
    student = lcm_student(model["teacher"])
    perturb(student.net.guidance_embed, 0.1, 4)
    x32 = x.float()
    cond = {k: v[:3] for k, v in model["data"].items() if k != "x0"}
    with torch.no_grad():
        out = student(x32, s0.float(), guidance_scale=4.0, **cond)
    torch.testing.assert_close(out, x32 / (1 + s0.float() ** 2).sqrt(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Training


def test_resume_is_bit_exact(model, tmp_path):
    """fit 2 steps, resume to 4 == 4 straight: student, EMA target (mu = 0.95), the loop's EMA, the step buffer."""
    teacher, data, uncond = model["teacher"], model["data"], model["uncond"]

    def make():
        return LatentConsistencyDistillation(teacher, uncond, student=lcm_student(teacher), w_min=1.5, w_max=4.0)

    cfg = lambda steps: config(steps, ema_decay=0.9, checkpoint_every=2, seed=3)  # noqa: E731
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(0)
    b = make()
    fit(a, data, cfg(4), tmp_path / "a")
    fit(b, data, cfg(2), tmp_path / "b")
    torch.manual_seed(1)
    c = make()  # other initial w-embedding: everything must come from the checkpoint
    fit(c, data, cfg(4), tmp_path / "b")
    assert int(c.module.step) == 4 and "target" in c.module
    for key, v in a.module.state_dict().items():
        assert torch.equal(v, c.module.state_dict()[key]), key
    ta, _ = load_checkpoint(tmp_path / "a")
    tb, _ = load_checkpoint(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_few_steps_lower_the_lcd_loss(model):
    teacher, data = model["teacher"], model["data"]
    objective = LatentConsistencyDistillation(teacher, model["uncond"], student=lcm_student(teacher), w_min=1.5,
                                              w_max=4.0, target_ema=0.0)
    cfg = config(20, batch_size=16)
    held = [draw_step(objective, data, dataclasses.replace(cfg, seed=99), s) for s in range(3)]  # fixed draws

    def lcd_loss():
        with torch.no_grad():
            return float(torch.stack([objective.loss(b).mean() for b in held]).mean())

    before = lcd_loss()
    fit(objective, data, cfg)
    after = lcd_loss()
    print(f"LCD loss on held-out draws: {before:.5f} -> {after:.5f} after 20 steps")
    assert after < 0.6 * before, (before, after)  # measured: 0.0065 -> 0.0022


# ----------------------------------------------------------------------------------------------
# Sampling


def test_student_samples_in_the_pipeline_with_one_evaluation_per_step(model):
    """text_to_image with sampler="lcm", grid="lcm": the scale goes in as an input (GuidanceInput), one
    call of the batch a step, no unconditional branch; one step is f(x_T) itself."""
    student = lcm_student(model["teacher"]).eval()
    perturb(student.net.guidance_embed, 0.1, 5)
    calls = []
    student.net.register_forward_pre_hook(lambda m, args, kw: calls.append((len(args[0]), kw["guidance_scale"])),
                                          with_kwargs=True)
    z = torch.randn(len(PROMPTS), 4, 4, 4, generator=torch.Generator().manual_seed(0))
    run = dict(sampler="lcm", grid="lcm", guidance_scale=3.0, height=16, width=16, seed=0, progress=False)
    for steps in (1, 2, 4):
        calls.clear()
        latents = text_to_image(student, model["text"], model["vae"], PROMPTS, steps=steps, latents=z,
                                output_type="latent", **run)
        assert calls == [(len(PROMPTS), 3.0)] * steps and bool(latents.isfinite().all())
        if steps == 1:
            cond, _, _ = encode_prompts(model["text"], PROMPTS, guided=False)
            sigma = grids.for_denoiser(student, 1, grid="lcm")[0]
            with torch.no_grad():
                one = student(z * student.prior_std(sigma), sigma, guidance_scale=3.0, **cond)
            torch.testing.assert_close(latents, one, rtol=0, atol=1e-6)
    assert torch.equal(grids.for_denoiser(student, 4, grid="lcm"),
                       grids.timestep_sigmas(student.frame, torch.tensor([999, 759, 499, 259])))
    images = text_to_image(student, model["text"], model["vae"], PROMPTS, steps=4, output_type="pt", **run)
    assert images.shape == (len(PROMPTS), 1, 16, 16) and bool(images.isfinite().all())
    tcd = text_to_image(student, model["text"], model["vae"], PROMPTS, steps=4, output_type="pt",
                        **{**run, "sampler": "tcd"}, gamma=0.3)  # TCD's gamma through the same pipeline
    assert bool(tcd.isfinite().all()) and not torch.equal(tcd, images)


# ----------------------------------------------------------------------------------------------
# LCM-LoRA


def test_lcm_lora_trains_the_adapter_alone_and_plugs_into_the_base_model(model, tmp_path):
    teacher, data = model["teacher"], model["data"]
    base = copy.deepcopy(teacher.net.state_dict())
    student = lcm_lora_student(teacher, rank=4, generator=torch.Generator().manual_seed(0))
    objective = LatentConsistencyDistillation(teacher, model["uncond"], student=student, w_min=1.5, w_max=4.0,
                                              target_ema=0.0)
    assert not objective.takes_w  # LCM-LoRA's network takes no w: the guidance is baked in
    fit(objective, data, config(4))
    # 1. only A and B moved; the teacher and the student's base weights are the base model's
    state = student.net.state_dict()
    assert all(torch.equal(v, state[k]) and torch.equal(v, teacher.net.state_dict()[k]) for k, v in base.items())
    assert all(p.abs().max() > 0 for p in lora_parameters(student.net, "lcm"))
    assert any(".lora_B.lcm." in k for k in objective.module.state_dict())  # checkpoints hold the adapter
    # 2. the file: the adapter alone, in diffusers' layout
    path = save_lcm_lora(tmp_path / "lcm_lora", student)
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert keys == {f"unet.{k}" for k in lora_state_dict(student.net, "lcm")}
    assert json.loads(header["lora_adapter_metadata"])["unet.r"] == 4
    # 3. base model + file == the student, and it samples with the LCM sampler at 4 steps (guidance 1)
    plugged = apply_lcm_lora(Denoiser(copy.deepcopy(teacher.net), teacher.frame, "v"), path).eval()
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = {k: v[:3] for k, v in data.items() if k != "x0"}
    with torch.no_grad():
        torch.testing.assert_close(plugged(x, 20.0, **cond), student(x, 20.0, **cond), rtol=0, atol=1e-6)
    run = dict(sampler="lcm", grid="lcm", steps=4, guidance_scale=1.0, height=16, width=16, seed=0, output_type="pt",
               progress=False)
    ours = text_to_image(plugged, model["text"], model["vae"], PROMPTS, **run)
    torch.testing.assert_close(ours, text_to_image(student.eval(), model["text"], model["vae"], PROMPTS, **run),
                               rtol=0, atol=1e-5)
    without = text_to_image(ConsistencyFunction(teacher, form="lcm"), model["text"], model["vae"], PROMPTS, **run)
    assert (ours - without).abs().max() > 1e-4 and bool(ours.isfinite().all())


def test_lcm_lora_file_loads_into_diffusers_unet(tmp_path):
    """A file written for difflab's UNetSD (diffusers' module names), mixed ranks and alphas, loads with
    diffusers' own LoRA loader (peft) into UNet2DConditionModel and gives the same outputs."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
    from test_unet_sd import SD1_TINY, tiny_diffusers_unet

    from difflab.nn.unet_sd import UNetSD, UNetSDConfig

    ref = tiny_diffusers_unet(**SD1_TINY)
    net = UNetSD(UNetSDConfig.from_diffusers_config(dict(ref.config))).eval()
    net.load_state_dict(ref.state_dict())
    teacher = Denoiser(net, VPDiscrete.from_name("scaled_linear", 1000), "eps")
    student = lcm_lora_student(teacher, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"], rank=4, alpha=8,
                               generator=torch.Generator().manual_seed(0))
    inject_lora(student.net, ["conv1", "time_emb_proj"], rank=2, alpha=6, name="lcm")  # other rank and alpha
    perturb(nn.ParameterList(lora_parameters(student.net, "lcm")), 0.1, 1)
    path = save_lcm_lora(tmp_path, student)
    state, alphas, meta = Loader.lora_state_dict(str(tmp_path), weight_name=path.name, return_lora_metadata=True)
    assert meta["unet.rank_pattern"] and meta["unet.alpha_pattern"]
    Loader.load_lora_into_unet(state, alphas, unet=ref, metadata=meta)
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 637.0]), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = student.net(x, t, context=ctx)
        assert (want - net(x, t, context=ctx)).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
