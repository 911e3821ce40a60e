"""Performance tooling: ``optimize`` (precision, channels_last, compile, CUDA graphs, fused QKV,
FP8), FP8 training (``swap_fp8_training``), memory planning (``estimate_memory``) and ``difflab
bench``; networks know nothing of it."""
from .fast import FastConfig, optimize
from .fp8 import swap_fp8_training
from .memory import estimate_memory

__all__ = ["FastConfig", "optimize", "swap_fp8_training", "estimate_memory"]
