"""AnimateDiff motion modules (difflab.nn.motion, difflab.io.motion_folder): parity with diffusers'
UNetMotionModel through both folder loaders, the F = 1 reduction, per-clip independence, bad
shapes, and training only the temporal layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflab.io.diffusers_folder import load_diffusers_unet
from difflab.io.motion_folder import load_motion_adapter, load_unet_motion_model, save_motion_adapter, save_unet_motion_model
from difflab.io.spec import build_denoiser, load_denoiser, make_spec, sample_shape
from difflab.nn.motion import (PRESETS, MotionUNet, MotionUNetConfig, TemporalTransformer, freeze_spatial, insert_motion_modules,
                               is_temporal)
from difflab.nn.unet import PRESETS as UNET_PRESETS
from difflab.nn.unet import UNet
from difflab.nn.unet_sd import UNetSD, UNetSDConfig
from difflab.train import TrainConfig, train

TINY_SD = UNetSDConfig.from_dict(PRESETS["tiny"].image)


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every parameter redrawn from N(0, std^2): a motion module that is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _motion_sd(seed: int = 0, randomize: bool = True, **motion) -> MotionUNet:
    torch.manual_seed(seed)
    net = MotionUNet(MotionUNetConfig(image=TINY_SD.to_dict(), **{"num_heads": 2, "max_frames": 8, "num_frames": 4, **motion}))
    if randomize:
        _randomize(net.motion, seed + 1)
    return net.eval()


# ----------------------------------------------------------------------------------------------
# Parity with diffusers' UNetMotionModel


@pytest.fixture(scope="module")
def diffusers_motion(tmp_path_factory):
    """A tiny random UNet2DConditionModel + MotionAdapter (per-level heads and depths, a middle
    module), joined by ``UNetMotionModel.from_unet2d``; the three saved as folders."""
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("motion")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4)
    adapter = diffusers.MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=(2, 4),
                                      motion_transformer_layers_per_block=(1, 2), motion_norm_num_groups=8,
                                      motion_max_seq_length=8, use_motion_mid_block=True)
    _randomize(adapter, 1)  # proj_out too: the modules are far from the identity
    model = diffusers.UNetMotionModel.from_unet2d(unet, adapter).eval()
    unet.save_pretrained(root / "unet")
    adapter.save_pretrained(root / "adapter")
    model.save_pretrained(root / "unet_motion")
    return model, root


def _reference(model, x, t, context):
    """diffusers' output; its UNetMotionModel takes the text states already repeated per frame."""
    with torch.no_grad():
        return model(x, t, context.repeat_interleave(x.shape[2], dim=0)).sample


def test_motion_adapter_and_unet_motion_folders_match_diffusers(diffusers_motion):
    model, root = diffusers_motion
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 5, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
    t = torch.tensor([10, 700])
    ref = _reference(model, x, t, context)
    from_adapter = load_motion_adapter(root / "adapter", load_diffusers_unet(root / "unet"))
    from_folder = load_unet_motion_model(root / "unet_motion")
    assert sorted(from_adapter.motion) == ["down_0_0", "down_1_0", "mid_0", "up_0_0", "up_0_1", "up_1_0", "up_1_1"]
    assert len(from_adapter.motion["down_1_0"].transformer_blocks) == 2 and len(from_adapter.motion["up_1_0"].transformer_blocks) == 1
    with torch.no_grad():
        for net in (from_adapter, from_folder):
            out = net(x, t.float(), context=context)
            assert out.shape == (2, 4, 5, 8, 8)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert ref.abs().max() > 0.1  # not a trivially small output


def test_a_motion_unet_written_back_loads_in_diffusers_with_the_same_output(diffusers_motion, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model, root = diffusers_motion
    net = load_unet_motion_model(root / "unet_motion")
    save_unet_motion_model(net, tmp_path / "out")
    save_motion_adapter(net, tmp_path / "adapter")
    back = diffusers.UNetMotionModel.from_pretrained(tmp_path / "out").eval()
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
    joined = diffusers.UNetMotionModel.from_unet2d(unet, diffusers.MotionAdapter.from_pretrained(tmp_path / "adapter")).eval()
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 3, 16, generator=g)
    ref = _reference(model, x, torch.tensor([500]), context)
    for written in (back, joined):
        torch.testing.assert_close(_reference(written, x, torch.tensor([500]), context), ref, atol=1e-6, rtol=0)


def test_an_adapter_for_another_unet_is_refused_naming_the_setting(diffusers_motion):
    _, root = diffusers_motion
    other = UNetSD(UNetSDConfig(block_out_channels=(16, 32), layers_per_block=2, down_attention=(True, False),
                                up_attention=(False, True), num_heads=(2, 2), cross_attention_dim=16, norm_num_groups=8))
    with pytest.raises(ValueError, match="motion_layers_per_block=1 does not match the U-Net's layers_per_block=2"):
        load_motion_adapter(root / "adapter", other)


# ----------------------------------------------------------------------------------------------
# F = 1 and the identity at insertion


@pytest.mark.parametrize("kind", ["unet_sd", "unet"])
def test_freshly_inserted_motion_modules_leave_the_image_model_exactly(kind):
    torch.manual_seed(0)
    # the ADM net's output conv starts at zero and would hide everything: a "pretrained" one
    image = UNetSD(TINY_SD) if kind == "unet_sd" else _randomize(UNet(UNET_PRESETS["digits"]), 5, std=0.1)
    net = insert_motion_modules(image, num_heads=2, max_frames=8, num_frames=4).eval()
    assert net.unet is image  # the pretrained weights themselves, not a copy
    g = torch.Generator().manual_seed(1)
    c = image.config.in_channels
    x, t = torch.randn(2, c, 8, 8, generator=g), torch.tensor([3.0, 400.0])
    cond = {"context": torch.randn(2, 3, 32, generator=g)} if kind == "unet_sd" else {"class_labels": torch.tensor([3, 7])}
    with torch.no_grad():
        image_out = image(x, t, **cond)
        assert torch.equal(net(x[:, :, None], t, **cond)[:, :, 0], image_out)  # F = 1
        clip = net(x[:, :, None].expand(-1, -1, 4, -1, -1), t, **cond)  # F = 4, zero-initialized proj_out
    assert image_out.abs().max() > 0
    for f in range(4):
        torch.testing.assert_close(clip[:, :, f], image_out, atol=1e-5, rtol=0)


def test_temporal_attention_over_one_frame_is_its_value_path():
    """At F = 1 each attention has one key (softmax weight 1): with any weights, the module is
    h + proj_out(blocks(proj_in(norm(h)))) with every attention replaced by to_out(to_v(.)) and
    the frame encoding's first row added."""
    module = _randomize(TemporalTransformer(16, heads=2, depth=2, groups=4, max_frames=8), 0)
    h = torch.randn(3, 16, 4, 4)
    pe = module.transformer_blocks[0].pos_embed.pe[0, 0]
    x = F.group_norm(h, 4, module.norm.weight, module.norm.bias, eps=1e-6).permute(0, 2, 3, 1).reshape(-1, 16)
    x = module.proj_in(x)
    for block in module.transformer_blocks:
        x = x + block.attn1.to_out[0](block.attn1.to_v(block.norm1(x) + pe))
        x = x + block.attn2.to_out[0](block.attn2.to_v(block.norm2(x) + pe))
        x = x + block.ff(block.norm3(x))
    expected = h + module.proj_out(x).reshape(3, 4, 4, 16).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(module(h, num_frames=1), expected.detach(), atol=1e-5, rtol=0)
    assert (expected - h).abs().max() > 0.1  # not the identity


# ----------------------------------------------------------------------------------------------
# Clips: frames interact, clips do not


def test_frames_mix_within_a_clip_and_a_clip_is_the_same_whatever_the_batch():
    net = _motion_sd()
    g = torch.Generator().manual_seed(4)
    x, context, t = torch.randn(3, 4, 4, 8, 8, generator=g), torch.randn(3, 2, 32, generator=g), torch.tensor([5.0, 300.0, 900.0])
    with torch.no_grad():
        batch = net(x, t, context=context)
        for i in range(3):
            alone = net(x[i:i + 1], t[i:i + 1], context=context[i:i + 1])
            torch.testing.assert_close(alone, batch[i:i + 1], atol=1e-5, rtol=0)
        changed = x.clone()
        changed[0, :, 3] += 1.0  # the last frame of clip 0
        out = net(changed, t, context=context)
    assert (out[0, :, 0] - batch[0, :, 0]).abs().max() > 1e-3  # frame 0 sees frame 3 through the motion modules
    torch.testing.assert_close(out[1:], batch[1:], atol=1e-5, rtol=0)  # the other clips do not


# ----------------------------------------------------------------------------------------------
# Bad shapes


def test_bad_shapes_are_refused_naming_the_argument():
    net = _motion_sd(randomize=False)
    with pytest.raises(ValueError, match=r"x must be a batch of clips \(B, 4, F, H, W\).*4-D batch of images"):
        net(torch.zeros(2, 4, 8, 8), torch.ones(2))
    with pytest.raises(ValueError, match="F = 9 frames, above max_frames = 8"):
        net(torch.zeros(1, 4, 9, 8, 8), torch.ones(1))
    with pytest.raises(ValueError, match=r"context must have one row per clip \(B = 2\)"):
        net(torch.zeros(2, 4, 3, 8, 8), torch.ones(2), context=torch.zeros(6, 2, 32))
    with pytest.raises(ValueError, match="num_frames=9 is above max_frames=8"):
        MotionUNetConfig(image=TINY_SD.to_dict(), num_heads=2, max_frames=8, num_frames=9)
    with pytest.raises(ValueError, match="num_heads=3 does not divide"):
        MotionUNet(MotionUNetConfig(image=TINY_SD.to_dict(), num_heads=3))


# ----------------------------------------------------------------------------------------------
# Training only the temporal layers; the network kind


@pytest.mark.parametrize("kind", ["unet_sd", "unet"])
def test_freeze_spatial_trains_only_the_motion_modules(kind):
    torch.manual_seed(0)
    image = UNetSD(TINY_SD) if kind == "unet_sd" else _randomize(UNet(UNET_PRESETS["tiny"]), 5, std=0.1)  # "pretrained"
    net = insert_motion_modules(image, num_heads=2, max_frames=8, num_frames=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainable = freeze_spatial(net)
    assert {id(p) for p in trainable} == {id(p) for n, p in net.named_parameters() if n.startswith("motion.")}
    opt = torch.optim.SGD(trainable, lr=0.1)
    x = torch.randn(2, image.config.in_channels, 3, 8, 8)
    loss = (net(x, torch.tensor([1.0, 2.0])) - 1).square().mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert (p.grad is not None) == is_temporal(name), name
    assert any(p.grad.abs().sum() > 0 for p in trainable)
    opt.step()
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("motion.") for k in changed)


def test_the_motion_unet_kind_trains_saves_and_loads(tmp_path):
    spec = make_spec("motion_unet", _motion_sd(randomize=False).config,
                     {"frame": "vp_discrete", "schedule": "linear", "T": 100, "prediction": "eps"})
    denoiser = build_denoiser(spec, seed=0)
    start = {k: v.clone() for k, v in denoiser.net.state_dict().items()}
    freeze_spatial(denoiser.net)  # the AnimateDiff route: the loop trains what requires grad
    clips = torch.rand(8, 4, 4, 8, 8) * 2 - 1
    train(denoiser, clips, TrainConfig(steps=2, batch_size=4, checkpoint_every=0, log_every=1, progress=False), tmp_path / "run",
          spec=spec)
    loaded, meta = load_denoiser(tmp_path / "run", weights="model")
    assert isinstance(loaded.net, MotionUNet) and sample_shape(meta["spec"], meta) == (4, 4, 8, 8)
    trained = loaded.net.state_dict()
    changed = {k for k in trained if not torch.equal(trained[k], start[k])}
    assert changed and all(k.startswith("motion.") for k in changed)  # the image network came back untouched
    x, sigma = torch.randn(2, 4, 4, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma), denoiser.eval()(x, sigma))


def test_levels_choose_where_the_modules_go_and_survive_a_spec():
    net = insert_motion_modules(UNet(UNET_PRESETS["digits"]), num_heads=4, max_frames=8, num_frames=8, levels=(1,))
    assert sorted(net.motion) == ["down_1_0", "down_1_1", "mid_0", "up_0_0", "up_0_1", "up_0_2"]  # up block 0 is level 1
    assert MotionUNetConfig.from_dict(net.config.to_dict()) == net.config
    with pytest.raises(ValueError, match=r"levels=\[2\]: \[2\] are not levels of the image network \(valid: 0..1\)"):
        MotionUNetConfig(image_kind="unet", image=UNET_PRESETS["digits"].to_dict(), levels=(2,))


@pytest.mark.parametrize("down_blocks", [True, False])
def test_down_blocks_false_leaves_the_frozen_encoder_out_of_the_backward(down_blocks, tmp_path):
    torch.manual_seed(0)
    net = insert_motion_modules(UNet(UNET_PRESETS["tiny"]), num_heads=2, max_frames=8, num_frames=4, down_blocks=down_blocks)
    downs = sorted(s for s in net.motion if s.startswith("down"))
    assert downs == (["down_0_0", "down_1_0"] if down_blocks else [])
    assert sorted(s for s in net.motion if not s.startswith("down")) == ["mid_0", "up_0_0", "up_0_1", "up_1_0", "up_1_1"]
    assert MotionUNetConfig.from_dict(net.config.to_dict()) == net.config
    freeze_spatial(net)
    seen = []
    hook = net.unet.down[-1].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    out = net(torch.randn(2, 1, 4, 8, 8), torch.tensor([10.0, 500.0]))
    hook.remove()
    assert seen == [down_blocks] and out.requires_grad  # without down modules the encoder records no graph
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.motion.parameters())
    if not down_blocks:
        sd = insert_motion_modules(UNetSD(TINY_SD), num_heads=2, max_frames=8, num_frames=4, down_blocks=False)
        with pytest.raises(ValueError, match="down_blocks=False"):
            save_motion_adapter(sd, tmp_path / "a")
    with pytest.raises(ValueError, match="down_blocks='no' must be a bool"):
        MotionUNetConfig(image_kind="unet", image=UNET_PRESETS["tiny"].to_dict(), down_blocks="no")



def test_up_modules_keeps_the_first_sites_of_each_decoder_level_and_cannot_be_exported(tmp_path):
    torch.manual_seed(0)
    net = insert_motion_modules(UNet(UNET_PRESETS["tiny"]), num_heads=2, max_frames=8, num_frames=4, up_modules=1)
    assert sorted(net.motion) == ["down_0_0", "down_1_0", "mid_0", "up_0_0", "up_1_0"]  # the second site of each level dropped
    assert MotionUNetConfig.from_dict(net.config.to_dict()) == net.config
    freeze_spatial(net)
    out = net(torch.randn(2, 1, 4, 8, 8), torch.tensor([10.0, 500.0]))
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.motion.parameters())
    none = insert_motion_modules(UNet(UNET_PRESETS["tiny"]), num_heads=2, max_frames=8, num_frames=4, up_modules=0)
    assert sorted(none.motion) == ["down_0_0", "down_1_0", "mid_0"]
    sd = insert_motion_modules(UNetSD(TINY_SD), num_heads=2, max_frames=8, num_frames=4, up_modules=1)
    with pytest.raises(ValueError, match="up_modules=1"):
        save_motion_adapter(sd, tmp_path / "a")
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="must be an int >= 0 or None"):
            MotionUNetConfig(image_kind="unet", image=UNET_PRESETS["tiny"].to_dict(), up_modules=bad)

def test_direction_labels_reach_only_the_motion_modules_and_cannot_be_exported(tmp_path):
    torch.manual_seed(0)
    image = _randomize(UNet(UNET_PRESETS["tiny"]), 5, std=0.1)
    net = insert_motion_modules(image, num_heads=2, max_frames=8, num_frames=4, num_directions=4)
    for module in net.motion.values():  # trained modules: proj_out no longer zero
        torch.nn.init.normal_(module.proj_out.weight, std=0.1)
    assert net.config.null_direction == 4 and net.config.null_class is None
    x, t = torch.randn(2, 1, 4, 8, 8), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        out = {d: net(x, t, direction_labels=torch.tensor([d, 0])) for d in (0, 1, 4)}
        assert not torch.allclose(out[0][0], out[1][0], atol=1e-4)  # the label changes the clip asked for ...
        torch.testing.assert_close(out[0][1], out[1][1])  # ... and no other clip
        torch.testing.assert_close(net(x, t), net(x, t, direction_labels=torch.tensor([4, 4])))  # missing: the null label
    assert {n for n, p in net.named_parameters() if "direction_embed" in n} <= {n for n in dict(net.named_parameters())
                                                                              if n.startswith("motion.")}
    trainable = {id(p) for p in freeze_spatial(net)}
    assert all(id(p) in trainable for n, p in net.named_parameters() if "direction_embed" in n)
    with pytest.raises(ValueError, match=r"direction_labels must be a \(2,\) long tensor of values in \[0, 4\]"):
        net(x, t, direction_labels=torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="these motion modules take none"):
        insert_motion_modules(image, num_heads=2, max_frames=8, num_frames=4)(x, t, direction_labels=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="num_directions"):
        save_motion_adapter(insert_motion_modules(UNetSD(TINY_SD), num_heads=2, max_frames=8, num_frames=4, num_directions=4), tmp_path / "a")
    with pytest.raises(ValueError, match="num_directions"):
        save_unet_motion_model(insert_motion_modules(UNetSD(TINY_SD), num_heads=2, max_frames=8, num_frames=4, num_directions=4), tmp_path / "u")
