"""Pipelines: short functions with numbered stages that turn a request into images."""
from .class_to_image import generate

__all__ = ["generate"]
