"""Image to image, inpainting (replacement / RePaint and mask channels) and outpainting: parity with
diffusers' img2img and inpainting pipelines, the known region kept exactly, RePaint's resampling
on an exact denoiser, bad input."""
import dataclasses

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

from difflab.core import Denoiser, VPDiscrete, grids
from difflab.guidance.inpaint import MaskChannels, latent_mask, sample_repaint
from difflab.nn.text import TinyTextEncoder
from difflab.nn.unet_sd import PRESETS as UNET_PRESETS, UNetSD
from difflab.oracle import GaussianMixture
from difflab.pipelines import image_to_image, inpaint, outpaint
from difflab.pipelines.image_to_image import start_index
from difflab.samplers import get_sampler, sample_ddim

transformers = pytest.importorskip("transformers", reason="the CLIP text encoder needs transformers (the 'sd' extra)")
from test_text import write_tiny_tokenizer  # noqa: E402
from test_text_to_image import NEGATIVES, PROMPTS, SD1_PIPE, build_pipeline, ddim_scheduler, parity_error  # noqa: E402

F64 = torch.float64


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tokenizer_dir):
    return build_pipeline(tmp_path_factory.mktemp("sd"), tokenizer_dir, pipeline_class=StableDiffusionImg2ImgPipeline)


@pytest.fixture(scope="module")
def sd_inpaint(tmp_path_factory, tokenizer_dir):
    """A tiny SD-inpainting pipeline: the U-Net takes 9 channels (latents, mask, masked-image latents)."""
    return build_pipeline(tmp_path_factory.mktemp("sd-inpaint"), tokenizer_dir, unet_config={**SD1_PIPE, "in_channels": 9, "out_channels": 4},
                          pipeline_class=StableDiffusionInpaintPipeline)


def make_image(n=2, size=16, seed=3):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * 2 - 1


def make_mask(size=16):
    mask = torch.zeros(1, 1, size, size)
    mask[..., 3:11, 5:14] = 1
    return mask


def pixel_model(in_channels=3, seed=0):
    """A text-conditional pixel-space model: a tiny UNetSD on 3-channel images, and a tiny encoder."""
    torch.manual_seed(seed)
    config = dataclasses.replace(UNET_PRESETS["tiny"], in_channels=in_channels, out_channels=3)
    d = Denoiser(UNetSD(config).eval(), VPDiscrete.from_name("linear", 1000), "eps")
    return d, TinyTextEncoder.from_texts(["the digit 3", "a seven"], width=32).eval()


# ----------------------------------------------------------------------------------------------
# Image to image


def test_start_index_mirrors_diffusers_get_timesteps(sd):
    pipe, _ = sd
    pipe.scheduler = ddim_scheduler()
    for steps, strength in [(10, 0.75), (10, 0.3), (7, 0.5), (6, 1.0), (50, 0.02)]:
        pipe.scheduler.set_timesteps(steps)
        timesteps, run = pipe.get_timesteps(steps, strength, "cpu")
        assert start_index(steps, strength) == steps - run == steps - len(timesteps)


@pytest.mark.parametrize("sampler,strength,steps", [("ddim", 0.75, 10), ("euler", 0.5, 6), ("ddim", 1.0, 5)])
def test_img2img_matches_diffusers(sd, sampler, strength, steps):
    pipe, parts = sd
    sched = ddim_scheduler()
    if sampler == "euler":
        sched = EulerDiscreteScheduler.from_config(sched.config, timestep_spacing="leading", steps_offset=1)
    pipe.scheduler = sched
    image = make_image()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        theirs = pipe(PROMPTS, image=image, strength=strength, negative_prompt=NEGATIVES, num_inference_steps=steps,
                      guidance_scale=4.0, generator=g, output_type="latent").images
    # diffusers draws the posterior sample, then the noise, from one generator: the same noise for us
    # (the tiny VAE's posterior std is 3e-7, so whose posterior draw it is does not matter)
    g = torch.Generator().manual_seed(11)
    torch.randn(theirs.shape, generator=g)
    noise = torch.randn(theirs.shape, generator=g)
    ours = image_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, strength=strength,
                          negative_prompts=NEGATIVES, sampler=sampler, steps=steps, spacing="leading", steps_offset=1,
                          guidance_scale=4.0, noise=noise, output_type="latent", progress=False)
    err = parity_error(ours, theirs)
    assert err < 1e-4, err


def test_img2img_low_strength_stays_close_to_the_image():
    d, enc = pixel_model()
    image = make_image(1, 8)
    kw = dict(steps=20, output_type="pt", progress=False, guidance_scale=1.0)
    near = image_to_image(d, enc, None, ["a seven"], image, strength=0.1, **kw)
    far = image_to_image(d, enc, None, ["a seven"], image, strength=0.9, **kw)
    assert (near - image).abs().mean() < 0.5 * (far - image).abs().mean()


# ----------------------------------------------------------------------------------------------
# Inpainting by replacement (RePaint)


def test_repaint_known_region_exact_and_resampling_harmonizes():
    """x0 ~ N(0, [[1, .9], [.9, 1]]), exact denoiser: x1 known, x2 filled. The exact conditional
    has slope E[x1 x2] / E[x1^2] = 0.9. Plain replacement (U = 1) harmonizes poorly; resampling
    (U = 10) gets close (Lugmayr et al. 2022, Section 4.2)."""
    g = GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.9], [0.9, 1.0]]])
    x0 = g.sample(4000, torch.Generator().manual_seed(1))
    mask = torch.tensor([[0.0, 1.0]])
    sigmas = grids.karras_sigmas(20, 0.002, 80.0)
    slopes, calls = {}, {}
    for u in (1, 10):
        x = torch.randn(4000, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 80
        seen = []
        out = sample_repaint(g.denoiser, x, sigmas, known=x0, mask=mask, sampler=get_sampler("ddpm"), resample=u,
                             callback=seen.append)
        assert torch.equal(out[:, 0], x0[:, 0])  # the known coordinate, exactly
        slopes[u] = float((out[:, 0] * out[:, 1]).mean() / (out[:, 0] ** 2).mean())
        calls[u] = len(seen)
    assert calls == {1: 20, 10: 19 * 10 + 1}  # the last step (to sigma = 0) is not repeated
    assert abs(slopes[1] - 0.9) > 0.25 and abs(slopes[10] - 0.9) < 0.06, slopes


def test_repaint_edge_masks():
    """An all-fill mask is the plain sampler (DDIM draws nothing); an all-keep mask returns the known sample."""
    g = GaussianMixture([0.5, 0.5], [[1.0, -1.0, 0.0], [-1.0, 0.5, 2.0]], [0.1, 0.3])
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 80
    known = g.sample(5, torch.Generator().manual_seed(1))
    sigmas = grids.karras_sigmas(8, 0.002, 80.0)
    fill = sample_repaint(g.denoiser, x, sigmas, known=known, mask=torch.ones(1, 3), sampler=sample_ddim)
    torch.testing.assert_close(fill, sample_ddim(g.denoiser, x, sigmas), rtol=0, atol=0)
    keep = sample_repaint(g.denoiser, x, sigmas, known=known, mask=torch.zeros(1, 3), sampler=sample_ddim, resample=3, jump_length=2)
    assert torch.equal(keep, known)


def test_inpaint_pixel_model_keeps_the_known_region_exactly():
    d, enc = pixel_model()
    image, mask = make_image(2, 8), make_mask(8)
    kw = dict(steps=6, output_type="pt", progress=False, keep_known_pixels=False, guidance_scale=3.0, sampler="ddpm")
    seen = []
    plain = inpaint(d, enc, None, ["the digit 3", "a seven"], image, mask, **kw)
    resampled = inpaint(d, enc, None, ["the digit 3", "a seven"], image, mask, resample=3, jump_length=2, callback=seen.append, **kw)
    keep = (mask == 0).expand_as(image)
    for out in (plain, resampled):
        assert torch.equal(out[keep], image[keep])  # exactly, without pasting
    assert len(seen) == 2 * 3 + 2 * 3 + 2  # 6 steps in stretches of 2, 3 passes each, the last stretch (to 0) once
    assert (plain - resampled)[~keep].abs().max() > 1e-3  # resampling changes the filled region


def test_inpaint_latent_model_keep_known_pixels(sd):
    _, parts = sd
    image, mask = make_image(), make_mask()
    kw = dict(steps=4, output_type="pt", progress=False, guidance_scale=2.0, spacing="leading", steps_offset=1)
    pasted = inpaint(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, mask, keep_known_pixels=True, **kw)
    decoded = inpaint(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, mask, keep_known_pixels=False, **kw)
    keep = (mask == 0).expand_as(image)
    assert torch.equal(pasted[keep], image[keep])
    assert (decoded[keep] - image[keep]).abs().max() > 1e-2  # the decoder changes known pixels: why the paste exists
    torch.testing.assert_close(pasted[~keep], decoded[~keep], rtol=0, atol=0)


def test_latent_mask_is_conservative():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3, 5] = 1  # one pixel to fill
    small = latent_mask(mask, 2, "any")
    assert small.shape == (1, 1, 4, 4) and small.sum() == 1 and small[0, 0, 1, 2] == 1
    assert latent_mask(mask, 2, "nearest").sum() == 0  # diffusers' nearest picks the block's top-left pixel


# ----------------------------------------------------------------------------------------------
# Mask-channel models


class RecordingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, t, **cond):
        self.inputs.append(x)
        return x[:, :4] * 0.1


def test_mask_channels_feeds_the_extra_channels_unscaled():
    net = RecordingNet()
    d = Denoiser(net, VPDiscrete.from_name("linear", 1000), "eps")
    x, extra = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3)
    out = MaskChannels(d)(x, torch.tensor([2.0, 5.0]), mask_channels=extra)
    seen = net.inputs[-1]
    assert seen.shape == (2, 9, 3, 3) and out.shape == (2, 4, 3, 3)
    torch.testing.assert_close(seen[:, :4], x / torch.tensor([5.0, 26.0]).sqrt()[:, None, None, None])  # x_in = x / sqrt(1 + s^2)
    assert torch.equal(seen[:, 4:], extra)


def test_mask_channel_model_matches_diffusers_inpainting(sd_inpaint):
    pipe, parts = sd_inpaint
    assert parts.unet.config.in_channels == 9
    pipe.scheduler = ddim_scheduler()
    image, mask = make_image(), make_mask()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = pipe(PROMPTS, image=image, mask_image=mask, height=16, width=16, negative_prompt=NEGATIVES, num_inference_steps=6,
                      guidance_scale=4.0, latents=latents, generator=torch.Generator().manual_seed(0), output_type="latent").images
    ours = inpaint(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, mask, mode="channels", negative_prompts=NEGATIVES,
                   steps=6, spacing="leading", steps_offset=1, guidance_scale=4.0, latents=latents, output_type="latent", progress=False)
    err = parity_error(ours, theirs)
    assert err < 1e-4, err
    # and its known pixels come back exactly through keep_known_pixels
    out = inpaint(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, mask, steps=3, output_type="pt", progress=False)
    keep = (mask == 0).expand_as(image)
    assert torch.equal(out[keep], image[keep])


# ----------------------------------------------------------------------------------------------
# Outpainting


@pytest.mark.parametrize("pads", [dict(left=2, top=4), dict(right=6, bottom=2, left=4, top=2)])
def test_outpaint_keeps_the_original_pixels(sd, pads):
    _, parts = sd
    image = make_image()
    out = outpaint(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, steps=3, output_type="pt", progress=False, **pads)
    top, left = pads.get("top", 0), pads.get("left", 0)
    assert out.shape == (2, 3, 16 + top + pads.get("bottom", 0), 16 + left + pads.get("right", 0))
    assert torch.equal(out[:, :, top:top + 16, left:left + 16], image)
    border = out.clone()
    border[:, :, top:top + 16, left:left + 16] = 0
    assert border.abs().max() > 1e-2  # the border is filled


def test_outpaint_pixel_model_exact_without_paste():
    d, enc = pixel_model()
    image = make_image(1, 8)
    out = outpaint(d, enc, None, ["a seven"], image, right=8, steps=4, output_type="pt", progress=False, keep_known_pixels=False)
    assert out.shape == (1, 3, 8, 16) and torch.equal(out[..., :8], image)


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask=torch.zeros(1, 3, 16, 16)), r"mask must be \(B, 1, H, W\) or \(1, 1, H, W\)"),
    (dict(mask=torch.zeros(1, 1, 8, 8)), r"mask must be .*got shape \(1, 1, 8, 8\)"),
    (dict(mask=torch.zeros(3, 1, 16, 16)), r"mask must be .*got shape \(3, 1, 16, 16\)"),
    (dict(mask=torch.full((1, 1, 16, 16), 0.5)), "only 0 \\(keep\\) and 1 \\(fill\\)"),
    (dict(strength=0.0), r"strength=0.0 must be in \(0, 1\]"),
    (dict(strength=1.5), r"strength=1.5 must be in \(0, 1\]"),
    (dict(strength=0.05, steps=10), "runs no step"),
    (dict(image=torch.zeros(2, 3, 15, 16)), "image height=15 must be a positive multiple of 2"),
    (dict(image=torch.zeros(2, 1, 16, 16)), r"image must be \(N, 3, H, W\)"),
    (dict(prompts=[]), "prompts is an empty list"),
    (dict(mode="channels"), "mode='channels' does not fit a network of 4 input channels"),
])
def test_inpaint_bad_input(sd, kwargs, match):
    _, parts = sd
    call = {"prompts": PROMPTS, "image": make_image(), "mask": make_mask(), "steps": 4, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        inpaint(parts.denoiser, parts.text_encoder, parts.vae, call.pop("prompts"), call.pop("image"), call.pop("mask"), **call)


def test_img2img_and_outpaint_bad_input(sd):
    _, parts = sd
    args = (parts.denoiser, parts.text_encoder, parts.vae, PROMPTS)
    for strength in (0.0, -0.2, 1.01):
        with pytest.raises(ValueError, match="strength"):
            image_to_image(*args, make_image(), strength=strength, progress=False)
    with pytest.raises(ValueError, match="image width=15"):
        image_to_image(*args, torch.zeros(1, 3, 16, 15), steps=4, progress=False)
    with pytest.raises(ValueError, match=r"noise must be \(N, C, h, w\)"):
        image_to_image(*args, make_image(), steps=4, noise=torch.zeros(2, 4, 4, 4), progress=False)
    with pytest.raises(ValueError, match="needs some padding"):
        outpaint(*args, make_image(), progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        outpaint(*args, make_image(), left=-2, progress=False)
    with pytest.raises(ValueError, match=r"extended canvas 16 \+ top 3 \+ bottom 0 = 19"):
        outpaint(*args, make_image(), top=3, steps=2, progress=False)
