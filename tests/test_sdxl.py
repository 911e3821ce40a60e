"""SDXL (Podell et al. 2023): the U-Net's added conditions, the two text encoders, and the
pipelines (text to image, image to image, the base -> refiner hand-off, inpainting), each against
diffusers' StableDiffusionXL* pipelines on tiny random components saved to and loaded from a
diffusers folder."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from PIL import Image
from safetensors.torch import save_file

from difflab.adapters import load_lora_weights
from difflab.cli import main
from difflab.core import Denoiser
from difflab.io import is_sdxl_folder, load_diffusers_folder, load_sdxl_folder
from difflab.io.images import make_grid
from difflab.io.keymaps import from_difflab, to_difflab
from difflab.io.keymaps.clip_text import TRANSFORMERS as CLIP_TRANSFORMERS
from difflab.io.keymaps.unet_sd import original_table
from difflab.nn.text_dual import DualCLIPTextEncoder
from difflab.nn.unet_sd import PRESETS, UNetSD, UNetSDConfig
from difflab.perf.memory import estimate_memory, example_inputs
from difflab.pipelines.common import sampling_grid
from difflab.pipelines.folder import folder_defaults, sample_folder
from difflab.pipelines.sdxl import MicroConditioning, handoff_index, sdxl_image_to_image, sdxl_inpaint, sdxl_text_to_image

transformers = pytest.importorskip("transformers", reason="the CLIP text encoders need transformers (the 'sd' extra)")
from test_text import tiny_clip_config, write_tiny_tokenizer  # noqa: E402
from test_text_to_image import SD_BETAS, build_pipeline, parity_error, tiny_diffusers_vae  # noqa: E402

# diffusers' own tiny SDXL U-Net (tests/pipelines/stable_diffusion_xl): no attention in the first level,
# transformer depth (1, 2), 6 time ids x 8 + a pooled embedding of 32 = 80; context 32 + 32 = 64
SDXL_TINY = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                 projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)
# the refiner: the second encoder only (context 32), 5 time ids (aesthetic score) x 8 + 32 = 72
REFINER_TINY = {**SDXL_TINY, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 72}
PROMPTS, NEGATIVES = ["a photo of abc", "b"], ["", "c d"]


def tiny_unet(seed=0, **config):
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def tiny_encoders(seed=0):
    """CLIP ViT-L's and OpenCLIP bigG's stand-ins: a CLIPTextModel and a CLIPTextModelWithProjection (gelu, projection 32)."""
    torch.manual_seed(seed)
    first = transformers.CLIPTextModel(tiny_clip_config()).eval()
    second = transformers.CLIPTextModelWithProjection(tiny_clip_config(hidden_act="gelu", projection_dim=32, num_hidden_layers=3)).eval()
    return first, second


def euler():
    return EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)


def sdxl_vae():
    vae = tiny_diffusers_vae()
    vae.register_to_config(scaling_factor=0.13025)
    return vae


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The tiny CLIP tokenizer, and a copy padding with "!" as SDXL's second tokenizer does."""
    first = write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    second = tmp_path_factory.mktemp("tokenizer_2")
    for f in first.iterdir():
        shutil.copy(f, second / f.name)
    (second / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "!"}))
    return [transformers.CLIPTokenizer.from_pretrained(str(d)) for d in (first, second)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizers):
    first, second = tiny_encoders()
    pipe = StableDiffusionXLPipeline(vae=sdxl_vae(), text_encoder=first, text_encoder_2=second, tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=tiny_unet(**SDXL_TINY), scheduler=euler())
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(folder)
    return pipe, load_sdxl_folder(folder), folder


@pytest.fixture(scope="module")
def refiner(tmp_path_factory, tokenizers, base):
    pipe = StableDiffusionXLImg2ImgPipeline(vae=base[0].vae, text_encoder=None, text_encoder_2=base[0].text_encoder_2,
                                            tokenizer=None, tokenizer_2=tokenizers[1], unet=tiny_unet(1, **REFINER_TINY),
                                            scheduler=euler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sdxl_refiner")
    pipe.save_pretrained(folder)
    return pipe, load_sdxl_folder(folder)


def start_latents(n=2, seed=5):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# The U-Net and its key map


def test_unet_with_added_conditions_matches_diffusers():
    ref = tiny_unet(**SDXL_TINY)
    net = UNetSD(UNetSDConfig.from_diffusers_config(dict(ref.config))).eval()
    net.load_state_dict(ref.state_dict())  # the same names: no key map
    assert net.config.transformer_layers_per_block == (1, 2) and net.config.down_attention == (False, True)
    assert UNetSDConfig.from_diffusers_config(net.config.to_diffusers_config()) == net.config
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g), torch.randn(2, 32, generator=g)
    t, ids = torch.tensor([10.0, 600.0]), torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 16, 8, 64, 64]])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = net(x, t, context=ctx, text_embeds=pooled, time_ids=ids)
        other = net(x, t, context=ctx, text_embeds=pooled, time_ids=ids.flip(0))
    assert want.abs().max() > 0.1 and (other - got).abs().max() > 1e-3  # the time ids matter
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs text_embeds"):
        net(x, t, context=ctx)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=80"):
        net(x, t, context=ctx, text_embeds=pooled, time_ids=ids[:, :5])


def test_unet_original_layout_agrees_with_diffusers_converter():
    ref = tiny_unet(**SDXL_TINY)
    state = ref.state_dict()
    table = original_table(UNetSDConfig.from_diffusers_config(dict(ref.config)))
    original = {"model.diffusion_model." + k: v for k, v in from_difflab(state, table).items()}
    assert any(".label_emb.0.0." in k for k in original)
    back = convert_ldm_unet_checkpoint(original, dict(ref.config))  # diffusers' own sgm -> diffusers map
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())
    ours = to_difflab({k[len("model.diffusion_model."):]: v for k, v in original.items()}, table)
    assert set(ours) == set(state)


# the published unet/config.json of SDXL base 1.0 and refiner 1.0 (the keys that differ from diffusers' defaults)
SDXL_BASE_CONFIG = dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                        block_out_channels=[320, 640, 1280], cross_attention_dim=2048, layers_per_block=2,
                        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                        projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
                        use_linear_projection=True)
SDXL_REFINER_CONFIG = {**SDXL_BASE_CONFIG, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
                       "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
                       "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                       "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def test_sdxl_presets_are_the_published_models():
    assert UNetSDConfig.from_diffusers_config(SDXL_REFINER_CONFIG) == PRESETS["sdxl_refiner"]
    assert UNetSDConfig.from_diffusers_config(SDXL_BASE_CONFIG) == PRESETS["sdxl"]
    with torch.device("meta"):
        ref, ours = UNet2DConditionModel(**SDXL_BASE_CONFIG), UNetSD(PRESETS["sdxl"])
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684  # SDXL base 1.0's U-Net


# ----------------------------------------------------------------------------------------------
# The text encoders


def test_loader_reads_both_encoders_and_the_folder_settings(base, refiner):
    _, parts, folder = base
    assert is_sdxl_folder(folder) and isinstance(parts.text_encoder, DualCLIPTextEncoder)
    assert parts.vae.config.scaling_factor == 0.13025 and parts.force_zeros_for_empty_prompt
    assert parts.sampling["scheduler"] == "EulerDiscreteScheduler" and parts.sampling["timestep_spacing"] == "leading"
    ref_parts = refiner[1]
    assert ref_parts.requires_aesthetics_score and not ref_parts.force_zeros_for_empty_prompt
    assert ref_parts.text_encoder.config.projection_dim == 32  # the second encoder alone
    with pytest.raises(ValueError, match="load_sdxl_folder"):
        load_diffusers_folder(folder)


def test_text_encoders_match_transformers(base):
    pipe, parts, _ = base
    ids = torch.randint(0, 514, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 514, 515, 515
    ours = (parts.text_encoder.text_encoder, parts.text_encoder.text_encoder_2)
    theirs = (pipe.text_encoder, pipe.text_encoder_2)
    with torch.no_grad():
        for enc, ref in zip(ours, theirs):
            want = ref(ids, output_hidden_states=True)
            hidden, pooled = enc(ids)
            torch.testing.assert_close(hidden, want.hidden_states[-2], atol=1e-5, rtol=0)  # penultimate, no final norm
            torch.testing.assert_close(pooled, want[0] if want[0].ndim == 2 else want.pooler_output, atol=1e-5, rtol=0)
    assert pooled.shape == (2, 32) and (pooled - want.text_embeds).abs().max() < 1e-5  # projected


def test_prompt_encoding_matches_diffusers_encode_prompt(base):
    pipe, parts, _ = base
    with torch.no_grad():
        want = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVES)
        hidden, pooled = parts.text_encoder.encode(PROMPTS + NEGATIVES)
    assert hidden.shape == (4, 77, 64)
    for got, ref in zip((hidden[:2], hidden[2:], pooled[:2], pooled[2:]), want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# The pipelines


def run_text_to_image(base, steps=3, negatives=NEGATIVES, output_type="latent", micro=None, prompts=PROMPTS, **kw):
    pipe, parts, _ = base
    latents = start_latents(len(prompts))
    micro_kw = {} if micro is None else {k: v for k, v in vars(micro).items() if v is not None and "aesthetic" not in k}
    with torch.no_grad():
        theirs = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=5.0, latents=latents,
                      output_type=output_type, **micro_kw, **kw).images
    ours = sdxl_text_to_image(parts.denoiser, parts.text_encoder, parts.vae, prompts, negative_prompts=negatives, micro=micro,
                              sampler="euler", steps=steps, spacing="leading", steps_offset=1, guidance_scale=5.0,
                              latents=latents, output_type=output_type, progress=False, **kw)
    return ours, theirs


@pytest.mark.parametrize("negatives", [NEGATIVES, None], ids=["negatives", "zeros-for-no-negative"])
def test_text_to_image_matches_diffusers(base, negatives):
    ours, theirs = run_text_to_image(base, negatives=negatives)
    assert parity_error(ours, theirs) < 1e-4
    if negatives is None:
        return
    ours_np, theirs_np = run_text_to_image(base, output_type="np")
    assert ours_np.shape == theirs_np.shape == (2, 16, 16, 3) and np.abs(ours_np - theirs_np).max() < 1e-4


def test_micro_conditioning_matches_diffusers_and_matters(base):
    micro = MicroConditioning(original_size=(32, 24), crops_coords_top_left=(4, 8), target_size=(16, 16))
    ours, theirs = run_text_to_image(base, micro=micro)
    assert parity_error(ours, theirs) < 1e-4
    plain, _ = run_text_to_image(base)
    assert (ours - plain).abs().max() > 1e-3
    # other negative sizes: one prompt, since diffusers 0.42 pairs the stacked time ids [neg, pos] * N
    # with the embeddings [neg] * N + [pos] * N, i.e. crosses them for N > 1
    negative = MicroConditioning(original_size=(32, 24), crops_coords_top_left=(4, 8), negative_original_size=(8, 8),
                                 negative_crops_coords_top_left=(0, 0), negative_target_size=(16, 16))
    ours, theirs = run_text_to_image(base, micro=negative, prompts=PROMPTS[:1], negatives=NEGATIVES[:1])
    assert parity_error(ours, theirs) < 1e-4


def test_img2img_matches_diffusers(base):
    pipe, parts, _ = base
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        theirs = img2img(PROMPTS, image=image / 2 + 0.5, strength=0.6, negative_prompt=NEGATIVES, num_inference_steps=5,
                         guidance_scale=4.0, generator=torch.Generator().manual_seed(11), output_type="latent").images
    g = torch.Generator().manual_seed(11)  # diffusers draws the posterior sample, then the noise
    torch.randn(theirs.shape, generator=g)
    noise = torch.randn(theirs.shape, generator=g)
    ours = sdxl_image_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, strength=0.6,
                               negative_prompts=NEGATIVES, sampler="euler", steps=5, spacing="leading", steps_offset=1,
                               guidance_scale=4.0, noise=noise, output_type="latent", progress=False)
    assert parity_error(ours, theirs) < 1e-4


def test_base_to_refiner_handoff_matches_diffusers(base, refiner):
    pipe, parts, _ = base
    rpipe, rparts = refiner
    steps, cut = 4, 0.6
    sigmas = sampling_grid(parts.denoiser, steps, spacing="leading", steps_offset=1)
    assert handoff_index(parts.denoiser, sigmas, cut, "denoising_end") == 2  # timesteps 751, 501 | 251, 1
    latents = start_latents()
    kw = dict(sampler="euler", steps=steps, spacing="leading", steps_offset=1, guidance_scale=5.0, progress=False)
    with torch.no_grad():
        mid_theirs = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, guidance_scale=5.0, latents=latents,
                          denoising_end=cut, output_type="latent").images
        theirs = rpipe(PROMPTS, image=mid_theirs, negative_prompt=NEGATIVES, num_inference_steps=steps, guidance_scale=5.0,
                       denoising_start=cut, output_type="latent").images
    mid = sdxl_text_to_image(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, negative_prompts=NEGATIVES, latents=latents,
                             denoising_end=cut, output_type="latent", **kw)
    assert parity_error(mid, mid_theirs) < 1e-4
    ours = sdxl_image_to_image(rparts.denoiser, rparts.text_encoder, rparts.vae, PROMPTS, mid, negative_prompts=NEGATIVES,
                               denoising_start=cut, force_zeros_for_empty_prompt=rparts.force_zeros_for_empty_prompt,
                               output_type="latent", **kw)
    assert parity_error(ours, theirs) < 1e-4


def test_mask_channel_inpainting_matches_diffusers(tmp_path, base, tokenizers):
    pipe, _, _ = base
    unet = tiny_unet(2, **{**SDXL_TINY, "in_channels": 9})
    inpaint_pipe = StableDiffusionXLInpaintPipeline(**{**pipe.components, "unet": unet})
    inpaint_pipe.set_progress_bar_config(disable=True)
    inpaint_pipe.save_pretrained(tmp_path)
    parts = load_sdxl_folder(tmp_path)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:11, 5:14] = 1
    latents = start_latents(seed=4)
    with torch.no_grad():
        theirs = inpaint_pipe(PROMPTS, image=image / 2 + 0.5, mask_image=mask, height=16, width=16, negative_prompt=NEGATIVES,
                              num_inference_steps=4, guidance_scale=4.0, strength=1.0, latents=latents,
                              generator=torch.Generator().manual_seed(0), output_type="latent").images
    ours = sdxl_inpaint(parts.denoiser, parts.text_encoder, parts.vae, PROMPTS, image, mask, mode="channels",
                        negative_prompts=NEGATIVES, sampler="euler", steps=4, spacing="leading", steps_offset=1,
                        guidance_scale=4.0, latents=latents, output_type="latent", progress=False)
    assert parity_error(ours, theirs) < 1e-4


def test_bad_input_is_named(base):
    _, parts, _ = base
    args = (parts.denoiser, parts.text_encoder, parts.vae, PROMPTS)
    with pytest.raises(ValueError, match="denoising_end=1.5 must be a float in"):
        sdxl_text_to_image(*args, denoising_end=1.5, steps=2, progress=False)
    with pytest.raises(ValueError, match="leaves the base model no step"):
        sdxl_text_to_image(*args, denoising_end=0.01, steps=2, spacing="leading", steps_offset=1, progress=False)
    with pytest.raises(ValueError, match="base model's latents"):
        sdxl_image_to_image(*args, torch.zeros(2, 3, 16, 16), denoising_start=0.5, steps=2, progress=False)
    with pytest.raises(ValueError, match="original_size=.* must be a pair"):
        sdxl_text_to_image(*args, micro=MicroConditioning(original_size=(1, 2, 3)), steps=2, progress=False)
    with pytest.raises(ValueError, match="not an SDXL U-Net"):
        sdxl_text_to_image(Denoiser(UNetSD(PRESETS["tiny"]), parts.denoiser.frame), parts.text_encoder, None, PROMPTS,
                           steps=2, progress=False)


def test_kohya_lora_on_sdxl_matches_diffusers(base, tmp_path):
    """kohya's SDXL LoRA files spell the sgm U-Net (input_blocks...) and both encoders (lora_te1_, lora_te2_):
    the U-Net's key-map table and the CLIP one resolve them; the U-Net against diffusers' own kohya
    loader, the encoders against the merged weights W + (alpha / r) B A (Hu et al. 2021, eq. 3)."""
    _, _, folder = base
    parts, ref = load_sdxl_folder(folder), StableDiffusionXLPipeline.from_pretrained(folder)
    encoders = (parts.text_encoder.text_encoder, parts.text_encoder.text_encoder_2)
    modules = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (parts.unet, "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
               "lora_unet_output_blocks_1_1_proj_in": (parts.unet, "up_blocks.0.attentions.1.proj_in"),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (encoders[0], "encoder.layers.0.self_attn.q_proj"),
               "lora_te2_text_model_encoder_layers_1_mlp_fc1": (encoders[1], "encoder.layers.1.mlp.fc1")}
    g, kohya = torch.Generator().manual_seed(0), {}
    for key, (model, name) in modules.items():
        layer = model.get_submodule(name)
        kohya[key + ".lora_down.weight"] = torch.randn(2, layer.in_features, generator=g)
        kohya[key + ".lora_up.weight"] = torch.randn(layer.out_features, 2, generator=g)
        kohya[key + ".alpha"] = torch.tensor(1.0)
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet_")}, tmp_path / "unet_lora.safetensors")
    ref.load_lora_weights(str(tmp_path / "unet_lora.safetensors"))  # (diffusers 0.42 cannot read kohya lora_te2_ alone)
    assert load_lora_weights(parts.unet, kohya, module_table=original_table(parts.unet.config)) == [
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "up_blocks.0.attentions.1.proj_in"]
    for model, prefix, ref_model in zip(encoders, ("text_encoder.", "text_encoder_2."), (ref.text_encoder, ref.text_encoder_2)):
        (name,) = load_lora_weights(model, kohya, prefix=prefix, module_table=CLIP_TRANSFORMERS)
        key = next(k for k, (m, n) in modules.items() if m is model)
        with torch.no_grad():  # the reference: the merged weight
            getattr(ref_model, "text_model", ref_model).get_submodule(name).weight += 0.5 * kohya[key + ".lora_up.weight"] @ kohya[key + ".lora_down.weight"]
    with torch.no_grad():
        hidden, pooled = parts.text_encoder.encode(PROMPTS)
        want = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        x, t = start_latents(), torch.tensor([10.0, 500.0])
        ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
        got = parts.unet(x, t, context=hidden, text_embeds=pooled, time_ids=ids)
        theirs = ref.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        plain = base[0].unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    torch.testing.assert_close(hidden, want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, want[2], atol=1e-5, rtol=0)
    assert (theirs - plain).abs().max() > 0.1  # the LoRA changes the U-Net ...
    torch.testing.assert_close(got, theirs, atol=1e-5, rtol=0)  # ... as diffusers applies it


def test_sample_command_on_an_sdxl_folder(base, tmp_path):
    """``difflab sample --model FOLDER --prompt ...``: the folder's scheduler gives the sampler and grid
    (Euler, leading, offset 1), SDXL guides at 5, and the grid holds what sample_folder returns."""
    _, parts, folder = base
    opts = folder_defaults(parts.sampling, sdxl=True)
    assert (opts.sampler, opts.spacing, opts.steps_offset, opts.guidance_scale) == ("euler", "leading", 1, 5.0)
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2",
                 "--seed", "3", "--out", str(out), "--device", "cpu"]) == 0
    images = sample_folder(folder, PROMPTS, steps=2, seed=3, progress=False)
    assert images.shape == (2, 3, 16, 16)
    grid = np.asarray(Image.open(out), dtype=np.float32)
    np.testing.assert_allclose(grid, np.asarray(make_grid(images, nrow=2), dtype=np.float32), atol=1)


def test_memory_estimate_takes_the_added_conditions():
    config = UNetSDConfig.from_diffusers_config(SDXL_TINY)
    x, t, cond = example_inputs(UNetSD(config), 2, 8)
    assert cond["text_embeds"].shape == (2, 32) and cond["time_ids"].shape == (2, 6)
    _, _, refiner_cond = example_inputs(UNetSD(UNetSDConfig.from_diffusers_config(REFINER_TINY)), 2, 8)
    assert refiner_cond["text_embeds"].shape == (2, 32) and refiner_cond["time_ids"].shape == (2, 5)
    est = estimate_memory(config, 2, 8, training=False)
    assert est["total"] >= est["parameters"] > 0


def test_sample_command_on_an_sd_folder(tmp_path):
    """The same command on an SD 1.x folder: DDIM from its scheduler, guidance 7.5, text_to_image."""
    pipe, parts = build_pipeline(tmp_path / "sd", write_tiny_tokenizer(tmp_path / "tok"))
    opts = folder_defaults(parts.sampling, sdxl=False)
    assert (opts.sampler, opts.spacing, opts.steps_offset, opts.guidance_scale) == ("ddim", "leading", 1, 7.5)
    assert main(["sample", "--model", str(tmp_path / "sd"), "--prompt", "abc", "--steps", "2", "--out", str(tmp_path / "g.png"),
                 "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "g.png").size == (18, 18)  # one 16 x 16 image and its 1-pixel border
