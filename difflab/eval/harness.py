"""The evaluation harness: generated images vs. a reference -> a dict of metrics.

``evaluate(generated, reference, extractor, metrics)`` where each side is

- a tensor (N, C, H, W) in [-1, 1] (or an ``(images, labels)`` pair, a ``TensorDataset``),
- a folder of images, or ``"digits"`` (the embedded digits' held-out split),
- a statistics ``.npz`` (:class:`~difflab.eval.stats.FeatureStats`; must come from the same extractor),
- a callable ``num -> images`` (N, C, H, W), called once the inputs are checked: how ``difflab eval``
  passes a checkpoint, ``lambda num: difflab.pipelines.sample_checkpoint(path, labels="balanced",
  num=num, ...)`` (eval sits below pipelines, so it never samples a checkpoint itself; a checkpoint
  path is refused with that advice).

Features are extracted in batches of ``batch_size`` by an extractor in eval mode, so no number
depends on the batch size beyond the extractor's own rounding; the digits judge (the default)
computes in float64 image by image, so its metrics are bit for bit the same at any batch size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..io.checkpoint import checkpoint_path
from . import metrics as M
from .default_judge import load_judge
from .features import extractor_identity
from .stats import DIGITS, FeatureStats, compute_stats, load_images

METRICS = ("fid", "kid", "precision", "recall", "is", "clip_score")
DEFAULT_METRICS = ("fid", "kid", "precision", "recall", "is")
NEEDS_REFERENCE = ("fid", "kid", "precision", "recall")
NEEDS_FEATURES = ("kid", "precision", "recall")
DEFAULT_NUM_SAMPLES = 1000


def check_metrics(metrics) -> tuple[str, ...]:
    """Metric names (a sequence or a comma-separated string), checked against :data:`METRICS`."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}" if bad
                         else f"no metric given; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def is_checkpoint(source) -> bool:
    """True for a ``.safetensors`` file or a folder holding ``checkpoint.safetensors``."""
    if not isinstance(source, (str, Path)):
        return False
    path = Path(source)
    return (path.is_file() and path.suffix == ".safetensors") or (path.is_dir() and checkpoint_path(path).is_file())


def generated_images(source, num: int | None, what: str = "generated") -> torch.Tensor:
    """The images of one side: called with ``num`` (default :data:`DEFAULT_NUM_SAMPLES`) when
    ``source`` is a callable ``num -> images`` (e.g. a checkpoint's sampler), else loaded and cut to
    the first ``num``. A checkpoint path is refused: eval does not sample (it sits below pipelines)."""
    if is_checkpoint(source):
        raise ValueError(f"the {what} side {source} is a training checkpoint: sample it first, e.g. "
                         f"images = difflab.pipelines.sample_checkpoint(path, labels='balanced', num=1000), and pass "
                         "the images (or a callable num -> images); 'difflab eval' does this for you")
    if callable(source):
        return source(num or DEFAULT_NUM_SAMPLES)
    return load_images(source)[0][:num]


def _stats_file(source, identity: dict, what: str, *, features: bool, logits: bool) -> FeatureStats | None:
    """The statistics ``source`` is (a FeatureStats or a ``.npz``), checked against the
    extractor and the metrics; None when ``source`` is images."""
    if isinstance(source, (str, Path)) and str(source).endswith(".npz"):
        label, source = f"the {what} statistics {source}", FeatureStats.load(source)
    elif isinstance(source, FeatureStats):
        label = f"the {what} statistics"
    else:
        return None
    source.check_extractor(identity, label)
    source.require(features=features, logits=logits, what=label)
    return source


def evaluate(generated, reference=None, extractor=None, metrics=DEFAULT_METRICS, *, num: int | None = None,
             batch_size: int = 64, prompts: list[str] | None = None, kid_subsets: int = 100,
             kid_subset_size: int = 1000, is_splits: int = 10, k: int = 3, seed: int = 0,
             device="cpu", cache=None, progress: bool = True) -> dict:
    """Metrics of ``generated`` against ``reference`` (see the module doc for what each may be).

    ``extractor``: a feature extractor (:mod:`difflab.eval.features`); default: the digits judge,
    trained afresh (a few seconds). ``metrics``: names from :data:`METRICS` ("fid" in a CLIP
    extractor's space is CLIP-FID; "is" needs ``extractor.logits``; "clip_score" needs
    ``extractor.encode_text`` and one prompt per generated image). ``num``: images asked of a
    callable side (default 1000) or taken first from a tensor/folder. ``cache``: a
    ``.npz`` for the reference statistics, reused when present (:func:`~difflab.eval.stats.compute_stats`).

    Returns ``{"fid", "kid", "kid_std", "precision", "recall", "is", "is_std", "clip_score"}`` (those
    asked for) plus ``extractor``, ``n_generated``, ``n_reference``.
    """
    # 1. Check the inputs.
    metrics = check_metrics(metrics)
    if reference is None and any(m in NEEDS_REFERENCE for m in metrics):
        raise ValueError(f"{', '.join(m for m in metrics if m in NEEDS_REFERENCE)} need(s) a reference")
    extractor = load_judge(device=device) if extractor is None else extractor
    identity = extractor_identity(extractor)
    if "clip_score" in metrics:
        if not callable(getattr(extractor, "encode_text", None)):
            raise ValueError(f"clip_score needs an extractor with encode_text() (CLIP); {identity['name']!r} has none")
        if prompts is None or callable(generated) or is_checkpoint(generated):
            raise ValueError("clip_score needs images (a tensor or folder) and prompts=, one prompt per image")
    if "is" in metrics and not callable(getattr(extractor, "logits", None)):
        raise ValueError(f"'is' (Inception Score) needs an extractor with logits(); {identity['name']!r} has none")
    need_features = any(m in NEEDS_FEATURES for m in metrics)

    # 2. The generated side: sample or load the images and extract their features, or load statistics.
    gen = _stats_file(generated, identity, "generated", features=need_features or "clip_score" in metrics,
                      logits="is" in metrics)
    size = None
    if gen is None:
        images = generated_images(generated, num)
        size = images.shape[-1]
        gen = compute_stats(images, extractor, batch_size=batch_size, keep_features=need_features or "clip_score" in metrics,
                            logits="is" in metrics, progress=progress, label="(generated)")

    # 3. The reference side ("digits" at the generated images' size), cached in `cache` if given.
    ref = None
    if any(m in NEEDS_REFERENCE for m in metrics):
        ref = _stats_file(reference, identity, "reference", features=need_features, logits=False)
        if ref is None:
            if callable(reference) or is_checkpoint(reference):
                reference = generated_images(reference, num, "reference")
            is_digits = isinstance(reference, str) and reference == DIGITS
            ref = compute_stats(reference, extractor, batch_size=batch_size, keep_features=need_features,
                                size=size if is_digits else None, cache=cache, progress=progress, label="(reference)")

    # 4. The metrics.
    out: dict = {}
    if "fid" in metrics:
        out["fid"] = M.fid(gen, ref)
    if "kid" in metrics:
        out["kid"], out["kid_std"] = M.kid(gen.features, ref.features, subsets=kid_subsets,
                                           subset_size=kid_subset_size, seed=seed)
    if "precision" in metrics or "recall" in metrics:
        precision, recall = M.precision_recall(ref.features, gen.features, k=k)
        out.update({m: v for m, v in (("precision", precision), ("recall", recall)) if m in metrics})
    if "is" in metrics:
        out["is"], out["is_std"] = M.inception_score(gen.logits, splits=min(is_splits, gen.n), seed=seed)
    if "clip_score" in metrics:
        if len(prompts) != gen.n:
            raise ValueError(f"clip_score: {len(prompts)} prompts for {gen.n} images; give one prompt per image")
        with torch.no_grad():
            text = torch.cat([extractor.encode_text(list(prompts[i:i + batch_size])).detach().cpu()
                              for i in range(0, len(prompts), batch_size)])
        out["clip_score"] = M.clip_score(gen.features, text)
    out.update(extractor=identity["name"], n_generated=gen.n, n_reference=ref.n if ref is not None else None)
    return out
