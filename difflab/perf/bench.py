"""``difflab bench``: difflab against diffusers on the same U-Nets, on the same device, in one run.

Three workloads (ANCHORS.md has diffusers' H100 figures; issue 7 the targets):

1. ``cifar_forward``: DDPM's CIFAR-10 U-Net (Ho et al. 2020, Appendix B), forward images/s at
   batch 256: difflab's ``PRESETS["cifar10"]`` against diffusers' ``UNet2DModel`` in the
   google/ddpm-cifar10-32 layout (built from :data:`DDPM_CIFAR10`, no download); fp32,
   bf16 and bf16 + torch.compile (+ CUDA graphs).
2. ``cifar_train``: the same models' training images/s at batch 128 (bf16 autocast, fused
   AdamW, dropout 0.1 as in DDPM), eager and compiled.
3. ``sd_step``: the Stable Diffusion 1.5 U-Net (860 M parameters), milliseconds per denoiser
   call at 64x64 latents with classifier-free guidance (batch 2), fp16: difflab's ``UNetSD``
   and diffusers' ``UNet2DConditionModel`` with the same random weights (checked equal in fp32),
   eager, compiled, compiled + CUDA graphs (+ FP8 linears on GPUs that have them).

Every fast variant's output is compared with the same implementation's eager fp32 output
(relative L2 error; for training, of the gradient). FLOPs are counted once per workload with
``torch.utils.flop_counter.FlopCounterMode`` on meta-device copies; model FLOP utilization
(MFU) is the achieved FLOP/s over this device's dense matmul rate, measured in the same run
(bf16 on CUDA, fp32 on the CPU). ``quick=True`` runs tiny models for a smoke test on the CPU.
"""
from __future__ import annotations

import copy
import datetime
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .fast import autocast, fp8_supported, optimize
from .memory import make_optimizer
from ..nn.unet import PRESETS, UNet, UNetConfig
from ..nn.unet_sd import PRESETS as SD_PRESETS
from ..nn.unet_sd import UNetSD

WORKLOADS = ("cifar_forward", "cifar_train", "sd_step")
BF16_TOLERANCE = 3e-2  # relative L2 error vs eager fp32; bf16 autocast itself is 1-2% off on these random nets
SECTION = "## U-Net speed (difflab bench)"

# diffusers' google/ddpm-cifar10-32 unet/config.json (the fields that shape the network)
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# what issue 7 asks of difflab on an H100 (diffusers' figures: ANCHORS.md)
TARGETS = {
    "cifar_forward": "difflab best >= 1.6x diffusers' compiled and >= 30,000 img/s (diffusers compiled: 18,300 img/s)",
    "cifar_train": "difflab best >= 2.5x diffusers' best and >= 5,600 img/s (diffusers: 2,260 img/s eager)",
    "sd_step": "difflab best <= 0.75x diffusers' best and <= 5 ms (diffusers compiled + CUDA graphs: 6.7 ms)",
}
TINY_CIFAR = UNetConfig(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                        num_heads=1, dropout=0.1, groups=8)


def ddpm_unet2d_config(c: UNetConfig) -> dict:
    """diffusers' ``UNet2DModel`` config with the layout of a difflab ``UNetConfig`` (DDPM's:
    no classes, no cross-attention, one attention head). For ``PRESETS["cifar10"]`` this is
    :data:`DDPM_CIFAR10`. The nets differ only where DDPM and ADM do: difflab's ResBlocks scale
    and shift by the time embedding, diffusers' add it (the same FLOPs up to 0.05%)."""
    if c.num_classes is not None or c.context_dim is not None or c.num_heads != 1:
        raise ValueError("the DDPM layout has no classes, no cross-attention and one attention head")
    n = len(c.channel_mult)
    return {
        **DDPM_CIFAR10,
        "block_out_channels": [c.model_channels * m for m in c.channel_mult], "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels, "layers_per_block": c.num_res_blocks, "norm_num_groups": c.groups,
        "down_block_types": ["AttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in range(n)],
        "up_block_types": ["AttnUpBlock2D" if n - 1 - j in c.attention_levels else "UpBlock2D" for j in range(n)],
        "dropout": c.dropout,
    }


@dataclass
class Result:
    workload: str
    impl: str            # "difflab" or "diffusers"
    variant: str
    value: float | None  # img/s (cifar) or ms per call (sd); None when skipped or failed
    unit: str
    mfu: float | None = None
    rel_err: float | None = None  # vs the same implementation's eager fp32 (output; gradient for training)
    note: str = ""


# ----------------------------------------------------------------------------------------------
# Measuring


def median_time(fn, inputs: list, *, warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds of ``fn(*inputs[i % len(inputs)])`` after ``warmup`` calls (CUDA events on
    a GPU, so the asynchronous launches are timed where they run)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(iters):
        args = inputs[i % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device: torch.device, quick: bool = False) -> float:
    """Measured dense matmul FLOP/s of ``device``: bf16 on CUDA (n = 8192), fp32 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else ((256 if quick else 1024), torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = median_time(torch.mm, [(a, b)], warmup=2, iters=5 if quick else 20, device=device)
    return 2 * n**3 / t


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` (matmuls and convolutions, forward and backward) by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def randomize_zero_init(net: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Give zero-initialized weights (ADM's zero_module) small random values: never time or
    check a network on zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


# ----------------------------------------------------------------------------------------------
# The workloads


@dataclass
class Context:
    device: torch.device
    quick: bool
    compile: bool
    compile_mode: str | None
    warmup: int
    iters: int
    peak: float  # FLOP/s
    log: object


def _variant(ctx: Context, workload, impl, name, unit, flops, build, run, ref, *, needs=(), rel=None):
    """Build one variant, check it against ``ref``, time it; a Result even when it fails."""
    missing = [n for n in needs if not {"cuda": ctx.device.type == "cuda", "compile": ctx.compile,
                                         "fp8": fp8_supported(ctx.device)}[n]]
    if missing:
        why = {"cuda": "needs CUDA", "compile": "compile off (--quick skips it; --compile turns it on)",
               "fp8": "needs FP8 tensor cores (compute capability >= 8.9)"}
        return Result(workload, impl, name, None, unit, note="skipped: " + "; ".join(why[n] for n in missing))
    ctx.log(f"  {workload}: {impl} {name} ...")
    import torch._dynamo  # here: importing dynamo costs seconds at every CLI start

    torch._dynamo.reset()  # each variant compiles afresh: no shapes marked dynamic by an earlier variant
    try:
        fn, inputs = build()
        err = rel(fn, inputs) if rel is not None else rel_err(run(fn, *inputs[0]), ref)
        seconds = median_time(lambda *a: run(fn, *a), inputs, warmup=ctx.warmup, iters=ctx.iters, device=ctx.device)
    except Exception as e:  # a failing variant is reported, not fatal
        return Result(workload, impl, name, None, unit, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    per_call_items = inputs[0][0].shape[0]
    value = per_call_items / seconds if unit == "img/s" else seconds * 1e3
    return Result(workload, impl, name, value, unit, mfu=flops / seconds / ctx.peak, rel_err=err)


def _cifar_models(ctx: Context):
    from diffusers import UNet2DModel

    cfg = TINY_CIFAR if ctx.quick else PRESETS["cifar10"]
    torch.manual_seed(0)
    ours = randomize_zero_init(UNet(cfg)).to(ctx.device)
    theirs = randomize_zero_init(UNet2DModel.from_config(ddpm_unet2d_config(cfg))).to(ctx.device)
    with torch.device("meta"):
        meta = (UNet(cfg), UNet2DModel.from_config(ddpm_unet2d_config(cfg)))
    return cfg, ours, theirs, meta


def _cifar_inputs(ctx, cfg, batch, size, n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, cfg.in_channels, size, size, generator=g).to(ctx.device),
             (torch.rand(batch, generator=g) * 999).to(ctx.device)) for _ in range(n)]


def cifar_forward(ctx: Context) -> list[Result]:
    """DDPM CIFAR-10 U-Net forward, images/s."""
    batch, size = (4, 16) if ctx.quick else (256, 32)
    cfg, ours, theirs, (meta_ours, meta_theirs) = _cifar_models(ctx)
    inputs = _cifar_inputs(ctx, cfg, batch, size)
    x_meta, t_meta = torch.empty(batch, cfg.in_channels, size, size, device="meta"), torch.empty(batch, device="meta")
    flops = {"difflab": count_flops(lambda: meta_ours(x_meta, t_meta)),
             "diffusers": count_flops(lambda: meta_theirs(x_meta, t_meta))}
    ours.eval(), theirs.eval()

    def ours_run(net, x, t):
        with torch.no_grad():
            return net(x, t)

    def theirs_run(spec, x, t):
        net, amp, cl = spec
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(amp, ctx.device):
            return net(x, t, return_dict=False)[0].float()

    with torch.no_grad():
        refs = {"difflab": ours(*inputs[0]), "diffusers": theirs(*inputs[0], return_dict=False)[0]}

    def ours_build(**kw):
        return lambda: (optimize(copy.deepcopy(ours), compile_mode=ctx.compile_mode, **kw), inputs)

    def theirs_build(precision, cl=False, compile=False, cast=False):
        def build():
            net = copy.deepcopy(theirs)
            if cast:
                net.to(torch.bfloat16)
            if cl:
                net.to(memory_format=torch.channels_last)
            if compile:
                net = torch.compile(net, mode=ctx.compile_mode)
            amp = "fp32" if cast else precision  # bf16 weights need no autocast
            return (net, amp, cl), [(x.to(torch.bfloat16) if cast else x, t) for x, t in inputs]
        return build

    variants = [
        ("difflab", "fp32 eager", ours_build(precision="fp32", channels_last=False), ()),
        ("difflab", "bf16 + channels_last", ours_build(precision="bf16"), ()),
        ("difflab", "bf16 + channels_last + compile", ours_build(precision="bf16", compile="full"), ("compile",)),
        ("difflab", "bf16 + channels_last + regional compile",
         ours_build(precision="bf16", compile="regional", dynamic=False), ("compile",)),
        ("difflab", "bf16 + channels_last + compile + CUDA graphs",
         ours_build(precision="bf16", compile="full", cuda_graphs=True), ("compile", "cuda")),
        ("diffusers", "fp32 eager", theirs_build("fp32"), ()),
        ("diffusers", "bf16 autocast", theirs_build("bf16"), ()),
        ("diffusers", "bf16 autocast + channels_last + compile", theirs_build("bf16", cl=True, compile=True), ("compile",)),
        ("diffusers", "bf16 weights + channels_last + compile", theirs_build("bf16", cl=True, compile=True, cast=True), ("compile",)),
    ]
    return [_variant(ctx, "cifar_forward", impl, name, "img/s", flops[impl], build,
                     ours_run if impl == "difflab" else theirs_run, refs[impl], needs=needs)
            for impl, name, build, needs in variants]


def cifar_train(ctx: Context) -> list[Result]:
    """DDPM CIFAR-10 U-Net training step (bf16 autocast, fused AdamW), images/s."""
    batch, size = (4, 16) if ctx.quick else (128, 32)
    cfg, ours, theirs, (meta_ours, meta_theirs) = _cifar_models(ctx)
    inputs = [(x, t, torch.randn_like(x)) for x, t in _cifar_inputs(ctx, cfg, batch, size)]
    x_meta, t_meta = torch.empty(batch, cfg.in_channels, size, size, device="meta"), torch.empty(batch, device="meta")
    flops = {"difflab": count_flops(lambda: meta_ours(x_meta, t_meta).square().mean().backward()),
             "diffusers": count_flops(lambda: meta_theirs(x_meta, t_meta).sample.square().mean().backward())}

    def forward(impl, net, x, t):
        return net(x, t) if impl == "difflab" else net(x, t, return_dict=False)[0]

    def grads(impl, net, precision, cl):
        """The gradient of one step's loss, dropout off: what the variant computes, checked."""
        net.eval()
        x, t, noise = inputs[0]
        with autocast(precision, ctx.device):
            loss = (forward(impl, net, x.contiguous(memory_format=torch.channels_last) if cl else x, t).float() - noise).square().mean()
        g = torch.autograd.grad(loss, [p for p in net.parameters()])
        net.train()
        return torch.cat([v.flatten() for v in g])

    refs = {impl: grads(impl, m, "fp32", False) for impl, m in (("difflab", ours), ("diffusers", theirs))}

    def build(impl, cl=False, compile=None):
        def make():
            net = copy.deepcopy(ours if impl == "difflab" else theirs)
            if impl == "difflab":
                optimize(net, precision="fp32", channels_last=cl, compile=compile or False, compile_mode=ctx.compile_mode,
                         dynamic=False if compile == "regional" else None)  # static kernels per block shape
            else:
                if cl:
                    net.to(memory_format=torch.channels_last)
                if compile:
                    net = torch.compile(net, mode=ctx.compile_mode)
            net.train()
            return (impl, net, make_optimizer(net, "adamw"), cl), inputs
        return make

    def run(spec, x, t, noise):
        impl, net, opt, cl = spec
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with autocast("bf16", ctx.device):
            loss = (forward(impl, net, x, t).float() - noise).square().mean()
        loss.backward()
        opt.step()

    def check(spec, inputs_):
        impl, net, _, cl = spec
        return rel_err(grads(impl, net, "bf16", cl), refs[impl])

    variants = [
        ("difflab", "bf16 autocast eager", build("difflab"), ()),
        ("difflab", "bf16 autocast + channels_last + compile", build("difflab", cl=True, compile="full"), ("compile",)),
        ("difflab", "bf16 autocast + channels_last + regional compile", build("difflab", cl=True, compile="regional"), ("compile",)),
        ("diffusers", "bf16 autocast eager", build("diffusers"), ()),
        ("diffusers", "bf16 autocast + channels_last + compile", build("diffusers", cl=True, compile=True), ("compile",)),
    ]
    return [_variant(ctx, "cifar_train", impl, name, "img/s", flops[impl], b, run, None, needs=needs, rel=check)
            for impl, name, b, needs in variants]


def sd_step(ctx: Context) -> list[Result]:
    """SD1.5-size U-Net, one call at batch 2 (one image with CFG), ms."""
    from diffusers import UNet2DConditionModel

    cfg = SD_PRESETS["tiny" if ctx.quick else "sd1"]
    size, length = (8, 7) if ctx.quick else (64, 77)
    precision = "fp16" if ctx.device.type == "cuda" else "bf16"  # fp16 convolutions are slow or missing on the CPU
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    theirs = UNet2DConditionModel.from_config(cfg.to_diffusers_config()).to(ctx.device).eval()
    with torch.no_grad():  # diffusers zero-inits conv_out and proj_out: perturb, so nothing is checked on zeros
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = UNetSD(cfg).to(ctx.device).eval()
    ours.load_state_dict(theirs.state_dict())  # the same names: the same weights
    with torch.device("meta"):
        meta = UNetSD(cfg)
    flops = count_flops(lambda: meta(torch.empty(2, cfg.in_channels, size, size, device="meta"), torch.empty(2, device="meta"),
                                     context=torch.empty(2, length, cfg.cross_attention_dim, device="meta")))
    g = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(2, cfg.in_channels, size, size, generator=g).to(ctx.device),
               torch.tensor([999.0, 999.0]).to(ctx.device),
               torch.randn(2, length, cfg.cross_attention_dim, generator=g).to(ctx.device)) for _ in range(3)]
    with torch.no_grad():
        refs = {"difflab": ours(inputs[0][0], inputs[0][1], context=inputs[0][2]),
                "diffusers": theirs(*inputs[0], return_dict=False)[0]}
    parity = rel_err(refs["difflab"], refs["diffusers"])
    ctx.log(f"  sd_step: difflab vs diffusers, same weights, fp32: relative error {parity:.1e}")

    def ours_build(**kw):
        def build():
            net = optimize(copy.deepcopy(ours), precision=precision, compile_mode=ctx.compile_mode, **kw)
            return net, [(x, t, c.to(dtype)) for x, t, c in inputs]
        return build

    def ours_run(net, x, t, c):
        with torch.no_grad():
            return net(x, t, context=c)

    def theirs_build(cl=False, compile=False, mode=None, fuse=False):
        def build():
            net = copy.deepcopy(theirs).to(dtype)
            if fuse:
                net.fuse_qkv_projections()
            if cl:
                net.to(memory_format=torch.channels_last)
            if compile:
                net = torch.compile(net, mode=mode or ctx.compile_mode)
            return (net, cl), [(x.to(dtype), t, c.to(dtype)) for x, t, c in inputs]
        return build

    def theirs_run(spec, x, t, c):
        net, cl = spec
        with torch.no_grad():
            return net(x.contiguous(memory_format=torch.channels_last) if cl else x, t, c, return_dict=False)[0].float()

    cl = ctx.device.type == "cuda"
    variants = [
        ("difflab", f"{precision} eager, q/k/v unfused", ours_build(channels_last=False, fuse_qkv=False), ()),
        ("difflab", f"{precision} eager", ours_build(channels_last=False), ()),
        ("difflab", f"{precision} + channels_last + compile", ours_build(channels_last=cl, compile="full"), ("compile",)),
        ("difflab", f"{precision} + channels_last + compile + CUDA graphs",
         ours_build(channels_last=cl, compile="full", cuda_graphs=True), ("compile", "cuda")),
        ("difflab", f"{precision} + channels_last + compile + CUDA graphs + FP8 linears",
         ours_build(channels_last=cl, compile="full", cuda_graphs=True, fp8=True), ("compile", "cuda", "fp8")),
        ("diffusers", f"{precision} eager", theirs_build(), ()),
        ("diffusers", f"{precision} + channels_last + compile", theirs_build(cl=cl, compile=True), ("compile",)),
        ("diffusers", f"{precision} + channels_last + compile (reduce-overhead: CUDA graphs)",
         theirs_build(cl=cl, compile=True, mode="reduce-overhead"), ("compile", "cuda")),
        ("diffusers", f"{precision} + fused QKV + channels_last + compile (reduce-overhead: CUDA graphs)",
         theirs_build(cl=cl, compile=True, mode="reduce-overhead", fuse=True), ("compile", "cuda")),
    ]
    results = [_variant(ctx, "sd_step", impl, name, "ms", flops, b, ours_run if impl == "difflab" else theirs_run,
                        refs[impl], needs=needs) for impl, name, b, needs in variants]
    return [replace(r, note=(r.note + "; " if r.note else "") + f"fp32 parity with diffusers: {parity:.1e}") if r.impl == "difflab"
            and r.variant.endswith("eager") else r for r in results]


# ----------------------------------------------------------------------------------------------
# The run and its report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    n = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {n} thread{'s' if n > 1 else ''})"


def run_bench(*, quick: bool = False, device=None, workloads=WORKLOADS, compile: bool | None = None,
              compile_mode: str | None = None, iters: int | None = None, log=print) -> dict:
    """Run the workloads; returns ``dict(device=, torch=, diffusers=, date=, quick=, peak_flops=, results=[...])``."""
    import diffusers

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    if quick and device.type == "cuda":
        log("note: --quick runs tiny models; the figures say nothing about the GPU")
    compile = (not quick) if compile is None else compile
    peak = matmul_rate(device, quick)
    ctx = Context(device, quick, compile, compile_mode, warmup=1 if quick else 5, iters=iters or (2 if quick else 20),
                  peak=peak, log=log)
    log(f"difflab bench on {device_name(device)}: dense matmul {peak / 1e12:.1f} TFLOP/s")
    results, verbosity = [], diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its advice on casting with .to() would repeat for every variant
    try:
        for name in workloads:
            results += globals()[name](ctx)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "date": datetime.date.today().isoformat(), "quick": quick,
            "peak_flops": peak, "results": [asdict(r) for r in results]}


def _best(rows, impl, unit):
    values = [r["value"] for r in rows if r["impl"] == impl and r["value"] is not None]
    if not values:
        return None
    return max(values) if unit == "img/s" else min(values)


def format_report(report: dict) -> str:
    """The report as Markdown: one table per workload, then difflab's best against diffusers' best."""
    lines = [f"Device: **{report['device']}**; torch {report['torch']}, diffusers {report['diffusers']}, {report['date']}"
             + ("; **--quick smoke run (tiny models), not a performance figure**" if report["quick"] else "")
             + f". Dense matmul rate measured in the run: {report['peak_flops'] / 1e12:.2f} TFLOP/s (MFU is relative to it).", ""]
    for workload in WORKLOADS:
        rows = [r for r in report["results"] if r["workload"] == workload]
        if not rows:
            continue
        unit = rows[0]["unit"]
        lines += [f"**{workload}** ({unit}; error: relative L2 vs the same implementation's eager fp32)", "",
                  f"| implementation | variant | {unit} | MFU | error | note |", "| --- | --- | ---: | ---: | ---: | --- |"]
        for r in rows:
            v = "-" if r["value"] is None else (f"{r['value']:,.0f}" if unit == "img/s" else f"{r['value']:.2f}")
            mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
            err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}" + ("" if r["rel_err"] <= BF16_TOLERANCE or "FP8" in r["variant"] else " (over tolerance)")
            lines.append(f"| {r['impl']} | {r['variant']} | {v} | {mfu} | {err} | {r['note']} |")
        ours, theirs = _best(rows, "difflab", unit), _best(rows, "diffusers", unit)
        if ours is not None and theirs is not None:
            ratio = ours / theirs
            word = "faster" if (ratio > 1) == (unit == "img/s") else "slower"
            if report["quick"] or report["device_type"] != "cuda":
                lines += ["", f"Best difflab / best diffusers: {ratio:.2f}x ({word}); not evidence either way for the "
                              f"H100 target ({TARGETS[workload]})."]
            else:
                lines += ["", f"Best difflab / best diffusers: {ratio:.2f}x ({word}). Target on an H100: {TARGETS[workload]}."]
        lines.append("")
    return "\n".join(lines)


BEGIN, END = "<!-- difflab bench: begin -->", "<!-- difflab bench: end -->"


def record(report: dict, path="BENCHMARKS.md") -> Path:
    """Write the report as the section ``SECTION`` of ``path``, between its own begin and end
    markers, leaving the rest of the file as it is.

    The section keeps the raw results in an HTML comment, so recording some workloads again
    (one per run on a GPU) merges with the others recorded on the same device."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        found = re.search(r"<!-- difflab-bench (.*?) -->", text[start:end], re.S)
        old = json.loads(found.group(1)) if found else None
        if old and (old["device"], old["quick"]) == (report["device"], report["quick"]):
            redone = {r["workload"] for r in report["results"]}
            report = {**report, "results": [r for r in old["results"] if r["workload"] not in redone] + report["results"]}
    pending = ("" if report["device_type"] == "cuda" else " **The GPU figures are still to be measured:** this run "
               "had no GPU; on an H100 run `difflab bench --workloads <one> --record BENCHMARKS.md` per workload.")
    body = (f"{BEGIN}\n{SECTION}\n\nWritten by `difflab bench --record` (difflab/perf/bench.py).{pending}\n\n"
            + format_report(report).rstrip() + f"\n\n<!-- difflab-bench {json.dumps(report)} -->\n{END}")
    if start >= 0 and end > start:
        text = text[:start] + body + text[end + len(END):]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)
    return path


__all__ = ["run_bench", "format_report", "record", "ddpm_unet2d_config", "DDPM_CIFAR10", "WORKLOADS", "Result",
           "median_time", "matmul_rate", "count_flops", "rel_err", "randomize_zero_init", "BF16_TOLERANCE", "TARGETS"]
