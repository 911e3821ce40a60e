"""DreamBooth (Ruiz et al. 2023, eq. 2) and textual inversion (Gal et al. 2023, eq. 2) on tiny
models: the prior-preservation loss is the sum of its two terms, LoRA DreamBooth moves only the
adapters, textual inversion only the new word's row, a fine-tune writes checkpoints that reload,
and ``difflab dreambooth`` reports bad input clearly."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.adapters import lora_layers
from difflab.cli import build_parser
from difflab.cli import dreambooth as dreambooth_command
from difflab.data import load_image_folder
from difflab.io.checkpoint import save_checkpoint
from difflab.io.spec import DEFAULT_DIFFUSION, build_denoiser
from difflab.io.text import load_tiny_text, save_tiny_text
from difflab.nn.text import TinyTextEncoder
from difflab.nn.unet import UNetConfig
from difflab.train import diffusion_loss
from difflab.io.text_model import read_text_model
from difflab.train.dreambooth import (DreamBoothConfig, add_tokens, dreambooth, prior_preservation_loss,
                                      save_text_model)
from difflab.train.textual_inversion import (TextualInversionConfig, load_learned_embeds, save_learned_embeds,
                                             textual_inversion)

CAPTIONS = ["a digit", "the digit 3", "a 3", "the digit 7", "a seven", "a picture of a digit"]
SPEC = {"unet": UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                           num_heads=2, context_dim=16, groups=4).to_dict(),
        "diffusion": DEFAULT_DIFFUSION}
# a few prior images and sampler steps keep every fine-tune under a second
FAST = dict(num_prior_images=3, prior_steps=2, steps=3, batch_size=2, log_every=1)


def tiny_model(seed=0, dtype=torch.float32):
    """A tiny text-conditional denoiser and TinyTextEncoder with non-zero output layers (so every weight matters)."""
    torch.manual_seed(seed)
    denoiser = build_denoiser(SPEC)
    with torch.no_grad():
        for p in denoiser.parameters():
            if p.ndim > 0 and float(p.abs().max()) == 0:  # zero-initialized output projections
                p.normal_(0, 0.1)
    text = TinyTextEncoder.from_texts(CAPTIONS, max_length=6, width=16, layers=1, heads=2, seed=seed)
    return denoiser.to(dtype).eval(), text.to(dtype).eval()


def subject_images(n=3, seed=1):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def unet_state(denoiser):
    return {k: v.clone() for k, v in denoiser.net.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# The loss


def test_prior_preservation_loss_is_the_sum_of_the_two_terms():
    denoiser, text = tiny_model(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_inst, x_prior = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.7, 2.0, 5.0, 30.0], dtype=torch.float64)
    noise = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    h_inst, _, m_inst = text.encode(["a sks digit"] * 3, return_mask=True)
    h_prior, _, m_prior = text.encode(["a digit"] * 2, return_mask=True)
    lam = 0.7
    out = prior_preservation_loss(denoiser, x_inst, x_prior, sigma, noise, instance_cond={"context": h_inst, "context_mask": m_inst},
                                  prior_cond={"context": h_prior, "context_mask": m_prior}, prior_weight=lam)
    # by hand: two separate calls of the per-example denoising loss, each with its own prompt
    inst = diffusion_loss(denoiser, x_inst, sigma[:3], noise[:3], extra_args={"context": h_inst, "context_mask": m_inst})
    prior = diffusion_loss(denoiser, x_prior, sigma[3:], noise[3:], extra_args={"context": h_prior, "context_mask": m_prior})
    torch.testing.assert_close(out["instance"], inst, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["prior"], prior, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["loss"], inst.mean() + lam * prior.mean(), rtol=1e-12, atol=1e-14)
    assert float(prior.detach().mean()) > 1e-3  # the prior term is not negligible, so a dropped term would fail
    # no class images: plain fine-tuning on the instance term
    alone = prior_preservation_loss(denoiser, x_inst, None, sigma[:3], noise[:3], instance_cond={"context": h_inst, "context_mask": m_inst})
    torch.testing.assert_close(alone["loss"], inst.mean(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="prior_cond must have the keys"):
        prior_preservation_loss(denoiser, x_inst, x_prior, sigma, noise, instance_cond={"context": h_inst},
                                prior_cond={"context": h_prior, "context_mask": m_prior})


# ----------------------------------------------------------------------------------------------
# Vocabulary surgery


def test_add_tokens_keeps_old_rows_and_round_trips(tmp_path):
    _, text = tiny_model()
    before = text.token_embedding.weight.detach().clone()
    old_hidden = text.encode(["the digit 3"])[0]
    ids = add_tokens(text, ["sks", "digit"], generator=torch.Generator().manual_seed(0))
    assert ids == [len(before), text.index["digit"]] and text.config.vocab[-1] == "sks"
    w = text.token_embedding.weight
    assert w.shape == (len(before) + 1, 16) and torch.equal(w[:len(before)], before)
    torch.testing.assert_close(text.encode(["the digit 3"])[0], old_hidden, rtol=0, atol=0)  # old prompts unchanged
    assert text.tokenize(["a sks digit"])[0][0, 1] == ids[0]  # no longer <unk>
    back = load_tiny_text(save_tiny_text(text, tmp_path / "te"))
    torch.testing.assert_close(back.encode(["a sks digit"])[0], text.encode(["a sks digit"])[0], rtol=0, atol=0)
    add_tokens(text, ["xyz"], init_word="digit")
    assert torch.equal(text.token_embedding.weight[-1], text.token_embedding.weight[text.index["digit"]])
    for bad in ("two words", "Sks", "<subject>"):
        with pytest.raises(ValueError, match="one lower-case word"):
            add_tokens(text, [bad])


# ----------------------------------------------------------------------------------------------
# What trains


def test_lora_dreambooth_changes_only_the_adapters():
    denoiser, text = tiny_model()
    base, text_before = unet_state(denoiser), text.token_embedding.weight.detach().clone()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    h, _, m = text.encode(["a digit", "the digit 3"], return_mask=True)
    out_before = denoiser(x, 1.0, context=h, context_mask=m).detach()
    cfg = DreamBoothConfig(lora_rank=2, text_encoder="frozen", lr=1e-2, **FAST)
    result = dreambooth(denoiser, text, subject_images(), cfg, progress=False)
    assert result.lora_modules and result.trainable["text_encoder"] == 0
    state = denoiser.net.state_dict()
    for k, v in base.items():  # every base tensor (attention weights included) is bit-identical
        assert torch.equal(state[k], v), k
    lora_keys = [k for k in state if ".lora_" in k]
    assert lora_keys and set(state) == set(base) | set(lora_keys)
    assert any(float(layer.lora_B["dreambooth"].weight.abs().max()) > 0 for layer in lora_layers(denoiser.net).values())
    n_old = len(text_before)
    assert torch.equal(text.token_embedding.weight[:n_old], text_before)  # frozen encoder: old rows unchanged
    out_after = denoiser(x, 1.0, context=h, context_mask=m)
    assert (out_after - out_before).abs().max() > 1e-6  # the adapters act
    assert len(result.history) == 3 and result.prior_images.shape == (3, 1, 8, 8)


def test_dreambooth_tokens_mode_trains_the_unet_and_only_the_identifier_row():
    denoiser, text = tiny_model()
    base, text_state = unet_state(denoiser), {k: v.clone() for k, v in text.state_dict().items()}
    result = dreambooth(denoiser, text, subject_images(), DreamBoothConfig(lr=1e-2, text_encoder="tokens", **FAST), progress=False)
    (sks,) = result.token_ids
    assert text.config.vocab[sks] == "sks" and sks == len(text_state["token_embedding.weight"])
    assert any(not torch.equal(denoiser.net.state_dict()[k], v) for k, v in base.items())  # the U-Net trained
    w = text.token_embedding.weight
    assert torch.equal(w[:sks], text_state["token_embedding.weight"])
    for k, v in text_state.items():
        if k != "token_embedding.weight":
            assert torch.equal(text.state_dict()[k], v), k
    assert result.trainable["text_encoder"] == 16


def test_textual_inversion_learns_only_the_new_word(tmp_path):
    denoiser, text = tiny_model()
    base, text_state = unet_state(denoiser), {k: v.clone() for k, v in text.state_dict().items()}
    cfg = TextualInversionConfig(placeholder="sks", init_word="digit", templates=("a {}", "the {} digit"), steps=4,
                                 batch_size=2, lr=5e-2)
    out = textual_inversion(denoiser, text, subject_images(), cfg, progress=False)
    i = out["token_id"]
    w = text.token_embedding.weight
    assert i == len(text_state["token_embedding.weight"]) and text.config.vocab[i] == "sks"
    assert torch.equal(w[:i], text_state["token_embedding.weight"])  # every old row is frozen
    init = text_state["token_embedding.weight"][text.index["digit"]]
    assert (w[i] - init).abs().max() > 1e-3  # the new row moved away from its coarse descriptor
    for k, v in base.items():
        assert torch.equal(denoiser.net.state_dict()[k], v), k
    for k, v in text_state.items():
        if k != "token_embedding.weight":
            assert torch.equal(text.state_dict()[k], v), k
    # the learned row travels alone into a fresh encoder
    path = save_learned_embeds(tmp_path, text, ["sks"])
    _, fresh = tiny_model()
    assert load_learned_embeds(path, fresh) == [i]
    torch.testing.assert_close(fresh.encode(["a sks"])[0], text.encode(["a sks"])[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="already a word"):
        textual_inversion(denoiser, text, subject_images(), cfg, progress=False)


# ----------------------------------------------------------------------------------------------
# Checkpoints and the command


def _write_pngs(folder, n=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    return folder


def _parse(argv):
    return build_parser().parse_args(["dreambooth", *argv])


def test_end_to_end_lora_and_full_runs_write_checkpoints_that_reload(tmp_path):
    denoiser, text = tiny_model()
    base_file = save_text_model(tmp_path / "base", denoiser, text, SPEC, {"size": 8})
    images = _write_pngs(tmp_path / "subject")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    for mode, extra in (("lora", ["--lora-rank", "2"]), ("full", [])):
        out = tmp_path / mode
        args = _parse(["--base", str(base_file), "--images", str(images), "--class-prompt", "a digit", "--out", str(out),
                       "--steps", "3", "--batch-size", "2", "--num-prior-images", "2", "--lr", "1e-2", "--no-progress",
                       "--device", "cpu", *extra])
        assert dreambooth_command.run(args) == 0
        names = sorted(p.name for p in out.iterdir())
        assert names == (["lora.json", "lora.safetensors"] if mode == "lora" else []) + ["model.json", "model.safetensors"]
        tuned, tuned_text, meta = _tuple(read_text_model(out))
        assert meta["dreambooth"]["instance_prompt"] == "a sks digit" and meta["size"] == 8
        assert "sks" in tuned_text.index
        h, _, m = tuned_text.encode(["a sks digit", "a digit"], return_mask=True)
        changed = tuned(x, 1.0, context=h, context_mask=m)
        h0, _, m0 = text.encode(["a sks digit", "a digit"], return_mask=True)
        assert (changed - denoiser(x, 1.0, context=h0, context_mask=m0)).abs().max() > 1e-6  # it did fine-tune
        # the reloaded (merged) model computes what the fine-tuned one does: rerun it in memory
        again, again_text, _ = _tuple(read_text_model(base_file))
        cfg = DreamBoothConfig(class_prompt="a digit", steps=3, batch_size=2, num_prior_images=2, lr=1e-2,
                               lora_rank=2 if mode == "lora" else None)
        dreambooth(again, again_text, load_image_folder(images, 8, channels=1), cfg, progress=False)
        torch.testing.assert_close(again(x, 1.0, context=h, context_mask=m), changed, rtol=1e-5, atol=1e-5)
        assert meta["dreambooth"]["trainable"]["unet"] == (sum(p.numel() for n, p in again.net.named_parameters() if ".lora_" in n)
                                                           if mode == "lora" else sum(p.numel() for p in denoiser.net.parameters()))
    # a second run over the same folder replaces the files atomically: no temporary file is left
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_command_errors(tmp_path):
    denoiser, text = tiny_model()
    base_file = save_text_model(tmp_path / "base", denoiser, text, SPEC, {"size": 8})
    images = _write_pngs(tmp_path / "subject")
    common = ["--class-prompt", "a digit", "--out", str(tmp_path / "out"), "--steps", "1", "--no-progress", "--device", "cpu"]

    def run(base, imgs, *more):
        args = _parse(["--base", str(base), "--images", str(imgs), *common, *more])
        return dreambooth_command.run(args)

    with pytest.raises(FileNotFoundError, match="--images .*missing does not exist"):
        run(base_file, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="--base .*nothing does not exist"):
        run(tmp_path / "nothing", images)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        run(base_file, tmp_path / "empty")
    # a class-conditional training checkpoint is no text model
    save_checkpoint(tmp_path / "run", {"model.w": torch.zeros(1)}, {"kind": "difflab.train", "spec": SPEC})
    with pytest.raises(ValueError, match="'difflab.train' checkpoint, not a text-to-image model"):
        run(tmp_path / "run", images)
    # a spec that does not match the stored weights (a wider U-Net)
    wide = {**SPEC, "unet": {**SPEC["unet"], "model_channels": 16}}
    bad = save_text_model(tmp_path / "bad", denoiser, text, SPEC, {"size": 8})
    from difflab.io.checkpoint import load_checkpoint
    tensors, meta = load_checkpoint(bad)
    save_checkpoint(bad, tensors, {**meta, "spec": wide})
    with pytest.raises(ValueError, match="checkpoint does not match UNet.*shape mismatches"):
        run(bad, images)
    # a U-Net whose context width is not the text encoder's
    save_checkpoint(bad, tensors, {**meta, "spec": {**SPEC, "unet": {**SPEC["unet"], "context_dim": 32}}})
    with pytest.raises(ValueError, match="context_dim=32 does not match the text encoder's width 16"):
        run(bad, images)
    with pytest.raises(ValueError, match="one lower-case word"):
        run(base_file, images, "--identifier", "S K S")
    assert not (tmp_path / "out").exists()  # nothing written on a failed run


def test_lora_dreambooth_on_the_sd_unet_with_clip_adapts_attention_only(tmp_path):
    pytest.importorskip("transformers", reason="the CLIP tokenizer needs transformers (the 'sd' extra)")
    from test_text import write_tiny_tokenizer

    from difflab.io.diffusers_folder import make_denoiser
    from difflab.nn.text import CLIPTextEncoder, CLIPTextEncoderConfig, load_clip_tokenizer
    from difflab.nn.unet_sd import PRESETS as SD_PRESETS, UNetSD

    torch.manual_seed(0)
    clip = CLIPTextEncoder(CLIPTextEncoderConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                                 vocab_size=516, bos_token_id=514, eos_token_id=515, pad_token_id=515),
                           tokenizer=load_clip_tokenizer(write_tiny_tokenizer(tmp_path / "tok")))
    unet = UNetSD(dataclasses.replace(SD_PRESETS["tiny"], cross_attention_dim=32))
    denoiser = make_denoiser(unet, {"frame": "vp_discrete", "schedule": "scaled_linear", "T": 1000, "zero_terminal_snr": False,
                                    "prediction": "eps"}).eval()
    base, clip_state = unet_state(denoiser), {k: v.clone() for k, v in clip.state_dict().items()}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="only a TinyTextEncoder gets"):  # CLIP's vocabulary is fixed: the identifier must be a token it has
        dreambooth(denoiser, clip, x, DreamBoothConfig(identifier="abc", class_prompt="a b", lora_rank=2, **FAST), progress=False)
    cfg = DreamBoothConfig(identifier="abc", class_prompt="a b", lora_rank=2, text_encoder="frozen", lr=1e-2, **FAST)
    result = dreambooth(denoiser, clip, x, cfg, progress=False)
    assert cfg.prompt == "a abc b" and result.token_ids == []
    assert result.lora_modules and all(m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or m.endswith("to_out.0")
                                       for m in result.lora_modules)
    state = denoiser.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in clip_state.items())


def _tuple(model):
    return model.denoiser, model.text_encoder, model.meta
