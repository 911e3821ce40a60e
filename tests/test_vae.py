"""The KL autoencoder: parity with diffusers' AutoencoderKL (folder, export, single file), the
posterior's formulas, scaling, tiling, training, and clear errors."""
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab.data import load_digits
from difflab.io.diffusers_vae import (config_from_diffusers, infer_vae_config, load_diffusers_vae,
                                      load_sd_vae_from_single_file, save_diffusers_vae, sd_single_file_state)
from difflab.io.keymaps import convert, from_difflab, rename_key, to_difflab
from difflab.io.keymaps.vae import DIFFUSERS, ORIGINAL
from difflab.nn.vae import PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig, estimate_scaling_factor
from difflab.train.vae_loss import (PatchDiscriminator, adaptive_weight, discriminator_loss, hinge_discriminator_loss,
                                    reconstruction_loss, vae_loss)

TINY = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
PARITY_TOL = 1e-5  # float32


def _images(b=2, c=3, hw=16, seed=0):
    return torch.randn(b, c, hw, hw, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Config, shapes and errors


def test_config_round_trip_and_validation():
    c = dataclasses.replace(TINY, shift_factor=0.1, mid_block_attention=False)
    assert VAEConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert PRESETS["sd"].downsample_factor == 8 and PRESETS["digits"].downsample_factor == 4
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide .* \\[8, 16\\]"):
        VAEConfig(block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="unknown key 'bogus' in VAEConfig"):
        VAEConfig.from_dict({**TINY.to_dict(), "bogus": 1})


@pytest.mark.parametrize("widths, factor", [((8, 16, 16), 4), ((8, 8, 16, 16), 8)])
def test_shapes_for_factor_4_and_8(widths, factor):
    vae = AutoencoderKL(dataclasses.replace(TINY, block_out_channels=widths)).eval()
    assert vae.downsample_factor == factor
    x = _images(hw=32)
    with torch.no_grad():
        posterior = vae.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 32 // factor, 32 // factor)
        assert vae.decode(posterior.mode()).shape == x.shape
        assert vae.decode_latents(vae.encode_latents(x)).shape == x.shape
        x_hat, _ = vae(x)
        assert x_hat.shape == x.shape


def test_bad_inputs_raise_clear_errors():
    vae = AutoencoderKL(dataclasses.replace(TINY, block_out_channels=(8, 16, 16)))
    with pytest.raises(ValueError, match="x must be \\(B, 3, H, W\\).*in_channels=3.*\\(2, 1, 16, 16\\)"):
        vae.encode(_images(c=1))
    with pytest.raises(ValueError, match="x's height and width must be divisible by the VAE's downsampling factor 4.*18x16"):
        vae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="z must be \\(B, 4, h, w\\).*latent_channels=4"):
        vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="tile_size=6 must be a positive multiple of the downsampling factor 4"):
        vae.decode(torch.zeros(1, 4, 8, 8), tiled=True, tile_size=6)
    with pytest.raises(ValueError, match="noise must have the posterior's shape"):
        vae.encode_latents(_images(), noise=torch.zeros(2, 4, 3, 3))


# ----------------------------------------------------------------------------------------------
# The posterior (float64)


def test_posterior_matches_formulas():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    moments[0, 2, 0, 0], moments[1, 3, 1, 1] = 50.0, -40.0  # logvar outside [-30, 20] is clamped
    q = DiagonalGaussian(moments)
    mu, logvar = moments[:, :2], moments[:, 2:].clamp(-30, 20)
    assert q.logvar[0, 0, 0, 0] == 20.0 and q.logvar[1, 1, 1, 1] == -30.0
    assert torch.equal(q.mode(), mu)
    # sample = mu + sigma * eps, with eps from the generator or given
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(q.sample(torch.Generator().manual_seed(5)), mu + torch.exp(0.5 * logvar) * eps, rtol=1e-12, atol=0)
    assert torch.allclose(q.sample(noise=eps), mu + torch.exp(0.5 * logvar) * eps, rtol=1e-12, atol=0)
    assert torch.allclose(q.sample(noise=lambda: eps), q.sample(noise=eps))
    # KL against N(0, I) and against another Gaussian, vs torch.distributions
    normal = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl_ref = torch.distributions.kl_divergence(normal, std_normal).sum(dim=(1, 2, 3))
    assert q.kl().shape == (3,)
    assert torch.allclose(q.kl(), kl_ref, rtol=1e-10)
    p = DiagonalGaussian(torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64))
    kl_qp = torch.distributions.kl_divergence(normal, torch.distributions.Normal(p.mean, p.std)).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(p), kl_qp, rtol=1e-10)
    z = torch.randn(mu.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(q.nll(z), -normal.log_prob(z).sum(dim=(1, 2, 3)), rtol=1e-10)


def test_latent_scaling_and_shift():
    vae = AutoencoderKL(dataclasses.replace(TINY, scaling_factor=0.5, shift_factor=0.25)).double().eval()
    x = _images().double()
    with torch.no_grad():
        mean = vae.encode(x).mean
        z = vae.encode_latents(x, sample=False)
        assert torch.allclose(z, (mean - 0.25) * 0.5, rtol=1e-12, atol=1e-12)
        assert torch.allclose(vae.decode_latents(z), vae.decode(mean), rtol=1e-10, atol=1e-10)
        g = torch.Generator().manual_seed(1)
        sampled = vae.encode(x).sample(torch.Generator().manual_seed(1))
        assert torch.allclose(vae.encode_latents(x, g), (sampled - 0.25) * 0.5, rtol=1e-12, atol=1e-12)


def test_estimate_scaling_factor_is_one_over_latent_std():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).double().eval()
    x = _images(b=8).double()
    s = estimate_scaling_factor(vae, x, batch_size=3, sample=False)
    assert s == pytest.approx(1.0 / vae.encode(x).mean.detach().flatten().std().item(), rel=1e-12)
    # latents twice as large (quant_conv's mean rows doubled) -> half the factor
    with torch.no_grad():
        vae.quant_conv.weight[:4] *= 2
        vae.quant_conv.bias[:4] *= 2
    assert estimate_scaling_factor(vae, x, sample=False) == pytest.approx(s / 2, rel=1e-12)
    scaled = AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=s / 2)).double()
    scaled.load_state_dict(vae.state_dict())
    with torch.no_grad():
        assert scaled.encode_latents(x, sample=False).std().item() == pytest.approx(1.0, rel=1e-10)


# ----------------------------------------------------------------------------------------------
# Key maps


def test_keymap_tables_rename_both_ways():
    assert rename_key("encoder.mid_block.attentions.0.to_out.0.weight", DIFFUSERS) == ("encoder.mid_block.attention.to_out.weight", None)
    assert rename_key("decoder.mid_block.attention.to_out.bias", DIFFUSERS, reverse=True) == ("decoder.mid_block.attentions.0.to_out.0.bias", None)
    assert rename_key("quant_conv.weight", DIFFUSERS) == ("quant_conv.weight", None)
    # original decoder levels are numbered from the top: up.0 is difflab's last level
    assert rename_key("decoder.up.0.block.2.nin_shortcut.weight", ORIGINAL, num_levels=4) == ("decoder.up_blocks.3.resnets.2.conv_shortcut.weight", None)
    assert rename_key("decoder.up_blocks.1.upsample.conv.bias", ORIGINAL, reverse=True, num_levels=4) == ("decoder.up.2.upsample.conv.bias", None)
    assert rename_key("encoder.mid.attn_1.q.weight", ORIGINAL) == ("encoder.mid_block.attention.to_q.weight", "conv1x1")
    with pytest.raises(ValueError, match="pass num_levels"):
        rename_key("decoder.up.0.block.0.conv1.weight", ORIGINAL)
    w = torch.randn(5, 5)
    out = from_difflab({"encoder.mid_block.attention.to_k.weight": w}, ORIGINAL)
    assert out["encoder.mid.attn_1.k.weight"].shape == (5, 5, 1, 1)
    assert torch.equal(to_difflab(out, ORIGINAL)["encoder.mid_block.attention.to_k.weight"], w)
    with pytest.raises(ValueError, match="map to the same name"):
        to_difflab({"encoder.mid_block.attentions.0.query.weight": w, "encoder.mid_block.attentions.0.to_q.weight": w}, DIFFUSERS)


# ----------------------------------------------------------------------------------------------
# Parity with diffusers' AutoencoderKL


def _diffusers_vae(widths=(8, 16), layers=1, attention=True, seed=0):
    diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
    torch.manual_seed(seed)
    n = len(widths)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=widths, layers_per_block=layers, norm_num_groups=4, latent_channels=4, sample_size=16,
        mid_block_add_attention=attention).eval()


def _assert_same_outputs(ours: AutoencoderKL, theirs, hw=16, tol=PARITY_TOL) -> dict:
    x = _images(hw=hw)
    f = ours.downsample_factor
    z = torch.randn(2, 4, hw // f, hw // f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q_ref, q = theirs.encode(x).latent_dist, ours.encode(x)
        errors = {
            "mean": (q.mean - q_ref.mean).abs().max().item(),
            "logvar": (q.logvar - q_ref.logvar).abs().max().item(),
            "decode": (ours.decode(z) - theirs.decode(z).sample).abs().max().item(),
            "sample": (q.sample(torch.Generator().manual_seed(2)) - q_ref.sample(torch.Generator().manual_seed(2))).abs().max().item(),
        }
    assert q.mean.abs().max() > 0.05 and q.logvar.std() > 0.01  # not a degenerate comparison
    assert max(errors.values()) < tol, errors
    return errors


@pytest.mark.parametrize("widths, layers, attention", [((8, 16), 1, True), ((8, 16, 16), 2, False)])
def test_load_diffusers_folder_matches_diffusers(tmp_path, widths, layers, attention):
    ref = _diffusers_vae(widths, layers, attention)
    ref.save_pretrained(tmp_path)
    vae = load_diffusers_vae(tmp_path)
    assert vae.config.block_out_channels == widths and vae.config.mid_block_attention is attention
    assert vae.config.scaling_factor == ref.config.scaling_factor
    _assert_same_outputs(vae, ref)


def test_export_to_diffusers_folder_round_trips(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
    torch.manual_seed(3)
    vae = AutoencoderKL(dataclasses.replace(TINY, scaling_factor=0.3, shift_factor=0.1)).eval()
    save_diffusers_vae(vae, tmp_path / "vae")
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert ref.config.scaling_factor == 0.3 and ref.config.shift_factor == 0.1
    _assert_same_outputs(vae, ref)
    again = load_diffusers_vae(tmp_path / "vae")
    assert again.config == vae.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), vae.state_dict().values()))


def test_legacy_diffusers_attention_names_load(tmp_path):
    ref = _diffusers_vae()
    legacy = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    state = {}
    for k, v in ref.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{old}")
        state[k] = v
    assert "encoder.mid_block.attentions.0.query.weight" in state
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    _assert_same_outputs(load_diffusers_vae(tmp_path), ref)


def test_single_file_checkpoint_matches_diffusers(tmp_path):
    widths = (8, 16, 16)
    ref = _diffusers_vae(widths, layers=2)
    # diffusers layout -> original layout through the tables (not diffusers' converter)
    original = convert(ref.state_dict(), DIFFUSERS, ORIGINAL, num_levels=len(widths))
    assert original["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert torch.equal(original["decoder.up.0.block.0.nin_shortcut.weight"], ref.state_dict()["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"])
    checkpoint = {"first_stage_model." + k: v for k, v in original.items()}
    checkpoint["first_stage_model.loss.logvar"] = torch.zeros(())  # training leftovers are skipped
    checkpoint["model.diffusion_model.conv_in.weight"] = torch.zeros(2, 2)  # other components are ignored
    vae = load_sd_vae_from_single_file(checkpoint, norm_num_groups=4)
    assert vae.config == dataclasses.replace(vae.config, block_out_channels=widths, layers_per_block=2, latent_channels=4)
    errors = _assert_same_outputs(vae, ref)
    # and from a .safetensors file, with the config given
    save_file(checkpoint, str(tmp_path / "sd.safetensors"))
    _assert_same_outputs(load_sd_vae_from_single_file(tmp_path / "sd.safetensors", vae.config), ref)
    # export back to the original layout: the same tensors
    exported = sd_single_file_state(vae)
    assert set(exported) == {k for k in checkpoint if k.startswith("first_stage_model.") and ".loss." not in k}
    assert all(torch.equal(exported[k], checkpoint[k]) for k in exported)
    # independent check of the ORIGINAL table: diffusers' own converter reads our original layout back
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    back = convert_ldm_vae_checkpoint(checkpoint, dict(ref.config))
    ref_state = ref.state_dict()
    assert set(back) == set(ref_state)
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in ref_state.items())
    print("single-file parity max errors:", errors)


def test_tiled_encode_decode_matches_diffusers_tiling():
    ref = _diffusers_vae()
    ref.enable_tiling()  # tiles of sample_size = 16 pixels, 8 latents, overlap 0.25
    vae = AutoencoderKL(TINY).eval()
    vae.load_state_dict(to_difflab(ref.state_dict(), DIFFUSERS))
    x = _images(hw=40)
    z = torch.randn(2, 4, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q_ref, q = ref.encode(x).latent_dist, vae.encode(x, tiled=True, tile_size=16)
        dec_ref, dec = ref.decode(z).sample, vae.decode(z, tiled=True, tile_size=16)
        untiled = vae.decode(z)
    assert dec.shape == untiled.shape == (2, 3, 40, 40) and q.mean.shape == (2, 4, 20, 20)
    assert (q.mean - q_ref.mean).abs().max() < PARITY_TOL and (q.logvar - q_ref.logvar).abs().max() < PARITY_TOL
    assert (dec - dec_ref).abs().max() < PARITY_TOL
    assert (dec - untiled).abs().max() > 1e-3  # tiling really happened


def test_loading_errors_name_the_keys(tmp_path):
    ref = _diffusers_vae()
    ref.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["encoder.bogus.weight"] = state.pop("encoder.conv_in.weight")
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing keys \\(1\\): encoder.conv_in.weight.*unexpected keys \\(1\\): encoder.bogus.weight"):
        load_diffusers_vae(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        config_from_diffusers({**config, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types"):
        config_from_diffusers({**config, "down_block_types": ["DownEncoderBlock2D"]})
    path.unlink()
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load_diffusers_vae(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_diffusers_vae(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no tensors under prefix 'first_stage_model.'"):
        load_sd_vae_from_single_file({"model.x": torch.zeros(1)})
    single = sd_single_file_state(AutoencoderKL(TINY))
    del single["first_stage_model.decoder.up.0.block.1.conv2.bias"]
    with pytest.raises(ValueError, match="missing keys \\(1\\): decoder.up_blocks.1.resnets.1.conv2.bias"):
        load_sd_vae_from_single_file(single, TINY)
    with pytest.raises(ValueError, match="cannot infer the VAE config"):
        infer_vae_config({})


# ----------------------------------------------------------------------------------------------
# Training on digits, tiling on a trained model


DIGITS_VAE = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=1.0)


@pytest.fixture(scope="module")
def trained():
    """A tiny VAE trained 100 steps on 16x16 digits (about 4 s on one CPU thread)."""
    images, _ = load_digits(size=16)
    torch.manual_seed(0)
    vae = AutoencoderKL(DIGITS_VAE)
    held_out = images[:256]

    def l1():
        with torch.no_grad():
            return (vae.decode(vae.encode(held_out).mode()) - held_out).abs().mean().item()

    before = l1()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = images[torch.randint(len(images), (16,), generator=g)]
        loss = vae_loss(vae, batch, generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval(), images, before, l1()


def test_training_reduces_reconstruction_error(trained):
    vae, images, before, after = trained
    mean_image = (images.mean(0, keepdim=True) - images[:256]).abs().mean().item()  # 0.39
    print(f"digits VAE L1: {before:.3f} -> {after:.3f} (mean-image predictor {mean_image:.3f})")
    assert after < 0.25 * before and after < 0.4 * mean_image


def test_tiled_decode_approximates_untiled_on_a_trained_vae(trained):
    """Tiling is not exact: GroupNorm statistics and the mid-block attention see one tile, and
    convolutions see zero padding at tile borders; a trained decoder is local enough that the
    blended result stays close (measured: about 5% relative error, reconstruction no worse)."""
    vae, images, _, _ = trained
    mosaic = images[:18].reshape(2, 3, 3, 16, 16).permute(0, 1, 3, 2, 4).reshape(2, 1, 48, 48)  # 3x3 digits
    with torch.no_grad():
        z = vae.encode(mosaic).mode()
        untiled = vae.decode(z)
        tiled = vae.decode(z, tiled=True, tile_size=32)
        z_tiled = vae.encode(mosaic, tiled=True, tile_size=32).mode()
    rel = ((tiled - untiled).norm() / untiled.norm()).item()
    rel_z = ((z_tiled - z).norm() / z.norm()).item()
    print(f"tiled vs untiled relative error: decode {rel:.3f}, encode {rel_z:.3f}")
    assert 1e-4 < rel < 0.1 and 1e-4 < rel_z < 0.1
    assert (tiled - mosaic).abs().mean() < 1.25 * (untiled - mosaic).abs().mean()


def test_scaling_factor_on_digits_gives_unit_variance_latents(trained):
    vae, images, _, _ = trained
    s = estimate_scaling_factor(vae, images[:512], generator=torch.Generator().manual_seed(0))
    scaled = AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=s))
    scaled.load_state_dict(vae.state_dict())
    with torch.no_grad():
        z = scaled.encode_latents(images[512:1024], torch.Generator().manual_seed(1))
    assert z.std().item() == pytest.approx(1.0, abs=0.05)  # held-out images


# ----------------------------------------------------------------------------------------------
# Loss pieces


def test_vae_loss_is_reconstruction_plus_beta_kl_per_example():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).double()
    x = _images(b=3).double()
    out = vae_loss(vae, x, reconstruction="l2", kl_weight=0.01, generator=torch.Generator().manual_seed(4))
    x_hat, q = vae(x, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(out["x_hat"], x_hat)
    assert torch.allclose(out["reconstruction"], ((x - x_hat) ** 2).sum(dim=(1, 2, 3)))
    assert torch.allclose(out["kl"], q.kl())
    assert out["loss"].shape == (3,) and torch.allclose(out["loss"], out["reconstruction"] + 0.01 * out["kl"])
    assert torch.equal(out["adversarial"], torch.zeros(3, dtype=torch.float64)) and out["adaptive_weight"] == 0
    assert torch.allclose(reconstruction_loss(x, x_hat, "l1"), (x - x_hat).abs().sum(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="reconstruction kind must be one of"):
        reconstruction_loss(x, x_hat, "lpips")


def test_patch_discriminator_hinge_and_adaptive_weight():
    logits_real = torch.tensor([[[[2.0, 0.5]]], [[[-1.0, 0.0]]]])
    logits_fake = torch.tensor([[[[-2.0, 0.5]]], [[[1.0, -0.5]]]])
    # 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) per example
    assert torch.allclose(hinge_discriminator_loss(logits_real, logits_fake), torch.tensor([0.5 * (0.25 + 0.75), 0.5 * (1.5 + 1.25)]))

    torch.manual_seed(0)
    vae = AutoencoderKL(dataclasses.replace(TINY, block_out_channels=(8, 16, 16)))
    disc = PatchDiscriminator(3, channels=8, n_layers=2)
    x = _images(b=2, hw=16)
    out = vae_loss(vae, x, discriminator=disc, disc_weight=0.5, generator=torch.Generator().manual_seed(0))
    rec, adv = out["reconstruction"].mean(), out["adversarial"].mean()
    w = vae.decoder.conv_out.weight
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(adv, w, retain_graph=True)[0].norm()
    assert out["adaptive_weight"].item() == pytest.approx(0.5 * (g_rec / (g_adv + 1e-4)).item(), rel=1e-5)
    assert out["adaptive_weight"] > 0 and not out["adaptive_weight"].requires_grad
    assert torch.allclose(out["loss"], out["reconstruction"] + 1e-6 * out["kl"] + out["adaptive_weight"] * out["adversarial"])
    assert torch.allclose(out["adversarial"], -disc(out["x_hat"]).flatten(1).mean(1))
    assert adaptive_weight(rec, adv, w).item() == pytest.approx((g_rec / (g_adv + 1e-4)).item(), rel=1e-5)
    # one step of each player
    out["loss"].mean().backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    d_loss = discriminator_loss(disc, x, out["x_hat"])
    assert d_loss.shape == (2,)
    d_loss.mean().backward()
    assert disc.net[0].weight.grad.abs().sum() > 0
    with torch.no_grad():  # evaluation: no adaptive weight, as in LDM
        assert vae_loss(vae, x, discriminator=disc)["adaptive_weight"] == 0
    with pytest.raises(ValueError, match="at least 12x12"):
        disc(torch.zeros(1, 3, 8, 8))
    assert math.isfinite(d_loss.sum().item())
