"""Parameterizations: what a network predicts, and the conversions between all of them.

A noisy sample in any frame is ``x = alpha * x0 + sigma * eps`` (VP: alpha^2 + sigma^2 = 1;
VE: alpha = 1; flow: alpha = 1 - t, sigma = t). A network may predict

- ``eps``:  the noise (Ho et al. 2020, eq. 11)
- ``x0``:   the clean sample
- ``v``:    v = alpha * eps - sigma * x0 (Salimans & Ho 2022, section 4; generalised here as
            the velocity of the angle parameterization for any alpha, sigma)
- ``score``: grad log p(x) = -eps / sigma (Song et al. 2021, eq. 8 for Gaussian perturbations)
- ``flow``: the rectified-flow velocity u = eps - x0 (Liu et al. 2023, eq. 1)
- ``edm``:  EDM's F_theta with D = c_skip x + c_out F, in EDM's frame where alpha = c_in
            (Karras et al. 2022, eq. 7 and Table 1); needs ``sigma_data``.

Every conversion goes through the pair (x0, eps): :func:`to_x0_eps` decodes a prediction,
:func:`from_x0_eps` encodes one. All functions broadcast ``alpha`` and ``sigma``.
"""
from __future__ import annotations

import torch

PREDICTIONS = ("eps", "x0", "v", "score", "flow", "edm")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is unknown; choose one of {list(PREDICTIONS)}")
    return prediction


def to_x0_eps(pred: torch.Tensor, prediction: str, x: torch.Tensor, alpha, sigma, sigma_data: float = 0.5):
    """Decode a network output into (x0, eps) given the noisy input ``x = alpha x0 + sigma eps``."""
    check_prediction(prediction)
    if prediction == "eps":
        eps = pred
        x0 = (x - sigma * eps) / alpha
    elif prediction == "x0":
        x0 = pred
        eps = (x - alpha * x0) / sigma
    elif prediction == "v":
        # v = alpha eps - sigma x0 and x = alpha x0 + sigma eps  =>  solve the 2x2 rotation.
        norm = alpha**2 + sigma**2
        x0 = (alpha * x - sigma * pred) / norm
        eps = (sigma * x + alpha * pred) / norm
    elif prediction == "score":
        eps = -sigma * pred
        x0 = (x - sigma * eps) / alpha
    elif prediction == "flow":
        # u = eps - x0  =>  x = (alpha + sigma) x0 + sigma u
        x0 = (x - sigma * pred) / (alpha + sigma)
        eps = pred + x0
    else:  # edm: x0 = c_skip x_ve + c_out F with c_skip = sd^2 alpha^2, c_out = sd sigma (EDM frame)
        x0 = sigma_data**2 * alpha * x + sigma_data * sigma * pred
        eps = (x - alpha * x0) / sigma
    return x0, eps


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, prediction: str, alpha, sigma, sigma_data: float = 0.5):
    """Encode (x0, eps) as the target a network of ``prediction`` type should output."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "score":
        return -eps / sigma
    if prediction == "flow":
        return eps - x0
    # edm: F = (x0 - c_skip x_ve) / c_out, x_ve = x / alpha
    x = alpha * x0 + sigma * eps
    return (x0 - sigma_data**2 * alpha * x) / (sigma_data * sigma)


def convert(pred: torch.Tensor, source: str, target: str, x: torch.Tensor, alpha, sigma, sigma_data: float = 0.5):
    """Convert a prediction of type ``source`` into type ``target`` at the same (x, alpha, sigma)."""
    x0, eps = to_x0_eps(pred, source, x, alpha, sigma, sigma_data)
    return from_x0_eps(x0, eps, target, alpha, sigma, sigma_data)


def x0_error_scale(prediction: str, alpha, sigma, sigma_data: float = 0.5):
    """The factor k with |x0_hat - x0| = k |pred_hat - pred| at fixed x, so that a weight on the
    x0 error becomes a weight on the network's own error (k^2 multiplies squared errors).
    Used by min-SNR weighting (Hang et al. 2023, section 3.4)."""
    check_prediction(prediction)
    if prediction == "eps":
        return sigma / alpha
    if prediction == "x0":
        return torch.ones_like(torch.as_tensor(sigma * alpha))
    if prediction == "v":
        return sigma / (alpha**2 + sigma**2)
    if prediction == "score":
        return sigma**2 / alpha
    if prediction == "flow":
        return sigma / (alpha + sigma)
    return sigma_data * sigma  # edm: c_out
