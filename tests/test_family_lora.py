"""kohya-layout LoRA files for Flux and SD3: a random LoRA in each layout gives, through difflab, the
outputs diffusers' ``load_lora_weights`` gives on a tiny pipeline (Flux: kohya's BFL names with the
fused q/k/v split, and the "lora_transformer_" spelling of diffusers' names; SD3, which diffusers 0.42
reads only in the PEFT layout: that layout's twin of the same LoRA), and the merged weights
W + (alpha / r) B A (Hu et al. 2021, eq. 3) where diffusers' converter is fixed to FLUX.1's widths."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import save_file

from difflab.adapters import load_lora_weights
from difflab.io.family_files import load_flux_single_file
from difflab.io.flux_folder import load_flux_transformer
from difflab.io.keymaps import flux as flux_keys
from difflab.io.keymaps import mmdit as mmdit_keys
from difflab.io.sd3_folder import load_sd3_transformer

pytest.importorskip("transformers")
pytest.importorskip("peft", reason="diffusers' LoRA loader needs peft")
from test_family_files import bfl_state  # noqa: E402
from test_flux import TINY as FLUX_TINY  # noqa: E402
from test_flux import tiny_transformer as tiny_flux  # noqa: E402
from test_sd3 import diffusers_transformer  # noqa: E402

RANK = 4


def random_kohya(layers: dict, seed=0, alpha=2.0, no_alpha=()) -> dict:
    """A kohya LoRA: per module path, lora_down (r, in), lora_up (out, r) and alpha (scale alpha / r)."""
    g, out = torch.Generator().manual_seed(seed), {}
    for key, (n_in, n_out) in layers.items():
        out[f"{key}.lora_down.weight"] = torch.randn(RANK, n_in, generator=g) * 0.3
        out[f"{key}.lora_up.weight"] = torch.randn(n_out, RANK, generator=g) * 0.3
        if key not in no_alpha:
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def flux_inputs():
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = torch.randn(2, 4, 4, 6, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    return x, torch.tensor([0.3, 0.8]), ctx, pooled


def run_flux_ref(ref, x, t, ctx, pooled):
    """diffusers' transformer on the packed tokens of x, unpacked back (what difflab's FluxTransformer does inside)."""
    from difflab.nn.flux import latent_image_ids, pack_latents, text_ids, unpack_latents
    tokens = pack_latents(x)
    out = ref(hidden_states=tokens, timestep=t, guidance=torch.full((2,), 3.5), pooled_projections=pooled,
              encoder_hidden_states=ctx, txt_ids=text_ids(ctx.shape[1]), img_ids=latent_image_ids(x.shape[2] // 2, x.shape[3] // 2)).sample
    return unpack_latents(out, *x.shape[2:])


@pytest.fixture
def flux(tmp_path):
    ref = tiny_flux(guidance_embeds=True)
    ref.save_pretrained(tmp_path / "t")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=ref)
    return pipe, load_flux_transformer(tmp_path / "t")


D = FLUX_TINY["num_attention_heads"] * FLUX_TINY["attention_head_dim"]  # 32


def test_flux_kohya_bfl_names_match_diffusers(flux):
    pipe, ours = flux
    lora = random_kohya({"lora_unet_double_blocks_0_img_attn_qkv": (D, 3 * D), "lora_unet_double_blocks_0_txt_attn_proj": (D, D),
                         "lora_unet_double_blocks_0_img_mlp_0": (D, 4 * D), "lora_unet_double_blocks_0_txt_mod_lin": (D, 6 * D),
                         "lora_unet_single_blocks_0_linear2": (5 * D, D)})
    # (final_layer: diffusers 0.42's converter drops its LoRA silently; the merged-weight test below covers it)
    x, t, ctx, pooled = flux_inputs()
    with torch.no_grad():
        before = run_flux_ref(pipe.transformer, x, t, ctx, pooled)
    pipe.load_lora_weights(dict(lora))
    names = load_lora_weights(ours, lora, format="kohya", prefix="unet.", module_table=flux_keys.ORIGINAL, fused=flux_keys.FUSED)
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "norm1_context.linear"} <= {
        n.replace("transformer_blocks.0.", "") if n.endswith("norm1_context.linear") else n for n in names} and len(names) == 7
    with torch.no_grad():
        want = run_flux_ref(pipe.transformer, x, t, ctx, pooled)
        got = ours(x, t, context=ctx, pooled=pooled, guidance_scale=3.5)
    assert (want - before).abs().max() > 0.05  # the LoRA changes the output ...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ... as diffusers applies it


def test_flux_kohya_fused_single_block_is_the_merged_weight(flux, tmp_path):
    """linear1 fuses q, k, v and the 4x MLP input (1:1:1:4): its LoRA, split over the four layers, equals
    the merged fused weight read by the single-file loader (diffusers' converter assumes FLUX.1's 3072 widths)."""
    pipe, ours = flux
    lora = random_kohya({"lora_unet_single_blocks_0_linear1": (D, 7 * D), "lora_unet_double_blocks_0_txt_attn_qkv": (D, 3 * D),
                         "lora_unet_final_layer_adaLN_modulation_1": (D, 2 * D)}, alpha=3.0)
    save_file(lora, str(tmp_path / "kohya.safetensors"))
    load_lora_weights(ours, tmp_path / "kohya.safetensors", prefix="unet.", module_table=flux_keys.ORIGINAL, fused=flux_keys.FUSED)
    merged = bfl_state(pipe.transformer)
    for path in ("single_blocks_0_linear1", "double_blocks_0_txt_attn_qkv", "final_layer_adaLN_modulation_1"):
        name = {"single_blocks_0_linear1": "single_blocks.0.linear1", "double_blocks_0_txt_attn_qkv": "double_blocks.0.txt_attn.qkv",
                "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}[path]
        k = f"lora_unet_{path}"
        merged[name + ".weight"] = merged[name + ".weight"] + 3.0 / RANK * lora[k + ".lora_up.weight"] @ lora[k + ".lora_down.weight"]
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "merged.safetensors"))
    reference = load_flux_single_file(tmp_path / "merged.safetensors", axes_dims_rope=FLUX_TINY["axes_dims_rope"]).transformer
    x, t, ctx, pooled = flux_inputs()
    with torch.no_grad():
        got = ours(x, t, context=ctx, pooled=pooled, guidance_scale=3.5)
        want = reference(x, t, context=ctx, pooled=pooled, guidance_scale=3.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flux_kohya_diffusers_names_match_diffusers(flux):
    """The "lora_transformer_" spelling of diffusers' own module names (kohya's mixture layout)."""
    pipe, ours = flux
    # (diffusers' converter of this layout knows the attention projections and the embedders, not the MLPs)
    lora = random_kohya({"lora_transformer_transformer_blocks_0_attn_to_k": (D, D),
                         "lora_transformer_transformer_blocks_0_attn_add_v_proj": (D, D),
                         "lora_transformer_single_transformer_blocks_0_attn_to_q": (D, D),
                         "lora_transformer_x_embedder": (16, D)})
    pipe.load_lora_weights(dict(lora))
    assert len(load_lora_weights(ours, lora, prefix="transformer.")) == 4  # kohya detected, names resolved on the model
    x, t, ctx, pooled = flux_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context=ctx, pooled=pooled, guidance_scale=3.5),
                                   run_flux_ref(pipe.transformer, x, t, ctx, pooled), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# SD3


@pytest.mark.parametrize("layout", ["sd-scripts", "diffusers-names"])
def test_sd3_kohya_matches_diffusers_on_its_peft_twin(tmp_path, layout):
    ref = diffusers_transformer(num_layers=2)
    ref.save_pretrained(tmp_path / "t")
    ours = load_sd3_transformer(tmp_path / "t")
    pipe = StableDiffusion3Pipeline(transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    W = 32
    if layout == "sd-scripts":  # the MMDiT's original names (sd-scripts' lora_sd3): fused q/k/v
        lora = random_kohya({"lora_unet_joint_blocks_0_x_block_attn_qkv": (W, 3 * W), "lora_unet_joint_blocks_1_x_block_mlp_fc2": (4 * W, W),
                             "lora_unet_joint_blocks_0_context_block_attn_proj": (W, W)})
        targets = {"lora_unet_joint_blocks_0_x_block_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                                   "transformer_blocks.0.attn.to_v"],
                   "lora_unet_joint_blocks_1_x_block_mlp_fc2": ["transformer_blocks.1.ff.net.2"],
                   "lora_unet_joint_blocks_0_context_block_attn_proj": ["transformer_blocks.0.attn.to_add_out"]}
        names = load_lora_weights(ours, lora, prefix="unet.", module_table=mmdit_keys.original_table(2), fused=mmdit_keys.FUSED)
    else:  # diffusers' names spelled with underscores
        lora = random_kohya({"lora_transformer_transformer_blocks_0_attn_add_k_proj": (W, W),
                             "lora_transformer_transformer_blocks_1_ff_net_0_proj": (W, 4 * W)})
        targets = {"lora_transformer_transformer_blocks_0_attn_add_k_proj": ["transformer_blocks.0.attn.add_k_proj"],
                   "lora_transformer_transformer_blocks_1_ff_net_0_proj": ["transformer_blocks.1.ff.net.0.proj"]}
        names = load_lora_weights(ours, lora, prefix="transformer.")
    assert sorted(names) == sorted(n for ns in targets.values() for n in ns)
    twin = {}  # the same LoRA in diffusers' PEFT layout: alpha / r folded into A, B split over fused pieces
    for key, modules in targets.items():
        A, B = lora[key + ".lora_down.weight"] * 2.0 / RANK, lora[key + ".lora_up.weight"]
        for module, b in zip(modules, B.chunk(len(modules))):
            twin[f"transformer.{module}.lora_A.weight"], twin[f"transformer.{module}.lora_B.weight"] = A, b
    g = torch.Generator().manual_seed(2)
    x, ctx, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 48, generator=g), torch.randn(2, 64, generator=g)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        before = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    pipe.load_lora_weights(twin)
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        got = ours(x, t, context=ctx, pooled=pooled)
    assert (want - before).abs().max() > 0.05
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
