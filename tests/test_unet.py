"""The ADM / DDPM U-Net: shapes, zero init, conditioning, masking, checkpointing, validation."""
import dataclasses
import json
import math

import pytest
import torch

from difflab.nn import PRESETS, ResBlock, UNet, UNetConfig, timestep_embedding

TINY = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2)


def perturbed(config: UNetConfig, seed: int = 0) -> UNet:
    """A net whose zero-initialized layers are made nonzero, so every input can reach the output."""
    torch.manual_seed(seed)
    net = UNet(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return net


def inputs(b=3, c=1, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, hw, hw, generator=g), torch.rand(b, generator=g) * 999


@pytest.mark.parametrize("config", [TINY, dataclasses.replace(TINY, channel_mult=(1, 2, 2), out_channels=2, attention_levels=(0, 2)), PRESETS["digits"]])
def test_output_shape_and_zero_at_init(config):
    x, t = inputs()
    out = UNet(config)(x, t)
    assert out.shape == (3, config.out_channels or config.in_channels, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialized output conv


def test_trainable_from_zero_init():
    torch.manual_seed(0)
    net = UNet(TINY)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, t = inputs()
    target = torch.randn_like(x)
    for step in range(3):
        opt.zero_grad()
        ((net(x, t) - target) ** 2).mean().backward()
        if step == 0:  # only the output conv sees a nonzero upstream gradient at first
            assert net.out[-1].weight.grad.abs().sum() > 0
        opt.step()
    # zero-initialized convs open up one step at a time: after a few steps every part gets a gradient
    assert net.input_conv.weight.grad.abs().sum() > 0
    assert net.time_embed.net[0].weight.grad.abs().sum() > 0
    assert net(x, t).abs().sum() > 0


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 0.5, 3.7, 999.25])
    for dim in (6, 7):
        emb = timestep_embedding(t, dim, max_period=10000)
        half = dim // 2
        for b, tb in enumerate(t.tolist()):
            for i in range(half):
                w = 10000 ** (-i / half)
                assert emb[b, i].item() == pytest.approx(math.cos(tb * w), abs=2e-4)
                assert emb[b, half + i].item() == pytest.approx(math.sin(tb * w), abs=2e-4)
        assert emb.shape == (4, dim)
    assert torch.equal(emb[:, -1], torch.zeros(4))  # odd dim: zero padding


def test_class_conditioning_and_null_class():
    config = dataclasses.replace(TINY, num_classes=10)
    net = perturbed(config).eval()
    assert net.null_class == config.null_class == 10
    x, t = inputs(b=1)
    out = {y: net(x, t, torch.tensor([y])) for y in (3, 5, 10)}
    assert not torch.allclose(out[3], out[5], atol=1e-4)
    assert not torch.allclose(out[3], out[10], atol=1e-4)
    assert torch.equal(net(x, t), out[10])  # missing labels = the null class


def test_cross_attention_context_and_mask():
    net = perturbed(dataclasses.replace(TINY, context_dim=5)).eval()
    x, t = inputs(b=2)
    g = torch.Generator().manual_seed(3)
    context = torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    base = net(x, t, context=context, context_mask=mask)

    changed = context.clone()
    changed[:, 0] += 1.0  # a real token
    assert not torch.allclose(net(x, t, context=changed, context_mask=mask), base, atol=1e-4)

    hidden = context.clone()
    hidden[:, 2] = 100 * torch.randn(2, 5, generator=g)  # masked in both samples
    assert torch.allclose(net(x, t, context=hidden, context_mask=mask), base, atol=1e-6)

    # no real token at all is the same as no context
    none_kept = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.allclose(net(x, t, context=context, context_mask=none_kept), net(x, t), atol=1e-6)


def test_gradient_checkpointing_same_output_and_gradients():
    config = dataclasses.replace(TINY, num_classes=3, context_dim=5, dropout=0.1)
    net = perturbed(config)
    net_ckpt = UNet(dataclasses.replace(config, gradient_checkpointing=True))
    net_ckpt.load_state_dict(net.state_dict())
    assert all(m.checkpoint for m in net_ckpt.modules() if isinstance(m, ResBlock))
    x, t = inputs(b=2)
    cond = dict(class_labels=torch.tensor([0, 3]), context=torch.randn(2, 4, 5), context_mask=torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]]).bool())
    results = []
    for model in (net, net_ckpt):
        torch.manual_seed(7)  # same dropout masks; checkpointing must replay them in backward
        out = model(x, t, **cond)
        (out**2).sum().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.abs().sum() > 0
    assert torch.allclose(out_a, out_b, atol=1e-6, rtol=0)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda: (torch.zeros(2, 3, 8, 8), torch.zeros(2)), r"^x must be \(B, 1, H, W\)"),
        (lambda: (torch.zeros(2, 1, 8, 7), torch.zeros(2)), r"^x's height and width must be divisible by 2"),
        (lambda: (torch.zeros(2, 1, 8, 8), torch.zeros(3)), r"^t must be"),
        (lambda: (torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 11])), r"^class_labels must be in \[0, 10\]"),
        (lambda: (torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.tensor([-1, 0])), r"^class_labels must be in \[0, 10\]"),
        (lambda: (torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.tensor([0.0, 1.0])), r"^class_labels must be an integer"),
        (lambda: (torch.zeros(2, 1, 8, 8), torch.zeros(2), None, torch.zeros(2, 4, 5)), r"^context given"),
    ],
)
def test_bad_inputs_raise(make_args, match):
    net = UNet(dataclasses.replace(TINY, num_classes=10))
    with pytest.raises(ValueError, match=match):
        net(*make_args())


def test_bad_inputs_raise_unconditional_and_context():
    with pytest.raises(ValueError, match=r"^class_labels given, but this UNet is unconditional"):
        UNet(TINY)(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.tensor([0]))
    net = UNet(dataclasses.replace(TINY, context_dim=5))
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2)
    with pytest.raises(ValueError, match=r"^context must be"):
        net(x, t, context=torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match=r"^context_mask must be a bool"):
        net(x, t, context=torch.zeros(2, 4, 5), context_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attention_levels \[2\]"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))


def test_config_round_trip():
    for config in [*PRESETS.values(), dataclasses.replace(TINY, num_classes=3, context_dim=7, out_channels=2)]:
        d = json.loads(json.dumps(config.to_dict()))
        assert UNetConfig.from_dict(d) == config
        assert isinstance(UNetConfig.from_dict(d).channel_mult, tuple)
    with pytest.raises(ValueError, match="unknown key .* in UNetConfig; did you mean"):
        UNetConfig.from_dict({"model_chanels": 3})


def test_batch_independence():
    """GroupNorm normalizes per sample: sample i's output ignores the rest of the batch (eval mode)."""
    net = perturbed(dataclasses.replace(TINY, num_classes=3, context_dim=5)).eval()
    x, t = inputs(b=3)
    labels, context = torch.tensor([0, 2, 3]), torch.randn(3, 4, 5)
    batch = net(x, t, labels, context)
    other = x.clone()
    other[1:] = 10 * torch.randn(2, 1, 8, 8)
    assert torch.allclose(net(other, t, labels, context)[0], batch[0], atol=1e-5)
    for i in range(3):
        alone = net(x[i : i + 1], t[i : i + 1], labels[i : i + 1], context[i : i + 1])
        assert torch.allclose(alone[0], batch[i], atol=1e-5)


def test_cifar10_preset_parameter_count():
    """38,307,203 parameters; DDPM's 35.7M (Ho et al. 2020) plus the shift half of the scale/shift projections.

    Without those halves (DDPM adds the time embedding instead of scaling and shifting) the count is
    35,746,307, exactly that of diffusers' UNet2DModel for google/ddpm-cifar10-32.
    """
    with torch.device("meta"):
        net = UNet(PRESETS["cifar10"])
    n = sum(p.numel() for p in net.parameters())
    assert n == 38_307_203
    shift_halves = sum(p.numel() // 2 for m in net.modules() if isinstance(m, ResBlock) for p in m.emb_layers.parameters())
    assert n - shift_halves == 35_746_307
