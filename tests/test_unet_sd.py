"""The Stable Diffusion U-Net against diffusers' UNet2DConditionModel, output for output."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from difflab.core import Denoiser, VPDiscrete
from difflab.nn.unet_sd import PRESETS, UNetSD, UNetSDConfig

F64 = torch.float64

SD1_TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                norm_num_groups=8, sample_size=8)
SD2_TINY = dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                attention_head_dim=[2, 4, 4], use_linear_projection=True, transformer_layers_per_block=2,
                norm_num_groups=8, sample_size=8)


def tiny_diffusers_unet(seed=0, **config):
    """A random diffusers UNet2DConditionModel (weights perturbed off their init so zero-init layers matter)."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def difflab_copy(ref) -> UNetSD:
    net = UNetSD(UNetSDConfig.from_diffusers_config(dict(ref.config))).eval()
    net.load_state_dict(ref.state_dict())  # the same names: no key map
    return net


def inputs(config, batch=2, size=(8, 8), length=5, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g, dtype=dtype)
    t = torch.tensor([10.0, 637.25, 999.0][:batch], dtype=dtype)
    ctx = torch.randn(batch, length, config["cross_attention_dim"], generator=g, dtype=dtype)
    return x, t, ctx


@pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY], ids=["sd1-conv-proj", "sd2-linear-proj"])
def test_parity_with_diffusers(config):
    ref = tiny_diffusers_unet(**config)
    net = difflab_copy(ref)
    x, t, ctx = inputs(config)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = net(x, t, context=ctx)
    assert want.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # float64: the same arithmetic, so the same numbers
    ref, net = ref.double(), net.double()
    x, t, ctx = inputs(config, dtype=F64)
    with torch.no_grad():
        err = (net(x, t, context=ctx) - ref(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    assert err < 1e-12


def test_context_mask_and_odd_sizes_match_diffusers():
    ref = tiny_diffusers_unet(**SD2_TINY).double()
    net = difflab_copy(ref).double()
    x, t, ctx = inputs(SD2_TINY, size=(7, 9), dtype=F64)  # not a multiple of 4: upsampling follows the skips
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask.long()).sample
        got = net(x, t, context=ctx, context_mask=mask)
        unmasked = net(x, t, context=ctx)
    assert got.shape == (2, 4, 7, 9)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert (got[0] - unmasked[0]).abs().max() > 1e-4  # the mask changes sample 0 ...
    torch.testing.assert_close(got[1], unmasked[1], atol=1e-12, rtol=0)  # ... and not the all-True sample 1


def test_fully_masked_context_is_no_context():
    """difflab's convention (as its ADM UNet): a sample with no token to attend to gets no cross-attention."""
    net = difflab_copy(tiny_diffusers_unet(**SD1_TINY)).double()
    x, t, ctx = inputs(SD1_TINY, dtype=F64)
    mask = torch.tensor([[False] * 5, [True] * 5])
    with torch.no_grad():
        got = net(x, t, context=ctx, context_mask=mask)
        none = net(x[:1], t[:1])
        with_ctx = net(x[:1], t[:1], context=ctx[:1])
    torch.testing.assert_close(got[0], none[0], atol=1e-12, rtol=0)
    assert (none - with_ctx).abs().max() > 1e-3


def test_denoiser_wrap_matches_diffusers_eps_at_a_training_step():
    """Denoiser(UNetSD, VPDiscrete scaled-linear, eps): D(x, sigma_t) = x - sigma_t eps(x / sqrt(1 + sigma_t^2), t)."""
    ref = tiny_diffusers_unet(**SD1_TINY).double()
    frame = VPDiscrete.from_name("scaled_linear", 1000)
    denoiser = Denoiser(difflab_copy(ref).double(), frame, prediction="eps")
    x, _, ctx = inputs(SD1_TINY, dtype=F64)
    steps = torch.tensor([100, 750])
    sigma = frame.sigmas[steps]
    with torch.no_grad():
        eps = ref(x / (1 + sigma**2).sqrt()[:, None, None, None], steps.to(F64), encoder_hidden_states=ctx).sample
        got = denoiser(x, sigma, context=ctx)
    torch.testing.assert_close(got, x - sigma[:, None, None, None] * eps, atol=1e-9, rtol=0)


def test_config_round_trips_and_builds_the_same_diffusers_model():
    for config in (SD1_TINY, SD2_TINY):
        ref = UNet2DConditionModel(**config)
        c = UNetSDConfig.from_diffusers_config(dict(ref.config))
        assert UNetSDConfig.from_dict(c.to_dict()) == c
        assert UNetSDConfig.from_diffusers_config(c.to_diffusers_config()) == c
        exported = {k: v for k, v in c.to_diffusers_config().items() if not k.startswith("_")}
        again = UNet2DConditionModel(**exported)
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in UNetSD(c).state_dict().items()}


@pytest.mark.parametrize("name, params", [("sd1", 859_520_964), ("sd2", 865_910_724)])
def test_presets_have_the_published_sizes(name, params):
    """SD 1.5's U-Net has 859,520,964 parameters and SD 2.1's 865,910,724; built on the meta device (no memory)."""
    with torch.device("meta"):
        net = UNetSD(PRESETS[name])
        ref = UNet2DConditionModel(**{k: v for k, v in PRESETS[name].to_diffusers_config().items() if not k.startswith("_")})
    assert sum(p.numel() for p in net.parameters()) == params
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_gradient_checkpointing_gives_the_same_values_and_gradients():
    ref = tiny_diffusers_unet(**SD1_TINY)
    plain = difflab_copy(ref).train()
    ckpt = UNetSD(UNetSDConfig.from_dict({**plain.config.to_dict(), "gradient_checkpointing": True})).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = inputs(SD1_TINY)
    outs = []
    for net in (plain, ckpt):
        out = net(x, t, context=ctx)
        out.square().mean().backward()
        outs.append((out.detach(), net.conv_in.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_unsupported_diffusers_configs_are_named():
    base = dict(UNet2DConditionModel(**SD1_TINY).config)
    for key, value in [("addition_embed_type", "text_time"), ("class_embed_type", "timestep"), ("freq_shift", 1),
                       ("resnet_time_scale_shift", "scale_shift")]:
        with pytest.raises(ValueError, match=key):
            UNetSDConfig.from_diffusers_config({**base, key: value})
    with pytest.raises(ValueError, match="layers_per_block"):
        UNetSDConfig.from_diffusers_config({**base, "layers_per_block": [1, 2]})
    with pytest.raises(ValueError, match="block_types"):
        UNetSDConfig.from_diffusers_config({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})


def test_bad_inputs_raise_clear_errors():
    net = UNetSD(PRESETS["tiny"])
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        net(torch.randn(2, 3, 8, 8), 1.0, context=ctx)
    with pytest.raises(ValueError, match="t must be"):
        net(x, torch.ones(3), context=ctx)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, 1.0, context=ctx, class_labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="context must be"):
        net(x, 1.0, context=torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="context_mask must be"):
        net(x, 1.0, context=ctx, context_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="without context"):
        net(x, 1.0, context_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_heads"):
        UNetSDConfig(block_out_channels=(32, 64), down_attention=(True, True), up_attention=(True, True), num_heads=(3, 4))
    assert net(x, 1.0, context=ctx).shape == x.shape
