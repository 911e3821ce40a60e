"""FP8 training (difflab.perf.fp8): saturation on outliers, gradients within the formats' error,
the delayed-scaling recipe by hand, the 1x1 conv equal to the linear, the GPU arithmetic
(torch._scaled_mm) equal to the CPU's, exact resume through fit, and ``difflab train --fp8``."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difflab.cli import main
from difflab.core import Denoiser, VPDiscrete
from difflab.io.checkpoint import load_checkpoint, load_model_state, without_training_buffers
from difflab.io.spec import load_denoiser
from difflab.perf.fast import fp8_matmul_emulated
from difflab.perf.fp8 import (FORMATS, FP8TrainConv2d, FP8TrainLinear, G, W, X, fp8_layers, quantize, swap_fp8_training)
from difflab.train import TrainConfig, train

E4M3_MAX, E5M2_MAX = FORMATS["e4m3"][1], FORMATS["e5m2"][1]


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def _pair(n_in=32, n_out=16, seed=0, **swap):
    """An fp32 nn.Linear and an FP8 copy with the same weights."""
    torch.manual_seed(seed)
    ref = nn.Linear(n_in, n_out)
    fp8 = nn.Sequential(nn.Linear(n_in, n_out))
    fp8[0].load_state_dict(ref.state_dict())
    swap_fp8_training(fp8, **swap)
    return ref, fp8[0]


# ----------------------------------------------------------------------------------------------
# Saturation


def test_an_outlier_saturates_instead_of_overflowing():
    x = torch.randn(64, 32)
    x[3, 5] = 1e6
    # e5m2 has infinities: without the clamp the scaled outlier would be inf
    s = torch.tensor(E5M2_MAX / 4.0)  # a delayed scale from a history of amax 4
    assert torch.isinf((x * s).to(FORMATS["e5m2"][0]).float()).any()
    for fmt, fmax in (("e4m3", E4M3_MAX), ("e5m2", E5M2_MAX)):
        s = torch.tensor(fmax / 4.0)
        deq = quantize(x, s, fmt).float() / s
        assert torch.isfinite(deq).all()
        assert float(deq.abs().max()) <= fmax / float(s) and float(deq[3, 5]) == fmax / float(s)  # saturated at max / s
    # a non-finite value is not hidden: it becomes NaN, which the loop's divergence check sees
    assert torch.isnan(quantize(torch.tensor([1.0, math.inf]), torch.tensor(1.0), "e4m3").float()[1])


def test_the_layer_stays_finite_on_outliers_forward_and_backward():
    _, layer = _pair()
    x, dy = torch.randn(64, 32), torch.randn(64, 16)
    layer(x).backward(dy)  # step 1: the histories hold amax ~ 4
    scales = layer.fp8_scale.clone()
    x_out, dy_out = x.clone().requires_grad_(), dy.clone()
    with torch.no_grad():
        x_out[0, 0] = 1e6
    dy_out[1, 2] = 1e6
    y = layer(x_out)
    y.backward(dy_out)
    assert torch.isfinite(y).all() and torch.isfinite(x_out.grad).all() and torch.isfinite(layer.weight.grad).all()
    # the outlier entered at the saturated value max / s of the delayed scale (fp32: its product is ~1e6)
    x_sat = x.clone()
    x_sat[0, 0] = E4M3_MAX / scales[X]
    y_sat = nn.functional.linear(x_sat, layer.weight, layer.bias).detach()
    assert _rel(y.detach()[0], y_sat[0]) < 0.1 and float(y.detach()[0].abs().max()) < 100
    # and the next call's scales follow the outlier (the history now holds 1e6)
    assert math.isclose(float(layer.fp8_scale[X]), E4M3_MAX / 1e6, rel_tol=1e-6)
    assert math.isclose(float(layer.fp8_scale[G]), E5M2_MAX / 1e6, rel_tol=1e-6)
    # the first call with an outlier is safe too (just-in-time scale from its own amax)
    _, fresh = _pair()
    assert torch.isfinite(fresh(x_out.detach())).all()


# ----------------------------------------------------------------------------------------------
# Gradients within the formats' error


def test_gradients_match_fp32_within_the_formats_error():
    """Rounding to m mantissa bits errs by at most half a step, 2^-(m+1) relative; uniform over the
    step its RMS is at most 2^-m / sqrt(12). The output of a product of two quantized operands
    errs by the root sum of their squares: forward E4M3 x E4M3, backward E5M2 x E4M3."""
    rms = lambda m: 2.0 ** -m / math.sqrt(12)  # noqa: E731
    bound_fwd, bound_bwd = math.hypot(rms(3), rms(3)), math.hypot(rms(2), rms(3))  # 0.051, 0.081
    ref, layer = _pair(64, 48)
    x = torch.randn(256, 64)
    dy = torch.randn(256, 48)
    for _ in range(2):  # the second call runs on delayed scales
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref.zero_grad(), layer.zero_grad()
        yr, yf = ref(xr), layer(xf)
        yr.backward(dy), yf.backward(dy)
    errors = {"y": _rel(yf, yr), "dx": _rel(xf.grad, xr.grad), "dW": _rel(layer.weight.grad, ref.weight.grad)}
    assert errors["y"] < bound_fwd and errors["dx"] < bound_bwd and errors["dW"] < bound_bwd, errors
    assert min(errors.values()) > 1e-3, errors  # quantization really happened
    assert torch.equal(layer.bias.grad, ref.bias.grad)  # the bias gradient stays in full precision
    assert layer.weight.dtype == layer.weight.grad.dtype == torch.float32  # fp32 master weights


def test_bf16_autocast_and_eval_mode_inference():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 4))
    ref = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 4))
    ref.load_state_dict(net.state_dict())
    swap_fp8_training(net)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in net.parameters())
    # eval: frozen scales, nothing recorded; within the forward bound of the fp32 network
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        y = net(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert 1e-3 < _rel(y, ref(x).detach()) < 0.1


# ----------------------------------------------------------------------------------------------
# The delayed recipe


def test_delayed_scaling_over_three_steps_by_hand():
    """H = 2, margin = 1: step 1 scales just in time, step 2 by the amax of step 1, step 3 by the
    max of steps 1-2, and the scale after step 3 forgets step 1 (it left the history)."""
    _, layer = _pair(16, 16, history_len=2, margin=1)
    pattern = torch.linspace(-1, 1, 16 * 16).reshape(16, 16)[torch.randperm(16)]  # max |value| 1
    amax_x, amax_g = [3.0, 1.5, 0.5], [0.2, 0.8, 0.1]
    s = lambda fmax, a: fmax / a / 2  # noqa: E731  (fp8_max / amax) / 2^margin
    used_x = [s(E4M3_MAX, 3.0), s(E4M3_MAX, 3.0), s(E4M3_MAX, 3.0)]
    used_g = [s(E5M2_MAX, 0.2), s(E5M2_MAX, 0.2), s(E5M2_MAX, 0.8)]
    after_x = [s(E4M3_MAX, 3.0), s(E4M3_MAX, 3.0), s(E4M3_MAX, 1.5)]
    after_g = [s(E5M2_MAX, 0.2), s(E5M2_MAX, 0.8), s(E5M2_MAX, 0.8)]
    w_amax = float(layer.weight.detach().abs().max())
    for i in range(3):
        x = (amax_x[i] * pattern).requires_grad_()
        y = layer(x)
        # the output is the product of x quantized with the scale the recipe says this step uses
        sx, sw = torch.tensor(used_x[i]), torch.tensor(s(E4M3_MAX, w_amax))
        expected = fp8_matmul_emulated(quantize(x, sx, "e4m3"), 1 / sx, quantize(layer.weight, sw, "e4m3"), 1 / sw,
                                       torch.float32) + layer.bias
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
        dy = amax_g[i] * pattern
        y.backward(dy)
        sg = torch.tensor(used_g[i])
        torch.testing.assert_close(x.grad, fp8_matmul_emulated(quantize(dy, sg, "e5m2"), 1 / sg,
                                                               quantize(layer.weight, sw, "e4m3").t().contiguous(),
                                                               1 / sw, torch.float32), rtol=1e-6, atol=1e-6)
        hist = layer.fp8_amax_history
        assert hist[X].tolist() == pytest.approx([amax_x[i], amax_x[i - 1] if i else 0.0])
        assert hist[G].tolist() == pytest.approx([amax_g[i], amax_g[i - 1] if i else 0.0])
        assert float(layer.fp8_scale[X]) == pytest.approx(after_x[i], rel=1e-6)
        assert float(layer.fp8_scale[G]) == pytest.approx(after_g[i], rel=1e-6)
        assert float(layer.fp8_scale[W]) == pytest.approx(s(E4M3_MAX, w_amax), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The 1x1 convolution, the swap, the GPU arithmetic


def test_pointwise_conv_equals_the_linear_path():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, stride=2))
    lin = nn.Sequential(nn.Linear(6, 4))
    lin[0].weight.data.copy_(net[0].weight.flatten(1)), lin[0].bias.data.copy_(net[0].bias)
    assert swap_fp8_training(net) == ["0"] and swap_fp8_training(lin) == ["0"]  # 3x3 and strided 1x1 stay convs
    assert isinstance(net[0], FP8TrainConv2d) and type(net[1]) is type(net[2]) is nn.Conv2d
    assert swap_fp8_training(net) == [] and fp8_layers(net) == ["0"]  # swapping again changes nothing
    x = torch.randn(3, 6, 5, 5)
    for _ in range(2):
        xc, xl = x.clone().requires_grad_(), x.movedim(1, -1).clone().requires_grad_()
        yc, yl = net[0](xc), lin[0](xl)
        dy = torch.randn_like(yl)
        yc.backward(dy.movedim(-1, 1)), yl.backward(dy)
        assert torch.equal(yc, yl.movedim(-1, 1))
        assert torch.equal(xc.grad, xl.grad.movedim(-1, 1))
        assert torch.equal(net[0].weight.grad.flatten(1), lin[0].weight.grad)
    assert torch.equal(net[0].fp8_amax_history, lin[0].fp8_amax_history)
    assert swap_fp8_training(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), pattern=r"^1$") == ["1"]


def test_scaled_mm_path_equals_the_cpu_arithmetic():
    """The GPU path (torch._scaled_mm; its CPU kernel here) with the backward's transposed operands."""
    ref, layer = _pair(32, 48)
    _, mm = _pair(32, 48)
    mm.fp8_scaled_mm = True
    x, dy = torch.randn(64, 32), torch.randn(64, 48)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), mm(xb)
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mm.weight.grad, layer.weight.grad, rtol=1e-5, atol=1e-5)
    assert _rel(ya, ref(x).detach()) > 1e-3


# ----------------------------------------------------------------------------------------------
# Training: exact resume, the command


class PointwiseNet(nn.Module):
    """A 1x1 conv and a linear time embedding: net(x_in, t) on (B, 2, 4, 4)."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"num_classes": None})()
        self.temb = nn.Linear(1, 8)
        self.conv_in = nn.Conv2d(2, 8, 1)
        self.conv_out = nn.Conv2d(8, 2, 1)

    def forward(self, x, t, class_labels=None):
        h = self.conv_in(x) + self.temb(t.to(x.dtype)[:, None] / 100)[:, :, None, None]
        return self.conv_out(nn.functional.silu(h))


def test_resume_is_bit_identical_with_fp8_state(tmp_path):
    data = torch.randn(24, 2, 4, 4).clamp(-1, 1)
    cfg = lambda steps: TrainConfig(steps=steps, batch_size=8, lr=1e-2, ema_decay=0.9, fp8=True, checkpoint_every=100,  # noqa: E731
                                    progress=False, log_every=0, seed=3)
    make = lambda: Denoiser(PointwiseNet(), VPDiscrete.from_name("linear", 100), "v")  # noqa: E731
    torch.manual_seed(0)
    a, b = make(), make()
    b.net.load_state_dict(a.net.state_dict())
    straight = train(a, data, cfg(5), tmp_path / "a")
    assert fp8_layers(a.net) == ["temb", "conv_in", "conv_out"]
    train(b, data, cfg(2), tmp_path / "b")
    torch.manual_seed(123)  # other initial weights: everything, the FP8 state included, comes from the checkpoint
    c = make()
    resumed = train(c, data, cfg(5), tmp_path / "b")
    assert straight.step == resumed.step == 5
    ta, _ = load_checkpoint(tmp_path / "a")
    tc, meta = load_checkpoint(tmp_path / "b")
    assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tc[k]) for k in ta)
    assert meta["train_config"]["fp8"] is True
    hist = ta["model.conv_in.fp8_amax_history"]
    assert (hist[:, :5] > 0).all() and (hist[:, 5:] == 0).all(), hist  # 5 steps in every row (x, W, dy) of 16
    assert torch.equal(c.net.conv_in.fp8_scale, a.net.conv_in.fp8_scale)
    # the plain network loads the checkpoint without its FP8 state (load_denoiser's way) and has the fp32 weights
    plain = PointwiseNet()
    with pytest.raises(ValueError, match="unexpected keys"):
        load_model_state(plain, ta, prefix="model.")
    load_model_state(plain, without_training_buffers(ta), prefix="model.")
    assert not fp8_layers(plain) and torch.equal(plain.conv_in.weight, a.net.conv_in.weight)


def test_train_command_with_fp8(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--device", "cpu", "--out", str(run), "--fp8"]
    assert main(args) == 0
    tensors, meta = load_checkpoint(run)
    assert meta["train_config"]["fp8"] is True
    histories = [v for k, v in tensors.items() if k.startswith("model.") and k.endswith("fp8_amax_history")]
    assert len(histories) >= 10 and all(float(h[X, 0]) > 0 and float(h[X, 1]) > 0 for h in histories)
    assert main(["check", str(run)]) == 0
    denoiser, _ = load_denoiser(run)
    with torch.no_grad():
        out = denoiser(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), class_labels=torch.tensor([0, 1]))
    assert torch.isfinite(out).all()
