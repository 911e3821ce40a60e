"""IP-Adapter (Ye et al. 2023): decoupled cross-attention by surgery, scale 0 is the base model,
eq. 5 by hand, removal, the authors' file layout and parity with diffusers' IP-Adapter."""
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from difflab.adapters.ip_adapter import (DecoupledCrossAttention, ImageProjection, IPAdapterUNet, install_ip_adapter,
                                         ip_adapter_layers, ip_adapter_parameters, ip_adapter_state_dict,
                                         load_ip_adapter_state_dict, mark_only_ip_adapter_trainable, remove_ip_adapter,
                                         set_ip_adapter_scale)
from difflab.nn.transformer import Attention
from difflab.nn.unet_sd import UNetSD, UNetSDConfig

F64 = torch.float64
TINY = UNetSDConfig(block_out_channels=(16, 32), layers_per_block=1, down_attention=(True, False), up_attention=(False, True),
                    num_heads=(4, 4), cross_attention_dim=16, norm_num_groups=8, sample_size=8)
DIFFUSERS_TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                      norm_num_groups=8, sample_size=8)


def perturb(params, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tiny_unet(seed=0) -> UNetSD:
    torch.manual_seed(seed)
    unet = UNetSD(TINY)
    perturb(unet.parameters(), seed + 100, 0.05)
    return unet.double().eval()


def adapted(seed=0, embed_dim=10, tokens=4):
    """A tiny U-Net, and the same U-Net with an IP-Adapter whose new weights are off their init."""
    base = tiny_unet(seed)
    unet = tiny_unet(seed)
    torch.manual_seed(seed + 1)
    net = IPAdapterUNet(unet, ImageProjection(embed_dim, TINY.cross_attention_dim, tokens).double()).eval()
    perturb(ip_adapter_parameters(net), seed + 2)
    return base, net


def inputs(batch=2, embed_dim=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([10.0, 637.25, 999.0][:batch], dtype=F64)
    ctx = torch.randn(batch, 5, 16, generator=g, dtype=F64)
    return x, t, ctx, torch.randn(batch, embed_dim, generator=g, dtype=F64)


def test_scale_zero_is_the_base_model_bit_for_bit():
    base, net = adapted()
    x, t, ctx, e = inputs()
    mask = torch.tensor([[True, False, True, True, False], [True] * 5])
    set_ip_adapter_scale(net.unet, 0.0)
    with torch.no_grad():
        assert torch.equal(net(x, t, context=ctx, image_embeds=e), base(x, t, context=ctx))
        assert torch.equal(net(x, t, context=ctx, context_mask=mask, image_embeds=e), base(x, t, context=ctx, context_mask=mask))
        set_ip_adapter_scale(net.unet, 1.0)  # no image: zero image tokens, whose attention output is exactly 0
        assert torch.equal(net(x, t, context=ctx), base(x, t, context=ctx))


def test_nonzero_scale_changes_the_output_and_scale_is_adjustable_per_layer():
    base, net = adapted()
    x, t, ctx, e = inputs()
    with torch.no_grad():
        want = base(x, t, context=ctx)
        full = net(x, t, context=ctx, image_embeds=e)
        set_ip_adapter_scale(net.unet, 0.5)
        half = net(x, t, context=ctx, image_embeds=e)
        set_ip_adapter_scale(net.unet, {"down_blocks.*": 1.0, "up_blocks.*": 0.0, "mid_block.*": 0.0})
        down_only = net(x, t, context=ctx, image_embeds=e)
        other = net(x, t, context=ctx, image_embeds=inputs(seed=5)[3])
    assert (full - want).abs().max() > 1e-2 and (half - want).abs().max() > 1e-3
    assert (full - half).abs().max() > 1e-3 and (down_only - full).abs().max() > 1e-3
    assert (other - down_only).abs().max() > 1e-3  # the reference matters
    assert [m.scale for m in ip_adapter_layers(net.unet).values()] == [1.0, 0.0, 0.0, 0.0]


def test_decoupled_attention_is_text_attention_plus_scale_times_image_attention():
    """Ye et al. 2023, eq. 5, by hand: to_out(softmax(Q K^T / sqrt d) V + lambda softmax(Q K'^T / sqrt d) V')."""
    torch.manual_seed(0)
    base = Attention(12, 6, heads=3, dim_head=4).double()
    layer = DecoupledCrossAttention(base, num_tokens=2, scale=0.7)
    assert torch.equal(layer.to_k_ip.weight, base.to_k.weight) and torch.equal(layer.to_v_ip.weight, base.to_v.weight)  # Section 3.2.2
    assert layer.to_k_ip.weight.data_ptr() != base.to_k.weight.data_ptr()  # copies, trained on their own
    perturb(layer.parameters(), 1)
    g = torch.Generator().manual_seed(2)
    x, text, image = (torch.randn(2, n, d, generator=g, dtype=F64) for n, d in ((9, 12), (5, 6), (2, 6)))

    def attention(q, k, v):  # per head, eq. 1 of Vaswani et al.
        h = layer.heads
        q, k, v = (z.reshape(*z.shape[:2], h, -1).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (w @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)

    q = x @ layer.to_q.weight.T
    z_text = attention(q, text @ layer.to_k.weight.T, text @ layer.to_v.weight.T)
    z_image = attention(q, image @ layer.to_k_ip.weight.T, image @ layer.to_v_ip.weight.T)
    want = (z_text + 0.7 * z_image) @ layer.to_out[0].weight.T + layer.to_out[0].bias
    with torch.no_grad():
        got = layer(x, torch.cat([text, image], dim=1))
        assert (0.7 * z_image @ layer.to_out[0].weight.T).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="image tokens"):
        layer(x, text[:, :1])


def test_surgery_is_removable_and_keeps_the_base_keys():
    base, net = adapted()
    x, t, ctx, e = inputs()
    base_keys = set(base.state_dict())
    assert base_keys < set(net.unet.state_dict())  # the base keys unchanged, to_k_ip / to_v_ip added
    with torch.no_grad():
        assert (net(x, t, context=ctx, image_embeds=e) - base(x, t, context=ctx)).abs().max() > 1e-2
        names = remove_ip_adapter(net.unet)
        assert names == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                         "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                         "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
                         "mid_block.attentions.0.transformer_blocks.0.attn2"]  # diffusers' order
        assert not ip_adapter_layers(net.unet)
        assert all(type(net.unet.get_submodule(n)) is Attention for n in names)
        assert set(net.unet.state_dict()) == base_keys
        assert torch.equal(net.unet(x, t, context=ctx), base(x, t, context=ctx))
    assert install_ip_adapter(net.unet, 4, layers="down_blocks.*") == names[:1]
    with pytest.raises(ValueError, match="already installed"):
        install_ip_adapter(net.unet, 4)


def test_a_unet_without_text_takes_the_image_tokens_alone():
    """context=None: no text attention (as the base skips cross-attention); the image tokens still steer."""
    base, net = adapted()
    x, t, _, e = inputs()
    with torch.no_grad():
        set_ip_adapter_scale(net.unet, 0.0)
        assert torch.equal(net(x, t, image_embeds=e), base(x, t))
        set_ip_adapter_scale(net.unet, 1.0)
        assert (net(x, t, image_embeds=e) - base(x, t)).abs().max() > 1e-2


def test_image_encoder_interface_and_trainable_parameters():
    unet = tiny_unet()
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    net = IPAdapterUNet(unet, ImageProjection(10, 16, 4).double(), encoder).eval()
    x, t, ctx, _ = inputs()
    image = torch.randn(2, 1, 8, 8, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, context=ctx, image=image), net(x, t, context=ctx, image_embeds=encoder(image)),
                                   atol=0, rtol=0)
    n = mark_only_ip_adapter_trainable(net)
    # projection, LayerNorm, W'_k and W'_v of 3 layers of width 16 and the middle one's of width 32 (context width 16)
    assert n == (10 * 64 + 64) + 2 * 16 + 3 * 2 * 16 * 16 + 2 * 32 * 16
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in ip_adapter_parameters(net)}


def test_authors_layout_round_trips_and_matches_diffusers_ip_adapter():
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**DIFFUSERS_TINY).eval()
    perturb(ref.parameters(), 1, 0.05)
    unet = UNetSD(UNetSDConfig.from_diffusers_config(dict(ref.config))).eval()
    unet.load_state_dict(ref.state_dict())
    net = IPAdapterUNet(unet, ImageProjection(10, 16, 4))
    perturb(ip_adapter_parameters(net), 2)
    state = ip_adapter_state_dict(net)
    assert sorted(k for k in state if k.startswith("ip_adapter.")) == [f"ip_adapter.{i}.to_{kv}_ip.weight" for i in (1, 3, 5, 7) for kv in "kv"]
    # diffusers reads the authors' nested dict
    nested = {g: {k[len(g) + 1:]: v.clone() for k, v in state.items() if k.startswith(g + ".")} for g in ("image_proj", "ip_adapter")}
    ref._load_ip_adapter_weights([nested])
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.6]
    set_ip_adapter_scale(unet, 0.6)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 600.0])
    ctx, e = torch.randn(2, 5, 16, generator=g), torch.randn(2, 10, generator=g)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [e[:, None]]}).sample
        got = net(x, t, context=ctx, image_embeds=e)
        plain = net(x, t, context=ctx)
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and back into a fresh adapter
    torch.manual_seed(9)
    other = IPAdapterUNet(UNetSD(TINY).eval(), ImageProjection(10, 16, 4))
    other.unet.load_state_dict(unet.state_dict())
    load_ip_adapter_state_dict(other, nested)
    set_ip_adapter_scale(other.unet, 0.6)
    with torch.no_grad():
        assert torch.equal(other(x, t, context=ctx, image_embeds=e), got)
    with pytest.raises(ValueError, match="missing"):
        load_ip_adapter_state_dict(other, {k: v for k, v in state.items() if "ip_adapter.7" not in k})
