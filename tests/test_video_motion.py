"""The motion-module route of the video demo: the direction label and the noise level reach the
motion modules, and zero-initialized modules over a frozen image U-Net still learn (their first
step opens ``proj_out``, their second reaches the direction embedding)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from difflab.io.motion_folder import save_motion_adapter, save_unet_motion_model
from difflab.nn.motion import PRESETS, MotionUNetConfig, TemporalTransformer, freeze_spatial, insert_motion_modules
from difflab.nn.unet import PRESETS as UNET_PRESETS
from difflab.nn.unet import UNet
from difflab.nn.unet_sd import UNetSD, UNetSDConfig


def _net(seed=0, **motion):
    torch.manual_seed(seed)
    image = UNet(UNET_PRESETS["tiny"])
    with torch.no_grad():
        for p in image.parameters():
            p.normal_(0, 0.1)
    return insert_motion_modules(image, num_heads=2, max_frames=8, num_frames=4, num_directions=4, **motion)


def test_the_direction_changes_a_trained_motion_modules_output_and_the_time_reaches_it_with_time_embedding():
    torch.manual_seed(0)
    module = TemporalTransformer(8, 2, groups=4, max_frames=8, num_directions=4, time_embedding=True)
    torch.nn.init.normal_(module.proj_out.weight, std=0.2)  # as after training: proj_out no longer zero
    h, tf = torch.randn(2 * 4, 8, 3, 3), torch.randn(2, 32)
    with torch.no_grad():
        base = module(h, 4, torch.tensor([0, 0]), tf)
        other_dir = module(h, 4, torch.tensor([1, 0]), tf)
        other_time = module(h, 4, torch.tensor([0, 0]), torch.cat([tf[:1] + 1.0, tf[1:]]))
    assert (base[:4] - other_dir[:4]).abs().max() > 1e-3 and torch.equal(base[4:], other_dir[4:])  # clip 0 only
    assert (base[:4] - other_time[:4]).abs().max() > 1e-3 and torch.equal(base[4:], other_time[4:])
    with pytest.raises(ValueError, match="time_features"):
        module(h, 4, torch.tensor([0, 0]))


def test_time_embedding_makes_the_modules_depend_on_t_beyond_the_image_network():
    """Only the modules' own time path differs between the two nets (same weights otherwise): with
    time_embedding the output at two times differs by more than the image network's own t-dependence."""
    plain, timed = _net(0), _net(0, time_embedding=True)
    timed.load_state_dict(plain.state_dict(), strict=False)
    for net in (plain, timed):
        for m in net.motion.values():
            torch.nn.init.normal_(m.proj_out.weight, generator=torch.Generator().manual_seed(1), std=0.2)
    x, d = torch.randn(1, 1, 4, 8, 8), torch.tensor([2])
    with torch.no_grad():
        same_t = [net(x, torch.tensor([100.0]), direction_labels=d) for net in (plain, timed)]
        assert not torch.allclose(same_t[0], same_t[1], atol=1e-4)  # the time MLP adds to the tokens
        # the time features are those of t, per clip: a batch of 2 clips at two times = each alone
        both = timed(torch.cat([x, x]), torch.tensor([100.0, 700.0]), direction_labels=torch.tensor([2, 2]))
        torch.testing.assert_close(both[1:], timed(x, torch.tensor([700.0]), direction_labels=d))
    assert all(p.requires_grad for n, p in timed.named_parameters() if "time_embed" in n and n.startswith("motion."))
    trainable = {id(p) for p in freeze_spatial(timed)}
    assert all(id(p) in trainable for n, p in timed.named_parameters() if n.startswith("motion.") and "time_embed" in n)
    assert MotionUNetConfig.from_dict(timed.config.to_dict()) == timed.config
    with pytest.raises(ValueError, match="time_embedding"):
        MotionUNetConfig(image_kind="unet", image=UNET_PRESETS["tiny"].to_dict(), time_embedding=1)


def test_zero_initialized_modules_over_a_frozen_image_net_learn_the_direction():
    """proj_out starts at zero, so at step 0 no gradient reaches the direction embedding; after one
    AdamW step proj_out is open and the next step moves the embedding: zero init does not stall them."""
    net = _net(0, time_embedding=True)
    params = freeze_spatial(net)
    image_before = {k: v.clone() for k, v in net.unet.state_dict().items()}
    embed = net.motion["mid_0"].direction_embed.weight
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, t, d = torch.randn(2, 1, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 3])
    grads = []
    for _ in range(2):
        opt.zero_grad()
        net(x, t, direction_labels=d).square().mean().backward()
        grads.append(embed.grad.abs().sum().item())
        opt.step()
    assert grads[0] == 0.0 and grads[1] > 0.0
    assert all(torch.equal(v, net.unet.state_dict()[k]) for k, v in image_before.items())  # the image net stays frozen


def test_time_embedding_cannot_be_exported_to_diffusers(tmp_path):
    sd = UNetSDConfig.from_dict(PRESETS["tiny"].image)
    net = insert_motion_modules(UNetSD(sd), num_heads=2, max_frames=8, num_frames=4, time_embedding=True)
    with pytest.raises(ValueError, match="time_embedding"):
        save_motion_adapter(net, tmp_path / "a")
    with pytest.raises(ValueError, match="time_embedding"):
        save_unet_motion_model(net, tmp_path / "u")


def test_the_demos_data_design_moves_the_labelled_way_in_every_frame():
    """The demo's clips (no bounce): every centre-of-mass step goes the labelled way by the speed,
    and the judge's motion reading is right for all of them; a design that cannot fit is refused."""
    from difflab.data.moving_digits import moving_digits
    from difflab.demos.video import BOUNCE, FRAMES, SIZE, SPEEDS
    from difflab.eval.video import centre_steps, direction_axis_sign, moves_as_asked
    c = moving_digits(60, frames=FRAMES, size=SIZE, speeds=SPEEDS, bounce=BOUNCE, split="test", seed=3)
    axis, sign = direction_axis_sign(c.directions)
    steps = (c.positions[:, 1:] - c.positions[:, :-1]).float()  # (N, F - 1, 2)
    along = steps.gather(2, axis[:, None, None].expand(-1, FRAMES - 1, 1))[..., 0] * sign[:, None]
    assert torch.equal(along, c.speeds[:, None].float().expand_as(along))
    assert bool(moves_as_asked(c.clips, c.directions).all())
    assert centre_steps(c.clips).shape == (60, FRAMES - 1, 2)
    bounced = moving_digits(200, frames=8, size=16, speeds=(1,), seed=3)  # the old design: most clips turn at an edge
    b_steps = (bounced.positions[:, 1:] - bounced.positions[:, :-1]).float()
    b_axis, b_sign = direction_axis_sign(bounced.directions)
    b_along = b_steps.gather(2, b_axis[:, None, None].expand(-1, 7, 1))[..., 0] * b_sign[:, None]
    assert (b_along < 0).float().mean() > 0.2
    with pytest.raises(ValueError, match="bounce=False: 8 frames at speeds=\\[2\\] travel 14 pixels, more than the 8"):
        moving_digits(2, frames=8, size=16, speeds=(2,), bounce=False)


def test_the_unfrozen_control_route_trains_the_image_network_on_clips(tmp_path):
    from difflab.demos.video import NETWORKS, train_route, training_data
    route = NETWORKS["motion_modules_unfrozen"](tiny=True)
    assert not route.freeze_image and NETWORKS["motion_modules"](tiny=True).freeze_image
    assert route.spec["network"]["config"]["time_embedding"] is True
    clips, labels, cond, null = training_data(16, 0.0)
    config = dataclasses.replace(route.train, steps=2, progress=False, checkpoint_every=2)
    image = dataclasses.replace(route, image_train=dataclasses.replace(route.image_train, steps=1, checkpoint_every=1))
    den, _ = train_route(image, "control", config, (clips, labels, cond), null, tmp_path, steps=1, progress=False, resume=False)
    assert all(p.requires_grad for p in den.net.parameters())
    from difflab.io.checkpoint import load_checkpoint
    pre = {k[len("ema."):]: v for k, v in load_checkpoint(tmp_path / "control" / "image")[0].items() if k.startswith("ema.")}
    after = den.net.unet.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in pre.items())  # the image U-Net moved on the clips


def test_the_frame_embedding_tells_each_frame_its_index_and_skips_independent_frames():
    """A clip of one repeated frame: without a frame embedding every frame comes out the same (the
    relative bias cannot tell them apart); with it (trained: nonzero) they differ, unless the
    frames are marked independent (then each frame is the network at F = 1); a fresh embedding is
    zero, so it starts as the plain network."""
    from difflab.nn.video_unet import PRESETS as VIDEO_PRESETS
    from difflab.nn.video_unet import VideoUNet
    plain_cfg = VIDEO_PRESETS["tiny"]
    nets = {}
    for flag in (False, True):
        torch.manual_seed(0)
        nets[flag] = VideoUNet(dataclasses.replace(plain_cfg, frame_embedding=flag)).eval()
    nets[True].load_state_dict(nets[False].state_dict(), strict=False)
    x = torch.randn(1, 1, 1, 8, 8).expand(2, 1, 4, 8, 8).contiguous()
    t, y, d = torch.tensor([300.0, 300.0]), torch.tensor([3, 3]), torch.tensor([0, 0])
    with torch.no_grad():
        torch.testing.assert_close(nets[True](x, t, y, d), nets[False](x, t, y, d))  # zero at start
        for net in nets.values():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        plain, framed = nets[False](x, t, y, d), nets[True](x, t, y, d)
        assert (plain[:, :, 1:] - plain[:, :, :1]).abs().max() < 1e-5
        assert (framed[:, :, 1:] - framed[:, :, :1]).abs().max() > 1e-3
        still = nets[True](x, t, y, d, independent_frames=torch.tensor([True, False]))
        assert (still[0, :, 1:] - still[0, :, :1]).abs().max() < 1e-5
        torch.testing.assert_close(still[1], framed[1])
        xs = torch.randn(1, 1, 4, 8, 8)  # independent frames = each frame alone (F = 1: no index either)
        alone = torch.cat([nets[True](xs[:, :, f:f + 1], t[:1], y[:1], d[:1]) for f in range(4)], dim=2)
        torch.testing.assert_close(nets[True](xs, t[:1], y[:1], d[:1], independent_frames=True), alone, atol=1e-5, rtol=1e-4)
