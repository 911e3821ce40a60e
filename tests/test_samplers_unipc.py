"""UniPC: against diffusers step by step, its orders of convergence (UniC adds one), and its edge cases."""
import math

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from test_samplers_dpm import F64, MIXTURE, T, diffusers_steps, exact_gaussian, orders

from difflab.core import grids
from difflab.oracle import GaussianMixture
from difflab.samplers import sample_ddim
from difflab.samplers.dpm_solver import sample_dpmpp_2m
from difflab.samplers.unipc import SAMPLERS, sample_unipc, unipc_weights

# diffusers warns about its own deprecations (and numpy 2 ones when given float64 schedules)
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers.*")]

PARITY = [  # order, variant, prediction, spacing, steps, final sigma, disable_corrector, lower_order_final
    (1, "bh2", "epsilon", "linspace", 10, "zero", [], True),
    (2, "bh2", "epsilon", "linspace", 10, "zero", [], True),
    (2, "bh1", "v_prediction", "trailing", 12, "sigma_min", [], True),  # bh1: diffusers' step to 0 is NaN (B = -inf)
    (3, "bh2", "v_prediction", "leading", 16, "zero", [], True),
    (3, "bh1", "epsilon", "linspace", 8, "sigma_min", [], True),
    (2, "bh2", "epsilon", "linspace", 10, "zero", [0, 1, 5], True),
    (3, "bh2", "epsilon", "trailing", 10, "sigma_min", [], False),
    (3, "bh2", "epsilon", "linspace", 10, "zero", list(range(10)), True),  # the corrector off: UniP alone
    (4, "bh2", "epsilon", "linspace", 12, "zero", [], True),
    (4, "bh1", "v_prediction", "trailing", 12, "sigma_min", [2], False),
]


@pytest.mark.parametrize("order,variant,prediction,spacing,steps,final,disable,lower_order_final", PARITY)
def test_unipc_matches_diffusers(monkeypatch, order, variant, prediction, spacing, steps, final, disable,
                                 lower_order_final):
    sched = UniPCMultistepScheduler(num_train_timesteps=T, solver_order=order, solver_type=variant,
                                    prediction_type=prediction, timestep_spacing=spacing, final_sigmas_type=final,
                                    disable_corrector=disable, lower_order_final=lower_order_final)
    kw = dict(order=order, variant=variant, lower_order_final=lower_order_final)
    kw.update(corrector=False) if disable == list(range(steps)) else kw.update(disable_corrector=disable)
    errors, _ = diffusers_steps(sched, lambda *a, **k: sample_unipc(*a, **kw, **k), steps, prediction, monkeypatch)
    assert max(errors) < 1e-10, errors


def test_weights_solve_the_order_conditions():
    """a solves sum_k a_k r_k^(i-1) = g_i = i! z phi_{i+1}(z) / B(h), z = -h (Zhao et al. 2023,
    Algorithms 1-2, data prediction), with phi_k(z) = int_0^1 e^((1-t) z) t^(k-1) / (k-1)! dt
    computed here by quadrature; UniP-2 and UniC-1 use a = 1/2 instead."""
    h = 0.3
    z = -h
    t, w = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(30))
    t, w = (t + 1) / 2, w / 2
    phi = lambda k: float((w * torch.exp((1 - t) * z) * t ** (k - 1)).sum()) / math.factorial(k - 1)  # noqa: E731
    for variant, B_ref in (("bh1", z), ("bh2", math.expm1(z))):
        for rks in ([-0.8, -1.7, -2.5, 1.0], [-0.8, -1.7, 1.0], [-0.8, -1.7], [-0.8, 1.0]):  # UniC-4, -3, UniP-3, UniC-2
            B, a = unipc_weights(rks, h, variant)
            assert B == pytest.approx(B_ref, rel=1e-14)
            for i in range(1, len(rks) + 1):
                g_i = math.factorial(i) * z * phi(i + 1) / B
                assert sum(ak * rk ** (i - 1) for ak, rk in zip(a, rks)) == pytest.approx(g_i, rel=1e-10)
        assert unipc_weights([1.0], h, variant)[1] == [0.5] and unipc_weights([-0.8], h, variant)[1] == [0.5]


def test_unip_2_with_b2_is_dpm_solver_pp_2m():
    """Without the corrector, UniP-2 with B2(h) and a = 1/2 is DPM-Solver++(2M) (midpoint);
    UniP-1 is DDIM."""
    denoiser, x, _ = MIXTURE
    sigmas = grids.karras_sigmas(20, 0.01, 80.0)
    torch.testing.assert_close(sample_unipc(denoiser, x, sigmas, order=2, corrector=False),
                               sample_dpmpp_2m(denoiser, x, sigmas), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample_unipc(denoiser, x, sigmas, order=1, corrector=False),
                               sample_ddim(denoiser, x, sigmas), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sample_unipc(denoiser, x, sigmas, order=2), sample_dpmpp_2m(denoiser, x, sigmas), rtol=1e-6)


ORDERS = [  # order, variant, corrector, steps, expected band: UniC raises the order by one
    (1, "bh1", False, (16, 32, 64), (0.8, 1.3)),
    (1, "bh1", True, (16, 32, 64), (1.7, 2.4)),
    (1, "bh2", True, (16, 32, 64), (1.7, 2.4)),
    (2, "bh1", True, (16, 32, 64), (2.5, 3.5)),
    (2, "bh2", False, (16, 32, 64), (1.7, 2.4)),
    (2, "bh2", True, (16, 32, 64), (2.5, 3.5)),
    (3, "bh2", True, (32, 64, 128), (2.5, 4.5)),
    (3, "bh1", False, (16, 32, 64), (2.5, 4.5)),
    (4, "bh2", False, (48, 96, 192), (3.5, 4.5)),
    (4, "bh2", True, (48, 96, 192), (4.5, 5.5)),
]


@pytest.mark.parametrize("order,variant,corrector,ns,band", ORDERS)
def test_order_of_convergence_on_the_gaussian(order, variant, corrector, ns, band):
    denoiser, x, exact = exact_gaussian(80.0)
    errors, p = orders(sample_unipc, denoiser, x, exact, 80.0, ns, order=order, variant=variant, corrector=corrector,
                       lower_order_final=False)
    assert all(band[0] < q < band[1] for q in p), (errors, p)


@pytest.mark.parametrize("order,variant,band", [(1, "bh2", (1.7, 2.4)), (2, "bh1", (2.5, 3.5)), (2, "bh2", (2.5, 3.5)),
                                                (3, "bh2", (2.5, 6.0))])
def test_order_of_convergence_on_a_gaussian_mixture(order, variant, band):
    denoiser, x, exact = MIXTURE
    errors, p = orders(sample_unipc, denoiser, x, exact, 80.0, (32, 64, 128), order=order, variant=variant,
                       lower_order_final=False)
    assert band[0] < p[-1] < band[1], (errors, p)


def test_starting_mid_grid_from_the_exact_state():
    # the warm-up UniP-1 + UniC-1 step is second order, so UniPC-2 keeps its third order mid-grid
    denoiser, x, exact = exact_gaussian(2.0)
    errors, p = orders(sample_unipc, denoiser, x, exact, 2.0, (16, 32, 64), order=2, lower_order_final=False)
    assert all(2.5 < q < 3.5 for q in p) and errors[-1] < 1e-4, (errors, p)


def test_one_evaluation_per_step_step_to_zero_and_lower_order_final():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    for variant in ("bh1", "bh2"):
        calls, steps = [], []
        out = sample_unipc(lambda x_, s: calls.append(s) or gm.denoiser(x_, s), x, grids.karras_sigmas(6, 0.01, 3.0),
                           order=3, variant=variant, callback=steps.append)
        assert len(calls) == 6 and torch.equal(out, steps[-1]["denoised"]) and torch.isfinite(out).all()
        assert torch.equal(sample_unipc(gm.denoiser, x, torch.tensor([3.0, 0.0]), variant=variant), gm.denoiser(x, 3.0))
    # lower_order_final (diffusers' rule: whatever the number of steps) makes the last step UniP-1
    sigmas = grids.exponential_sigmas(20, 0.01, 3.0)[:-1]
    a, b = [], []
    sample_unipc(gm.denoiser, x, sigmas, order=3, callback=a.append)
    sample_unipc(gm.denoiser, x, sigmas, order=3, lower_order_final=False, callback=b.append)
    assert all(torch.equal(s["x"], t["x"]) for s, t in zip(a[:-2], b[:-2]))
    assert not torch.allclose(a[-2]["x"], b[-2]["x"], rtol=1e-8) and not torch.allclose(a[-1]["x"], b[-1]["x"], rtol=1e-8)


def test_float32_extra_args_and_bad_arguments():
    gm = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    x = torch.randn(4, 2)
    out = SAMPLERS["unipc"](lambda x_, s, *, c: gm.denoiser(x_, s), x, grids.karras_sigmas(4, 0.1, 1.0),
                            extra_args={"c": 1}, progress=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    for bad in ([1.0, 2.0, 0.0], [2.0, float("nan"), 0.0], []):
        with pytest.raises(ValueError, match="sigmas"):
            sample_unipc(gm.denoiser, x, torch.tensor(bad))
    with pytest.raises(ValueError, match="variant"):
        sample_unipc(gm.denoiser, x, torch.tensor([1.0, 0.0]), variant="bh3")
    with pytest.raises(ValueError, match="order"):
        sample_unipc(gm.denoiser, x, torch.tensor([1.0, 0.0]), order=5)
