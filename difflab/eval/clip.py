"""CLIP's image and text encoders (Radford et al. 2021), through transformers, from a local folder:
the image embeddings for CLIP-FID (Kynkaanniemi et al. 2023, FID in CLIP space) and both towers
for the CLIP score (Hessel et al. 2021, eq. 1: w * max(cos(E_I, E_C), 0)).

``CLIPFeatures(folder)(images)`` returns the *projected, unnormalised* image embeddings
``visual_projection(pooler_output)`` (transformers' ``get_image_features``; OpenAI CLIP's
``encode_image``), which is what CLIP-FID fits Gaussians to (clean-fid and torch-fidelity do the
same); ``encode_text`` likewise returns unnormalised ``get_text_features``. The CLIP score
normalises both itself (cosine).

Preprocessing is transformers' ``CLIPImageProcessor`` done in torch on the batch: resize the
shortest side to 224 (bicubic, antialiased: PIL's filter), centre-crop 224x224, normalise with
CLIP's mean and std; the sizes, mean and std come from the folder's ``preprocessor_config.json``
when it has one. It differs from the PIL path by PIL's 8-bit rounding only (a few 1e-3 of the
normalised range; tests/test_clip_features.py measures it).

Nothing is downloaded: the folder is read with ``local_files_only=True`` (so ``HF_HUB_OFFLINE`` is
moot); a missing folder or file raises ``FileNotFoundError`` naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt")


def resize_crop_normalize(images01: torch.Tensor, size: int | tuple[int, int], crop: int | None,
                          mean, std, *, clamp: bool = True) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] -> bicubic antialiased resize (``size`` an int: the shortest
    side, the longer one ``int(size * long / short)`` as transformers and torchvision compute it;
    a pair: exactly (h, w)), clamped to [0, 1] if ``clamp`` (as an 8-bit image would be), centre
    crop to ``crop`` x ``crop`` (None: no crop), then ``(x - mean) / std`` per channel."""
    h, w = images01.shape[-2:]
    if isinstance(size, int):
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        size = (size, new_long) if h <= w else (new_long, size)
    x = images01 if (h, w) == tuple(size) else F.interpolate(images01, size=size, mode="bicubic", antialias=True,
                                                            align_corners=False)
    if clamp:
        x = x.clamp(0, 1)
    if crop is not None:
        h, w = x.shape[-2:]
        if h < crop or w < crop:
            raise ValueError(f"cannot centre-crop {crop}x{crop} from {h}x{w}")
        top, left = (h - crop) // 2, (w - crop) // 2    # transformers' and torchvision's rounding
        x = x[..., top:top + crop, left:left + crop]
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def to_rgb01(images: torch.Tensor) -> torch.Tensor:
    """(N, 1 or 3, H, W) in [-1, 1] -> (N, 3, H, W) in [0, 1] (grey repeated to RGB)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    x = (images + 1) / 2
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def check_model_folder(folder: str | Path, what: str, example: str) -> Path:
    """``FileNotFoundError`` naming what is missing unless ``folder`` holds a transformers model
    (``config.json`` and a weights file); never looks anything up online."""
    folder = Path(folder)
    how = (f"difflab never downloads models: save one once with transformers, e.g. "
           f"{example}.from_pretrained(name).save_pretrained(folder) (and the processor/tokenizer), then pass that folder "
           "(--clip-dir on the command line)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found at {folder}; {how}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {folder} has no config.json; {how}")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{what} folder {folder} has no weights (one of {', '.join(WEIGHT_FILES)}); {how}")
    return folder


def read_preprocessor_config(folder: Path) -> dict:
    """The folder's ``preprocessor_config.json`` (an empty dict without one)."""
    path = folder / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _edge(value, key: str) -> int | None:
    """transformers writes sizes as an int or a dict ({"shortest_edge": s} / {"height": h, ...})."""
    if value is None or isinstance(value, int):
        return value
    return value.get(key, value.get("height"))


class CLIPFeatures(nn.Module):
    """CLIP embeddings: ``extractor(images)`` -> image embeddings (N, projection_dim) for images
    (N, 1 or 3, H, W) in [-1, 1]; ``extractor.encode_text(prompts)`` -> text embeddings. Both are
    unnormalised (see the module docstring). ``model_dir``: a local transformers CLIP folder."""

    def __init__(self, model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import CLIPModel

        self.model_dir = check_model_folder(model_dir, "CLIP model", "CLIPModel")
        self.model = CLIPModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        cfg = read_preprocessor_config(self.model_dir)
        image_size = self.model.config.vision_config.image_size
        self.size = _edge(cfg.get("size"), "shortest_edge") or image_size
        self.crop = _edge(cfg.get("crop_size"), "height") or image_size
        self.mean = tuple(cfg.get("image_mean", CLIP_MEAN))
        self.std = tuple(cfg.get("image_std", CLIP_STD))
        self.name = f"clip-{self.model_dir.resolve().name}"
        self.preprocessing = (f"grey -> RGB; [-1, 1] -> [0, 1]; bicubic antialiased resize, shortest side {self.size}; "
                              f"clamp [0, 1]; centre crop {self.crop}; normalise mean {self.mean} std {self.std}")
        self._tokenizer = None

    def train(self, mode: bool = True):  # always in eval mode
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> CLIP's ``pixel_values``."""
        p = self.model.visual_projection.weight
        x = to_rgb01(images.to(device=p.device, dtype=p.dtype))
        return resize_crop_normalize(x, self.size, self.crop, self.mean, self.std)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings of preprocessed pixels (transformers' ``get_image_features``)."""
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return self.model.visual_projection(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (N, projection_dim), unnormalised."""
        return self.image_features(self.preprocess(images))

    @property
    def tokenizer(self):
        """The folder's tokenizer, loaded on first use (CLIP-FID needs none)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            d = self.model_dir
            if not ((d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())):
                raise FileNotFoundError(
                    f"CLIP model folder {d} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the tokenizer "
                    "there with CLIPTokenizer.from_pretrained(name).save_pretrained(folder)"
                )
            self._tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        return self._tokenizer

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (N, projection_dim), unnormalised; prompts longer than the text tower's
        context (77 tokens for OpenAI CLIP) are truncated, as the CLIP score's references do."""
        if isinstance(prompts, str):
            prompts = [prompts]
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        device = self.model.text_projection.weight.device
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(device),
                                       attention_mask=tokens["attention_mask"].to(device)).pooler_output
        return self.model.text_projection(pooled)


def load_clip(path: str | Path | None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CLIPFeatures:
    """The ``"clip"`` extractor of :data:`difflab.eval.features.EXTRACTORS`, from a local folder."""
    if path is None:
        raise FileNotFoundError("the CLIP extractor needs a local transformers CLIP folder (e.g. a saved "
                                "openai/clip-vit-base-patch32 or clip-vit-large-patch14; --clip-dir on the "
                                "command line); none was given")
    return CLIPFeatures(path, device=device, dtype=dtype)

