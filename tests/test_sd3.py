"""Stable Diffusion 3 (Esser et al. 2024): the MMDiT, the three text encoders and text to image
against diffusers' SD3Transformer2DModel and StableDiffusion3Pipeline, on tiny random components
saved with save_pretrained and loaded with difflab (float32); flow-matching training of a tiny MMDiT."""
import json

import numpy as np
import pytest
import torch

from difflab.samplers.euler import sample_euler
from difflab.core import Denoiser, Flow, schedules
from difflab.io.sd3_folder import diffusion_from_flow_scheduler, load_sd3_folder, load_sd3_transformer, save_sd3_transformer
from difflab.io.verify import verify_checkpoint
from difflab.io.spec import build_denoiser, load_denoiser, make_spec
from difflab.nn.mmdit import PRESETS, MMDiT, MMDiTConfig
from difflab.pipelines.sd3 import sd3_image_to_image, sd3_sigmas, sd3_text_to_image
from difflab.train import DiffusionObjective, TrainConfig, fit

transformers = pytest.importorskip("transformers", reason="the text encoders need transformers (the 'sd' extra)")
diffusers = pytest.importorskip("diffusers")
from test_text import write_tiny_tokenizer  # noqa: E402

# diffusers' own SD3 test shapes (joint_attention_dim raised to 48 so that the two CLIPs' 16 + 24
# channels fit in it: diffusers' tests use 32 + 32 > 32, which F.pad silently cuts)
TRANSFORMER = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                   joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                   pos_embed_max_size=96)
PROMPTS, NEGATIVES = ["a photo of abc", "b"], ["", "c d"]


def randomize(module, seed, std=0.2):
    """Every parameter redrawn N(0, std^2) (diffusers zero-initialises nothing here, but a LayerNorm's
    weight of 1 or a bias of 0 would hide a swapped name)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def diffusers_transformer(seed=0, **kw):
    return randomize(diffusers.SD3Transformer2DModel(**{**TRANSFORMER, **kw}), seed)


@pytest.mark.parametrize("kw", [dict(patch_size=2, num_layers=2), dict(qk_norm="rms_norm", dual_attention_layers=(0, 1), num_layers=3)],
                         ids=["sd3", "sd35-qknorm-dual"])
def test_mmdit_matches_sd3_transformer(tmp_path, kw):
    ref = diffusers_transformer(**kw)
    ref.save_pretrained(tmp_path)
    config = MMDiTConfig.from_diffusers_config(json.loads((tmp_path / "config.json").read_text()))
    net = MMDiT(config)
    # the position table difflab computes is diffusers' (it is also loaded from the file)
    torch.testing.assert_close(net.pos_embed.pos_embed, ref.pos_embed.pos_embed, rtol=0, atol=1e-6)
    net = load_sd3_transformer(tmp_path)
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 7, 48, generator=g), torch.randn(2, 64, generator=g)
    t = torch.tensor([999.0, 312.5])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        got = net(x, t, context=ctx, pooled=pooled)
    assert want.abs().max() > 1  # a real signal
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert MMDiTConfig.from_diffusers_config(config.to_diffusers_config()) == config


def test_gradient_checkpointing_changes_no_gradient():
    from difflab.perf.memory import set_gradient_checkpointing

    torch.manual_seed(0)
    net = randomize(MMDiT(PRESETS["tiny"]), 0).train()
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16), torch.randn(2, 8)
    grads = []
    for on in (False, True):
        assert set_gradient_checkpointing(net, on) == 2
        net.zero_grad()
        net(x, torch.tensor([10.0, 900.0]), context=ctx, pooled=pooled).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert any(g.abs().max() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mmdit_bad_inputs():
    net = MMDiT(PRESETS["tiny"])
    with pytest.raises(ValueError, match="patch_size=2"):
        net(torch.randn(1, 4, 7, 8), torch.ones(1))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        net(torch.randn(1, 4, 34, 34), torch.ones(1))
    with pytest.raises(ValueError, match="context must be"):
        net(torch.randn(1, 4, 8, 8), torch.ones(1), context=torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="pooled must be"):
        net(torch.randn(1, 4, 8, 8), torch.ones(1), pooled=torch.randn(1, 3))
    with pytest.raises(ValueError, match="caption_projection_dim"):
        MMDiTConfig(caption_projection_dim=100)
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig(qk_norm="layer_norm")


# ----------------------------------------------------------------------------------------------
# A tiny StableDiffusion3Pipeline folder


def tiny_clip(seed, hidden):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=516, max_position_embeddings=77, bos_token_id=514, eos_token_id=515,
                                         pad_token_id=515, projection_dim=32, hidden_act="gelu")
    return randomize(transformers.CLIPTextModelWithProjection(config), seed)


def tiny_t5_tokenizer():
    """A T5 (unigram) tokenizer built offline from a word list: no sentencepiece, no download."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in ["a", "photo", "of", "abc", "b", "c", "d"]]
    return transformers.T5Tokenizer(vocab=pieces + [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz\u2581"], extra_ids=0)


def tiny_t5(seed=3):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=37, d_model=48, d_ff=40, d_kv=8, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    return randomize(transformers.T5EncoderModel(config), seed, std=0.1)


def tiny_vae(seed=4):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                  sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False, use_post_quant_conv=False,
                                  shift_factor=0.0609, scaling_factor=1.5035)
    with torch.no_grad():  # a (nearly) point-mass posterior: logvar = -30, std 3e-7, whoever draws its noise
        vae.encoder.conv_out.weight[4:] = 0
        vae.encoder.conv_out.bias[4:] = -30.0
    return vae.eval()


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers' StableDiffusion3Pipeline, its folder) with tiny random components."""
    folder, tok = tmp_path_factory.mktemp("sd3"), write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    clip_tok = transformers.CLIPTokenizer.from_pretrained(str(tok))
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=diffusers_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=tiny_clip(1, 16), tokenizer=clip_tok, text_encoder_2=tiny_clip(2, 24), tokenizer_2=clip_tok,
        text_encoder_3=tiny_t5(), tokenizer_3=tiny_t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def parts(sd3):
    return load_sd3_folder(sd3[1], max_sequence_length=12)


def test_text_encoders_match_encode_prompt(sd3, parts):
    pipe, _ = sd3
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                     max_sequence_length=12)
        got, got_pooled = parts.text_encoder.encode(PROMPTS)
    assert got.shape == (2, 77 + 12, 48) and got_pooled.shape == (2, 64)
    assert want[:, 77:].abs().max() > 0.1 and want[:, :77].abs().max() > 0.1  # T5 and CLIP both give a signal
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_pooled, want_pooled, rtol=0, atol=1e-5)


def test_missing_encoders_are_zeros(sd3, parts, tmp_path):
    pipe, folder = sd3
    # a folder saved without T5 (model_index.json lists it as null) reads like one whose T5 is left out
    diffusers.StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None}).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    no_t5 = load_sd3_folder(tmp_path, max_sequence_length=12).text_encoder
    assert no_t5.t5 is None and no_t5.clip_l is not None and no_t5.clip_g is not None
    t5 = pipe.text_encoder_3
    pipe.text_encoder_3 = None  # diffusers' pipeline without T5: zeros (B, max_sequence_length, joint_attention_dim)
    try:
        with torch.no_grad():
            want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                         max_sequence_length=12)
    finally:
        pipe.text_encoder_3 = t5
    got, got_pooled = no_t5.encode(PROMPTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_pooled, want_pooled, rtol=0, atol=1e-5)
    assert got[:, 77:].abs().max() == 0
    # without CLIP-L: its 16 channels and its 32 pooled features are zeros, the rest unchanged
    only_g = load_sd3_folder(folder, components=("text_encoder_2", "text_encoder_3"), max_sequence_length=12).text_encoder
    full, full_pooled = parts.text_encoder.encode(PROMPTS)
    ctx, pooled = only_g.encode(PROMPTS)
    assert ctx[:, :77, :16].abs().max() == 0 and pooled[:, :32].abs().max() == 0
    torch.testing.assert_close(ctx[:, :, 16:], full[:, :, 16:], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[:, 32:], full_pooled[:, 32:], rtol=0, atol=1e-6)


def test_default_grid_is_flow_match_euler_grid():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(7)
    ours = sd3_sigmas(7, 3.0)
    # the first level is t = 1 in diffusers; the largest finite sigma (t = 4096/4097) for difflab's
    # general samplers, exactly 1 (FLOW_SIGMA_ONE) for the flow samplers
    assert float(schedules.flow_t(ours[:1])) == pytest.approx(4096 / 4097) and ours[-1] == 0
    torch.testing.assert_close(schedules.flow_t(ours[1:-1]), sched.sigmas[1:-1].double(), rtol=2e-7, atol=0)
    exact = sd3_sigmas(7, 3.0, exact_one=True)
    assert float(schedules.flow_t(exact[:1])) == 1.0 and torch.equal(exact[1:], ours[1:])
    with pytest.raises(ValueError, match="flow_euler"):  # only the flow samplers step from t = 1 exactly
        sample_euler(lambda x, s: x, torch.zeros(1, 2), exact)


def run_both(pipe, parts, *, steps=4, guidance_scale=5.0, output_type="latent"):
    """diffusers' pipeline and difflab's sd3_text_to_image on the same prompts, negatives and
    starting latents, each on its own default grid: t = 1 exactly, then diffusers' shifted levels
    (which it rounds to float32)."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, guidance_scale=guidance_scale,
                      latents=latents, height=16, width=16, max_sequence_length=12, output_type=output_type).images
    ours = sd3_text_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, negative_prompts=NEGATIVES,
                             steps=steps, guidance_scale=guidance_scale, shift=parts.sampling["shift"], latents=latents,
                             height=16, width=16, output_type=output_type, progress=False)
    return ours, theirs


def test_text_to_image_matches_stable_diffusion_3_pipeline(sd3, parts):
    pipe, _ = sd3
    assert parts.sampling["shift"] == 3.0 and parts.diffusion["time_scale"] == 1000.0
    ours, theirs = run_both(pipe, parts)
    assert theirs.abs().max() > 0.5  # a real signal
    # max error in units of max(1, RMS) as tests/test_text_to_image.py measures it: float32 rounding
    # of diffusers' timesteps grows through the random transformer
    err = float((ours - theirs).abs().max()) / max(1.0, float(theirs.pow(2).mean().sqrt()))
    assert err < 1e-4, err
    # decoded through the 16-channel-style VAE's shift and scale (diffusers' "np": (B, H, W, C) in [0, 1])
    ours_np, theirs_np = run_both(pipe, parts, output_type="np")
    assert ours_np.shape == theirs_np.shape == (2, 16, 16, 3)
    assert np.abs(ours_np - theirs_np).max() < 1e-4


def test_precomputed_embeddings_give_the_same_images(parts):
    kw = dict(steps=2, guidance_scale=3.0, height=16, width=16, output_type="latent", progress=False, seed=2)
    with torch.no_grad():
        ctx, pooled = parts.text_encoder.encode(PROMPTS + NEGATIVES)
    want = sd3_text_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, negative_prompts=NEGATIVES, **kw)
    got = sd3_text_to_image(parts.denoiser, None, parts.vae, prompt_embeds=ctx[:2], pooled_prompt_embeds=pooled[:2],
                            negative_prompt_embeds=ctx[2:], negative_pooled_prompt_embeds=pooled[2:], **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="together"):
        sd3_text_to_image(parts.denoiser, None, parts.vae, prompt_embeds=ctx[:2], **kw)
    with pytest.raises(ValueError, match="pooled_prompt_embeds must be"):
        sd3_text_to_image(parts.denoiser, None, parts.vae, prompt_embeds=ctx[:2], pooled_prompt_embeds=pooled[:3], **kw)


def test_image_to_image_matches_stable_diffusion_3_img2img_pipeline(sd3, parts):
    """Started at sigmas[2] of 4 (strength 0.5), so the grid is diffusers' own (its t = 1 level is skipped)."""
    pipe, _ = sd3
    img2img = diffusers.StableDiffusion3Img2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    g = torch.Generator().manual_seed(7)
    torch.randn(2, 4, 8, 8, generator=g)  # diffusers draws the posterior sample first, then the noise
    noise = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        theirs = img2img(PROMPTS, image=(image + 1) / 2, height=16, width=16, strength=0.5, num_inference_steps=4, guidance_scale=5.0,
                         negative_prompt=NEGATIVES, generator=torch.Generator().manual_seed(7), max_sequence_length=12,
                         output_type="latent").images
    ours = sd3_image_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, strength=0.5, steps=4,
                              guidance_scale=5.0, negative_prompts=NEGATIVES, noise=noise, output_type="latent", progress=False)
    assert theirs.abs().max() > 0.5
    err = float((ours - theirs).abs().max()) / max(1.0, float(theirs.pow(2).mean().sqrt()))
    assert err < 1e-4, err


def test_flow_scheduler_settings():
    diffusion, sampling = diffusion_from_flow_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                                         "num_train_timesteps": 1000})
    assert diffusion["frame"] == "flow" and diffusion["prediction"] == "flow" and sampling["shift"] == 3.0
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        diffusion_from_flow_scheduler({"use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="flow-matching"):
        diffusion_from_flow_scheduler({"_class_name": "DDIMScheduler"})


def test_non_sd3_folder_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="not a StableDiffusion3Pipeline"):
        load_sd3_folder(tmp_path)


# ----------------------------------------------------------------------------------------------
# Training: flow matching is the diffusion objective in the Flow frame


def test_tiny_mmdit_trains_by_flow_matching_and_round_trips(tmp_path):
    spec = make_spec("mmdit", PRESETS["tiny"], {"frame": "flow", "time_scale": 1000.0, "prediction": "flow"})
    denoiser = build_denoiser(spec, seed=0)
    assert isinstance(denoiser.net, MMDiT) and isinstance(denoiser.frame, Flow)
    g = torch.Generator().manual_seed(0)
    data = {"x0": torch.randn(8, 4, 8, 8, generator=g), "context": torch.randn(8, 3, 16, generator=g),
            "pooled": torch.randn(8, 8, generator=g)}
    before = {k: v.clone() for k, v in denoiser.net.state_dict().items()}
    state = fit(DiffusionObjective(denoiser), data, TrainConfig(steps=3, batch_size=4, lr=1e-2, progress=False, log_every=1,
                                                                checkpoint_every=0), tmp_path, spec=spec)
    assert state.step == 3 and all(np.isfinite(h["loss"]) for h in state.history)
    assert any(not torch.equal(before[k], v) for k, v in denoiser.net.state_dict().items())
    loaded, _ = load_denoiser(tmp_path, weights="model")
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0])
    cond = dict(context=data["context"][:2], pooled=data["pooled"][:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, **cond), denoiser.eval()(x, sigma, **cond))
    report = verify_checkpoint(tmp_path)  # difflab check: shapes against the spec, finite weights
    assert report.ok and report.checks["shapes"] == report.checks["finite"] == "ok", report.checks
    # exported as a diffusers folder, it is diffusers' SD3Transformer2DModel with the same output
    save_sd3_transformer(denoiser.net, tmp_path / "export")
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "export").eval()
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=cond["context"], pooled_projections=cond["pooled"], timestep=t).sample
        torch.testing.assert_close(denoiser.net(x, t, **cond), want, rtol=0, atol=1e-6)
    assert want.abs().max() > 0  # trained away from the zero-initialised output


# ----------------------------------------------------------------------------------------------
# The command line: difflab sample --model FOLDER --prompt ...


def test_sample_command_draws_an_sd3_folder(sd3, parts, tmp_path):
    from PIL import Image

    from difflab.cli import main
    from difflab.pipelines.folder import sample_folder

    _, folder = sd3
    out = tmp_path / "sd3.png"
    argv = ["sample", "--model", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2",
            "--height", "16", "--width", "16", "--out", str(out), "--device", "cpu", "--seed", "3", "--dtype", "float32"]
    assert main(argv) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (1 + 17, 1 + 2 * 17, 3)  # two 16x16 images side by side, one-pixel borders
    # the images are those of the API with the folder's own settings (T5's default 256 tokens)
    images = sample_folder(folder, PROMPTS, height=16, width=16, steps=2, seed=3, progress=False)
    want = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(grid[1:17, 1:17].astype(int) - want[0]).max() <= 1
    assert np.abs(grid[1:17, 18:34].astype(int) - want[1]).max() <= 1


def test_sample_folder_reads_an_sd1_folder_with_its_scheduler_spacing(tmp_path):
    from test_text_to_image import build_pipeline

    from difflab.pipelines import text_to_image
    from difflab.pipelines.folder import model_family as folder_family, sample_folder

    _, sd = build_pipeline(tmp_path / "sd1", write_tiny_tokenizer(tmp_path / "tok"))  # DDIM, "leading", steps_offset 1
    assert folder_family(tmp_path / "sd1") == "stable-diffusion" and sd.sampling["timestep_spacing"] == "leading"
    got = sample_folder(tmp_path / "sd1", PROMPTS, steps=3, seed=1, output_type="latent", progress=False)
    want = text_to_image(sd.denoiser, sd.text_encoder, sd.vae, PROMPTS, steps=3, seed=1, spacing="leading", steps_offset=1,
                         output_type="latent", progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_bfloat16_folder_samples(sd3, parts):
    """Weights in bf16 (the sampler's arithmetic stays float32): the images are those of float32 up
    to bf16's 8-bit mantissa carried through a random transformer."""
    half = load_sd3_folder(sd3[1], max_sequence_length=12, dtype=torch.bfloat16)
    assert half.transformer.proj_out.weight.dtype == half.text_encoder.t5.dtype == torch.bfloat16
    kw = dict(steps=2, height=16, width=16, output_type="latent", progress=False)
    got = sd3_text_to_image(half.denoiser, half.text_encoder, half.vae, PROMPTS, **kw)
    want = sd3_text_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, **kw)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert 0 < float((got - want).abs().max()) < 0.1 * float(want.abs().max())


def test_clip_hidden_states_without_the_final_norm_are_transformers_hidden_states(sd3, parts):
    clip = parts.text_encoder.clip_g
    ids = torch.randint(0, 514, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = sd3[0].text_encoder_2(ids, output_hidden_states=True).hidden_states
        for skip in (0, 1):
            torch.testing.assert_close(clip(ids, clip_skip=skip, final_norm=False)[0], want[-1 - skip], rtol=0, atol=1e-5)
