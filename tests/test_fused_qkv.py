"""Fused q/k/v projections of the SD transformer's attention: the same function, the same
gradients, the same state dict; adapters and attention guidance see through them."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.adapters import inject_lora
from difflab.adapters.ip_adapter import install_ip_adapter
from difflab.core import Denoiser, VPDiscrete
from difflab.guidance import PerturbedAttentionGuidance, SelfAttentionGuidance
from difflab.perf.fast import fuse_projections, optimize
from difflab.nn.transformer import Attention
from difflab.nn.unet_sd import UNetSD, UNetSDConfig

F64 = torch.float64
CONFIG = UNetSDConfig(in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                      down_attention=(True, True), up_attention=(True, True), num_heads=(2, 2),
                      cross_attention_dim=6, norm_num_groups=4)


def tiny_unet_sd(seed=1):
    torch.manual_seed(seed)
    net = UNetSD(CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everywhere: zero-initialized projections would hide the attention
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.double().eval()


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, 8, 8, generator=g, dtype=F64), torch.tensor([10.0, 700.0], dtype=F64),
            torch.randn(2, 5, 6, generator=g, dtype=F64))


def attentions(net):
    return {n: m for n, m in net.named_modules() if type(m) is Attention}


@pytest.mark.parametrize("cross", [False, True])
def test_fused_attention_is_the_same_function_with_the_same_state_dict(cross):
    torch.manual_seed(0)
    attn = Attention(16, 12 if cross else None, 2, 8).double()
    x, c = torch.randn(3, 9, 16, dtype=F64), torch.randn(3, 4, 12 if cross else 16, dtype=F64)
    mask = torch.tensor([[True, True, False, True], [False] * 4, [True] * 4])
    calls = [(x, c, mask), (x, c, None)] if cross else [(x, None, None), (x, c, None)]  # self-attention given a context too
    wants, state = [attn(*a) for a in calls], attn.state_dict()
    assert attn.fuse_projections() and attn.fuse_projections()  # idempotent
    fused_name = "to_kv" if cross else "to_qkv"
    assert fused_name in dict(attn.named_children())
    assert not any(hasattr(attn, n) for n in (("to_k", "to_v") if cross else ("to_q", "to_k", "to_v")))
    for a, want in zip(calls, wants):
        torch.testing.assert_close(attn(*a), want, rtol=0, atol=1e-13)
    got = attn.state_dict()
    assert list(got) == list(state)  # the unfused keys, in the unfused order
    for k in state:
        assert torch.equal(got[k], state[k])


def test_fused_unet_matches_unfused_values_gradients_and_checkpoints(tmp_path):
    net = tiny_unet_sd()
    x, t, c = inputs()
    fused = copy.deepcopy(net)
    names = fuse_projections(fused)
    assert names == list(attentions(net)) and len(names) == 14  # attn1 and attn2 of 7 transformer blocks
    want, got = net(x, t, context=c), fused(x, t, context=c)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    # one SGD step through each: the same new weights, read through the (unchanged) state dict
    for m in (net, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x, t, context=c).square().mean().backward()
        opt.step()
    after, after_fused = net.state_dict(), fused.state_dict()
    assert list(after) == list(after_fused)
    for k in after:
        torch.testing.assert_close(after_fused[k], after[k], rtol=0, atol=1e-12, msg=k)

    # a fused network saves the unfused keys (safetensors refuses shared storage: they are copies)
    # and loads an unfused checkpoint; an unfused network loads the fused one's file
    save_file({k: v.contiguous() for k, v in after_fused.items()}, tmp_path / "fused.safetensors")
    plain = UNetSD(CONFIG).double()
    plain.load_state_dict(load_file(tmp_path / "fused.safetensors"))
    refused = UNetSD(CONFIG).double()
    fuse_projections(refused)
    refused.load_state_dict(after)
    x2 = x + 0.1
    torch.testing.assert_close(refused(x2, t, context=c), plain(x2, t, context=c), rtol=0, atol=1e-12)
    torch.testing.assert_close(plain(x2, t, context=c), net(x2, t, context=c), rtol=0, atol=1e-12)
    partial = {k: v for k, v in after.items() if not k.endswith("attn1.to_k.weight")}
    with pytest.raises(RuntimeError, match="attn1.to_k.weight"):  # a missing key is still reported by its name
        refused.load_state_dict(partial)


def test_optimize_fuses_by_default_and_not_when_asked():
    net = tiny_unet_sd().float()
    on = optimize(copy.deepcopy(net), precision="fp32", channels_last=False)
    off = optimize(copy.deepcopy(net), precision="fp32", channels_last=False, fuse_qkv=False)
    assert sum("to_qkv" in n for n, _ in on.named_modules()) == 7
    assert sum("to_kv" in n for n, _ in on.named_modules()) == 7
    assert not any(n.endswith(("to_qkv", "to_kv")) for n, _ in off.named_modules())
    assert list(on.state_dict()) == list(off.state_dict()) == list(net.state_dict())


def test_lora_and_ip_adapter_compose_with_fusion_in_the_documented_order():
    net = tiny_unet_sd()
    x, t, c = inputs()
    # LoRA first: the adapted projections stay separate, the rest fuse; the output is unchanged
    adapted = copy.deepcopy(net)
    inject_lora(adapted, "attn1.to_q", rank=2)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    want = adapted(x, t, context=c)
    names = fuse_projections(adapted)
    assert all(n.endswith("attn2") for n in names) and len(names) == 7  # attn1's to_q is a LoRA layer
    torch.testing.assert_close(adapted(x, t, context=c), want, rtol=0, atol=1e-12)
    # after fusion, LoRA on a fused projection is refused with the way out
    fused = copy.deepcopy(net)
    fuse_projections(fused)
    with pytest.raises(ValueError, match="fused .*add LoRA before optimize"):
        inject_lora(fused, "attn1.to_k", rank=2)
    with pytest.raises(ValueError, match="fused .*attach the IP-Adapter before optimize"):
        install_ip_adapter(fused, num_tokens=2, layers="*")
    ip = copy.deepcopy(net)
    install_ip_adapter(ip, num_tokens=2, layers="*")
    assert all(n.endswith("attn1") for n in fuse_projections(ip))  # the IP-Adapter layers stay as they are


@pytest.mark.parametrize("guidance", [PerturbedAttentionGuidance, SelfAttentionGuidance])
def test_attention_guidance_gives_the_same_result_on_a_fused_network(guidance):
    net = tiny_unet_sd()
    fused = copy.deepcopy(net)
    fuse_projections(fused)
    x, _, c = inputs()
    sigma = torch.tensor([0.5, 3.0], dtype=F64)
    where = {"layers": "*"} if guidance is PerturbedAttentionGuidance else {}  # SAG: the middle block's map
    outs = [guidance(Denoiser(m, VPDiscrete.from_name("cosine", 1000), "eps"), 1.5, **where)(x * 2, sigma, context=c)
            for m in (net, fused)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-11)
    base = Denoiser(net, VPDiscrete.from_name("cosine", 1000), "eps")(x * 2, sigma, context=c)
    assert (outs[0] - base).abs().mean() > 1e-3  # the guidance did act
