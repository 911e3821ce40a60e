"""``difflab eval``: generated images against a reference, in an extractor's feature space."""
from __future__ import annotations

import json
from pathlib import Path

from ..eval import check_metrics, evaluate, is_checkpoint, load_extractor
from ..eval.features import EXTRACTORS
from ..data import load_digits, load_image_folder
from ..eval.harness import DEFAULT_METRICS, DEFAULT_NUM_SAMPLES, METRICS, generated_images
from ..eval.memorization import memorization
from ..io.checkpoint import load_checkpoint
from ..io.spec import checkpoint_spec
from ..pipelines import sample_checkpoint
from ..pipelines.checkpoint import check_image_kind, sampling_defaults
from .common import UsageError, device, device_name, finite_float, non_negative_int, positive_int

HELP = "measure generated images against a reference (FID, KID, IS, precision/recall)"
DESCRIPTION = ("Compare generated images (a checkpoint to sample, a folder, or a statistics .npz) with a reference "
               "('digits', a folder, or a statistics .npz) in the feature space of an extractor, and print a table of "
               "metrics (JSON with --json).")


def add_arguments(e) -> None:
    e.add_argument("--generated", required=True, help="a checkpoint (run folder or .safetensors), a folder of images, or a stats .npz")
    e.add_argument("--reference", default=None, help="'digits' (held-out split), a folder of images, or a stats .npz")
    e.add_argument("--extractor", default="judge", help=f"feature extractor: one of {', '.join(sorted(EXTRACTORS))} (default: judge)")
    e.add_argument("--weights", default=None, help="weights file of the extractor (judge: a .safetensors, default: train "
                                                   "one; inception: the FID Inception-v3 weights, required)")
    e.add_argument("--clip-dir", default=None, help="local transformers folder for --extractor clip or dinov2")
    e.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated, from {', '.join(METRICS)} "
                                                                         f"(default: {','.join(DEFAULT_METRICS)})")
    e.add_argument("--num", type=positive_int, default=None, help=f"images to sample from a checkpoint (default: {DEFAULT_NUM_SAMPLES}) "
                                                         "or to take from a folder (default: all)")
    e.add_argument("--batch-size", type=positive_int, default=64, help="batch size of sampling and feature extraction; changes "
                                                              "no number (default: 64)")
    e.add_argument("--cache", default=None, help="a .npz for the reference statistics: reused when present, else written")
    e.add_argument("--prompts", type=Path, default=None, help="text file, one prompt per generated image (clip_score)")
    e.add_argument("--sampler", default=None, help="checkpoint sampling: sampler (default: the checkpoint's, else ddim)")
    e.add_argument("--steps", type=positive_int, default=None, help="checkpoint sampling: sampler steps (default: the checkpoint's, else 50)")
    e.add_argument("--guidance", type=finite_float, default=None,
                   help="checkpoint sampling: guidance scale (default: the checkpoint's, else 1 = none)")
    e.add_argument("--seed", type=non_negative_int, default=0, help="seed of sampling and of the KID subsets (default: 0)")
    e.add_argument("--memorization", default=None, metavar="TRAIN",
                   help="also check the generated images for copies of training examples (Carlini et al. 2023): "
                        "TRAIN is 'digits' (the training split) or the folder of training images")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")


EVAL_LABELS = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall", "is": "Inception Score",
               "clip_score": "CLIP score"}


def format_eval(results: dict) -> str:
    """The results of :func:`difflab.eval.evaluate` as a table."""
    rows = []
    for key, label in EVAL_LABELS.items():
        if key in results:
            std = results.get(f"{key}_std")
            rows.append((label, f"{results[key]:.6g}" + (f" +- {std:.2g}" if std is not None else "")))
    rows.append(("images", f"{results['n_generated']} generated" +
                 (f", {results['n_reference']} reference" if results.get("n_reference") is not None else "")))
    w = max(len(a) for a, _ in rows)
    return f"  features: {results['extractor']}\n" + "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)


def checkpoint_sampler(path, overrides: dict):
    """A checkpoint side as a callable ``num -> images`` (class-balanced labels), checked now and
    sampled only when :func:`difflab.eval.evaluate` has checked everything else; ``overrides``
    replace the checkpoint's own sampling defaults (:func:`difflab.pipelines.checkpoint.sampling_defaults`)."""
    kind, meta = checkpoint_spec(path)
    check_image_kind(kind, "difflab eval")
    load_checkpoint(path)  # its tensors checked finite now, not after the extractor has loaded
    sampling_defaults(meta).replace(**overrides)  # a bad combination is refused now, not after the extractor loads
    return lambda num: sample_checkpoint(path, labels="balanced", num=num, **overrides)


WEIGHT_SUFFIXES = {"judge": (".safetensors",), "inception": (".safetensors", ".pth", ".pt")}


def check_weights(args) -> None:
    """``--weights`` exists and has a suffix the extractor reads (safetensors; the Inception also a
    weights-only ``.pth``), checked before any work."""
    if args.weights is None:
        return
    path = Path(args.weights)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path} does not exist")
    suffixes = WEIGHT_SUFFIXES.get(args.extractor)
    if suffixes and path.suffix not in suffixes:
        raise UsageError(f"--weights {path}: the {args.extractor} extractor reads {' or '.join(suffixes)} files")


def training_images(train: str, like):
    """The training images of ``--memorization``: the digits' training split or a folder, at the
    generated images' size and channels."""
    size, channels = int(like.shape[-1]), int(like.shape[1])
    if train == "digits":
        if channels != 1:
            raise UsageError(f"--memorization digits: the digits are grey (1 channel), the generated images have {channels}")
        return load_digits(size=size, split="train")[0]
    return load_image_folder(train, size, channels=channels)


def format_memorization(summary: dict) -> str:
    return (f"  memorization (Carlini et al. 2023: nearest / ({summary['alpha']:g} x mean of the next "
            f"{summary['neighbours']}) < {summary['delta']:.3g})\n"
            f"  flagged      {summary['memorized']} of {summary['samples']} ({summary['memorized_rate']:.2%}); "
            f"median ratio {summary['median_ratio']:.3g}\n"
            f"  closer than 1% of training pairs  {summary['closer_than_train_rate']:.2%}")


def run(args) -> int:
    # 1. Check everything that can be checked before any work.
    metrics = check_metrics(args.metrics)
    if args.extractor not in EXTRACTORS:
        raise ValueError(f"--extractor {args.extractor!r} is unknown; choose one of {', '.join(sorted(EXTRACTORS))}")
    for flag, value in (("--generated", args.generated), ("--reference", args.reference)):
        if value is not None and value != "digits" and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value} does not exist")
    check_weights(args)
    if args.memorization is not None:
        if args.memorization != "digits" and not Path(args.memorization).is_dir():
            raise FileNotFoundError(f"--memorization {args.memorization}: give 'digits' or a folder of training images")
        if str(args.generated).endswith(".npz"):
            raise UsageError("--memorization needs the generated images, not statistics: give a checkpoint or a folder")
    dev = device(args.device)
    generated, reference = args.generated, args.reference
    if is_checkpoint(generated) or is_checkpoint(reference):
        given = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
        overrides = dict({k: v for k, v in given.items() if v is not None}, seed=args.seed, batch_size=args.batch_size,
                         device=dev, progress=not args.no_progress)
        generated, reference = (checkpoint_sampler(v, overrides) if is_checkpoint(v) else v for v in (generated, reference))
    prompts = None
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise FileNotFoundError(f"--prompts {args.prompts} does not exist")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]

    if isinstance(generated, (str, Path)) and Path(generated).is_dir():  # read now: a file that is not an image
        generated = generated_images(generated, args.num)                 # stops here, before the extractor loads

    # 2. The extractor, then the harness (which samples a checkpoint once its inputs are checked).
    path = args.clip_dir if args.extractor in ("clip", "dinov2") else args.weights
    extractor = load_extractor(args.extractor, path, device=dev)
    if args.memorization is not None and (callable(generated) or isinstance(generated, (str, Path))):
        generated = generated_images(generated, args.num)  # the images once, for the metrics and the check
    results = evaluate(generated, reference, extractor, metrics, num=args.num, batch_size=args.batch_size,
                       prompts=prompts, seed=args.seed, device=dev, cache=args.cache, progress=not args.no_progress)
    text = None if args.json else format_eval(results)
    # 3. The memorization check, in pixels, against the training images
    if args.memorization is not None:
        found = memorization(generated, training_images(args.memorization, generated)).summary()
        results["memorization"] = found
        text = None if args.json else text + "\n" + format_memorization(found)
    print(json.dumps(results, indent=2) if args.json else text)
    return 0
