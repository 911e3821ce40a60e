"""The checks of issue 7 that need a GPU, in one command: what the CPU suite cannot show.

    python bench/gpu_check.py                 # on CUDA; exits 1 if a check fails
    python bench/gpu_check.py --device cpu    # the same script on the CPU: the CUDA-only checks say so

1. CUDA graphs: ``optimize(cuda_graphs=True)`` replays give the eager network's output (to 1e-3
   relative: the same bf16 kernels), a new input shape records a second graph, an earlier output survives the next replay, and
   a 10-step DPM-Solver++(2M) loop over the graphed denoiser gives the eager loop's sample.
2. compile + CUDA graphs: the inference fast path matches eager fp32 within bf16 tolerance.
3. FP8: ``torch._scaled_mm`` on this device equals the dequantized product, and FP8 linears
   leave the SD U-Net within FP8's few percent of its bf16 output.
4. FP8 training (``difflab.perf.fp8``): the ``torch._scaled_mm`` path of an FP8 training layer
   (E4M3 forward, E5M2 x E4M3 backward) gives the float32 emulation's output and gradients.
5. The memory estimator within 15% of ``torch.cuda.max_memory_allocated`` for three configurations.

Each line prints PASS, FAIL or SKIP (with why); SKIP is never a pass.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from difflab.perf.bench import BF16_TOLERANCE, rel_err
from difflab.core import Denoiser, VPDiscrete, grids
from difflab.nn import PRESETS, UNet, UNetConfig
from difflab.perf.fast import CUDAGraphed, FP8Linear, fp8_matmul, fp8_matmul_emulated, fp8_supported, optimize, quantize_fp8
from difflab.perf.fp8 import swap_fp8_training
from difflab.perf.memory import estimate_memory, measure_peak, resolve_network, set_gradient_checkpointing
from difflab.nn.unet_sd import PRESETS as SD_PRESETS
from difflab.nn.unet_sd import UNetSD
from difflab.samplers import SAMPLERS

RESULTS: list[tuple[str, str, str]] = []
SAME = 1e-3  # the same bf16 kernels, replayed: equal up to the library's choice of algorithm


def check(name: str, ok: bool | None, detail: str) -> None:
    status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    RESULTS.append((status, name, detail))
    print(f"{status:4}  {name}: {detail}", flush=True)


def randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights in the zero-initialized layers, so no check runs on zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def sd_inputs(device, batch=2, size=16, length=77, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = SD_PRESETS["tiny"]
    return (torch.randn(batch, cfg.in_channels, size, size, generator=g).to(device),
            torch.tensor([10.0, 900.0] * (batch // 2)).to(device),
            torch.randn(batch, length, cfg.cross_attention_dim, generator=g).to(device))


def cuda_graphs(device) -> None:
    torch.manual_seed(0)
    net = randomized(UNetSD(SD_PRESETS["tiny"])).to(device)
    eager = optimize(copy.deepcopy(net), precision="bf16")
    graphed = optimize(copy.deepcopy(net), precision="bf16", cuda_graphs=True)
    if not (isinstance(graphed, CUDAGraphed) and graphed.enabled):
        check("CUDA graphs: replay equals eager", None, getattr(graphed, "note", "not graphed"))
        return
    x, t, c = sd_inputs(device)
    with torch.no_grad():
        first = graphed(x, t, context=c)
        second = graphed(x * 0.5, t, context=c)
        want1, want2 = eager(x, t, context=c), eager(x * 0.5, t, context=c)
        errs = rel_err(first, want1), rel_err(second, want2)
        check("CUDA graphs: replay equals eager", max(errs) < SAME, f"relative errors {errs[0]:.1e}, {errs[1]:.1e} "
              "(the first output read after the second replay: it survived)")
        err_cpu_t = rel_err(graphed(x, t.cpu(), context=c), want1)
        check("CUDA graphs: a timestep on the CPU replays the same graph", len(graphed.graphs) == 1 and err_cpu_t < SAME,
              f"{len(graphed.graphs)} graph recorded; relative error {err_cpu_t:.1e}")
        x4, t4, c4 = sd_inputs(device, batch=4, size=8)
        err4 = rel_err(graphed(x4, t4, context=c4), eager(x4, t4, context=c4))
        check("CUDA graphs: one graph per input signature", len(graphed.graphs) == 2 and err4 < SAME,
              f"{len(graphed.graphs)} graphs recorded; relative error {err4:.1e}")

    frame = VPDiscrete.from_name("scaled_linear", 1000)
    d_eager, d_graphed = Denoiser(eager, frame, "eps"), Denoiser(graphed, frame, "eps")
    sigmas = grids.for_denoiser(d_eager, 10, "karras").to(device)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)).to(device) * sigmas[0]
    with torch.no_grad():
        a = SAMPLERS["dpmpp_2m"](d_eager, noise, sigmas, extra_args={"context": c})
        b = SAMPLERS["dpmpp_2m"](d_graphed, noise, sigmas, extra_args={"context": c})
    check("CUDA graphs: a 10-step DPM-Solver++(2M) loop equals the eager loop", rel_err(b, a) < SAME,
          f"relative error {rel_err(b, a):.1e}")


def compiled_fast_path(device) -> None:
    torch.manual_seed(0)
    net = randomized(UNet(PRESETS["cifar10"])).to(device)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    t = torch.linspace(1, 999, 32).to(device)
    with torch.no_grad():
        want = net(x, t)
        for kw in ({"compile": "full"}, {"compile": "regional", "dynamic": False},
                   {"compile": "full", "cuda_graphs": True}):
            if kw.get("cuda_graphs") and device.type != "cuda":
                check(f"bf16 + {kw} vs eager fp32", None, "CUDA graphs need CUDA")
                continue
            torch._dynamo.reset()
            fast = optimize(copy.deepcopy(net), precision="bf16", **kw)
            fast(x, t)
            err = rel_err(fast(x, t), want)
            check(f"bf16 + {kw} vs eager fp32", err < BF16_TOLERANCE, f"relative error {err:.1e} (tolerance {BF16_TOLERANCE})")


def fp8(device) -> None:
    if not fp8_supported(device):
        check("FP8 matmul on this device", None, f"{device} has no FP8 tensor cores (CUDA capability >= 8.9)")
        return
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g).to(device), torch.randn(384, 512, generator=g).to(device)
    (aq, sa), (bq, sb) = quantize_fp8(a), quantize_fp8(b)
    got = fp8_matmul(aq, sa, bq, sb, torch.bfloat16).float()
    ref = fp8_matmul_emulated(aq, sa, bq, sb, torch.float32)
    check("FP8 matmul equals the dequantized product", rel_err(got, ref) < 1e-2, f"relative error {rel_err(got, ref):.1e}")
    torch.manual_seed(0)
    net = randomized(UNetSD(SD_PRESETS["tiny"])).to(device)
    x, t, c = sd_inputs(device)
    with torch.no_grad():
        want = optimize(copy.deepcopy(net), precision="bf16")(x, t, context=c)
        fast = optimize(copy.deepcopy(net), precision="bf16", fp8=True)
        swapped = sum(isinstance(m, FP8Linear) for m in fast.modules())
        err = rel_err(fast(x, t, context=c), want)
    check("FP8 linears vs bf16 (SD tiny)", swapped > 0 and err < 0.1, f"{swapped} FP8 linears, relative error {err:.1e}")


def fp8_training(device) -> None:
    if not fp8_supported(device):
        check("FP8 training on this device", None, f"{device} has no FP8 tensor cores (CUDA capability >= 8.9)")
        return
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(512, 384)).to(device) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    for net in layers:
        swap_fp8_training(net)
    layers[1][0].fp8_scaled_mm = False  # the float32 emulation, the CPU's arithmetic
    x, dy = torch.randn(256, 512, device=device), torch.randn(256, 384, device=device)
    for _ in range(2):  # the second call runs on delayed scales
        out = []
        for net in layers:
            xi = x.clone().requires_grad_()
            net.zero_grad()
            y = net(xi)
            y.backward(dy)
            out.append((y.detach(), xi.grad, net[0].weight.grad))
    errs = [rel_err(a, b) for a, b in zip(*out)]
    check("FP8 training layer: _scaled_mm vs emulation (y, dx, dW)", max(errs) < 1e-3,
          "relative errors " + ", ".join(f"{e:.1e}" for e in errs))


def memory(device) -> None:
    small = UNetConfig(in_channels=3, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1,),
                       num_heads=4)
    for name, config, batch, size, kw in (("cifar10 fp32", PRESETS["cifar10"], 32, 32, {}),
                                          ("cifar10 bf16", PRESETS["cifar10"], 64, 32, {"precision": "bf16"}),
                                          ("small + checkpointing", small, 64, 32, {"gradient_checkpointing": True}),
                                          ("SD tiny", SD_PRESETS["tiny"], 16, 32, {})):
        est = estimate_memory(config, batch, size, device=device, **kw)["total"]
        net = resolve_network(config, device)
        if kw.get("gradient_checkpointing"):
            set_gradient_checkpointing(net, True)
        measured = measure_peak(net, batch, size, precision=kw.get("precision", "fp32"))["peak"]
        off = abs(est - measured) / measured
        check(f"memory estimate, {name}, batch {batch}", off < 0.15,
              f"predicted {est / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB ({100 * off:.1f}% off)")
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"difflab GPU checks on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}; "
          f"torch {torch.__version__}", flush=True)
    for part in (cuda_graphs, compiled_fast_path, fp8, fp8_training, memory):
        try:
            part(device)
        except Exception as e:  # a crash is a failure of that part, reported, and the rest still runs
            check(part.__name__, False, f"{type(e).__name__}: {e}")
    counts = {s: sum(r[0] == s for r in RESULTS) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
