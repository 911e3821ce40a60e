"""Performance tooling: ``optimize`` (precision, channels_last, compile, CUDA graphs, fused QKV,
FP8), memory planning (``estimate_memory``) and ``difflab bench``; networks know nothing of it."""
from .fast import FastConfig, optimize
from .memory import estimate_memory

__all__ = ["FastConfig", "optimize", "estimate_memory"]
