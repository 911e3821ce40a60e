"""Stable Diffusion weights people have, loaded offline: diffusers folders, single files, key maps, export."""
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
from safetensors.torch import load_file, save_file

from difflab.io.diffusers_folder import (diffusion_from_scheduler_config, load_diffusers_folder, load_diffusers_unet,
                                         save_diffusers_folder, save_diffusers_text_encoder, save_diffusers_unet)
from difflab.io.keymaps import from_difflab, to_difflab
from difflab.io.keymaps.clip_text import difflab_to_open_clip, difflab_to_transformers, open_clip_to_difflab, transformers_to_difflab
from difflab.io.keymaps.unet_sd import original_table
from difflab.io.single_file import infer_clip_text_config, infer_unet_config, load_single_file, single_file_state
from difflab.nn.text import CLIPTextEncoderConfig
from difflab.nn.unet_sd import UNetSDConfig
from test_text import tiny_clip, write_tiny_tokenizer
from test_unet_sd import SD1_TINY, SD2_TINY, inputs, tiny_diffusers_unet

transformers = pytest.importorskip("transformers", reason="the text encoder needs transformers (the 'sd' extra)")

SD1_PIPE = {**SD1_TINY, "cross_attention_dim": 32}  # fits the tiny CLIP's width
SD2_PIPE = {**SD2_TINY, "cross_attention_dim": 32}
VAE_TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def unet_out(net, x, t, ctx, diffusers_model=False):
    with torch.no_grad():
        return net(x, t, encoder_hidden_states=ctx).sample if diffusers_model else net(x, t, context=ctx)


def unet_state_with_prefix(ref, prefix="model.diffusion_model."):
    """The tiny diffusers U-Net in the original layout, through the *reverse* direction of our table."""
    table = original_table(UNetSDConfig.from_diffusers_config(dict(ref.config)))
    return {prefix + k: v for k, v in from_difflab(ref.state_dict(), table).items()}


# ----------------------------------------------------------------------------------------------
# Key maps, both directions, against diffusers' own converters


@pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
def test_unet_table_agrees_with_diffusers_converter(config):
    ref = tiny_diffusers_unet(**config)
    state = ref.state_dict()
    original = unet_state_with_prefix(ref)
    assert all(k.startswith(("model.diffusion_model.input_blocks.", "model.diffusion_model.middle_block.",
                             "model.diffusion_model.output_blocks.", "model.diffusion_model.time_embed.",
                             "model.diffusion_model.out.")) for k in original)
    back = convert_ldm_unet_checkpoint(original, dict(ref.config))  # diffusers' own original -> diffusers map
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())
    ours = to_difflab({k[len("model.diffusion_model."):]: v for k, v in original.items()},
                      original_table(UNetSDConfig.from_diffusers_config(dict(ref.config))))
    assert set(ours) == set(state) and all(torch.equal(ours[k], v) for k, v in state.items())


def test_clip_tables_agree_with_diffusers_converters():
    ref = tiny_clip(hidden_act="gelu")
    ours = transformers_to_difflab(ref.state_dict())
    # transformers 4 layout (text_model.*), as SD 1.x files hold it under cond_stage_model.transformer.
    sd1 = {"cond_stage_model.transformer." + k: v for k, v in difflab_to_transformers(ours).items()}
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in sd1)
    converted = convert_ldm_clip_checkpoint(sd1)
    assert set(transformers_to_difflab(converted)) == set(ours)
    # OpenCLIP layout: fused q/k/v; SD 2.x files carry one more (unused) block, a projection and a logit scale
    open_clip = difflab_to_open_clip(ours)
    assert "transformer.resblocks.1.attn.in_proj_weight" in open_clip and open_clip["transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    extra = {k.replace("resblocks.1.", "resblocks.2."): torch.randn_like(v) for k, v in open_clip.items() if "resblocks.1." in k}
    full = {**open_clip, **extra, "text_projection": torch.randn(32, 32), "logit_scale": torch.tensor(4.6)}
    mine = open_clip_to_difflab(full)  # drops the last block (SD 2.x uses the penultimate layer)
    assert set(mine) == set(ours) and all(torch.equal(mine[k], v) for k, v in ours.items())
    theirs = transformers_to_difflab(convert_open_clip_checkpoint(ref, {"cond_stage_model.model." + k: v for k, v in full.items()}))
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())


# ----------------------------------------------------------------------------------------------
# Single-file checkpoints


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _text_ids():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 514, (2, 77), generator=g)
    ids[:, 0], ids[:, 20:] = 514, 515
    return ids


def test_sd1_single_file_loads_to_the_same_outputs(tmp_path, tokenizer_dir):
    from difflab.nn.vae import AutoencoderKL as DifflabVAE, VAEConfig

    ref_unet, ref_text = tiny_diffusers_unet(**SD1_PIPE), tiny_clip()
    vae = DifflabVAE(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)).eval()
    config = UNetSDConfig.from_diffusers_config(dict(ref_unet.config))
    tconfig = CLIPTextEncoderConfig.from_transformers_config(ref_text.config.to_dict())
    # the tiny diffusers/transformers weights in the original layout, through our tables' reverse direction
    text_sd1 = {"cond_stage_model.transformer." + k: v for k, v in difflab_to_transformers(transformers_to_difflab(ref_text.state_dict())).items()}
    from difflab.io.diffusers_vae import sd_single_file_state

    path = tmp_path / "tiny-sd1.safetensors"
    save_file({**unet_state_with_prefix(ref_unet), **text_sd1, **sd_single_file_state(vae)}, str(path))

    parts = load_single_file(path, unet_config=config, text_config=tconfig, vae_config=vae.config, tokenizer=tokenizer_dir)
    assert parts.diffusion["prediction"] == "eps" and parts.diffusion["schedule"] == "scaled_linear"
    x, t, ctx = inputs(SD1_PIPE)
    torch.testing.assert_close(unet_out(parts.unet, x, t, ctx), unet_out(ref_unet, x, t, ctx, True), atol=1e-5, rtol=0)
    ids = _text_ids()
    with torch.no_grad():
        want = ref_text(ids)
        hidden, pooled = parts.text_encoder(ids)
        z = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(parts.vae.decode(z), vae.decode(z))
    torch.testing.assert_close(hidden, want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, want.pooler_output, atol=1e-5, rtol=0)
    assert parts.text_encoder.encode(["abc"])[0].shape == (1, 77, 32)
    # what the shapes tell, inferred; what they cannot (heads, groups), given
    original = load_file(str(path))
    unet_original = {k[len("model.diffusion_model."):]: v for k, v in original.items() if k.startswith("model.diffusion_model.")}
    assert infer_unet_config(unet_original, num_heads=4, norm_num_groups=8, sample_size=8) == config
    assert infer_unet_config(unet_original, norm_num_groups=8).num_heads == (8, 8)  # SD 1.x's rule when not told
    assert infer_clip_text_config(parts.text_encoder.state_dict(), num_heads=4, bos_token_id=514, eos_token_id=515, pad_token_id=515) == tconfig
    # and the export writes the same file back
    again = single_file_state(parts.unet, parts.text_encoder, parts.vae)
    assert set(again) == set(original) and all(torch.equal(again[k], v) for k, v in original.items())


def test_sd2_single_file_with_openclip_text(tmp_path):
    ref_unet, ref_text = tiny_diffusers_unet(**SD2_PIPE), tiny_clip(hidden_act="gelu", num_hidden_layers=2)
    open_clip = difflab_to_open_clip(transformers_to_difflab(ref_text.state_dict()))
    extra = {k.replace("resblocks.1.", "resblocks.2."): torch.randn_like(v) for k, v in open_clip.items() if "resblocks.1." in k}
    text = {"cond_stage_model.model." + k: v for k, v in {**open_clip, **extra, "text_projection": torch.randn(32, 32)}.items()}
    path = tmp_path / "tiny-sd2.safetensors"
    save_file({**unet_state_with_prefix(ref_unet), **text}, str(path))
    config = UNetSDConfig.from_diffusers_config(dict(ref_unet.config))
    with pytest.raises(ValueError, match="prediction='v'"):
        load_single_file(path, unet_config=config)
    tconfig = CLIPTextEncoderConfig.from_transformers_config(ref_text.config.to_dict())
    parts = load_single_file(path, prediction="v", unet_config=config, text_config=tconfig, load_vae=False)
    assert parts.vae is None and parts.diffusion["prediction"] == "v" and parts.denoiser.prediction == "v"
    x, t, ctx = inputs(SD2_PIPE)
    torch.testing.assert_close(unet_out(parts.unet, x, t, ctx), unet_out(ref_unet, x, t, ctx, True), atol=1e-5, rtol=0)
    ids = _text_ids()
    with torch.no_grad():
        want = ref_text(ids)
        hidden, pooled = parts.text_encoder(ids)
    torch.testing.assert_close(hidden, want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, want.pooler_output, atol=1e-5, rtol=0)
    # inferred from shapes: linear projections, 2 blocks per level, 2 transformer layers; gelu, 2 of the 3 blocks
    original = {k[len("model.diffusion_model."):]: v for k, v in unet_state_with_prefix(ref_unet).items()}
    assert infer_unet_config(original, num_heads=(2, 4, 4), norm_num_groups=8, sample_size=8) == config
    with pytest.raises(ValueError, match="64-wide heads"):
        infer_unet_config(original, norm_num_groups=8)
    assert infer_clip_text_config(parts.text_encoder.state_dict(), hidden_act="gelu", num_heads=4, bos_token_id=514,
                                  eos_token_id=515, pad_token_id=515) == tconfig
    with pytest.raises(ValueError, match="num_heads"):  # 32 channels: no 64-wide heads to assume
        load_single_file(path, prediction="v", unet_config=config, load_vae=False)


def test_single_file_errors(tmp_path):
    with pytest.raises(ValueError, match="only .safetensors"):
        load_single_file(tmp_path / "model.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_single_file(tmp_path / "absent.safetensors")
    path = tmp_path / "vae-only.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=r"no U-Net tensors.*first_stage_model\."):
        load_single_file(path)
    ref = tiny_diffusers_unet(**SD1_TINY)
    state = unet_state_with_prefix(ref)
    state.pop("model.diffusion_model.middle_block.1.proj_out.bias")
    state["model.diffusion_model.middle_block.1.extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing keys \(1\): model\.diffusion_model\.middle_block\.1\.proj_out\.bias; "
                       r"unexpected keys \(1\): model\.diffusion_model\.middle_block\.1\.extra\.weight"):
        load_single_file(path, unet_config=UNetSDConfig.from_diffusers_config(dict(ref.config)))


# ----------------------------------------------------------------------------------------------
# Diffusers pipeline folders


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_TINY).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=tiny_clip(), tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
                                   unet=tiny_diffusers_unet(**SD1_PIPE), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(folder)
    return folder, pipe


def _check_against(pipe, parts):
    x, t, ctx = inputs(SD1_PIPE)
    torch.testing.assert_close(unet_out(parts.unet, x, t, ctx), unet_out(pipe.unet, x, t, ctx, True), atol=1e-5, rtol=0)
    prompts, negatives = ["a photo of abc", "b"], ["", "c d"]
    with torch.no_grad():
        want, want_neg = pipe.encode_prompt(prompts, "cpu", 1, True, negatives)  # diffusers' own prompt encoding
        hidden, _ = parts.text_encoder.encode(prompts + negatives)
    torch.testing.assert_close(hidden, torch.cat([want, want_neg]), atol=1e-5, rtol=0)
    with torch.no_grad():
        z = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(parts.vae.decode(z), pipe.vae.decode(z).sample, atol=1e-5, rtol=0)


def test_diffusers_folder_loads_to_the_same_outputs(pipeline_dir):
    folder, pipe = pipeline_dir
    parts = load_diffusers_folder(folder)
    _check_against(pipe, parts)
    # scheduler -> frame and prediction
    assert parts.diffusion == {"frame": "vp_discrete", "schedule": "scaled_linear", "T": 1000, "zero_terminal_snr": False,
                               "prediction": "v", "beta_start": 0.00085, "beta_end": 0.012}
    assert parts.sampling["scheduler"] == "DDIMScheduler" and parts.sampling["timestep_spacing"] == "leading" and parts.sampling["steps_offset"] == 1
    torch.testing.assert_close(parts.denoiser.frame.alpha_bars, pipe.scheduler.alphas_cumprod.double(), atol=1e-6, rtol=0)  # theirs: float32
    only = load_diffusers_folder(folder, components=("unet", "scheduler"))
    assert only.text_encoder is None and only.vae is None and only.denoiser.prediction == "v"


def test_zero_snr_and_cosine_schedules_map_to_frames():
    for kwargs in [dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, beta_start=0.00085, beta_end=0.012),
                   dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500, prediction_type="sample")]:
        sched = DDIMScheduler(**kwargs)
        diffusion, _ = diffusion_from_scheduler_config(dict(sched.config))
        from difflab.io.spec import build_frame

        torch.testing.assert_close(build_frame(diffusion).alpha_bars, sched.alphas_cumprod.double(), atol=1e-6, rtol=0)
    assert diffusion["prediction"] == "x0"
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusion_from_scheduler_config({"beta_schedule": "exp"})


def test_export_reloads_in_diffusers(pipeline_dir, tmp_path):
    folder, pipe = pipeline_dir
    parts = load_diffusers_folder(folder)
    out = save_diffusers_folder(parts, tmp_path / "export")
    again = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None)
    _check_against(again, parts)
    assert isinstance(again.scheduler, DDIMScheduler) and again.scheduler.config.prediction_type == "v_prediction"
    # the components alone, too
    save_diffusers_unet(parts.unet, tmp_path / "unet")
    save_diffusers_text_encoder(parts.text_encoder, tmp_path / "text_encoder")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"), local_files_only=True).eval()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in parts.unet.state_dict().items())
    text = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder"), local_files_only=True)
    assert "text_model.final_layer_norm.weight" in load_file(str(tmp_path / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in parts.text_encoder.state_dict().items())


def test_folder_errors_name_the_file_or_keys(pipeline_dir, tmp_path):
    folder, _ = pipeline_dir
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_diffusers_folder(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("conv_in.bias")
    state["conv_in.extra"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \(1\): conv_in\.bias; unexpected keys \(1\): conv_in\.extra"):
        load_diffusers_unet(broken / "unet")
    weights.rename(broken / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model\.safetensors.*pickle files are never loaded"):
        load_diffusers_folder(broken, components=("unet",))
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(FileNotFoundError, match="no text_encoder/ folder"):
        load_diffusers_folder(broken, components=("text_encoder",))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline",
                                                         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(ValueError, match="two text encoders"):
        load_diffusers_folder(broken)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(ValueError, match="addition_embed_type"):
        load_diffusers_unet(broken / "unet")
