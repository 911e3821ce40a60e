"""Memory switches and the memory estimator, against measured peaks on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from difflab.cli import main as perf_main
from difflab.nn import UNet, UNetConfig
from difflab.nn.dit import DiTConfig
from difflab.perf.memory import (_probe_saved, disable_attention_slicing, enable_attention_slicing, estimate_memory,
                               measure_peak, offload, resolve_network, set_gradient_checkpointing, sliced_attention)
from difflab.nn.unet_sd import PRESETS as SD_PRESETS
from difflab.nn.unet_sd import UNetSD

SMALL = UNetConfig(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2)
SMALL_COND = UNetConfig(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                        num_heads=2, num_classes=10, dropout=0.1)
SMALL_DIT = DiTConfig(in_channels=3, sample_size=16, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)
DEEPER = UNetConfig(in_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1,), num_heads=1)


def randomized(net):
    """Zero-initialized layers get random weights, so every path carries a signal."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


# ----------------------------------------------------------------------------------------------
# The estimator


@pytest.mark.parametrize("config, batch, size, precision, checkpointing", [
    (SMALL, 16, 16, "fp32", False),                    # activations dominate
    (SMALL_COND, 16, 16, "bf16", False),               # autocast, dropout masks, class labels
    (SD_PRESETS["tiny"], 8, 16, "fp32", True),         # SD U-Net with cross-attention, gradient checkpointing
    (DEEPER, 1, 8, "fp32", False),                     # gradients outweigh activations: the peak is at the optimizer step
    (SMALL_DIT, 16, 16, "fp32", False),                # a DiT: 64 tokens, adaLN-Zero blocks
    (SMALL_DIT, 16, 16, "bf16", True),                 # a DiT with autocast and gradient checkpointing
], ids=["unet-fp32", "unet-bf16-classes", "sd-checkpointing", "gradients-dominate", "dit-fp32", "dit-bf16-checkpointing"])
def test_estimate_is_close_to_the_measured_peak(config, batch, size, precision, checkpointing):
    """Within 15% in fp32; within 25% under bf16 autocast, where the CPU's kernels (oneDNN) keep
    ISA-dependent bf16 copies and workspaces the estimator does not model: measured 18.6% off for
    the DiT with checkpointing on an AVX-512 Xeon, 15.4% for the U-Net with oneDNN held to AVX2,
    under 15% for both on an AMD EPYC (AVX2)."""
    est = estimate_memory(config, batch, size, precision=precision, gradient_checkpointing=checkpointing)
    net = resolve_network(config)
    if checkpointing:
        set_gradient_checkpointing(net, True)
    measured = measure_peak(net, batch, size, precision=precision)["peak"]
    n = sum(p.numel() for p in net.parameters())
    assert est["parameters"] == est["gradients"] == 4 * n
    assert est["optimizer"] == 8 * n + 4 * len(list(net.parameters()))  # two fp32 moments + a step per tensor
    assert est["total"] == est["parameters"] + est["optimizer"] + max(est["activations"], est["gradients"])
    tolerance = 0.25 if precision == "bf16" else 0.15
    assert abs(est["total"] - measured) / measured < tolerance, (est, measured)


def test_activations_extrapolate_exactly_from_batch_1_and_2():
    net = UNet(SMALL).train()
    at = {b: _probe_saved(net, b, 16, "fp32", torch.device("cpu"), 77)[0] for b in (1, 2, 7)}
    assert at[7] == at[1] + 6 * (at[2] - at[1])
    assert at[2] > at[1] > 0


def test_checkpointing_and_precision_lower_prediction_and_measurement_alike():
    est = {k: estimate_memory(DEEPER, 8, 16, **kw)["total"] for k, kw in
           {"plain": {}, "ckpt": {"gradient_checkpointing": True}, "bf16": {"precision": "bf16"}}.items()}
    meas = {}
    for k in est:
        net = resolve_network(DEEPER)
        if k == "ckpt":
            set_gradient_checkpointing(net, True)
        meas[k] = measure_peak(net, 8, 16, precision="bf16" if k == "bf16" else "fp32")["peak"]
    assert est["ckpt"] < est["plain"] and meas["ckpt"] < meas["plain"]
    assert est["bf16"] < est["plain"] and meas["bf16"] < meas["plain"]


def test_inference_estimate_counts_weights_in_their_precision():
    est = estimate_memory(SMALL, 8, 16, precision="bf16", training=False)
    n = sum(p.numel() for p in UNet(SMALL).parameters())
    assert est["parameters"] == 2 * n and est["gradients"] == est["optimizer"] == 0
    measured = measure_peak(resolve_network(SMALL).to(torch.bfloat16), 8, 16, training=False)["peak"]
    assert abs(est["total"] - measured) / measured < 0.15
    with pytest.raises(ValueError, match="already in bf16"):
        estimate_memory(UNet(SMALL), 8, 16, precision="bf16", training=False)


def test_memory_command_prints_prediction_and_measurement(capsys):
    assert perf_main(["memory", "--preset", "tiny", "--batch-size", "4", "--image-size", "8", "--measure"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer", "activations", "total", "measured peak", "predicted - measured"):
        assert word in out
    assert perf_main(["memory", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Switches


def test_gradient_checkpointing_switch_sets_every_block():
    net = UNet(SMALL)
    n = set_gradient_checkpointing(net, True)
    assert n == sum(hasattr(m, "checkpoint") for m in net.modules()) > 0
    assert all(m.checkpoint for m in net.modules() if hasattr(m, "checkpoint"))
    with pytest.raises(ValueError, match="no blocks"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_sliced_attention_equals_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (13, 5, 5))
    mask = torch.rand(2, 1, 13, 5, generator=g) > 0.3
    mask[..., 0] = True
    for m in (None, mask, mask[:, :, :1]):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(sliced_attention(q, k, v, attn_mask=m, slice_size=4), want, rtol=1e-12, atol=1e-12)


class _QueryLengths(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.lengths = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.lengths.append(args[0].shape[-2])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["unet", "sd"])
def test_attention_slicing_switch_slices_and_keeps_the_output(kind):
    torch.manual_seed(0)
    net = randomized(UNet(SMALL) if kind == "unet" else UNetSD(SD_PRESETS["tiny"])).eval()
    x, t = torch.randn(2, net.config.in_channels, 8, 8), torch.tensor([3.0, 700.0])
    cond = {} if kind == "unet" else {"context": torch.randn(2, 5, net.config.cross_attention_dim),
                                      "context_mask": torch.tensor([[True] * 5, [True, True, False, False, False]])}
    with torch.no_grad():
        want = net(x, t, **cond)
        enable_attention_slicing(net, 5)
        with _QueryLengths() as seen:
            got = net(x, t, **cond)
    assert seen.lengths and max(seen.lengths) <= 5  # every attention saw at most 5 queries at a time
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    disable_attention_slicing(net)
    with torch.no_grad(), _QueryLengths() as seen:
        net(x, t, **cond)
    assert max(seen.lengths) > 5
    set_gradient_checkpointing(net, True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        enable_attention_slicing(net, 5)


def test_offload_is_a_noop_on_the_cpu():
    net = torch.nn.Linear(4, 3)
    assert offload(net, "cpu") is None
    assert not net._forward_pre_hooks and not net._forward_hooks


def test_offload_moves_weights_to_the_device_only_while_running():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    handle = offload(net, "meta")  # the meta device stands in for a GPU on a CPU-only machine
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append((next(m.parameters()).device.type, args[0].device.type)))
    out = net(torch.randn(2, 4))
    assert seen == [("meta", "meta")] and out.device.type == "meta"  # weights and input moved for the call
    assert all(v.device.type == "cpu" for v in net.state_dict().values())  # and the weights are back
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    net.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference"):
        net(torch.randn(2, 4))
    handle.remove()
    assert net(torch.randn(2, 4)).device.type == "cpu"
