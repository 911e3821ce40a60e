"""DPM-Solver++ SDE samplers (2M, 3M): multistep solvers of the reverse diffusion SDE, in the
canonical frame x = x0 + sigma eps.

The stochastic step from sigma_s to sigma_t (h = log(sigma_s / sigma_t)) solves the linear part
of the SDE exactly and Taylor-expands the data prediction, with the noise injected at rate eta
(eta = 1 is the reverse SDE, eta = 0 the probability-flow ODE)::

    x_t = (sigma_t / sigma_s) e^(-eta h) x_s + (1 - e^(-(1+eta) h)) D0 + c1 D1 [+ c2 D2]
          + s_noise * sigma_t sqrt(1 - e^(-2 eta h)) z

(Lu et al. 2022b, DPM-Solver++, the SDE variant "SDE-DPM-Solver++(2M)" added to diffusers by the
authors as ``algorithm_type="sde-dpmsolver++"``; k-diffusion's ``sample_dpmpp_2m_sde`` and
``sample_dpmpp_3m_sde``). The arithmetic is :func:`difflab.samplers.dpm_solver.dpm_update` with
``eta``; the loop is :func:`difflab.samplers.dpm_solver.sample_dpm_multistep`.

``noise`` is either the contract's plain callable ``noise()`` (independent draws per step;
:class:`difflab.core.SampleNoise` for per-sample determinism; ``None`` means ``torch.randn_like``)
or a :class:`difflab.samplers.brownian.BrownianTreeNoise`, queried as ``noise(sigma, sigma_next)``
so that refining the grid refines the same Brownian path (k-diffusion's default). No noise is
drawn on the step to sigma = 0, which returns the denoised estimate.

Third order: diffusers 0.42's ``sde-dpmsolver++`` with ``solver_order=3`` weights D2 by
(1 - e^(-2h) - 2h) / (2h)^2 - 1/2, about -1, where the expansion gives + 1/2 (about h/3, as in
k-diffusion and in the ODE's third-order step); difflab follows k-diffusion.
"""
from __future__ import annotations

from .dpm_solver import sample_dpm_multistep


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
                        noise=None, **kwargs):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, SDE-DPM-Solver++(2M); diffusers'
    ``sde-dpmsolver++``, k-diffusion's ``sample_dpmpp_2m_sde``): 1 NFE per step, stochastic.
    ``solver_type`` "midpoint" or "heun" weights the D1 term; ``eta`` scales the injected noise
    (eta = 0: DPM-Solver++(2M)). Other keywords: :func:`~difflab.samplers.dpm_solver.sample_dpm_multistep`
    (``lower_order_final=False`` is k-diffusion's behaviour)."""
    return sample_dpm_multistep(denoiser, x, sigmas, order=2, predict_x0=True, solver_type=solver_type, eta=eta,
                                s_noise=s_noise, noise=noise, **kwargs)


def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, eta: float = 1.0, s_noise: float = 1.0, noise=None, **kwargs):
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``; third-order analogue of
    Lu et al. 2022b's SDE-DPM-Solver++(2M)): 1 NFE per step, stochastic. Keywords as
    :func:`sample_dpmpp_2m_sde`."""
    return sample_dpm_multistep(denoiser, x, sigmas, order=3, predict_x0=True, eta=eta, s_noise=s_noise, noise=noise,
                                **kwargs)


SAMPLERS = {"dpmpp_2m_sde": sample_dpmpp_2m_sde, "dpmpp_3m_sde": sample_dpmpp_3m_sde}
