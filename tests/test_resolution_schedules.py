"""Resolution-aware noise schedules: simple diffusion's shifted cosine (Hoogeboom et al. 2023,
eq. 4) and SD3's shift for flow (Esser et al. 2024, eq. 23), against their closed forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from difflab.core import grids, noise_levels, schedules
from difflab.core.denoiser import VPContinuous
from difflab.io.spec import build_frame

T = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)


def test_shifted_cosine_closed_form():
    for shift in (0.125, 1.0, 4.0):
        ab = schedules.shifted_cosine_alpha_bar(T, shift)
        # sigma(t) = shift tan(pi t / 2); log-SNR = -2 log tan(pi t / 2) - 2 log shift
        assert torch.allclose(schedules.sigma_from_alpha_bar(ab), shift * torch.tan(math.pi * T / 2), rtol=1e-10)
        assert torch.allclose(torch.logit(ab), -2 * torch.log(torch.tan(math.pi * T / 2)) - 2 * math.log(shift), atol=1e-9)
        assert torch.allclose(schedules.shifted_cosine_t(ab, shift), T, atol=1e-10)
    # shift 1 is the cosine schedule with offset s = 0
    assert torch.allclose(schedules.shifted_cosine_alpha_bar(T, 1.0), schedules.cosine_alpha_bar(T, s=0.0), atol=1e-12)


def test_log_snr_shift_is_two_log_base_over_size():
    base_ab = schedules.shifted_cosine_alpha_bar(T, schedules.resolution_shift(8, base=8))
    big_ab = schedules.shifted_cosine_alpha_bar(T, schedules.resolution_shift(64, base=8))
    assert torch.allclose(torch.logit(big_ab) - torch.logit(base_ab), torch.full_like(T, 2 * math.log(8 / 64)), atol=1e-9)


def test_shifted_schedule_keeps_the_pooled_noise_of_the_base_resolution():
    """The reason for the shift: a 64x64 image noised at the shifted level and average-pooled to
    8x8 carries the noise std of the 8x8 schedule at the same t, so one recipe serves both sizes."""
    g = torch.Generator().manual_seed(0)
    frame8 = VPContinuous("shifted_cosine", shift=schedules.resolution_shift(8, base=8))
    frame64 = VPContinuous("shifted_cosine", shift=schedules.resolution_shift(64, base=8))
    for t in (0.2, 0.5, 0.8):
        s8, s64 = float(frame8.sigma(t)), float(frame64.sigma(t))
        pooled = F.avg_pool2d(s64 * torch.randn(64, 1, 64, 64, generator=g, dtype=torch.float64), 8)
        assert pooled.std().item() == pytest.approx(s8, rel=0.03)
        assert s64 == pytest.approx(8 * s8, rel=1e-12)


def test_vp_frame_from_a_spec_with_a_shift():
    frame = build_frame({"frame": "vp", "schedule": "shifted_cosine", "shift": 2.0, "prediction": "v"})
    sig = torch.tensor([0.05, 0.5, 3.0, 40.0], dtype=torch.float64)
    assert torch.allclose(frame.sigma(frame.time(sig)), sig, rtol=1e-9)
    assert float(frame.sigma(torch.tensor(0.5))) == pytest.approx(2.0, rel=1e-12)  # shift * tan(pi / 4)
    with pytest.raises(ValueError, match="shift"):
        schedules.shifted_cosine_alpha_bar(T, 0.0)
    with pytest.raises(ValueError, match="size"):
        schedules.resolution_shift(0)


def test_sd3_shift_is_sigma_times_shift():
    """SD3's t' = a t / (1 + (a - 1) t) is sigma' = a sigma, in the grid and in training."""
    a = schedules.resolution_shift(128, base=64)
    shifted, plain = grids.flow_sigmas(10, shift=a), grids.flow_sigmas(10)
    assert torch.allclose(shifted[1:], a * plain[1:], rtol=1e-12)  # the first level is clamped (t = 1)
    u = noise_levels.logit_normal(1000, generator=torch.Generator().manual_seed(3))
    v = noise_levels.logit_normal(1000, generator=torch.Generator().manual_seed(3), shift=a)
    t = u / (1 + u)
    t_shift = a * t / (1 + (a - 1) * t)
    assert torch.allclose(v, t_shift / (1 - t_shift), rtol=1e-10)
    assert torch.allclose(v, a * u, rtol=1e-12)
