"""The digits judge: a small CNN trained on the digits' train split, used to score generated
digits. Its accuracy on samples asked for class c measures class fidelity; the Frechet distance
in its penultimate features (FID's recipe, Heusel et al. 2017, with this net in place of
Inception-v3) measures how far the samples' distribution is from real held-out digits.

Training is deterministic without touching torch's global RNG: weights are initialised from a
local ``torch.Generator(seed)`` and :func:`difflab.train.fit` draws batches and shifts from the
seed. Checkpoints are safetensors with the config in the metadata.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import load_digits
from ..train import Classification, TrainConfig, fit
from ..train.objectives.classification import random_shift
from .features import JudgeFeatures
from .frechet import frechet_distance_features
from .metrics import fid

CACHE_NAME = "digits_judge.safetensors"
ONE_CYCLE_RISE = 0.3  # the rising fraction of the one-cycle schedule (OneCycleLR's default pct_start)


@dataclass(frozen=True)
class JudgeConfig:
    width: int = 32          # channels of the first conv; the second has 2 * width
    feature_dim: int = 64    # penultimate features used by `features` and `frechet`
    num_classes: int = 10


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    shift: int = 1           # random translation augmentation of up to `shift` pixels
    seed: int = 0
    test_fraction: float = 0.2   # the digits split (seed `split_seed`) the judge is trained on
    split_seed: int = 0


class DigitsJudge(nn.Module):
    """conv3x3(1->w)-relu-conv3x3(w->2w)-relu-maxpool2-linear(16*2w->feature_dim)-relu = features,
    then linear(feature_dim->10) = logits. Input (N, 1, H, W) in [-1, 1]; any H x W other than 8x8
    is area-averaged to 8x8 (``adaptive_avg_pool2d``), so upsampled digits can be judged."""

    def __init__(self, config: JudgeConfig = JudgeConfig(), generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.fit_config: FitConfig | None = None     # set by `fit` and `load`
        self.train_seconds: float | None = None      # set by `fit`
        w, d = config.width, config.feature_dim
        # built on the meta device, then initialised from `generator`: torch's global RNG is untouched
        self.conv1 = nn.Conv2d(1, w, 3, padding=1, device="meta")
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1, device="meta")
        self.fc = nn.Linear(2 * w * 4 * 4, d, device="meta")
        self.head = nn.Linear(d, config.num_classes, device="meta")
        self.to_empty(device="cpu")
        self.reset_parameters(torch.Generator().manual_seed(0) if generator is None else generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default layer init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator``."""
        for layer in (self.conv1, self.conv2, self.fc, self.head):
            bound = layer.weight[0].numel() ** -0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> float (N, 1, 8, 8), clamped to [-1, 1] as a saved image would be."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"the judge takes (N, 1, H, W) grey images in [-1, 1], got shape {tuple(images.shape)}")
        images = images.float()
        if images.shape[-2:] != (8, 8):
            images = F.adaptive_avg_pool2d(images, 8)
        return images.clamp(-1.0, 1.0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of prepared (N, 1, 8, 8) images, with gradients."""
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes)."""
        return self.head(self.embed(self.prepare(images)))

    # ---- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        device = self.head.weight.device
        out = [fn(self.prepare(images[i : i + batch_size]).to(device)).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images (N, 1, H, W) in [-1, 1]."""
        return self._batched(self.embed, images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes), without gradients, in batches."""
        return self._batched(lambda x: self.head(self.embed(x)), images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted classes (N,) long."""
        return self.logits(images).argmax(1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images whose predicted class equals ``labels``."""
        return (self.predict(images) == torch.as_tensor(labels).cpu()).float().mean().item()

    def frechet(self, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
        """Squared Frechet distance between Gaussians fitted to the two sets' judge features
        ("FID" with this judge as the feature extractor; biased upward for small sets)."""
        return frechet_distance_features(self.features(images_a), self.features(images_b))

    # ---- training ------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        config: JudgeConfig = JudgeConfig(),
        fit_config: FitConfig = FitConfig(),
        verbose: bool = False,
    ) -> "DigitsJudge":
        """Train a judge on (images, labels), by default the digits train split of ``fit_config``:
        cross-entropy with random shifts (:class:`difflab.train.Classification`) run by
        :func:`difflab.train.fit`, AdamW with a one-cycle learning rate (30% rising), no EMA, in
        memory; deterministic given ``fit_config.seed`` (CPU, fixed thread count)."""
        if images is None:
            images, labels = load_digits(8, "train", fit_config.test_fraction, fit_config.split_seed)
        judge = cls(config, generator=torch.Generator().manual_seed(fit_config.seed))
        x, y = cls.prepare(images), torch.as_tensor(labels).long()
        steps = fit_config.epochs * -(-len(x) // fit_config.batch_size)
        train_config = TrainConfig(steps=steps, batch_size=fit_config.batch_size, lr=fit_config.lr, lr_schedule="one_cycle",
                                   warmup_steps=round(ONE_CYCLE_RISE * steps), weight_decay=fit_config.weight_decay,
                                   grad_clip=None, ema_decay=None, log_every=0, seed=fit_config.seed, progress=verbose)
        objective = Classification(judge, augment=lambda xb, g: random_shift(xb, fit_config.shift, g))
        start = time.perf_counter()
        fit(objective, {"x": x, "y": y}, train_config)
        judge.eval()
        judge.fit_config = fit_config
        judge.train_seconds = time.perf_counter() - start
        return judge

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Weights as safetensors; the configs as JSON in the file's metadata."""
        from safetensors.torch import save_file

        meta = {"config": json.dumps(asdict(self.config))}
        if self.fit_config is not None:
            meta["fit_config"] = json.dumps(asdict(self.fit_config))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "DigitsJudge":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} has no judge config in its metadata; was it written by DigitsJudge.save?")
        judge = cls(JudgeConfig(**json.loads(meta["config"])))
        judge.load_state_dict(load_file(str(path)))
        judge.fit_config = FitConfig(**json.loads(meta["fit_config"])) if "fit_config" in meta else None
        return judge.to(device).eval()

    @classmethod
    def load_or_train(
        cls, cache_path: str | Path | None = None, fit_config: FitConfig = FitConfig(), verbose: bool = False
    ) -> "DigitsJudge":
        """Load the judge cached at ``cache_path`` (a ``.safetensors`` file, or a folder holding
        ``digits_judge.safetensors``) if it was trained with ``fit_config``; else train one and,
        when ``cache_path`` is given, save it there. ``None`` always trains (a few seconds)."""
        if cache_path is None:
            return cls.fit(fit_config=fit_config, verbose=verbose)
        path = Path(cache_path)
        if path.suffix != ".safetensors":
            path = path / CACHE_NAME
        if path.exists():
            judge = cls.load(path)
            if judge.fit_config == fit_config:
                return judge
        judge = cls.fit(fit_config=fit_config, verbose=verbose)
        judge.save(path)
        return judge


@torch.no_grad()
def judge_report(
    judge: DigitsJudge,
    generated: torch.Tensor,
    labels_asked: torch.Tensor,
    real_heldout: torch.Tensor,
    real_labels: torch.Tensor,
    seed: int = 0,
    real_reference: torch.Tensor | None = None,
) -> dict:
    """Scores of generated digits against real held-out digits, as a dict of floats:

    - ``class_accuracy``: judge accuracy of the samples against the class each was asked for;
    - ``real_accuracy``: judge accuracy on the real held-out digits (the ceiling);
    - ``frechet``: Frechet distance, judge features, generated vs real held-out;
    - ``frechet_real_halves``: the same between two random halves of the real held-out digits
      (a floor: real vs real at half the sample size; Frechet distance grows as sets shrink);
    - ``frechet_real_reference`` (only when ``real_reference``, e.g. the train split, is given):
      the Frechet distance of ``len(generated)`` random reference digits to the real held-out
      ones, the floor at the very same sample sizes (what memorising the training set scores);
    - ``n_generated``, ``n_real``.

    The Frechet distances are the harness's FID (:func:`difflab.eval.metrics.fid`) on the judge's
    float64 features (:class:`difflab.eval.features.JudgeFeatures`), so they equal
    ``evaluate(generated, real_heldout, JudgeFeatures(judge), ["fid"])["fid"]`` and differ from
    :meth:`DigitsJudge.frechet` (float32 features) only by float32 rounding (~1e-6 relative).
    """
    def features(images):
        return JudgeFeatures(judge)(images)

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(real_heldout), generator=g)
    half = len(real_heldout) // 2
    held = features(real_heldout)
    report = {
        "class_accuracy": judge.accuracy(generated, labels_asked),
        "real_accuracy": judge.accuracy(real_heldout, real_labels),
        "frechet": fid(features(generated), held),
        "frechet_real_halves": fid(held[perm[:half]], held[perm[half : 2 * half]]),
        "n_generated": len(generated),
        "n_real": len(real_heldout),
    }
    if real_reference is not None:
        pick = torch.randperm(len(real_reference), generator=g)[: len(generated)]
        report["frechet_real_reference"] = fid(features(real_reference[pick]), held)
    return report
