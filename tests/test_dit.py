"""The Diffusion Transformer (difflab.nn.dit, Peebles & Xie 2023): shapes, adaLN-Zero's identity at
init, the paper's parameter counts, exact parity with diffusers' DiTTransformer2DModel (network and
denoiser, two configurations, learned sigma included) and with the original facebookresearch/DiT
layout, a training step through difflab.train.fit, checkpoints through build_denoiser /
load_denoiser, and `difflab train --network dit` + `difflab sample`."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from difflab.cli import main
from difflab.cli.train import model_spec
from difflab.core import VPDiscrete
from difflab.io.dit_files import (dit_denoiser, load_diffusers_dit, load_original_dit, save_diffusers_dit)
from difflab.io.spec import build_denoiser, load_denoiser, make_spec, spec_network
from difflab.nn.dit import PRESETS, DiT, DiTConfig, parameter_count, sincos_2d
from difflab.train import TrainConfig, train

TINY = DiTConfig(in_channels=2, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def randomized(net, std=0.2, seed=0):
    """Every weight redrawn (the zero-initialized adaLN and output layers too), so every path carries a signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


# ----------------------------------------------------------------------------------------------
# The network


def test_shapes_patch_sizes_learned_sigma_and_other_image_sizes():
    torch.manual_seed(0)
    for config, size in [(TINY, (8, 8)), (dataclasses.replace(TINY, patch_size=4, out_channels=4), (8, 8)),
                         (TINY, (8, 16)), (TINY, (4, 4))]:
        net = randomized(DiT(config))
        x = torch.randn(3, 2, *size)
        out = net(x, torch.tensor([0.0, 10.5, 999.0]), class_labels=torch.tensor([0, 2, 3]))
        assert out.shape == (3, config.out_channels or 2, *size)
        assert torch.isfinite(out).all() and out.abs().max() > 0
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        net(torch.randn(1, 2, 7, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\]"):
        net(torch.randn(1, 2, 8, 8), torch.zeros(1), class_labels=torch.tensor([4]))
    with pytest.raises(ValueError, match="unconditional"):
        DiT(dataclasses.replace(TINY, num_classes=None))(torch.randn(1, 2, 8, 8), torch.zeros(1), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="patch_size=3 must divide sample_size=8"):
        DiTConfig(patch_size=3)
    with pytest.raises(ValueError, match="num_heads=5 must divide hidden_size=128"):
        DiTConfig(num_heads=5)


def test_adaln_zero_blocks_start_as_the_identity_and_the_net_at_zero():
    torch.manual_seed(0)
    net = DiT(TINY)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.equal(net(torch.randn(2, 2, 8, 8), torch.tensor([3.0, 700.0])), torch.zeros(2, 2, 8, 8))
    # the identity comes from the zero gates alone: a nonzero modulation layer breaks it
    block = net.blocks[0]
    torch.nn.init.normal_(block.adaLN_modulation[1].weight)
    assert not torch.allclose(block(x, c), x)
    # the feed-forward is its own replaceable submodule (B, T, D) -> (B, T, D)
    block.mlp = torch.nn.Identity()
    assert block(x, c).shape == x.shape


def test_missing_labels_mean_the_null_class():
    net = randomized(DiT(TINY))
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([5.0, 50.0])
    assert net.null_class == 3
    assert torch.equal(net(x, t), net(x, t, class_labels=torch.tensor([3, 3])))
    assert not torch.allclose(net(x, t), net(x, t, class_labels=torch.tensor([0, 0])))


def test_parameter_counts_match_the_paper_table_1():
    """Table 1 (with learned sigma, 256x256 images as 32x32x4 latents, 1000 classes): S 33M, B 130M, L 458M, XL 675M."""
    paper = {"S": 33, "B": 130, "L": 458, "XL": 675}
    for size, millions in paper.items():
        config = dataclasses.replace(PRESETS[f"DiT-{size}/2"], out_channels=8)
        assert round(parameter_count(config) / 1e6) == millions
    for name in ("DiT-S/8", "digits"):
        with torch.device("meta"):
            net = DiT(PRESETS[name])
        assert parameter_count(PRESETS[name]) == sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------------------------
# Parity with diffusers


def diffusers_dit(seed, **config):
    """A diffusers DiTTransformer2DModel with every weight random and nonzero; as in converted
    checkpoints, every block's copy of the conditioning embedding equals block 0's."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**config)
    randomized(model, seed=seed)
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


CONFIGS = {
    # learned sigma (out = 2 x in), patch 2, depth 2
    "learned-sigma-p2": dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6, num_layers=2,
                             sample_size=8, patch_size=2, num_embeds_ada_norm=5, norm_eps=1e-5),
    # no learned sigma, patch 4, 16x16, depth 3, 4 heads, the original's eps
    "plain-p4": dict(num_attention_heads=4, attention_head_dim=4, in_channels=2, num_layers=3, sample_size=16, patch_size=4,
                     num_embeds_ada_norm=3, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers_network_and_save_back(name, tmp_path):
    config = CONFIGS[name]
    model = diffusers_dit(1, **config)
    model.save_pretrained(tmp_path / "dit")
    net = load_diffusers_dit(tmp_path / "dit")
    g = torch.Generator().manual_seed(0)
    C, S, classes = config["in_channels"], config["sample_size"], config["num_embeds_ada_norm"]
    x = torch.randn(4, C, S, S, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([0, classes - 1, classes, 1])  # the null class (= num_classes) too
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=y).sample
        out = net(x, t.float(), class_labels=y)
    assert out.shape == ref.shape == (4, config.get("out_channels") or C, S, S)
    assert ref.abs().max() > 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # written back as a diffusers folder, diffusers loads the same function
    save_diffusers_dit(net, tmp_path / "back")
    from diffusers import DiTTransformer2DModel
    with torch.no_grad():
        again = DiTTransformer2DModel.from_pretrained(tmp_path / "back").eval()(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)


def test_denoiser_parity_in_the_papers_frame_with_learned_sigma(tmp_path):
    """DiT's frame (DDPM linear betas, T = 1000, eps): D(x, sigma_t) is x - sigma_t eps(x_in, t) of
    diffusers' model at the integer step t, and v is (r + 1) / 2 of its variance channels."""
    model = diffusers_dit(2, **CONFIGS["learned-sigma-p2"])
    model.save_pretrained(tmp_path / "pipeline" / "transformer")  # a DiTPipeline folder: its transformer/ is read
    (tmp_path / "pipeline" / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    denoiser = dit_denoiser(load_diffusers_dit(tmp_path / "pipeline"))
    assert denoiser.learned_variance and denoiser.prediction == "eps"
    frame = VPDiscrete.from_name("linear", 1000)
    t = torch.tensor([0, 10, 500, 999])
    sigma = frame.sigmas[t].float()
    alpha = frame.scale(sigma)[:, None, None, None]
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * (1 + sigma[:, None, None, None])
    y = torch.tensor([0, 1, 2, 5])
    with torch.no_grad():
        ref = model(alpha * x, timestep=t, class_labels=y).sample
        x0, v = denoiser.x0_and_v(x, sigma, class_labels=y)
    eps, r = ref.split(3, dim=1)
    # frame.time(sigma) recovers t to float32 rounding (~3e-6 steps), hence the looser tolerance
    torch.testing.assert_close(x0, x - sigma[:, None, None, None] * eps, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(v, (r + 1) / 2, atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The original facebookresearch/DiT layout


def original_pos_embed(dim, grid):
    """MAE / DiT's get_2d_sincos_pos_embed, restated in numpy from the paper's code."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)


def to_original_layout(model) -> dict:
    """A diffusers DiT's state dict renamed, by hand, to the names of facebookresearch/DiT's models.py."""
    sd, out = model.state_dict(), {}
    emb = "transformer_blocks.0.norm1.emb."
    out["x_embedder.proj.weight"], out["x_embedder.proj.bias"] = sd["pos_embed.proj.weight"], sd["pos_embed.proj.bias"]
    for i, j in ((0, 1), (2, 2)):
        for leaf in ("weight", "bias"):
            out[f"t_embedder.mlp.{i}.{leaf}"] = sd[f"{emb}timestep_embedder.linear_{j}.{leaf}"]
    out["y_embedder.embedding_table.weight"] = sd[f"{emb}class_embedder.embedding_table.weight"]
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([sd[f"{b}attn1.to_{n}.{leaf}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{leaf}"] = sd[f"{b}attn1.to_out.0.{leaf}"]
            out[f"blocks.{i}.mlp.fc1.{leaf}"] = sd[f"{b}ff.net.0.proj.{leaf}"]
            out[f"blocks.{i}.mlp.fc2.{leaf}"] = sd[f"{b}ff.net.2.{leaf}"]
            out[f"blocks.{i}.adaLN_modulation.1.{leaf}"] = sd[f"{b}norm1.linear.{leaf}"]
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = sd[f"proj_out_1.{leaf}"]
            out[f"final_layer.linear.{leaf}"] = sd[f"proj_out_2.{leaf}"]
    grid = model.config.sample_size // model.config.patch_size
    out["pos_embed"] = torch.from_numpy(original_pos_embed(model.inner_dim, grid)).float()[None]
    return {k: v.clone() for k, v in out.items()}


def test_original_layout_loads_and_computes_the_original_dit(tmp_path):
    """The original DiT is diffusers' DiT with frequencies 10000^(-i/half) (diffusers: i/(half-1))
    and eps 1e-6 in every LayerNorm; diffusers' model set that way is the reference."""
    model = diffusers_dit(3, **CONFIGS["learned-sigma-p2"])
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    state = to_original_layout(model)
    save_file({f"ema.{k}": v for k, v in state.items()}, tmp_path / "dit.safetensors")  # a training checkpoint's prefix
    net = load_original_dit(tmp_path / "dit.safetensors", num_heads=2)
    assert (net.config.frequency_shift, net.config.mlp_norm_eps, net.config.num_classes, net.config.out_channels) == (0, 1e-6, 5, 6)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t.float(), class_labels=y), model(x, timestep=t, class_labels=y).sample,
                                   atol=1e-5, rtol=1e-5)
    assert torch.allclose(net.pos_embed, state["pos_embed"], atol=1e-6)
    with pytest.raises(ValueError, match="head count .* not in Table 1: pass num_heads"):
        load_original_dit(state)
    bad = dict(state, pos_embed=state["pos_embed"].flip(1))
    with pytest.raises(ValueError, match="pos_embed is not the fixed"):
        load_original_dit(bad, num_heads=2)
    with pytest.raises(ValueError, match="missing keys .*blocks.1.mlp.fc2.bias"):
        load_original_dit({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}, num_heads=2)
    with pytest.raises(ValueError, match="never opened"):
        load_original_dit(tmp_path / "DiT-XL-2-256x256.pt")


def test_position_embeddings_match_the_original_table_and_diffusers_rescaling():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    assert torch.allclose(sincos_2d(24, 4, 4), torch.from_numpy(original_pos_embed(24, 4)).float(), atol=1e-6)
    # another grid: positions rescaled onto the trained one (base 4), as diffusers' PatchEmbed does
    ref = get_2d_sincos_pos_embed(24, 8, base_size=4, interpolation_scale=1, output_type="pt")
    assert torch.allclose(sincos_2d(24, 8, 8, base=4), ref.float(), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Training, checkpoints, the command line


def test_training_step_and_checkpoint_round_trip_with_learned_sigma(tmp_path):
    """The hybrid loss (improved DDPM) trains a learned-sigma DiT through difflab.train.fit; the run's
    checkpoint rebuilds the same denoiser."""
    config = dataclasses.replace(TINY, in_channels=1, hidden_size=16)
    spec = make_spec("dit", config, {"frame": "vp_discrete", "schedule": "linear", "T": 1000, "prediction": "eps",
                                     "learned_variance": True})
    assert spec_network(spec).config.out_channels == 2
    denoiser = build_denoiser(spec, seed=0)
    before = {k: v.clone() for k, v in denoiser.net.state_dict().items()}
    images, labels = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 3
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, loss="hybrid", cfg_dropout=0.5, checkpoint_every=0, progress=False,
                      ema_decay=0.0)
    state = train(denoiser, (images, labels), cfg, tmp_path / "run", spec=spec)
    assert state.step == 2
    after = denoiser.net.state_dict()
    assert not torch.equal(after["final_layer.linear.weight"], before["final_layer.linear.weight"])
    assert not torch.equal(after["blocks.0.adaLN_modulation.1.weight"], before["blocks.0.adaLN_modulation.1.weight"])
    loaded, meta = load_denoiser(tmp_path / "run", weights="model")
    assert isinstance(loaded.net, DiT) and loaded.learned_variance and meta["null_class"] == 3
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, class_labels=y), denoiser.eval()(x, sigma, class_labels=y), atol=0, rtol=0)


def test_train_command_network_dit_then_sample(tmp_path):
    spec = {"network": {"kind": "dit", "config": {"hidden_size": 16, "depth": 1, "num_heads": 2}}}
    (tmp_path / "cfg.json").write_text(json.dumps({"spec": spec, "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 0,
                                                                          "progress": False}}))
    run = tmp_path / "run"
    assert main(["train", "--network", "dit", "--config", str(tmp_path / "cfg.json"), "--out", str(run), "--device", "cpu"]) == 0
    denoiser, meta = load_denoiser(run)
    c = denoiser.net.config
    assert isinstance(denoiser.net, DiT) and (c.in_channels, c.num_classes, c.sample_size, c.hidden_size) == (1, 10, 8, 16)
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s.png"), "--steps", "2", "--num", "4",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    # a preset names the network kind's preset, fitted to the data (channels, classes, image size)
    args = argparse.Namespace(network="dit", preset="DiT-S/8", schedule=None, prediction=None)
    spec = model_spec({}, args, torch.zeros(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert spec["network"] == {"kind": "dit", "config": {**PRESETS["DiT-S/8"].to_dict(), "in_channels": 3, "num_classes": 4,
                                                         "sample_size": 16}}


def test_memory_command_takes_dit_presets(capsys):
    assert main(["memory", "--preset", "dit:digits", "--batch-size", "2", "--image-size", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dit:digits" in out and "activations" in out
