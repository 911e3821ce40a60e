"""Flux: the transformer against diffusers' FluxTransformer2DModel (with and without the guidance
embedding), the size-shifted grid against FlowMatchEulerDiscreteScheduler, and text-to-image and
image-to-image against diffusers' FluxPipeline / FluxImg2ImgPipeline on a tiny random folder
(CLIP, T5, VAE, transformer) saved with save_pretrained and read back by difflab, float32."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline,
                       FluxTransformer2DModel)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from difflab.cli import main
from difflab.core import schedules
from difflab.core.denoiser import SIGMA_MAX_FINITE
from difflab.core.grids import resolution_shift
from difflab.io.flux_folder import is_flux_folder, load_flux_folder, load_flux_transformer, sampling_from_scheduler_config
from difflab.nn.flux import FluxConfig, FluxTransformer, latent_image_ids, pack_latents, unpack_latents
from difflab.io.images import make_grid
from difflab.pipelines.folder import model_family, sample_folder
from difflab.pipelines.flux import FLUX_DEFAULTS, encode_flux_prompts, flux_image_to_image, flux_sigmas, flux_text_to_image

transformers = pytest.importorskip("transformers", reason="CLIP and T5 need transformers (the 'sd' extra)")
from test_text import tiny_clip, write_tiny_tokenizer  # noqa: E402

TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
VAE_TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# FLUX.1-dev's scheduler (size-dependent shift) and FLUX.1-schnell's (none)
DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False)
PROMPTS, NEGATIVES = ["a photo of abc", "b"], ["", "c d"]
T5_LENGTH = 16


def tiny_transformer(guidance_embeds: bool, seed: int = 0) -> FluxTransformer2DModel:
    """A tiny random diffusers Flux transformer, every weight redrawn (none left at zero)."""
    torch.manual_seed(seed)
    net = FluxTransformer2DModel(**TINY, guidance_embeds=guidance_embeds).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net


def tiny_t5_tokenizer(folder):
    """A T5 (Unigram) tokenizer of 31 pieces built from a vocabulary list: no sentencepiece, no download."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -float(i)) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")]
    tok = transformers.T5TokenizerFast(vocab=pieces + [("\u2581", -1.0), ("\u2581a", -0.5)], extra_ids=0)
    tok.save_pretrained(str(folder))
    return transformers.T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return transformers.T5EncoderModel(config).eval()


def tiny_vae(seed=0):
    """A random diffusers AutoencoderKL (Flux's layout: no quant convs, shift and scale) whose posterior
    is (nearly) a point mass: logvar = -30, so a posterior sample equals the mean to ~1e-6."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_TINY).eval()
    with torch.no_grad():
        vae.encoder.conv_out.weight[4:] = 0
        vae.encoder.conv_out.bias[4:] = -30.0
    return vae


def build(folder, tokenizer_dir, guidance_embeds: bool, scheduler: dict):
    """A tiny random FluxPipeline saved to ``folder``; returns (diffusers pipe, difflab FluxComponents)."""
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**scheduler), vae=tiny_vae(), text_encoder=tiny_clip(),
                        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir)), text_encoder_2=tiny_t5(),
                        tokenizer_2=tiny_t5_tokenizer(folder.parent / (folder.name + "_t5tok")),
                        transformer=tiny_transformer(guidance_embeds))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    assert is_flux_folder(folder) and not is_flux_folder(tokenizer_dir)
    return pipe, load_flux_folder(folder), folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux(request, tmp_path_factory, tokenizer_dir):
    dev = request.param == "dev"
    return build(tmp_path_factory.mktemp(request.param), tokenizer_dir, dev, DEV_SCHEDULER if dev else SCHNELL_SCHEDULER)


# ----------------------------------------------------------------------------------------------
# The transformer


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["schnell", "dev"])
def test_transformer_matches_diffusers(tmp_path, guidance_embeds):
    ref = tiny_transformer(guidance_embeds)
    ref.save_pretrained(tmp_path)
    ours = load_flux_transformer(tmp_path)  # built on the meta device, the file's tensors assigned
    assert {(p.device.type, p.dtype, p.requires_grad) for p in ours.parameters()} == {("cpu", torch.float32, True)}
    assert {p.dtype for p in load_flux_transformer(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    g = torch.Generator().manual_seed(1)
    z, context, pooled = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g)
    t, w = torch.tensor([0.3, 0.95]), (torch.tensor([3.5, 1.0]) if guidance_embeds else None)
    txt_ids = torch.zeros(7, 3)
    txt_ids[:, 1] = torch.arange(7)  # non-zero text positions: the rotation of the text tokens is checked too
    with torch.no_grad():
        want = ref(pack_latents(z), context, pooled, t, img_ids=latent_image_ids(3, 4), txt_ids=txt_ids, guidance=w).sample
        got = ours(z, t, context=context, pooled=pooled, guidance_scale=w, txt_ids=txt_ids)  # packs and unpacks itself
        tokens = ours(pack_latents(z), t, context=context, pooled=pooled, guidance_scale=w, img_ids=latent_image_ids(3, 4),
                      txt_ids=txt_ids)
    assert want.abs().max() > 1.0 and got.shape == z.shape
    torch.testing.assert_close(pack_latents(got), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=0)


def test_weights_that_do_not_fit_are_named(tmp_path):
    ref = tiny_transformer(False)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_single_layers": 2}))
    with pytest.raises(ValueError, match=r"missing keys .*single_transformer_blocks\.1\."):
        load_flux_transformer(tmp_path)


def test_packing_round_trip_and_layout():
    z = torch.randn(2, 3, 4, 6)
    tokens = pack_latents(z)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(tokens[0, 1], z[0, :, 0:2, 2:4].reshape(-1))  # token 1 is the 2x2 patch at row 0, col 1: (c, dy, dx)
    assert torch.equal(unpack_latents(tokens, 4, 6), z)
    assert latent_image_ids(2, 3).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    with pytest.raises(ValueError, match="even height and width"):
        pack_latents(torch.randn(1, 3, 5, 6))


def test_bad_network_input_is_named():
    dev, schnell = FluxTransformer(FluxConfig(**{**TINY, "guidance_embeds": True})), FluxTransformer(FluxConfig(**TINY))
    x, t, ctx, pooled = torch.randn(1, 4, 4, 4), torch.rand(1), torch.randn(1, 3, 32), torch.randn(1, 32)
    with pytest.raises(ValueError, match="guidance-distilled.*pass guidance_scale"):
        dev(x, t, context=ctx, pooled=pooled)
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell(x, t, context=ctx, pooled=pooled, guidance_scale=3.5)
    with pytest.raises(ValueError, match="takes 4 latent channels"):
        schnell(torch.randn(1, 3, 4, 4), t, context=ctx, pooled=pooled)
    with pytest.raises(ValueError, match="pooled must be CLIP's pooled"):
        schnell(x, t, context=ctx)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig(**{**TINY, "axes_dims_rope": [4, 4, 4]})
    with pytest.raises(ValueError, match="unsupported FluxTransformer2DModel config keys"):
        FluxConfig.from_diffusers_config({**TINY, "num_mode_layers": 3})


# ----------------------------------------------------------------------------------------------
# The grid


@pytest.mark.parametrize("seq_len", [64, 1024, 4096, 6000])
def test_default_grid_is_flux_scheduler_grid(seq_len):
    assert math.log(resolution_shift(seq_len)) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    n = 7
    sched = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq_len))
    ours = flux_sigmas(sampling_from_scheduler_config(dict(sched.config)), n, seq_len)
    # t = 1 is held as the largest finite sigma (core.denoiser); every other level is diffusers'
    assert ours[0] == SIGMA_MAX_FINITE and ours[-1] == 0 and sched.sigmas[0] == 1 and len(ours) == len(sched.sigmas)
    torch.testing.assert_close(schedules.flow_t(ours[1:]), sched.sigmas[1:].double(), atol=1e-7, rtol=0)


def test_scheduler_settings_difflab_does_not_reproduce_are_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        sampling_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="a Flux folder's is a 'FlowMatchEulerDiscreteScheduler'"):
        sampling_from_scheduler_config({"_class_name": "DDIMScheduler"})


# ----------------------------------------------------------------------------------------------
# The pipelines


def parity_error(ours, theirs) -> float:
    """Max |ours - theirs| in units of max(1, RMS(theirs))."""
    assert theirs.abs().max() > 0.1  # a real signal, not zeros
    return float((ours - theirs).abs().max()) / max(1.0, float(theirs.pow(2).mean().sqrt()))


def test_folder_is_read(flux):
    pipe, parts, _ = flux
    assert parts.transformer.takes_guidance_scale == pipe.transformer.config.guidance_embeds
    assert parts.sampling["use_dynamic_shifting"] == pipe.scheduler.config.use_dynamic_shifting
    assert parts.vae.config.shift_factor == pytest.approx(0.1159) and parts.vae.config.latent_channels == 4
    with torch.no_grad():
        ours, _ = encode_flux_prompts(parts.text_encoder, parts.text_encoder_2, PROMPTS, max_sequence_length=T5_LENGTH)
        context, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_LENGTH)
    assert context.shape == (2, T5_LENGTH, 32)
    torch.testing.assert_close(ours["context"], context, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours["pooled"], pooled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("true_cfg", [1.0, 2.5], ids=["guidance-input", "true-cfg"])
def test_text_to_image_matches_flux_pipeline(flux, true_cfg):
    pipe, parts, _ = flux
    steps, h = 4, 8  # 16 x 16 images, 8 x 8 latents, 16 tokens
    latents = torch.randn(2, 4, h, h, generator=torch.Generator().manual_seed(5))
    negatives = dict(negative_prompts=NEGATIVES, true_cfg_scale=true_cfg) if true_cfg != 1 else {}
    kw = dict(height=16, width=16, steps=steps, max_sequence_length=T5_LENGTH, latents=latents, progress=False, **negatives)
    ours = flux_text_to_image(parts, PROMPTS, output_type="latent", **kw)
    ours_np = flux_text_to_image(parts, PROMPTS, output_type="np", **kw)
    sigmas = flux_sigmas(parts.sampling, steps, (h // 2) ** 2, exact_one=True)
    negatives = dict(negative_prompt=NEGATIVES, true_cfg_scale=true_cfg) if true_cfg != 1 else {}
    kw = dict(height=16, width=16, num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=T5_LENGTH,
              latents=pack_latents(latents), **negatives)  # diffusers' own grid, from t = 1
    with torch.no_grad():
        theirs = pipe(PROMPTS, output_type="latent", **kw).images
        theirs_np = pipe(PROMPTS, output_type="np", **kw).images
    assert torch.allclose(schedules.flow_t(sigmas[:-1]).float(), pipe.scheduler.sigmas[:-1], atol=1e-7, rtol=0)
    assert parity_error(pack_latents(ours), theirs) < 1e-4
    assert np.abs(ours_np - theirs_np).max() < 1e-4


def test_image_to_image_matches_flux_img2img_pipeline(flux):
    pipe, parts, _ = flux
    i2i = FluxImg2ImgPipeline.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # diffusers' [0, 1]
    g = torch.Generator().manual_seed(7)
    torch.randn(2, 4, 8, 8, generator=g)  # diffusers draws the posterior sample first (a point mass here)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        theirs = i2i(PROMPTS, image=image, height=16, width=16, strength=0.5, num_inference_steps=4, guidance_scale=3.5,
                     max_sequence_length=T5_LENGTH, output_type="latent", generator=torch.Generator().manual_seed(7)).images
    ours = flux_image_to_image(parts, PROMPTS, image * 2 - 1, strength=0.5, steps=4, noise=noise, output_type="latent",
                               max_sequence_length=T5_LENGTH, progress=False)
    assert parity_error(pack_latents(ours), theirs) < 1e-4  # starts at t < 1: no clamped level, exact parity
    with torch.no_grad():  # true CFG with one negative prompt for both
        theirs = i2i(PROMPTS, image=image, height=16, width=16, strength=0.5, num_inference_steps=4, guidance_scale=3.5,
                     negative_prompt=["c d"] * 2, true_cfg_scale=3.0, max_sequence_length=T5_LENGTH, output_type="latent",
                     generator=torch.Generator().manual_seed(7)).images
    ours = flux_image_to_image(parts, PROMPTS, image * 2 - 1, strength=0.5, steps=4, noise=noise, output_type="latent",
                               negative_prompts="c d", true_cfg_scale=3.0, max_sequence_length=T5_LENGTH, progress=False)
    assert parity_error(pack_latents(ours), theirs) < 1e-4


def test_same_seed_same_image_whatever_the_batch_size_and_prompt_embeds(flux):
    _, parts, _ = flux
    kw = dict(height=16, width=16, steps=2, max_sequence_length=T5_LENGTH, output_type="latent", progress=False, seed=3)
    together = flux_text_to_image(parts, PROMPTS, batch_size=2, **kw)
    alone = flux_text_to_image(parts, PROMPTS, batch_size=1, **kw)
    with torch.no_grad():  # as inside the pipeline (transformers' T5 rounds differently when tracking gradients)
        cond, _ = encode_flux_prompts(parts.text_encoder, parts.text_encoder_2, PROMPTS, max_sequence_length=T5_LENGTH)
    embedded = flux_text_to_image(parts, None, prompt_embeds=cond["context"], pooled_prompt_embeds=cond["pooled"], **kw)
    assert together.shape == (2, 4, 8, 8) and together.abs().max() > 0.1
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)
    torch.testing.assert_close(embedded, together, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=18), "height=18 must be a positive multiple of 4"),
    (dict(latents=torch.zeros(2, 3, 8, 8)), "do not fit the transformer"),
    (dict(latents=torch.zeros(3, 4, 8, 8)), "latents has 3 samples for 2 prompts"),
    (dict(prompts=None, prompt_embeds=torch.zeros(2, 4, 32)), "prompt_embeds and pooled_prompt_embeds together"),
    (dict(sampler="nope"), "sampler='nope' is unknown"),
    (dict(true_cfg_scale=2.0), "true_cfg_scale=2.0 needs negative_prompts"),
    (dict(true_cfg_scale=math.nan, negative_prompts=""), "true_cfg_scale=nan must be a finite number"),
    (dict(true_cfg_scale=2.0, negative_prompts=["a", "b", "c"]), "give one or 2 negatives"),
])
def test_bad_pipeline_input_is_named(flux, kwargs, match):
    _, parts, _ = flux
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=match):
        flux_text_to_image(parts, prompts, **{"height": 16, "width": 16, "progress": False, **kwargs})


def test_sample_command_reads_a_flux_folder(flux, tmp_path):
    _, parts, folder = flux
    assert model_family(folder) == "flux"
    out = tmp_path / "flux.png"
    argv = ["sample", "--model", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--height", "16", "--width",
            "24", "--steps", "2", "--seed", "4", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    assert (FLUX_DEFAULTS.sampler, FLUX_DEFAULTS.steps, FLUX_DEFAULTS.guidance_scale) == ("flow_euler", 28, 3.5)
    images = sample_folder(folder, PROMPTS, steps=2, seed=4, progress=False, height=16, width=24)
    want = flux_text_to_image(parts, PROMPTS, height=16, width=24, steps=2, seed=4, output_type="pt", progress=False)
    assert images.shape == (2, 3, 16, 24) and torch.equal(images, want)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(make_grid(want, nrow=2)))
    assert main([*argv, "--negative-prompt", "c d"]) == 2  # a Flux negative prompt needs true_cfg_scale (Python API)


# ----------------------------------------------------------------------------------------------
# LoRA: diffusers' Flux files load with the existing machinery (same module names, prefix "transformer.")


def test_diffusers_flux_lora_file_loads_with_the_transformer_prefix(tmp_path):
    pytest.importorskip("peft", reason="peft (test extra) makes the reference LoRA")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from peft import LoraConfig, get_peft_model_state_dict

    from difflab.adapters.lora import load_lora_weights

    base = tiny_transformer(True)
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "add_v_proj", "to_out.0", "proj_mlp", "proj_out",
                                                           "ff.net.2", "x_embedder"], alpha_pattern={"proj_mlp": 2})
    base.add_adapter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    FluxLoraLoaderMixin.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(base),
                                          transformer_lora_adapter_metadata=config.to_dict())
    net = load_flux_transformer(tmp_path / "base")
    with torch.no_grad():
        plain = net(*_inputs(), **_cond())
    modules = load_lora_weights(net, tmp_path / "lora", prefix="transformer.")
    with torch.no_grad():
        want = base(pack_latents(_inputs()[0]), _cond()["context"], _cond()["pooled"], _inputs()[1],
                    img_ids=latent_image_ids(2, 2), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.5])).sample
        got = net(*_inputs(), **_cond())
    assert len(modules) == len(get_peft_model_state_dict(base)) // 2 and (pack_latents(plain) - want).abs().max() > 1e-2
    torch.testing.assert_close(pack_latents(got), want, atol=1e-5, rtol=0)


def _inputs():
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(8)), torch.tensor([0.6])


def _cond():
    g = torch.Generator().manual_seed(9)
    return dict(context=torch.randn(1, 3, 32, generator=g), pooled=torch.randn(1, 32, generator=g), guidance_scale=3.5)
