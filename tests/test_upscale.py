"""Stable Diffusion's upscalers (the x4 pixel-space upscaler and the x2 latent upscaler): their U-Nets
against diffusers' UNet2DConditionModel, and the pipelines against diffusers'
StableDiffusionUpscalePipeline / StableDiffusionLatentUpscalePipeline on tiny random components
saved to and loaded from diffusers folders."""
import json

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale as diffusers_x4
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline, StableDiffusionUpscalePipeline
from PIL import Image

from difflab.cli import main
from difflab.io.upscaler_folder import is_upscaler_folder, load_upscaler_folder, upscaler_kind
from difflab.nn.unet_sd import UNetSD, UNetSDConfig
from difflab.pipelines.folder import model_family, sample_folder
from difflab.pipelines.upscale import upscale, upscale_latent

transformers = pytest.importorskip("transformers", reason="the CLIP text encoder needs transformers (the 'sd' extra)")
from test_text import tiny_clip, write_tiny_tokenizer  # noqa: E402
from test_text_to_image import SD_BETAS, VAE_TINY, ddim_scheduler, parity_error, tiny_diffusers_vae  # noqa: E402
from test_unet_sd import difflab_copy, tiny_diffusers_unet  # noqa: E402

# diffusers' own tiny upscaler U-Nets (tests/pipelines/stable_diffusion_2 and stable_diffusion_latent_upscale)
X4_TINY = dict(block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=8, in_channels=7, out_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
               attention_head_dim=8, use_linear_projection=True, only_cross_attention=(True, True, False), num_class_embeds=100)
LATENT_TINY = dict(act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 32, 64, 64),
                   time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32, in_channels=8,
                   down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
                   up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
                   mid_block_type=None, only_cross_attention=False, out_channels=5, resnet_time_scale_shift="scale_shift",
                   time_embedding_type="fourier", timestep_post_act="gelu", sample_size=16)
PROMPTS, NEGATIVES = ["a photo of abc", "b"], ["", "c d"]
LOW_RES = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)


def randn(*shape, seed=5):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return transformers.CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))))


@pytest.fixture(scope="module")
def x4(tmp_path_factory, tokenizer):
    torch.manual_seed(0)  # the x4 VAE: three levels, so its decoder upsamples 4x; scaling factor 0.08333
    vae = AutoencoderKL(**{**VAE_TINY, "block_out_channels": (8, 16, 16), "down_block_types": ("DownEncoderBlock2D",) * 3,
                           "up_block_types": ("UpDecoderBlock2D",) * 3, "scaling_factor": 0.08333}).eval()
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=tiny_clip(), tokenizer=tokenizer, unet=tiny_diffusers_unet(**X4_TINY),
                                          low_res_scheduler=DDPMScheduler(**LOW_RES),
                                          scheduler=ddim_scheduler(prediction_type="v_prediction"), max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("x4")
    pipe.save_pretrained(folder)
    return pipe, load_upscaler_folder(folder), folder


@pytest.fixture(scope="module")
def latent(tmp_path_factory, tokenizer):
    scheduler = EulerDiscreteScheduler(**SD_BETAS, prediction_type="sample", use_karras_sigmas=True)
    pipe = StableDiffusionLatentUpscalePipeline(vae=tiny_diffusers_vae(), text_encoder=tiny_clip(), tokenizer=tokenizer,
                                                unet=tiny_diffusers_unet(**LATENT_TINY), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("latent_upscaler")
    pipe.save_pretrained(folder)
    return pipe, load_upscaler_folder(folder), folder


# ----------------------------------------------------------------------------------------------
# The U-Nets


def test_x4_unet_matches_diffusers_and_its_settings_matter():
    ref = tiny_diffusers_unet(**X4_TINY)
    net = difflab_copy(ref)
    c = net.config
    assert c.num_class_embeds == 100 and c.only_cross_attention == (True, True, False)
    assert UNetSDConfig.from_diffusers_config(c.to_diffusers_config()) == c == UNetSDConfig.from_dict(c.to_dict())
    x, ctx, t, labels = randn(2, 7, 8, 8), randn(2, 5, 32, seed=6), torch.tensor([10.0, 900.0]), torch.tensor([20, 70])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        got = net(x, t, context=ctx, class_labels=labels)
        other_level = net(x, t, context=ctx, class_labels=labels.flip(0))
        self_attention = UNetSD(UNetSDConfig(**{**c.to_dict(), "only_cross_attention": False})).eval()
        self_attention.load_state_dict(net.state_dict())  # the same shapes here: only attn1's inputs differ
        plain = self_attention(x, t, context=ctx, class_labels=labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (other_level - got).abs().max() > 1e-3 and (plain - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs class_labels"):
        net(x, t, context=ctx)
    with pytest.raises(ValueError, match=r"integers in \[0, 100\)"):
        net(x, t, context=ctx, class_labels=torch.tensor([20, 100]))


def test_latent_upscaler_unet_matches_diffusers():
    ref = tiny_diffusers_unet(**LATENT_TINY)
    net = difflab_copy(ref)
    c = net.config
    assert (c.block_style, c.time_embedding_type, c.head_dim, c.mid_block, c.norm_num_groups) == ("k", "fourier", 8, False, None)
    assert UNetSDConfig.from_diffusers_config(c.to_diffusers_config()) == c == UNetSDConfig.from_dict(c.to_dict())
    x, ctx, cond = randn(2, 8, 16, 16), randn(2, 5, 32, seed=6), randn(2, 160, seed=7)
    t = torch.tensor([-1.2, 0.6])  # ln(sigma) / 4
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, timestep_cond=cond).sample
        got = net(x, t, context=ctx, timestep_cond=cond)
        other = net(x, t, context=ctx, timestep_cond=cond.flip(0))
    assert want.shape == (2, 5, 16, 16) and (other - got).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs timestep_cond"):
        net(x, t, context=ctx)


# ----------------------------------------------------------------------------------------------
# The pipelines against diffusers'


def test_folders_are_recognised(x4, latent):
    assert upscaler_kind(x4[2]) == "x4" and upscaler_kind(latent[2]) == "latent" and is_upscaler_folder(x4[2])
    assert model_family(x4[2]) == model_family(latent[2]) == "sd-upscaler"
    assert x4[1].vae.config.scaling_factor == 0.08333 and x4[1].max_noise_level == 350
    assert latent[1].diffusion["frame"] == "edm" and latent[1].sampling["grid"] == "karras"


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_x4_pipeline_matches_diffusers(x4, monkeypatch, output_type):
    pipe, parts, _ = x4
    image, latents, eps = randn(2, 3, 8, 8).clamp(-1, 1), randn(2, 4, 8, 8, seed=6), randn(2, 3, 8, 8, seed=7)
    monkeypatch.setattr(diffusers_x4, "randn_tensor", lambda shape, **kw: eps.clone())  # diffusers' low-res noise: ours
    with torch.no_grad():
        theirs = pipe(PROMPTS, image=image, negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=5.0,
                      noise_level=40, latents=latents, output_type=output_type).images
    ours = upscale(parts, PROMPTS, image, negative_prompts=NEGATIVES, steps=5, guidance_scale=5.0, noise_level=40,
                   latents=latents, low_res_noise=eps, output_type=output_type, progress=False)
    if output_type == "np":
        assert ours.shape == theirs.shape == (2, 32, 32, 3)  # 4x the 8 x 8 input
        assert np.abs(ours - theirs).max() < 1e-4
    else:
        assert parity_error(ours, theirs) < 1e-4


@pytest.mark.parametrize("pixels", [False, True], ids=["latents-in", "pixels-in"])
def test_latent_upscaler_pipeline_matches_diffusers(latent, pixels):
    pipe, parts, _ = latent
    image = randn(2, 3, 16, 16).clamp(-1, 1) if pixels else randn(2, 4, 8, 8)
    start = randn(2, 4, 16, 16, seed=6)
    output_type = "np" if pixels else "latent"
    with torch.no_grad():
        theirs = pipe(PROMPTS, image=image, negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=5.0,
                      latents=start, output_type=output_type).images
    ours = upscale(parts, PROMPTS, image, negative_prompts=NEGATIVES, steps=5, guidance_scale=5.0, latents=start,
                   output_type=output_type, progress=False)
    if pixels:
        assert ours.shape == theirs.shape == (2, 32, 32, 3)
        assert np.abs(ours - theirs).max() < 1e-4
    else:
        assert parity_error(ours, theirs) < 1e-4


def test_latent_upscaler_without_guidance_matches_diffusers(latent):
    """guidance_scale 0: diffusers replaces the prompts by '' and guides nothing; so does difflab."""
    pipe, parts, _ = latent
    image, start = randn(2, 4, 8, 8), randn(2, 4, 16, 16, seed=6)
    with torch.no_grad():
        theirs = pipe(PROMPTS, image=image, num_inference_steps=3, guidance_scale=0.0, latents=start, output_type="latent").images
    ours = upscale(parts, PROMPTS, image, steps=3, guidance_scale=0.0, latents=start, output_type="latent", progress=False)
    assert parity_error(ours, theirs) < 1e-4


def test_same_seed_same_image_whatever_the_batch_size(x4):
    parts, image = x4[1], randn(2, 3, 8, 8).clamp(-1, 1)
    one = upscale(parts, PROMPTS, image, steps=2, seed=3, batch_size=1, output_type="pt", progress=False)
    two = upscale(parts, PROMPTS, image, steps=2, seed=3, batch_size=2, output_type="pt", progress=False)
    other = upscale(parts, PROMPTS, image, steps=2, seed=4, batch_size=2, output_type="pt", progress=False)
    assert one.shape == (2, 3, 32, 32)
    torch.testing.assert_close(one, two, atol=1e-4, rtol=0)  # batched kernels round differently, no more
    assert (other - two).abs().max() > 1e-2


def test_a_folder_upscales_through_sample_folder_and_the_cli(x4, latent, tmp_path):
    parts, folder = latent[1], latent[2]
    image = randn(1, 4, 8, 8)
    want = upscale(parts, ["b"], image, steps=2, output_type="pt", progress=False)
    got = sample_folder(folder, ["b"], image=image, steps=2, progress=False)
    torch.testing.assert_close(got, want)
    Image.fromarray(np.full((8, 8, 3), 120, dtype=np.uint8)).save(tmp_path / "low.png")
    assert main(["sample", "--model", str(x4[2]), "--image", str(tmp_path / "low.png"), "--prompt", "a", "--steps", "2",
                 "--device", "cpu", "--out", str(tmp_path / "up.png")]) == 0
    assert Image.open(tmp_path / "up.png").size[0] >= 32


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_level=351), r"noise_level=351 must be an int in \[0, 350\]"),
    (dict(noise_level=2.5), "noise_level=2.5"),
    (dict(image=torch.zeros(2, 4, 8, 8)), r"image must be \(N, 3, H, W\)"),
    (dict(latents=torch.zeros(2, 4, 4, 4)), r"latents must be \(2, 4, 8, 8\)"),
    (dict(prompts=[]), "empty list"),
])
def test_x4_bad_input_is_named(x4, kwargs, match):
    args = {**dict(prompts=PROMPTS, image=torch.zeros(1, 3, 8, 8), steps=1, progress=False), **kwargs}
    with pytest.raises(ValueError, match=match):
        upscale(x4[1], args.pop("prompts"), args.pop("image"), **args)


def test_latent_bad_input_is_named(latent, x4, tmp_path):
    parts = latent[1]
    with pytest.raises(ValueError, match="noise_level is the x4 upscaler's"):
        upscale(parts, ["a"], torch.zeros(1, 4, 8, 8), noise_level=20)
    with pytest.raises(ValueError, match=r"negative_prompts has 3 entries for 1 prompts"):
        upscale(parts, ["a"], torch.zeros(1, 4, 8, 8), negative_prompts=["a", "b", "c"], steps=1, progress=False)
    with pytest.raises(ValueError, match="no vae was given"):
        upscale_latent(parts.denoiser, parts.text_encoder, None, ["a"], torch.zeros(1, 3, 16, 16), steps=1, progress=False)
    with pytest.raises(ValueError, match="give image="):
        sample_folder(latent[2], ["a"], steps=1)
    with pytest.raises(ValueError, match="height is set by the low-resolution image"):
        sample_folder(latent[2], ["a"], image=torch.zeros(1, 4, 8, 8), height=64, steps=1)
    index = json.loads((x4[2] / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="not an upscaler"):
        load_upscaler_folder(tmp_path)


@pytest.mark.parametrize("change,match", [
    (dict(class_embed_type="timestep"), "class_embed_type='timestep'"),
    (dict(down_block_types=["KDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]), "down_block_types="),
    (dict(time_embedding_type="learned"), "time_embedding_type='learned'"),
])
def test_configs_outside_the_family_are_named(change, match):
    config = {**tiny_diffusers_unet(**X4_TINY).config, **change}
    with pytest.raises(ValueError, match=match):
        UNetSDConfig.from_diffusers_config(config)
