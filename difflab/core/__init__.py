"""The diffusion core: schedules, frames and the denoiser contract, grids, training noise levels."""
from . import grids, noise_levels, params, schedules
from .consistency import ConsistencyFunction
from .denoiser import EDM, FRAMES, VE, Denoiser, Flow, VPContinuous, VPDiscrete, append_dims, learned_log_variance
from .forward import flow_sample, noise_augment, q_posterior, q_sample, ve_posterior, ve_sample
from .rng import SampleNoise, sample_seed

__all__ = [
    "grids", "noise_levels", "params", "schedules", "Denoiser", "VPDiscrete", "VPContinuous", "VE", "EDM", "Flow",
    "FRAMES", "append_dims", "ConsistencyFunction", "learned_log_variance", "q_sample", "q_posterior", "ve_sample", "ve_posterior", "flow_sample", "noise_augment", "SampleNoise", "sample_seed",
]
