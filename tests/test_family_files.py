"""Single-file SDXL, SD3 and Flux checkpoints in each family's original layout: a file written from a
tiny random model is what diffusers' own converters read back to the diffusers weights (SDXL, SD3),
or is built here key by key from the BFL names (Flux); difflab reads it to the same weights and
outputs as the diffusers folder, and ``difflab sample --model FILE --base FOLDER`` samples it."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint, convert_sd3_t5_checkpoint_to_diffusers,
                                                 convert_sd3_transformer_checkpoint_to_diffusers)
from PIL import Image
from safetensors.torch import load_file, save_file

from difflab.cli import main
from difflab.io.family_files import (flux_original_state, load_flux_single_file, load_sd3_single_file, load_sdxl_single_file,
                                     mmdit_original_state, save_family_single_file, sd3_single_file_state, sdxl_single_file_state,
                                     single_file_family)
from difflab.io.flux_folder import load_flux_transformer
from difflab.io.images import make_grid
from difflab.io.sd3_folder import load_sd3_transformer
from difflab.pipelines.folder import model_family, sample_folder

transformers = pytest.importorskip("transformers", reason="the text encoders need transformers (the 'sd' extra)")
from test_flux import TINY as FLUX_TINY  # noqa: E402
from test_flux import build as build_flux  # noqa: E402
from test_flux import tiny_transformer as tiny_flux  # noqa: E402
from test_sd3 import PROMPTS, diffusers_transformer, parts, sd3  # noqa: E402,F401  (fixtures)
from test_sdxl import base, start_latents, tokenizers  # noqa: E402,F401  (fixtures)
from test_text import write_tiny_tokenizer  # noqa: E402


def same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def untext(state):
    """transformers CLIP keys without the text_model. wrapper and the position_ids buffer."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


# ----------------------------------------------------------------------------------------------
# SDXL: the sgm layout


@pytest.fixture(scope="module")
def sdxl_file(base, tmp_path_factory):
    _, parts, folder = base
    path = tmp_path_factory.mktemp("sdxl_file") / "sdxl.safetensors"
    save_family_single_file(path, sdxl_single_file_state(parts.unet, parts.text_encoder, parts.vae))
    return path


def test_sdxl_file_is_what_diffusers_converters_read(base, sdxl_file):
    pipe, _, _ = base
    tensors = load_file(str(sdxl_file))
    assert single_file_family(sdxl_file) == "sdxl"
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in tensors
    unet = convert_ldm_unet_checkpoint(dict(tensors), dict(pipe.unet.config))
    assert unet.keys() == pipe.unet.state_dict().keys() and all(torch.equal(unet[k], v) for k, v in pipe.unet.state_dict().items())
    clip_g = untext(convert_open_clip_checkpoint(pipe.text_encoder_2, tensors, prefix="conditioner.embedders.1.model."))
    want = untext(pipe.text_encoder_2.state_dict())
    assert clip_g.keys() == want.keys() and all(torch.equal(clip_g[k], v) for k, v in want.items())
    vae = convert_ldm_vae_checkpoint({k: v for k, v in tensors.items() if k.startswith("first_stage_model.")}, dict(pipe.vae.config))
    assert all(torch.equal(vae[k], v) for k, v in pipe.vae.state_dict().items())


def test_sdxl_file_loads_to_the_folders_weights_and_outputs(base, sdxl_file):
    pipe, folder_parts, folder = base
    enc = folder_parts.text_encoder
    got = load_sdxl_single_file(sdxl_file, base=folder, num_heads=folder_parts.unet.config.num_heads, norm_num_groups=1,
                                addition_time_embed_dim=8, sample_size=8,
                                text_config=enc.text_encoder.config, text_config_2=enc.text_encoder_2.config,
                                vae_config=folder_parts.vae.config)
    want = folder_parts.unet.config  # depth 2 where there is attention, added embedding, linear projections: from shapes
    assert [got.unet.config.transformer_depth(i) for i in (1,)] == [2] and got.unet.config.projection_class_embeddings_input_dim == 80
    assert dataclasses.replace(got.unet.config, transformer_layers_per_block=want.transformer_layers_per_block) == want
    for a, b in ((got.unet, folder_parts.unet), (got.text_encoder, enc), (got.vae, folder_parts.vae)):
        same_state(a, b)
    assert got.sampling == folder_parts.sampling and got.diffusion == folder_parts.diffusion
    with torch.no_grad():
        hidden, pooled = got.text_encoder.encode(PROMPTS)
        want = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
        x, t = start_latents(), torch.tensor([10.0, 500.0])
        out = got.unet(x, t, context=hidden, text_embeds=pooled, time_ids=ids)
        ref = pipe.unet(x, t, encoder_hidden_states=want[0], added_cond_kwargs={"text_embeds": want[2], "time_ids": ids}).sample
    torch.testing.assert_close(hidden, want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_sdxl_refiner_file_has_one_open_clip(base, tmp_path):
    _, parts, _ = base
    second = parts.text_encoder.text_encoder_2
    path = save_family_single_file(tmp_path / "refiner.safetensors", sdxl_single_file_state(parts.unet, second))
    got = load_sdxl_single_file(path, num_heads=parts.unet.config.num_heads, norm_num_groups=1, addition_time_embed_dim=8,
                                text_config_2=second.config)
    assert got.requires_aesthetics_score and not got.force_zeros_for_empty_prompt and got.vae is None
    same_state(got.text_encoder, second)


# ----------------------------------------------------------------------------------------------
# SD3: Stability's layout


@pytest.mark.parametrize("kw", [dict(num_layers=2, patch_size=2), dict(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,))],
                         ids=["sd3", "sd35-qknorm-dual"])
def test_mmdit_original_layout_is_what_diffusers_converter_reads(tmp_path, kw):
    ref = diffusers_transformer(**kw)
    ref.save_pretrained(tmp_path / "t")
    ours = load_sd3_transformer(tmp_path / "t")
    original = {"model.diffusion_model." + k: v for k, v in mmdit_original_state(ours).items()}
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in original
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    want = ref.state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], v) for k, v in want.items())
    path = save_family_single_file(tmp_path / "mmdit.safetensors", original)
    got = load_sd3_single_file(path, attention_head_dim=8, sample_size=ours.config.sample_size)
    assert got.transformer.config == ours.config
    same_state(got.transformer, ours)


def test_sd3_file_loads_to_the_folders_weights_and_outputs(sd3, parts, tmp_path):
    pipe, folder = sd3
    path = save_family_single_file(tmp_path / "sd3.safetensors",
                                   sd3_single_file_state(parts.transformer, parts.text_encoder, parts.vae))
    tensors = load_file(str(path))
    t5 = convert_sd3_t5_checkpoint_to_diffusers(tensors)
    assert all(torch.equal(t5[k], v) for k, v in pipe.text_encoder_3.state_dict().items() if k in t5)
    assert single_file_family(path) == "sd3" and model_family(path) == "sd3-file"
    enc = parts.text_encoder
    got = load_sd3_single_file(path, base=folder, attention_head_dim=8, sample_size=32, max_sequence_length=12,
                               text_configs=(enc.clip_l.config, enc.clip_g.config), vae_config=parts.vae.config)
    for a, b in ((got.transformer, parts.transformer), (got.text_encoder, enc), (got.vae, parts.vae)):
        same_state(a, b)
    assert got.sampling == parts.sampling and got.diffusion == parts.diffusion
    with torch.no_grad():
        context, pooled = got.text_encoder.encode(PROMPTS)
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                     max_sequence_length=12)
    torch.testing.assert_close(context, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Flux: Black Forest Labs' layout, its keys built here from the diffusers names


def bfl_state(ref) -> dict:
    """The BFL release layout of a diffusers FluxTransformer2DModel, key by key (the reference code's names)."""
    s, out = ref.state_dict(), {}
    cat = lambda *names: torch.cat([s[n] for n in names])  # noqa: E731
    swap = lambda t: torch.cat(t.chunk(2)[::-1])  # noqa: E731  (diffusers' scale, shift -> BFL's shift, scale)
    for ours, theirs in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in")):
        for w in ("weight", "bias"):
            if f"time_text_embed.{ours}.linear_1.{w}" in s:
                out[f"{theirs}.in_layer.{w}"] = s[f"time_text_embed.{ours}.linear_1.{w}"]
                out[f"{theirs}.out_layer.{w}"] = s[f"time_text_embed.{ours}.linear_2.{w}"]
    for w in ("weight", "bias"):
        out[f"txt_in.{w}"], out[f"img_in.{w}"] = s[f"context_embedder.{w}"], s[f"x_embedder.{w}"]
        out[f"final_layer.linear.{w}"] = s[f"proj_out.{w}"]
        out[f"final_layer.adaLN_modulation.1.{w}"] = swap(s[f"norm_out.linear.{w}"])
        for i in range(FLUX_TINY["num_layers"]):
            d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            out[f"{b}img_mod.lin.{w}"], out[f"{b}txt_mod.lin.{w}"] = s[f"{d}norm1.linear.{w}"], s[f"{d}norm1_context.linear.{w}"]
            out[f"{b}img_attn.qkv.{w}"] = cat(*(f"{d}attn.to_{p}.{w}" for p in "qkv"))
            out[f"{b}txt_attn.qkv.{w}"] = cat(*(f"{d}attn.add_{p}_proj.{w}" for p in "qkv"))
            out[f"{b}img_attn.proj.{w}"], out[f"{b}txt_attn.proj.{w}"] = s[f"{d}attn.to_out.0.{w}"], s[f"{d}attn.to_add_out.{w}"]
            for j, (x, c) in {"0": ("ff.net.0.proj", "ff_context.net.0.proj"), "2": ("ff.net.2", "ff_context.net.2")}.items():
                out[f"{b}img_mlp.{j}.{w}"], out[f"{b}txt_mlp.{j}.{w}"] = s[f"{d}{x}.{w}"], s[f"{d}{c}.{w}"]
        for i in range(FLUX_TINY["num_single_layers"]):
            d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[f"{b}modulation.lin.{w}"] = s[f"{d}norm.linear.{w}"]
            out[f"{b}linear1.{w}"] = cat(f"{d}attn.to_q.{w}", f"{d}attn.to_k.{w}", f"{d}attn.to_v.{w}", f"{d}proj_mlp.{w}")
            out[f"{b}linear2.{w}"] = s[f"{d}proj_out.{w}"]
    for i in range(FLUX_TINY["num_layers"]):
        for side, ours in (("img", ""), ("txt", "added_")):
            out[f"double_blocks.{i}.{side}_attn.norm.query_norm.scale"] = s[f"transformer_blocks.{i}.attn.norm_{ours}q.weight"]
            out[f"double_blocks.{i}.{side}_attn.norm.key_norm.scale"] = s[f"transformer_blocks.{i}.attn.norm_{ours}k.weight"]
    for i in range(FLUX_TINY["num_single_layers"]):
        out[f"single_blocks.{i}.norm.query_norm.scale"] = s[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = s[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in s.values())  # every weight placed once
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["release", "repacked"])
def test_flux_file_loads_to_the_folders_weights_and_outputs(tmp_path, prefix):
    ref = tiny_flux(guidance_embeds=True)
    ref.save_pretrained(tmp_path / "t")
    folder_net = load_flux_transformer(tmp_path / "t")
    bfl = bfl_state(ref)
    assert flux_original_state(folder_net).keys() == bfl.keys()
    assert all(torch.equal(v, bfl[k]) for k, v in flux_original_state(folder_net).items())  # our inverse agrees
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()}, str(tmp_path / "flux1.safetensors"))
    got = load_flux_single_file(tmp_path / "flux1.safetensors", axes_dims_rope=FLUX_TINY["axes_dims_rope"])
    assert got.transformer.config == folder_net.config and got.vae is None
    same_state(got.transformer, folder_net)
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 4, 4, 6, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        out = got.transformer(x, torch.tensor([0.3, 0.9]), context=ctx, pooled=pooled, guidance_scale=3.5)
        want = folder_net(x, torch.tensor([0.3, 0.9]), context=ctx, pooled=pooled, guidance_scale=3.5)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        load_flux_single_file(tmp_path / "flux1.safetensors")  # 16-wide heads: no published RoPE split to assume
    half = load_flux_single_file(tmp_path / "flux1.safetensors", axes_dims_rope=FLUX_TINY["axes_dims_rope"], dtype=torch.bfloat16)
    assert {p.dtype for p in half.transformer.parameters()} == {torch.bfloat16}
    assert torch.equal(half.transformer.x_embedder.weight, folder_net.x_embedder.weight.bfloat16())


def test_sample_command_on_a_flux_file_with_its_base_folder(tmp_path):
    from test_flux import SCHNELL_SCHEDULER
    pipe, parts, folder = build_flux(tmp_path / "schnell", write_tiny_tokenizer(tmp_path / "tok"), False, SCHNELL_SCHEDULER)
    save_file({k: v.contiguous() for k, v in bfl_state(pipe.transformer).items()}, str(tmp_path / "schnell.safetensors"))
    file = tmp_path / "schnell.safetensors"
    kw = dict(height=16, width=16, steps=2, seed=1, progress=False)
    with pytest.raises(ValueError, match="pass base="):
        sample_folder(file, ["abc"], **kw)
    with pytest.raises(ValueError, match="single-file"):
        sample_folder(folder, ["abc"], base=folder, **kw)
    images = sample_folder(file, ["abc"], base=folder, **kw)
    torch.testing.assert_close(images, sample_folder(folder, ["abc"], **kw), atol=1e-5, rtol=0)
    out = tmp_path / "g.png"
    assert main(["sample", "--model", str(file), "--base", str(folder), "--prompt", "abc", "--height", "16", "--width", "16",
                 "--steps", "2", "--seed", "1", "--out", str(out), "--device", "cpu"]) == 0
    grid = np.asarray(Image.open(out), dtype=np.float32)
    np.testing.assert_allclose(grid, np.asarray(make_grid(images, nrow=1), dtype=np.float32), atol=1)


# ----------------------------------------------------------------------------------------------
# The real sizes: each published architecture is read back from its own tensor shapes (meta device, no memory)


def test_real_size_configs_are_read_from_the_original_layouts():
    from difflab.io.family_files import infer_flux_config, infer_mmdit_config
    from difflab.io.keymaps import from_difflab
    from difflab.io.keymaps.unet_sd import original_table
    from difflab.io.single_file import infer_unet_config
    from difflab.nn.flux import FluxConfig, FluxTransformer
    from difflab.nn.mmdit import PRESETS as MMDIT, MMDiT
    from difflab.nn.unet_sd import PRESETS as UNETS, UNetSD
    with torch.device("meta"):
        nets = {"sdxl": UNetSD(UNETS["sdxl"]), "refiner": UNetSD(UNETS["sdxl_refiner"]), "sd3": MMDiT(MMDIT["sd3_medium"]),
                "sd35": MMDiT(MMDIT["sd35_medium"]), "flux": FluxTransformer(FluxConfig(guidance_embeds=True))}
    for name in ("sdxl", "refiner"):
        net = nets[name]
        original = from_difflab(net.state_dict(), original_table(net.config))
        assert infer_unet_config(original, sample_size=128) == net.config, name
    for name in ("sd3", "sd35"):
        assert infer_mmdit_config(mmdit_original_state(nets[name])) == nets[name].config, name
    assert infer_flux_config(flux_original_state(nets["flux"])) == nets["flux"].config
