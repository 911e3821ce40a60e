"""Objectives for :func:`difflab.train.fit`, one file per concept (see :mod:`difflab.train.objective`)."""
from .classification import Classification, random_shift
from .classifier import NoisyClassification, train_classifier
from .consistency import ConsistencyDistillation, ConsistencyTraining
from .diffusion import DiffusionObjective, draw_diffusion
from .dreambooth import SubjectObjective
from .vae import VAEObjective

__all__ = ["DiffusionObjective", "draw_diffusion", "SubjectObjective", "NoisyClassification", "train_classifier",
           "Classification", "random_shift", "VAEObjective", "ConsistencyDistillation", "ConsistencyTraining"]
