"""SAG and PAG: identity attention is V, recorded maps are the real ones, the patches leave no
trace, the paper's eps-space SAG, scale 0, composition with CFG, the ADM and SD U-Nets."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.core import Denoiser, VPDiscrete
from difflab.guidance import (ClassifierFreeGuidance, PerturbedAttentionGuidance, SelfAttentionGuidance, gaussian_blur,
                              identity_attention, record_attention, sag_mask, self_attention_modules)
from difflab.nn.layers import SelfAttention, merge_heads, split_heads
from difflab.nn.transformer import Attention
from difflab.nn.unet import UNet, UNetConfig
from difflab.nn.unet_sd import UNetSD, UNetSDConfig

F64 = torch.float64


def randomize(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Random weights everywhere (the zero-initialized projections would hide attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module.double().eval()


def tiny_unet(num_classes=None):
    config = UNetConfig(in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        num_heads=2, groups=4, num_classes=num_classes)
    return randomize(UNet(config))


def tiny_unet_sd():
    config = UNetSDConfig(in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                          down_attention=(True, True), up_attention=(True, True), num_heads=(2, 2),
                          cross_attention_dim=6, norm_num_groups=4)
    return randomize(UNetSD(config), seed=1)


def denoiser(net):
    return Denoiser(net, VPDiscrete.from_name("cosine", 1000), "eps")


def inputs(B=3, size=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, size, size, generator=g, dtype=F64) * 1.5, torch.tensor([0.4, 1.3, 6.0], dtype=F64)[:B]


def identity_sdpa(q, k, v, **kwargs):
    """scaled_dot_product_attention with the identity attention map: each query gets its own V."""
    return v


# ----------------------------------------------------------------------------------------------
# The perturbation and the recording, on single modules


def test_identity_attention_gives_v_on_the_adm_self_attention(monkeypatch):
    m = randomize(SelfAttention(8, num_heads=2, groups=4))
    net = nn.ModuleDict({"attn": m})
    x = torch.randn(2, 8, 4, 4, dtype=F64)
    normal = m(x)
    with identity_attention(net, "attn") as names:
        perturbed = m(x)
    assert names == ["attn"]
    # the module's own code with the attention map forced to the identity
    monkeypatch.setattr(F, "scaled_dot_product_attention", identity_sdpa)
    torch.testing.assert_close(perturbed, m(x), rtol=0, atol=1e-12)
    # and written out: x + proj(V)
    v = m.qkv(m.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)[2]
    torch.testing.assert_close(perturbed, x + m.proj(v).transpose(1, 2).reshape(x.shape), rtol=0, atol=1e-12)
    assert (perturbed - normal).abs().max() > 1e-3


def test_identity_attention_gives_v_on_the_sd_self_attention_and_leaves_cross_attention(monkeypatch):
    block = randomize(nn.ModuleDict({"attn1": Attention(8, None, 2, 4), "attn2": Attention(8, 6, 2, 4)}))
    x, ctx = torch.randn(2, 5, 8, dtype=F64), torch.randn(2, 3, 6, dtype=F64)
    normal_self, normal_cross = block["attn1"](x), block["attn2"](x, ctx)
    assert list(self_attention_modules(block)) == ["attn1"]
    with identity_attention(block, "*"):
        perturbed = block["attn1"](x)
        assert torch.equal(block["attn2"](x, ctx), normal_cross)
    torch.testing.assert_close(perturbed, block["attn1"].to_out[0](block["attn1"].to_v(x)), rtol=0, atol=1e-12)
    monkeypatch.setattr(F, "scaled_dot_product_attention", identity_sdpa)
    torch.testing.assert_close(perturbed, block["attn1"](x), rtol=0, atol=1e-12)
    assert (perturbed - normal_self).abs().max() > 1e-3


def test_recorded_maps_are_the_attention_the_modules_apply():
    """Output = x + proj(merge(A V)) for the ADM layer and to_out(merge(A V)) for the SD one."""
    m = randomize(SelfAttention(8, num_heads=2, groups=4))
    x = torch.randn(2, 8, 4, 4, dtype=F64)
    with record_attention(nn.ModuleDict({"a": m}), "a") as maps:
        out = m(x)
    (A,) = maps["a"]
    assert A.shape == (2, 2, 16, 16)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 2, 16, dtype=F64))
    v = split_heads(m.qkv(m.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)[2], 2)
    torch.testing.assert_close(out, x + m.proj(merge_heads(A @ v)).transpose(1, 2).reshape(x.shape), rtol=0, atol=1e-12)

    attn = randomize(Attention(8, None, 2, 4))
    t = torch.randn(2, 5, 8, dtype=F64)
    with record_attention(nn.ModuleDict({"attn1": attn}), "attn1") as maps:
        out = attn(t)
    (A,) = maps["attn1"]
    torch.testing.assert_close(out, attn.to_out[0](merge_heads(A @ split_heads(attn.to_v(t), 2))), rtol=0, atol=1e-12)


def test_sag_mask_keeps_the_positions_that_receive_more_than_average_attention():
    # 2 heads over a 2x2 map: head 0 sends every query to key 0, head 1 attends uniformly.
    A = torch.zeros(1, 2, 4, 4, dtype=F64)
    A[0, 0, :, 0] = 1.0
    A[0, 1] = 0.25
    mask = sag_mask(A, (4, 4))
    expected = torch.zeros(1, 1, 4, 4, dtype=F64)
    expected[..., :2, :2] = 1.0  # key 0 receives (4 + 1) / 2 = 2.5 > 1; the others 0.5
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="tile"):
        sag_mask(torch.zeros(1, 2, 5, 5, dtype=F64), (4, 4))


def test_gaussian_blur_is_a_normalized_separable_gaussian():
    x = torch.zeros(1, 1, 17, 17, dtype=F64)
    x[..., 8, 8] = 1.0
    out = gaussian_blur(x, 1.0, 9)
    t = torch.arange(-4, 5, dtype=F64)
    k = torch.exp(-0.5 * t**2)
    k = k / k.sum()
    torch.testing.assert_close(out[0, 0, 4:13, 4:13], torch.outer(k, k), rtol=0, atol=1e-12)
    assert out[0, 0, :4].abs().max() == 0 and abs(out.sum() - 1) < 1e-12
    const = torch.full((2, 3, 4, 4), 0.7, dtype=F64)  # the kernel is cut to fit a 4x4 image
    torch.testing.assert_close(gaussian_blur(const, 1.0, 9), const, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# The wrappers on whole U-Nets


@pytest.mark.parametrize("make", [tiny_unet, tiny_unet_sd])
def test_sag_and_pag_change_the_output_and_leave_no_trace(make):
    net = make()
    D = denoiser(net)
    x, sigma = inputs()
    before = D(x, sigma)
    for guided in (PerturbedAttentionGuidance(D, 1.0), PerturbedAttentionGuidance(D, 1.0, layers="*"),
                   SelfAttentionGuidance(D, 1.0), SelfAttentionGuidance(D, 1.0, space="x0")):
        out = guided(x, sigma)
        change = (out - before).abs().mean() / before.abs().mean()
        assert change > 1e-3, f"{type(guided).__name__} changed the output by only {change:.2e}"
    after = D(x, sigma)
    assert torch.equal(before, after)
    for m in self_attention_modules(net).values():
        assert "forward" not in m.__dict__
        for sub in m.modules():
            assert not sub._forward_hooks and not sub._forward_pre_hooks


def test_patches_are_removed_after_an_exception():
    net = tiny_unet()
    D = denoiser(net)
    x, sigma = inputs()
    before = D(x, sigma)
    with pytest.raises(RuntimeError, match="boom"):
        with identity_attention(net, "*"), record_attention(net, "*"):
            raise RuntimeError("boom")
    assert torch.equal(D(x, sigma), before)
    assert all("forward" not in m.__dict__ and not m.qkv._forward_hooks for m in self_attention_modules(net).values())


def test_scale_zero_is_the_base_denoiser():
    D = denoiser(tiny_unet())
    x, sigma = inputs()
    base = D(x, sigma)
    assert torch.equal(PerturbedAttentionGuidance(D, 0.0)(x, sigma), base)
    assert torch.equal(SelfAttentionGuidance(D, 0.0)(x, sigma), base)


def test_pag_is_the_guidance_formula_with_only_the_chosen_layers_perturbed():
    net = tiny_unet()
    D = denoiser(net)
    x, sigma = inputs()
    names = list(self_attention_modules(net))
    assert "middle.1" in names and len(names) > 2
    with identity_attention(net) as chosen:
        d_perturbed = D(x, sigma)
    assert chosen == ["middle.1"]
    d = D(x, sigma)
    torch.testing.assert_close(PerturbedAttentionGuidance(D, 2.5)(x, sigma), d + 2.5 * (d - d_perturbed), rtol=0, atol=1e-12)
    with identity_attention(net, ["down.*", "re:up\\.[0-9]+\\.1"]) as chosen:
        assert chosen and all(n.startswith(("down.", "up.")) for n in chosen)
    with pytest.raises(ValueError, match="matches no self-attention"):
        PerturbedAttentionGuidance(D, 1.0, layers="nothing.here")


def test_sag_in_eps_space_is_the_papers_algorithm_run_in_the_vp_frame():
    """Hong et al. 2023, Algorithm 1 with the network's own eps in the VP frame: x_t = sqrt(ab) x0 +
    sqrt(1 - ab) eps; eps_tilde = eps(x_bar) + (1 + s)(eps(x_t) - eps(x_bar)); x0 decoded at x_t."""
    net = tiny_unet()
    D = denoiser(net)
    x, sigma = inputs()
    s = 0.8
    frame = D.frame
    sqrt_ab = (1 / (1 + sigma**2).sqrt())[:, None, None, None]
    sqrt_1mab = sigma[:, None, None, None] * sqrt_ab
    x_t, t = sqrt_ab * x, frame.time(sigma)
    with record_attention(net) as maps:
        eps = net(x_t, t)
    x0 = (x_t - sqrt_1mab * eps) / sqrt_ab
    mask = sag_mask(maps["middle.1"][0], x.shape[-2:])
    x0_bar = mask * gaussian_blur(x0, 1.0, 9) + (1 - mask) * x0
    x_bar = sqrt_ab * x0_bar + sqrt_1mab * eps
    eps_bar = net(x_bar, t)
    eps_tilde = eps_bar + (1 + s) * (eps - eps_bar)
    expected = (x_t - sqrt_1mab * eps_tilde) / sqrt_ab
    torch.testing.assert_close(SelfAttentionGuidance(D, s)(x, sigma), expected, rtol=1e-10, atol=1e-10)
    # the x0-space form guides x0 directly: D + s (D - D(x_bar))
    x0_bar_hat = D(x_bar / sqrt_ab, sigma)
    torch.testing.assert_close(SelfAttentionGuidance(D, s, space="x0")(x, sigma), x0 + s * (x0 - x0_bar_hat),
                               rtol=1e-10, atol=1e-10)
    assert 0 < mask.sum() < mask.numel()  # the mask selects some positions, not all


def test_composition_with_classifier_free_guidance():
    net = tiny_unet(num_classes=3)
    D = denoiser(net)
    x, sigma = inputs()
    y, null = torch.tensor([0, 2, 1]), torch.full((3,), 3)
    w = 3.0
    for inner in (lambda d: PerturbedAttentionGuidance(d, 1.5), lambda d: SelfAttentionGuidance(d, 1.5)):
        branch = inner(D)
        d_c, d_u = branch(x, sigma, class_labels=y), branch(x, sigma, class_labels=null)
        out = ClassifierFreeGuidance(branch, w, {"class_labels": 3})(x, sigma, class_labels=y)
        torch.testing.assert_close(out, d_u + w * (d_c - d_u), rtol=1e-10, atol=1e-10)
    # PAG outside CFG perturbs both branches of the batched call
    cfg = ClassifierFreeGuidance(D, w, {"class_labels": 3})
    d = cfg(x, sigma, class_labels=y)
    with identity_attention(net):
        d_p = cfg(x, sigma, class_labels=y)
    torch.testing.assert_close(PerturbedAttentionGuidance(cfg, 1.5)(x, sigma, class_labels=y), d + 1.5 * (d - d_p),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="inside"):
        SelfAttentionGuidance(cfg, 1.0)(x, sigma, class_labels=y)


def test_sd_unet_with_context_perturbs_only_self_attention():
    net = tiny_unet_sd()
    D = denoiser(net)
    x, sigma = inputs()
    ctx = torch.randn(3, 4, 6, dtype=F64)
    names = list(self_attention_modules(net))
    assert names and all(n.endswith("attn1") for n in names)
    with identity_attention(net) as chosen:
        assert chosen == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    before = D(x, sigma, context=ctx)
    out = SelfAttentionGuidance(PerturbedAttentionGuidance(D, 1.0), 0.5)(x, sigma, context=ctx)
    assert (out - before).abs().mean() > 1e-3 * before.abs().mean()
    assert torch.equal(D(x, sigma, context=ctx), before)
    with pytest.raises(ValueError, match="one attention map"):
        SelfAttentionGuidance(D, 1.0, layer="*")
