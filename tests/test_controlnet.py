"""ControlNet (Zhang et al. 2023): zero convolutions, the encoder copy, scales and windows, several
ControlNets, and parity with diffusers' ControlNetModel."""
import dataclasses
import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from difflab.adapters.controlnet import (ControlledDenoiser, ControlledUNet, ControlNet, ControlNetConfig, control_sigma_range,
                                         controlnet_from_original, load_diffusers_controlnet, save_diffusers_controlnet)
from difflab.core import Denoiser, VPDiscrete, grids
from difflab.io.keymaps import controlnet as keymap
from difflab.io.keymaps import from_difflab
from difflab.nn.unet_sd import UNetSD, UNetSDConfig

F64 = torch.float64
TINY = UNetSDConfig(block_out_channels=(16, 32), layers_per_block=1, down_attention=(True, False), up_attention=(False, True),
                    num_heads=(4, 4), cross_attention_dim=16, norm_num_groups=8, sample_size=8)
DIFFUSERS_TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                      norm_num_groups=8, sample_size=8)


def perturb(module, seed, std=0.05):
    """Move every parameter off its init (zero convolutions included), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def tiny_unet(seed=0) -> UNetSD:
    torch.manual_seed(seed)
    return perturb(UNetSD(TINY), seed + 100).double().eval()


def inputs(batch=2, control_factor=1, channels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([10.0, 637.25, 999.0][:batch], dtype=F64)
    ctx = torch.randn(batch, 5, 16, generator=g, dtype=F64)
    control = torch.rand(batch, channels, 8 * control_factor, 8 * control_factor, generator=g, dtype=F64)
    return x, t, ctx, control


def skip_shapes(unet, x, t, ctx):
    """Shapes of the U-Net's skip connections and middle output, recorded by hooks."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: shapes.append(out.shape))]
    hooks += [b.register_forward_hook(lambda m, a, out: shapes.extend(s.shape for s in out[1])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: shapes.append(out.shape)))
    with torch.no_grad():
        unet(x, t, context=ctx)
    for h in hooks:
        h.remove()
    return shapes[:-1], shapes[-1]


def test_fresh_controlnet_changes_nothing_and_only_zero_convs_learn_first():
    """Zero convolutions (Section 3.1): a new ControlNet's residuals are exactly 0, so the output is the
    base model's bit for bit, however its copy is perturbed; the first gradient reaches only the zero
    convolutions (their input is nonzero), not the copy (their weight is zero)."""
    unet = tiny_unet()
    controlnet = ControlNet.from_unet(unet, conditioning_channels=3, conditioning_embedding_out_channels=(8,))
    x, t, ctx, c = inputs()
    with torch.no_grad():
        base = unet(x, t, context=ctx)
        down, mid = controlnet(x, t, c, ctx)
        assert all(torch.count_nonzero(r) == 0 for r in [*down, mid])
        assert torch.equal(ControlledUNet(unet, controlnet)(x, t, ctx, control=c), base)
        for block in (controlnet.down_blocks, controlnet.mid_block, controlnet.conv_in):  # the copy drifts: still nothing
            perturb(block, 7)
        assert torch.equal(ControlledUNet(unet, controlnet)(x, t, ctx, control=c), base)
    unet.requires_grad_(False)
    ControlledUNet(unet, controlnet)(x, t, ctx, control=c).square().mean().backward()
    zero_convs = [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters()]
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in zero_convs)
    copy = [*controlnet.down_blocks.parameters(), *controlnet.mid_block.parameters(), *controlnet.controlnet_cond_embedding.conv_in.parameters()]
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in copy)
    assert all(p.grad is None for p in unet.parameters())
    with torch.no_grad():  # and once the zero convolutions move, the output does
        perturb(controlnet.controlnet_down_blocks, 3)
        assert (ControlledUNet(unet, controlnet)(x, t, ctx, control=c) - base).abs().max() > 1e-3


def test_from_unet_copies_the_encoder_and_not_the_decoder():
    unet = perturb(tiny_unet(), 8)  # float64 values that float32 cannot hold
    controlnet = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16))
    ours, theirs = controlnet.state_dict(), unet.state_dict()
    encoder = [k for k in theirs if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")]
    assert len(encoder) > 50 and all(torch.equal(ours[k], theirs[k]) for k in encoder)
    assert not any(k.startswith(("up_blocks", "conv_out", "conv_norm_out")) for k in ours)
    assert ours["conv_in.weight"].dtype == F64
    with torch.no_grad():  # a copy, not shared storage
        controlnet.conv_in.weight.add_(1.0)
    assert not torch.equal(controlnet.conv_in.weight, unet.conv_in.weight)


def test_residuals_match_the_unet_skips_in_number_and_shape():
    unet = tiny_unet()
    controlnet = perturb(ControlNet.from_unet(unet, 3, (8, 16)), 5)  # control at twice the latent size
    x, t, ctx, c = inputs(control_factor=2)
    skips, mid_shape = skip_shapes(unet, x, t, ctx)
    down, mid = controlnet(x, t, c, ctx)
    assert [r.shape for r in down] == skips and mid.shape == mid_shape
    with pytest.raises(ValueError, match="control must be"):
        controlnet(x, t, c[:, :, :8, :8], ctx)
    with pytest.raises(ValueError, match="down_block_additional_residuals has"):
        unet(x, t, context=ctx, down_block_additional_residuals=down[:-1])


def test_conditioning_scale_zero_is_the_base_and_scale_is_linear():
    unet = tiny_unet()
    controlnet = perturb(ControlNet.from_unet(unet, 3, (8,)), 5)
    net = ControlledUNet(unet, controlnet).eval()
    x, t, ctx, c = inputs()
    with torch.no_grad():
        base = unet(x, t, context=ctx)
        assert torch.equal(net(x, t, ctx, control=c, conditioning_scale=0.0), base)
        assert torch.equal(net(x, t, ctx, control=None), base)
        down, mid = controlnet(x, t, c, ctx)
        want = unet(x, t, context=ctx, down_block_additional_residuals=[0.3 * r for r in down], mid_block_additional_residual=0.3 * mid)
        got = net(x, t, ctx, control=c, conditioning_scale=0.3)
        assert (got - base).abs().max() > 1e-3
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        # a (B,) scale acts per sample: sample 0 controlled at 0.3, sample 1 not at all
        mixed = net(x, t, ctx, control=c, conditioning_scale=torch.tensor([0.3, 0.0], dtype=F64))
        torch.testing.assert_close(mixed[0], want[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(mixed[1], base[1], atol=1e-12, rtol=0)


def test_two_controlnets_add_their_weighted_residuals():
    """Composing ControlNets (Section 3.4): the residuals of each, times its weight, are summed."""
    unet = tiny_unet()
    cn1 = perturb(ControlNet.from_unet(unet, 3, (8,)), 5)
    cn2 = perturb(ControlNet.from_unet(unet, 1, (8,)), 6)
    net = ControlledUNet(unet, [cn1, cn2]).eval()
    x, t, ctx, c1 = inputs()
    c2 = torch.rand(1, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(9))  # batch 1 serves every sample
    with torch.no_grad():
        d1, m1 = cn1(x, t, c1, ctx)
        d2, m2 = cn2(x, t, c2.expand(2, -1, -1, -1), ctx)
        want = unet(x, t, context=ctx, down_block_additional_residuals=[0.7 * a + 0.4 * b for a, b in zip(d1, d2)],
                    mid_block_additional_residual=0.7 * m1 + 0.4 * m2)
        got = net(x, t, ctx, control=[c1, c2], conditioning_scale=[0.7, 0.4])
        only_first = net(x, t, ctx, control=[c1, None], conditioning_scale=[0.7, 0.4])
        single = ControlledUNet(unet, cn1)(x, t, ctx, control=c1, conditioning_scale=0.7)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert (got - only_first).abs().max() > 1e-3
    assert torch.equal(only_first, single)
    with pytest.raises(ValueError, match="2 ControlNets"):
        net(x, t, ctx, control=[c1])


def test_start_end_fractions_gate_by_sigma_on_the_grid():
    """control_guidance_start/end as fractions of the steps (diffusers' rule), applied as a sigma range."""
    unet = tiny_unet()
    controlnet = perturb(ControlNet.from_unet(unet, 3, (8,)), 5)
    frame = VPDiscrete.from_name("scaled_linear", 1000)
    d_base = Denoiser(unet, frame, "eps")
    d = Denoiser(ControlledUNet(unet, controlnet), frame, "eps")
    sigmas = grids.for_denoiser(d, 10)
    low, high = control_sigma_range(sigmas, 0.2, 0.7)
    assert (high, low) == (float(sigmas[2]), float(sigmas[6]))  # steps 2..6 of 0..9
    assert control_sigma_range(sigmas, 0.55, 0.58) is None
    gated = ControlledDenoiser(d, 0.8, start=0.2, end=0.7, sigmas=sigmas)
    x, _, ctx, c = inputs()
    active = []
    with torch.no_grad():
        for i, s in enumerate(sigmas[:-1].float()):  # the grid as a float32 sampler passes it
            out = gated(x, s, control=c, context=ctx)
            on = d(x, s, control=c, conditioning_scale=0.8, context=ctx)
            off = d_base(x, s, context=ctx)
            assert (on - off).abs().max() > 1e-4
            if torch.equal(out, off):
                active.append(False)
            else:
                torch.testing.assert_close(out, on, atol=1e-12, rtol=0)
                active.append(True)
    assert active == [i in range(2, 7) for i in range(10)]
    with pytest.raises(ValueError, match="sigmas="):
        ControlledDenoiser(d, start=0.2)


def test_two_controlnets_with_their_own_windows():
    unet = tiny_unet()
    cn1, cn2 = (perturb(ControlNet.from_unet(unet, 3, (8,)), s) for s in (5, 6))
    frame = VPDiscrete.from_name("scaled_linear", 1000)
    d = Denoiser(ControlledUNet(unet, [cn1, cn2]), frame, "eps")
    sigmas = grids.for_denoiser(d, 4)
    gated = ControlledDenoiser(d, [1.0, 0.5], start=[0.0, 0.5], end=[0.5, 1.0], sigmas=sigmas)
    x, _, ctx, c = inputs()
    with torch.no_grad():
        early = gated(x, sigmas[0], control=[c, c], context=ctx)
        late = gated(x, sigmas[3], control=[c, c], context=ctx)
        torch.testing.assert_close(early, d(x, sigmas[0], control=[c, None], conditioning_scale=[1.0, 0.5], context=ctx), atol=1e-12, rtol=0)
        torch.testing.assert_close(late, d(x, sigmas[3], control=[None, c], conditioning_scale=[1.0, 0.5], context=ctx), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------
# diffusers


def tiny_diffusers_pair(tmp_path):
    torch.manual_seed(0)
    ref_unet = perturb(UNet2DConditionModel(**DIFFUSERS_TINY), 1).eval()
    ref = ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(8, 16), conditioning_channels=3)
    perturb(ref, 2).eval()  # the zero convolutions too, so the residuals are not zero
    ref.save_pretrained(tmp_path / "controlnet")
    return ref_unet, ref


def test_diffusers_controlnet_loads_and_matches_residuals_and_output(tmp_path):
    ref_unet, ref = tiny_diffusers_pair(tmp_path)
    controlnet = load_diffusers_controlnet(tmp_path / "controlnet")
    unet = UNetSD(UNetSDConfig.from_diffusers_config(dict(ref_unet.config))).eval()
    unet.load_state_dict(ref_unet.state_dict())
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 637.0])
    ctx, c = torch.randn(2, 5, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        want_down, want_mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=c, conditioning_scale=0.7, return_dict=False)
        down, mid = controlnet(x, t, c, ctx, conditioning_scale=0.7)
        want = ref_unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=want_down,
                        mid_block_additional_residual=want_mid).sample
        got = ControlledUNet(unet, controlnet)(x, t, ctx, control=c, conditioning_scale=0.7)
        base = unet(x, t, context=ctx)
    assert len(down) == len(want_down) and min(r.abs().max() for r in want_down) > 1e-3
    for a, b in zip(down, want_down):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(mid, want_mid, atol=1e-5, rtol=0)
    assert (want - base).abs().max() > 1e-2  # the control matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_saved_controlnet_loads_in_diffusers(tmp_path):
    torch.manual_seed(0)
    controlnet = perturb(ControlNet(ControlNetConfig(TINY, 1, (8,), "bgr")), 4).eval()
    save_diffusers_controlnet(controlnet, tmp_path / "cn")
    ref = ControlNetModel.from_pretrained(tmp_path / "cn").eval()
    assert ref.config.controlnet_conditioning_channel_order == "bgr"
    x, t, ctx, _ = inputs()
    x, t, ctx = x.float(), t.float(), ctx.float()
    c = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want_down, want_mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=c, return_dict=False)
        down, mid = controlnet(x, t, c, ctx)
    for a, b in zip([*down, mid], [*want_down, want_mid]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    loaded = load_diffusers_controlnet(tmp_path / "cn").config  # ControlNet configs record no sample_size
    assert dataclasses.replace(loaded, unet=dataclasses.replace(loaded.unet, sample_size=TINY.sample_size)) == controlnet.config


def test_original_layout_table_agrees_with_diffusers_converter():
    """The authors' ``control_model.*`` names, from the table, against diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    config = ControlNetConfig(UNetSDConfig(block_out_channels=(8, 16, 16), layers_per_block=2, down_attention=(True, True, False),
                                           up_attention=(False, True, True), num_heads=(2, 2, 2), cross_attention_dim=8,
                                           norm_num_groups=4), 3, (4, 4, 8, 8))  # 4 widths: input_hint_block.14 is conv_out
    torch.manual_seed(0)
    ours = perturb(ControlNet(config), 1).state_dict()
    original = {keymap.ORIGINAL_PREFIX + k: v for k, v in from_difflab(ours, keymap.original_table(config)).items()}
    assert "control_model.input_hint_block.14.weight" in original and "control_model.zero_convs.6.0.bias" in original
    assert "control_model.input_blocks.1.0.in_layers.0.weight" in original
    converted = convert_controlnet_checkpoint(original, {"layers_per_block": 2})
    assert set(converted) == set(ours)
    assert all(converted[k] is ours[k] for k in ours)
    loaded = controlnet_from_original(original, config).state_dict()
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)


def test_config_from_dict_round_trips_and_names_unknown_keys():
    from difflab.config import ConfigError

    c = ControlNetConfig(conditioning_embedding_out_channels=(8, 16))
    assert ControlNetConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ConfigError, match="unknown key 'bogus' in ControlNetConfig"):
        ControlNetConfig.from_dict({**c.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="unknown key 'widht' in ControlNetConfig.unet"):
        ControlNetConfig.from_dict({**c.to_dict(), "unet": {"widht": 1}})
