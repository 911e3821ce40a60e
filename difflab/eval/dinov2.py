"""DINOv2 features (Oquab et al. 2023) for FD-DINOv2, the Frechet distance in DINOv2 ViT-L/14
space that Stein et al. 2023 ("Exposing flaws of generative model evaluation metrics") proposed
and EDM2 (Karras et al. 2024) reports, through transformers' ``Dinov2Model`` from a local folder.

Features are the CLS token after the final layer norm (``pooler_output``; the torch.hub model's
``forward``, 1024-d for ViT-L/14). Preprocessing is EDM2's ``DINOv2Detector`` (its fast "torch"
mode, which it reports to give almost the same numbers as dgm-eval's PIL path): resize the whole
image to 224x224 with antialiased bicubic interpolation (no crop, no clamp), scale to [0, 1],
normalise with ImageNet's mean and std.

Not verified here against real weights: the hub model and transformers' port should agree, but
their position-embedding interpolation (518 -> 224 pixels) is implemented separately in each.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .clip import check_model_folder, resize_crop_normalize, to_rgb01

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224


def dinov2_preprocess(images01: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] -> DINOv2's ``pixel_values`` by EDM2's recipe."""
    return resize_crop_normalize(images01, (INPUT_SIZE, INPUT_SIZE), None, IMAGENET_MEAN, IMAGENET_STD, clamp=False)


class DINOv2Features(nn.Module):
    """``extractor(images)`` -> DINOv2 CLS features (N, hidden_size) for images (N, 1 or 3, H, W)
    in [-1, 1]; ``model_dir``: a local transformers DINOv2 folder (e.g. a saved facebook/dinov2-large)."""

    def __init__(self, model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import Dinov2Model

        self.model_dir = check_model_folder(model_dir, "DINOv2 model", "Dinov2Model")
        self.model = Dinov2Model.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.name = f"dinov2-{self.model_dir.resolve().name}"
        self.preprocessing = (f"grey -> RGB; [-1, 1] -> [0, 1]; bicubic antialiased resize to {INPUT_SIZE}x{INPUT_SIZE} "
                              "(no clamp, no crop); normalise with ImageNet mean/std (EDM2)")

    def train(self, mode: bool = True):  # always in eval mode
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> DINOv2's ``pixel_values`` by EDM2's recipe."""
        p = next(self.model.parameters())
        return dinov2_preprocess(to_rgb01(images.to(device=p.device, dtype=p.dtype)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """CLS features after the final layer norm, (N, hidden_size)."""
        return self.model(pixel_values=self.preprocess(images)).pooler_output


def load_dinov2(path: str | Path | None, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> DINOv2Features:
    """The ``"dinov2"`` extractor of :data:`difflab.eval.features.EXTRACTORS`, from a local folder."""
    if path is None:
        raise FileNotFoundError("the DINOv2 extractor needs a local transformers DINOv2 folder "
                                "(e.g. a saved facebook/dinov2-large, --clip-dir on the command line); none was given")
    return DINOv2Features(path, device=device, dtype=dtype)
