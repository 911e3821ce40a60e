"""Objectives for :func:`difflab.train.fit`, one file per concept (see :mod:`difflab.train.objective`)."""
from .classification import Classification, random_shift
from .centroid_motion import CentroidMotionObjective, centroid_velocity_loss
from .classifier import NoisyClassification, train_classifier
from .consistency import ConsistencyDistillation, ConsistencyTraining
from .diffusion import DiffusionObjective, draw_diffusion
from .dreambooth import SubjectObjective
from .guided import GuidedDistillation, guided_progressive_distillation, guided_student
from .motion import MotionObjective, geometric_losses
from .lcm import LatentConsistencyDistillation, apply_lcm_lora, lcm_lora_student, lcm_student, save_lcm_lora
from .progressive import DistilledRound, ProgressiveDistillation, progressive_distillation
from .regression import Regression
from .reflow import Reflow, reflow_pairs, straightness
from .vae import VAEObjective

__all__ = ["DiffusionObjective", "draw_diffusion", "SubjectObjective", "NoisyClassification", "train_classifier",
           "Classification", "random_shift", "Regression", "VAEObjective", "ProgressiveDistillation", "progressive_distillation",
           "DistilledRound", "GuidedDistillation", "guided_progressive_distillation", "guided_student", "Reflow", "reflow_pairs",
           "straightness", "ConsistencyDistillation", "ConsistencyTraining", "LatentConsistencyDistillation", "lcm_student",
           "lcm_lora_student", "save_lcm_lora", "apply_lcm_lora", "MotionObjective", "geometric_losses",
           "CentroidMotionObjective", "centroid_velocity_loss"]
