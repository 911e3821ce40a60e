"""Evaluation: the Frechet distance and the digits judge."""
from .frechet import feature_stats, frechet_distance, frechet_distance_features, trace_sqrt_product
from .judge import DigitsJudge, FitConfig, JudgeConfig, judge_report

__all__ = [
    "feature_stats", "frechet_distance", "frechet_distance_features", "trace_sqrt_product",
    "DigitsJudge", "JudgeConfig", "FitConfig", "judge_report",
]
