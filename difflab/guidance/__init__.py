"""Guidance: wrappers that turn a denoiser into another denoiser ``D(x, sigma, **cond) -> x0_hat``.

Usage::

    guided = ClassifierFreeGuidance(denoiser, scale=4.0, uncond={"class_labels": null_label})
    x = sample_ddim(guided, x, sigmas, extra_args={"class_labels": labels})

    guided = ClassifierGuidance(uncond_denoiser, noisy_classifier, scale=2.0)      # class_labels -> classifier
    guided = SafetyGuidance(denoiser, noisy_classifier, unwanted_class=7, scale=1.0)
    guided = PerturbedAttentionGuidance(denoiser, scale=2.0)                         # or SelfAttentionGuidance
"""
from .as_input import GuidanceInput, takes_guidance_scale
from .attention import (PerturbedAttentionGuidance, SelfAttentionGuidance, find_self_attention, gaussian_blur,
                        identity_attention, record_attention, sag_mask, self_attention_modules)
from .cfg import ClassifierFreeGuidance, rescale
from .classifier import ClassifierConfig, ClassifierGuidance, NoisyClassifier, classifier_accuracy
from .inpaint import MaskChannels, check_mask, latent_mask, mask_channels, sample_repaint
from .safety import RewardGuidance, SafetyGuidance

__all__ = ["ClassifierFreeGuidance", "rescale", "GuidanceInput", "takes_guidance_scale",
           "ClassifierGuidance", "NoisyClassifier", "ClassifierConfig", "classifier_accuracy",
           "SafetyGuidance", "RewardGuidance",
           "PerturbedAttentionGuidance", "SelfAttentionGuidance", "identity_attention", "record_attention",
           "find_self_attention", "self_attention_modules", "sag_mask", "gaussian_blur",
           "sample_repaint", "MaskChannels", "check_mask", "latent_mask", "mask_channels"]
