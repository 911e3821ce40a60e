"""Training: one loop (:func:`fit`) for every objective; per-example losses, EMA, checkpoints."""
from .augment import NoiseConditioningAugmentation
from .distributed import PARALLELS, init_distributed
from .ema import EMA
from .losses import (NOISE_LEVELS, SIGMA_BIN_EDGES, WEIGHTINGS, SigmaBinnedLoss, default_noise_level, diffusion_loss,
                     draw_sigmas, loss_by_sigma_bins, loss_weight)
from .interrupt import TrainingInterrupted
from .loop import LOSSES, LR_SCHEDULES, TrainConfig, TrainingDivergedError, TrainState, fit, lr_at
from .run_folder import RunLockedError
from .objective import Objective
from .objectives import (Classification, ConsistencyDistillation, ConsistencyTraining, DiffusionObjective,
                         GuidedDistillation, LatentConsistencyDistillation, NoisyClassification, ProgressiveDistillation, Reflow, Regression, SubjectObjective,
                         VAEObjective, guided_progressive_distillation, progressive_distillation, reflow_pairs,
                         train_classifier)
from .objectives.diffusion import draw_batch, train
from .dreambooth import DreamBoothConfig, dreambooth, prior_preservation_loss
from .vae_loss import PatchDiscriminator, adaptive_weight, discriminator_loss, hinge_discriminator_loss, vae_loss
from .textual_inversion import TextualInversionConfig, textual_inversion
from .vlb import hybrid_loss, hybrid_terms, vlb_loss

__all__ = [
    "EMA", "diffusion_loss", "loss_weight", "WEIGHTINGS", "NOISE_LEVELS", "default_noise_level", "draw_sigmas",
    "SIGMA_BIN_EDGES", "SigmaBinnedLoss", "loss_by_sigma_bins", "TrainConfig", "TrainState", "TrainingDivergedError",
    "TrainingInterrupted", "RunLockedError", "fit", "lr_at", "LR_SCHEDULES", "Objective", "DiffusionObjective", "SubjectObjective", "NoisyClassification",
    "Classification", "Regression", "VAEObjective", "train_classifier", "ProgressiveDistillation", "progressive_distillation",
    "GuidedDistillation", "guided_progressive_distillation", "Reflow", "reflow_pairs", "ConsistencyDistillation",
    "ConsistencyTraining", "LatentConsistencyDistillation",
    "draw_batch", "train", "LOSSES", "hybrid_loss", "hybrid_terms", "vlb_loss", "vae_loss", "PatchDiscriminator",
    "adaptive_weight", "discriminator_loss", "hinge_discriminator_loss", "PARALLELS", "init_distributed",
    "NoiseConditioningAugmentation", "DreamBoothConfig", "dreambooth", "prior_preservation_loss", "TextualInversionConfig", "textual_inversion",
]
