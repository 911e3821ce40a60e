"""Evaluation: feature extractors, metrics (FID, KID, IS, precision/recall, CLIP score, CLIP-FID),
reference statistics, the harness behind `difflab eval`, and the digits judge."""
from .frechet import feature_stats, frechet_distance, frechet_distance_features, trace_sqrt_product
from .judge import DigitsJudge, FitConfig, JudgeConfig, judge_report
from .features import EXTRACTORS, FeatureExtractor, JudgeFeatures, extract, extractor_identity, load_extractor
from .default_judge import load_judge
from .metrics import (clip_fid, clip_score, fid, inception_score, kid, knn_radii, mmd2_unbiased, polynomial_kernel,
                      precision_recall)
from .stats import FeatureStats, compute_stats, describe_source, load_images
from .memorization import Memorization, memorization
from .harness import DEFAULT_METRICS, METRICS, check_metrics, evaluate, is_checkpoint

__all__ = [
    "feature_stats", "frechet_distance", "frechet_distance_features", "trace_sqrt_product",
    "DigitsJudge", "JudgeConfig", "FitConfig", "judge_report",
    "FeatureExtractor", "EXTRACTORS", "JudgeFeatures", "extract", "extractor_identity", "load_extractor", "load_judge",
    "fid", "clip_fid", "kid", "mmd2_unbiased", "polynomial_kernel", "inception_score", "precision_recall", "knn_radii",
    "clip_score",
    "FeatureStats", "compute_stats", "describe_source", "load_images",
    "memorization", "Memorization",
    "evaluate", "check_metrics", "is_checkpoint", "METRICS", "DEFAULT_METRICS",
]
