"""The fast paths on the CPU: same function as eager fp32 within bf16 tolerance, clean fallbacks
for the CUDA-only ones, FP8 scaling math, regional compilation, and the bench's smoke run."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from difflab.perf.bench import BF16_TOLERANCE, DDPM_CIFAR10, SECTION, ddpm_unet2d_config, format_report, record, rel_err, run_bench
from difflab.nn import PRESETS, ResBlock, UNet, UNetConfig
from difflab.perf.fast import (E4M3_MAX, CUDAGraphed, FastConfig, FP8Linear, autocast, blocks, fp8_linear, fp8_matmul,
                             fp8_matmul_emulated, optimize, quantize_fp8, swap_fp8_linear)
from difflab.nn.unet_sd import PRESETS as SD_PRESETS
from difflab.nn.unet_sd import UNetSD

SMALL = UNetConfig(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                   num_heads=2, num_classes=10)


def randomized(net):
    """Zero-initialized layers get random weights, so the check is not on zeros."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net.eval()


def unet_call(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "unet":
        net = randomized(UNet(SMALL))
        x = torch.randn(4, 3, 16, 16, generator=g)
        return net, (x, torch.rand(4, generator=g) * 999), {"class_labels": torch.tensor([0, 3, 9, 10])}
    net = randomized(UNetSD(SD_PRESETS["tiny"]))
    x = torch.randn(2, 4, 8, 8, generator=g)
    return net, (x, torch.tensor([10.0, 900.0])), {"context": torch.randn(2, 7, 32, generator=g)}


@pytest.mark.parametrize("kind", ["unet", "sd"])
def test_bf16_fast_path_matches_eager_fp32_within_bf16_tolerance(kind):
    net, args, cond = unet_call(kind)
    with torch.no_grad():
        want = net(*args, **cond)
        with autocast("bf16", "cpu"):
            amp_err = rel_err(net(*args, **cond).float(), want)  # PyTorch's own mixed precision, for scale
        fast = optimize(copy.deepcopy(net), precision="bf16", channels_last=True)
        got = fast(*args, **cond)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(fast.state_dict()) == list(net.state_dict())  # checkpoints load either way
    err = rel_err(got, want)
    assert 1e-4 < err < BF16_TOLERANCE and err < 1.5 * amp_err  # really bf16, and no worse than autocast
    with pytest.raises(ValueError, match="already optimized"):
        optimize(fast)


def test_fp32_channels_last_is_the_same_function():
    net, args, cond = unet_call("unet")
    with torch.no_grad():
        want = net(*args, **cond)
        got = optimize(copy.deepcopy(net), precision="fp32", channels_last=True)(*args, **cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_config_is_checked():
    with pytest.raises(ValueError, match="precision"):
        FastConfig(precision="fp8")
    with pytest.raises(ValueError, match="compile"):
        FastConfig(compile="partial")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        FastConfig(attention_slice=64, gradient_checkpointing=True)
    assert FastConfig(compile=True).compile == "full"


def test_autocast_helper():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16


def test_regional_blocks_are_the_repeated_blocks():
    net = UNet(PRESETS["tiny"])
    names = [n for n, _ in blocks(net)]
    kinds = {type(m).__name__ for _, m in blocks(net)}
    from difflab.nn import SelfAttention

    assert kinds == {"ResBlock", "SelfAttention"}
    assert len(names) == sum(isinstance(m, (ResBlock, SelfAttention)) for m in net.modules()) == 12
    assert all(not any(n.startswith(o + ".") for o in names) for n in names)  # outermost only


class ResBlockStack(torch.nn.Module):
    """Three ResBlocks of one shape: regional compilation should compile one graph for all of them."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([ResBlock(8, 8, 16, groups=4) for _ in range(3)])

    def forward(self, x, emb):
        for b in self.blocks:
            x = b(x, emb)
        return x


def test_regional_compile_matches_eager_and_a_new_resolution_does_not_recompile():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = randomized(ResBlockStack())
    emb = torch.randn(2, 16)
    inputs = [torch.randn(2, 8, 6, 6), torch.randn(2, 8, 10, 10)]  # sizes unlike any other dim (no duck-shaped guard)
    with torch.no_grad():
        want = [net(x, emb) for x in inputs]
    torch._dynamo.reset()
    counters.clear()
    fast = optimize(net, precision="fp32", channels_last=False, compile="regional", dynamic=True)
    with torch.no_grad():
        got = [fast(x, emb) for x in inputs]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for three blocks and two resolutions


def test_cuda_graphs_are_a_passthrough_on_the_cpu():
    net, args, cond = unet_call("unet")
    with torch.no_grad():
        want = net(*args, **cond)
    graphed = optimize(copy.deepcopy(net), precision="fp32", channels_last=False, cuda_graphs=True)
    assert isinstance(graphed, CUDAGraphed) and not graphed.enabled and "CUDA" in graphed.note
    assert graphed.config is net.config or graphed.config == net.config  # attributes come from the network
    assert list(graphed.state_dict()) == list(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(graphed(*args, **cond), want, rtol=0, atol=0)
    assert not graphed.graphs


# ----------------------------------------------------------------------------------------------
# FP8


def test_fp8_per_tensor_scaling_math():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g) * 3
    q, s = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert float(q.float().abs().max()) == E4M3_MAX  # the largest magnitude lands on the top of the range
    torch.testing.assert_close(s, x.abs().max() / E4M3_MAX)
    normal = q.float().abs() >= 2**-6  # e4m3 normals: 3 mantissa bits, relative rounding error <= 2^-4
    assert ((q.float() * s - x).abs() <= 2**-4 * x.abs() * 1.0001)[normal].all()
    w = torch.randn(48, 64, generator=g)
    wq, ws = quantize_fp8(w)
    got = fp8_matmul(q, s, wq, ws, torch.float32)  # torch._scaled_mm (its CPU kernel here)
    torch.testing.assert_close(got, fp8_matmul_emulated(q, s, wq, ws, torch.float32), rtol=1e-5, atol=1e-4)
    assert 1e-3 < rel_err(got, x @ w.t()) < 0.06  # e4m3 operands: a few percent


def test_fp8_linear_forward_and_straight_through_backward():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 32, generator=g, requires_grad=True)
    w = torch.randn(48, 32, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    y = fp8_linear(x, w, b)
    want = F.linear(x, w, b)
    assert y.shape == want.shape and rel_err(y, want) < 0.06
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    wants = torch.autograd.grad(want, (x, w, b), gy)
    for got, ref in zip(grads, wants):  # the backward uses the unquantized operands
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fp8_swap_by_pattern_and_cpu_fallback():
    net, args, cond = unet_call("unet")
    with torch.no_grad():
        want = net(*args, **cond)
    keys = list(net.state_dict())
    names = swap_fp8_linear(net, r"\.qkv$")
    assert names and all(n.endswith(".qkv") for n in names)
    assert all(isinstance(net.get_submodule(n), FP8Linear) for n in names)
    assert type(net.time_embed.net[0]) is torch.nn.Linear  # not matched: untouched
    assert list(net.state_dict()) == keys
    with torch.no_grad():  # no FP8 tensor cores on the CPU: FP8Linear is F.linear
        torch.testing.assert_close(net(*args, **cond), want, rtol=0, atol=0)
    fresh, _, _ = unet_call("unet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimize(fresh, precision="fp32", fp8=True)
    assert any("fp8=True ignored" in str(w.message) for w in caught)
    assert not any(isinstance(m, FP8Linear) for m in fresh.modules())


# ----------------------------------------------------------------------------------------------
# The bench


def test_ddpm_cifar10_layout_is_diffusers_config():
    cfg = ddpm_unet2d_config(PRESETS["cifar10"])
    assert {k: v for k, v in cfg.items() if k != "dropout"} == DDPM_CIFAR10 and cfg["dropout"] == 0.1


def test_bench_quick_smoke_run_and_record(tmp_path):
    report = run_bench(quick=True, device="cpu", log=lambda *a: None)
    rows = report["results"]
    assert {r["workload"] for r in rows} == {"cifar_forward", "cifar_train", "sd_step"}
    ran = [r for r in rows if r["value"] is not None]
    assert {(r["workload"], r["impl"]) for r in ran} == {(w, i) for w in ("cifar_forward", "cifar_train", "sd_step")
                                                          for i in ("difflab", "diffusers")}
    assert all(r["value"] > 0 and 0 < r["mfu"] for r in ran)
    assert all(r["rel_err"] < BF16_TOLERANCE for r in ran)  # every fast path equals eager fp32 within bf16 tolerance
    assert all(r["note"].startswith("skipped") for r in rows if r["value"] is None)  # none failed
    parity = [r["note"] for r in rows if r["workload"] == "sd_step" and r["impl"] == "difflab" and "parity" in r["note"]]
    assert parity and float(parity[0].split("parity with diffusers: ")[1]) < 1e-5  # the same SD U-Net as diffusers'
    path = tmp_path / "BENCHMARKS.md"
    theirs = "<!-- other: begin -->\n## Samplers\n\nsomeone else's table\n<!-- other: end -->\n"
    path.write_text("# Benchmarks\n\n" + theirs + "\n## Later\n\nmore\n")
    part = lambda w: {**report, "results": [r for r in rows if r["workload"] == w]}  # noqa: E731
    record(part("cifar_forward"), path)
    record(part("sd_step"), path)  # one workload per run: the section merges them
    record(part("sd_step"), path)  # and recording one again replaces it
    text = path.read_text()
    assert text.count(SECTION) == 1 and theirs in text and "## Later\n\nmore\n" in text
    assert text.count("**cifar_forward**") == text.count("**sd_step**") == 1 and "**cifar_train**" not in text
    assert "smoke run" in format_report(report) and report["device"] in text


def test_bench_command_rejects_unknown_workloads(capsys):
    from difflab.cli import main

    assert main(["bench", "--quick", "--workloads", "cifar_forward,warp_drive"]) == 2
    assert "warp_drive" in capsys.readouterr().err


def test_compile_fuses_group_norm_and_silu_into_one_kernel():
    """The claim behind adding no GroupNorm+SiLU kernel: inductor's code for a compiled ResBlock
    has no SiLU kernel of its own; each SiLU runs inside a GroupNorm kernel."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    block = randomized(ResBlock(16, 32, 24, groups=4))
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 24)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(torch.compile(block), x, emb)
        torch.testing.assert_close(out, block(x, emb), rtol=1e-4, atol=1e-5)
    kernels = re.findall(r"(cpp_fused_\w+)\s*=\s*async_compile", code)
    with_silu = [k for k in kernels if "silu" in k]
    assert len(with_silu) >= 2, kernels  # the block's two norm -> SiLU pairs
    assert all("group_norm" in k for k in with_silu), kernels
