"""Guidance: wrappers that turn a denoiser into another denoiser ``D(x, sigma, **cond) -> x0_hat``.

Usage::

    guided = ClassifierFreeGuidance(denoiser, scale=4.0, uncond={"class_labels": null_label})
    x = sample_ddim(guided, x, sigmas, extra_args={"class_labels": labels})
"""
from .cfg import ClassifierFreeGuidance, rescale

__all__ = ["ClassifierFreeGuidance", "rescale"]
