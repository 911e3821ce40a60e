"""Text to image: parity with diffusers' StableDiffusionPipeline on tiny random components loaded
from a diffusers folder, per-sample seeds, negative prompts, guidance rescale, bad input."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from difflab.core import Denoiser, VPDiscrete
from difflab.io.diffusers_folder import load_diffusers_folder, make_denoiser
from difflab.nn.text import TinyTextEncoder
from difflab.nn.unet_sd import PRESETS as UNET_PRESETS, UNetSD
from difflab.nn.vae import PRESETS as VAE_PRESETS, AutoencoderKL as DifflabVAE
from difflab.pipelines import text_to_image

transformers = pytest.importorskip("transformers", reason="the CLIP text encoder needs transformers (the 'sd' extra)")
from test_text import tiny_clip, write_tiny_tokenizer  # noqa: E402
from test_unet_sd import SD1_TINY, tiny_diffusers_unet  # noqa: E402

SD1_PIPE = {**SD1_TINY, "cross_attention_dim": 32}  # fits the tiny CLIP's width
VAE_TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PROMPTS, NEGATIVES = ["a photo of abc", "b"], ["", "c d"]


def tiny_diffusers_vae(seed=0):
    """A random diffusers AutoencoderKL whose posterior is (nearly) a point mass: logvar = -30, so
    std = 3e-7 and a posterior sample equals the mean to ~1e-6, whoever draws the noise."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_TINY).eval()
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30.0
    return vae


def ddim_scheduler(**kw):
    return DDIMScheduler(**{**SD_BETAS, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 1, **kw})


def build_pipeline(folder, tokenizer_dir, unet_config=SD1_PIPE, pipeline_class=StableDiffusionPipeline, prediction="epsilon"):
    """A tiny random diffusers pipeline, saved to ``folder``; returns (diffusers pipe, difflab components)."""
    scheduler = ddim_scheduler(prediction_type=prediction)
    pipe = pipeline_class(vae=tiny_diffusers_vae(), text_encoder=tiny_clip(), unet=tiny_diffusers_unet(**unet_config),
                          tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir)), scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe, load_diffusers_folder(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tokenizer_dir):
    return build_pipeline(tmp_path_factory.mktemp("sd"), tokenizer_dir)


def parity_error(ours, theirs) -> float:
    """Max |ours - theirs| in units of max(1, RMS(theirs)): 1e-4 absolute for unit-scale latents. The
    random U-Net predicts eps unrelated to the noise, so its final latents reach |x| ~ 50 (RMS ~ 10)
    and float32 rounding grows with them."""
    assert theirs.abs().max() > 0.1  # a real signal, not zeros
    return float((ours - theirs).abs().max()) / max(1.0, float(theirs.pow(2).mean().sqrt()))


def start_latents(n=2, seed=5):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run_both(pipe, parts, scheduler, sampler, *, spacing, steps_offset, steps=6, guidance_scale=5.0, theirs_scale=1.0,
             output_type="latent", **kw):
    """diffusers' pipeline with ``scheduler`` and difflab's text_to_image with ``sampler`` on the
    same prompts, negatives and starting latents; returns (ours, theirs)."""
    latents = start_latents()
    pipe.scheduler = scheduler
    with torch.no_grad():
        theirs = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, guidance_scale=guidance_scale,
                      latents=latents * theirs_scale, output_type=output_type, **kw).images
    ours = text_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, negative_prompts=NEGATIVES, sampler=sampler,
                         steps=steps, spacing=spacing, steps_offset=steps_offset, guidance_scale=guidance_scale,
                         latents=latents, output_type=output_type, progress=False, **kw)
    return ours, theirs


# diffusers' DDIM steps from t to t - T // steps, which is the next timestep of the "trailing" grid only
# when steps divides T (never for "linspace"): parity is checked where diffusers walks its own grid.
@pytest.mark.parametrize("spacing,offset,steps", [("leading", 1, 6), ("trailing", 0, 5)])
def test_ddim_matches_stable_diffusion_pipeline(sd, spacing, offset, steps):
    pipe, parts = sd
    sched = ddim_scheduler(timestep_spacing=spacing, steps_offset=offset)
    ours, theirs = run_both(pipe, parts, sched, "ddim", spacing=spacing, steps_offset=offset, steps=steps)
    err = parity_error(ours, theirs)
    assert err < 1e-4, err
    # the decoded images too (diffusers' "np": (B, H, W, C) in [0, 1])
    ours_np, theirs_np = run_both(pipe, parts, sched, "ddim", spacing=spacing, steps_offset=offset, steps=steps, output_type="np")
    assert ours_np.shape == theirs_np.shape == (2, 16, 16, 3)
    assert np.abs(ours_np - theirs_np).max() < 1e-4


# (diffusers' Euler with "linspace" keeps fractional timesteps and interpolates sigma linearly; difflab
# rounds them, as diffusers' DDIM does: another grid, so no parity is expected there.)
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
def test_euler_matches_stable_diffusion_pipeline(sd, spacing, offset):
    pipe, parts = sd
    sched = EulerDiscreteScheduler.from_config(ddim_scheduler().config, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(6)
    # diffusers' Euler starts from latents * init_noise_sigma, which is sqrt(sigma_max^2 + 1) (our
    # prior_std) for "leading" but sigma_max for "trailing"/"linspace": give it the same start.
    s_max = float(sched.sigmas.max())
    scale = 1.0 if spacing == "leading" else math.sqrt(s_max**2 + 1) / s_max
    ours, theirs = run_both(pipe, parts, sched, "euler", spacing=spacing, steps_offset=offset, theirs_scale=scale)
    err = parity_error(ours, theirs)
    assert err < 1e-4, err


def test_guidance_rescale_matches_diffusers_for_an_x0_model(sd, tmp_path, tokenizer_dir):
    """We rescale the guided x0_hat; diffusers rescales the raw network output. They agree when the
    network predicts x0 (prediction_type="sample") and differ for eps."""
    pipe, parts = sd
    kw = dict(spacing="leading", steps_offset=1, guidance_rescale=0.7)
    sched = ddim_scheduler(prediction_type="sample")
    x0_parts = dataclasses.replace(parts, denoiser=make_denoiser(parts.unet, {**parts.diffusion, "prediction": "x0"}))
    ours, theirs = run_both(pipe, x0_parts, sched, "ddim", **kw)
    plain, _ = run_both(pipe, x0_parts, sched, "ddim", **{**kw, "guidance_rescale": 0.0})
    assert (ours - plain).abs().max() > 1e-2  # the rescale does something
    assert parity_error(ours, theirs) < 1e-4
    eps_ours, eps_theirs = run_both(pipe, parts, ddim_scheduler(), "ddim", **kw)
    assert (eps_ours - eps_theirs).abs().max() > 1e-3  # the documented difference for eps models


def test_prompt_embeds_and_long_prompts(sd):
    pipe, parts = sd
    ref = text_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, negative_prompts=NEGATIVES, steps=3,
                        output_type="latent", progress=False)
    hidden, _ = parts.text_encoder.encode(PROMPTS + NEGATIVES)
    embeds = text_to_image(parts.denoiser, None, parts.vae, None, prompt_embeds=hidden[:2], negative_prompt_embeds=hidden[2:],
                           steps=3, output_type="latent", progress=False)
    torch.testing.assert_close(embeds, ref, atol=1e-6, rtol=0)
    # a prompt of more than 75 tokens is chunked into 2 windows; its empty negative gets 2 windows too
    long = " ".join(["abc"] * 80)
    out = text_to_image(parts.denoiser, parts.text_encoder, parts.vae, [long, "b"], steps=2, output_type="pt", progress=False)
    assert out.shape == (2, 3, 16, 16)


def test_same_seed_same_image_whatever_the_batch_size(sd):
    _, parts = sd
    kw = dict(sampler="euler_ancestral", steps=4, seed=7, output_type="latent", progress=False)
    prompts = ["a", "b", "abc", "c d", "b"]
    big = text_to_image(parts.denoiser, parts.text_encoder, parts.vae, prompts, batch_size=5, **kw)
    small = text_to_image(parts.denoiser, parts.text_encoder, parts.vae, prompts, batch_size=2, **kw)
    scale = big.abs().max()  # ~50: the random U-Net amplifies; float32 batching noise is relative
    assert (big - small).abs().max() < 1e-5 * scale
    assert (big[1] - big[4]).abs().max() > 0.1  # the same prompt at another index is another sample
    other = text_to_image(parts.denoiser, parts.text_encoder, parts.vae, prompts, batch_size=5, **{**kw, "seed": 8})
    assert (other - big).abs().max() > 0.1


def test_pixel_space_model_and_a_masked_text_encoder():
    """vae=None: the samples are the images; a TinyTextEncoder's mask reaches both CFG branches."""
    torch.manual_seed(0)
    config = dataclasses.replace(UNET_PRESETS["tiny"], in_channels=3, out_channels=3)
    d = Denoiser(UNetSD(config).eval(), VPDiscrete.from_name("linear", 1000), "eps")
    enc = TinyTextEncoder.from_texts(["the digit 3", "a seven"], width=32).eval()
    kw = dict(steps=4, height=8, width=8, output_type="pt", progress=False)
    out = text_to_image(d, enc, None, ["the digit 3", "a seven"], guidance_scale=3.0, **kw)
    assert out.shape == (2, 3, 8, 8) and out.abs().max() <= 1
    lat = text_to_image(d, enc, None, ["the digit 3", "a seven"], guidance_scale=3.0, **{**kw, "output_type": "latent"})
    torch.testing.assert_close(lat.clamp(-1, 1), out)
    unguided = text_to_image(d, enc, None, ["the digit 3", "a seven"], guidance_scale=1.0, **kw)
    assert (unguided - out).abs().max() > 1e-3
    pil = text_to_image(d, enc, None, "a seven", **{**kw, "output_type": "pil"})
    assert len(pil) == 1 and pil[0].size == (8, 8) and pil[0].mode == "RGB"


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "prompts is an empty list"),
    (dict(negative_prompts=["x", "y", "z"]), "negative_prompts has 3 entries for 2 prompts"),
    (dict(height=15), r"height=15 must be a positive multiple of 2 \(the VAE's downsampling factor 2"),
    (dict(width=17), "width=17 must be a positive multiple of 2"),
    (dict(output_type="jpeg"), "output_type='jpeg' is unknown"),
    (dict(sampler="nope"), "sampler='nope' is unknown"),
    (dict(latents=torch.zeros(3, 4, 8, 8)), "latents has 3 samples for 2 prompts"),
    (dict(prompts=None), "give prompts"),
])
def test_bad_input_is_named(sd, kwargs, match):
    _, parts = sd
    call = {"prompts": ["a", "b"], "steps": 2, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        text_to_image(parts.denoiser, parts.text_encoder, parts.vae, call.pop("prompts"), **call)


def test_an_inpainting_unet_is_refused_with_a_pointer():
    config = dataclasses.replace(UNET_PRESETS["tiny"], in_channels=9)
    d = Denoiser(UNetSD(config).eval(), VPDiscrete.from_name("linear", 1000), "eps")
    vae = DifflabVAE(VAE_PRESETS["tiny"]).eval()
    enc = TinyTextEncoder.from_texts(["a"], width=32)
    with pytest.raises(ValueError, match="9 input channels.*inpaint"):
        text_to_image(d, enc, vae, ["a"], steps=2, height=8, width=8, progress=False)


def test_every_registered_sampler_runs_in_the_pipeline():
    """Any sampler of the registry, stochastic or not, with or without a ``noise=`` keyword."""
    from difflab.samplers import SAMPLERS

    torch.manual_seed(0)
    config = dataclasses.replace(UNET_PRESETS["tiny"], in_channels=3, out_channels=3)
    d = Denoiser(UNetSD(config).eval(), VPDiscrete.from_name("linear", 1000), "eps")
    enc = TinyTextEncoder.from_texts(["a seven"], width=32).eval()
    for name in sorted(SAMPLERS):
        out = text_to_image(d, enc, None, ["a seven"], sampler=name, steps=4, height=8, width=8, output_type="latent",
                            progress=False)
        assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all(), name
