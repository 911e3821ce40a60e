"""Verify a checkpoint: is it what it says it is, and what does it hold? (``difflab check``)

:func:`verify_checkpoint` reads a file written by :func:`difflab.io.checkpoint.save_checkpoint`
with ``finite=False`` (so a damaged file can still be looked at) and runs four checks; each
failure is one line of :attr:`Verification.problems`:

1. ``format``: a safetensors file with difflab's metadata in its header, of a format version this
   difflab reads;
2. ``sha256``: the file's SHA-256 equals the one given (skipped when none is given);
3. ``finite``: every floating-point tensor is free of NaN and infinity (each offender named);
4. ``shapes``: the weights match the networks the metadata names, built on the ``meta`` device
   (shapes, no memory): a training checkpoint's ``model.*`` and ``ema.*`` against the network of
   its spec (:func:`difflab.io.spec.spec_network`), a text model's ``unet.*`` and
   ``text_encoder.*``, a tiny text encoder's or a VAE's own weights; a LoRA's A/B pairs against
   the ranks it records; textual-inversion rows against their width.

What the file holds goes to :attr:`Verification.facts`: kind, step, objective, network and its
parameter count, tensor groups (count, bytes, dtypes), the training config's main settings,
the torch version that wrote it.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..nn.text import TinyTextConfig, TinyTextEncoder
from ..nn.vae import AutoencoderKL, VAEConfig
from .checkpoint import FORMAT_VERSION, checkpoint_path, format_version, load_checkpoint, non_finite, without_training_buffers
from .lora_files import LORA_KIND
from .spec import NETWORKS, build_network, read_spec, spec_network
from .text import KIND as TEXT_ENCODER_KIND

CHECKS = ("format", "sha256", "finite", "shapes")
# The first part of a tensor's name that makes a group of its own; other tensors are "weights".
GROUPS = ("model", "ema", "optim", "rng", "unet", "text_encoder", "vae")
# The training config's settings worth a line.
TRAIN_SUMMARY = ("steps", "batch_size", "lr", "lr_schedule", "precision", "ema_decay", "seed")


@dataclass
class Verification:
    """What :func:`verify_checkpoint` found: ``checks`` (name -> "ok", "failed" or why it was
    skipped), ``problems`` (one line each), ``notes`` (worth knowing, not a failure), ``facts``."""

    path: str
    checks: dict = field(default_factory=lambda: {name: "not run" for name in CHECKS})
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "checks": dict(self.checks), "problems": list(self.problems),
                "notes": list(self.notes), **self.facts}


def sha256_of(path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as 64 lowercase hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(text: str) -> str:
    """``text`` as 64 lowercase hex digits; a ValueError naming sha256 otherwise."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", text.strip()):
        raise ValueError(f"sha256={text!r} must be 64 hexadecimal digits (as sha256sum prints)")
    return text.strip().lower()


# ----------------------------------------------------------------------------------------------
# The networks each kind of checkpoint holds


def _on_meta(build):
    """``build()`` on the meta device: the module's shapes without allocating its weights."""
    with torch.device("meta"):
        return build()


def _spec_module(spec: dict) -> nn.Module:
    kind, config, _ = read_spec(spec)
    return _on_meta(lambda: build_network(kind, config) if NETWORKS[kind].output == "codec" else spec_network(spec))


def _network_facts(spec: dict, module: nn.Module) -> dict:
    kind, _, diffusion = read_spec(spec)
    facts = {"kind": kind, "class": type(module).__name__, "parameters": sum(p.numel() for p in module.parameters())}
    if NETWORKS[kind].output != "codec":
        facts["diffusion"] = {k: diffusion[k] for k in ("frame", "schedule", "prediction") if k in diffusion}
    return facts


def provenance_facts(record: dict | None) -> dict:
    """The training data's provenance (:func:`difflab.data.provenance.provenance`) in short: its
    hash, its size and its source (data set and version, or folder, file count and manifest hash)."""
    if not record:
        return {}
    facts = {"examples": record.get("examples"), "sha256": record.get("sha256")}
    source = record.get("source") or {}
    facts.update({k: v for k, v in source.items() if k != "file_sha256"})
    return facts


def _training(meta: dict, tensors: dict, report: Verification) -> list:
    """A training checkpoint: ``model.*`` (and ``ema.*`` when it kept an EMA) against its spec's network."""
    report.facts.update({k: meta.get(k) for k in ("step", "objective")})
    config = meta.get("train_config") or {}
    report.facts["train"] = {k: config[k] for k in TRAIN_SUMMARY if k in config}
    report.facts["data"] = meta.get("metadata") or {}
    report.facts["provenance"] = provenance_facts(meta.get("data_provenance"))
    if not meta.get("spec"):
        report.checks["shapes"] = "skipped (no spec)"
        report.notes.append("no model spec (train() got no spec=): the weights cannot be checked against a network")
        return []
    net = _spec_module(meta["spec"])
    report.facts["network"] = _network_facts(meta["spec"], net)
    return [("model.", net)] + ([("ema.", net)] if meta.get("ema") else [])


def _text_model(meta: dict, tensors: dict, report: Verification) -> list:
    """A text-to-image model: ``unet.*`` against its spec's network, ``text_encoder.*`` against its
    tiny encoder, ``vae.*`` (a latent model) against its AutoencoderKL."""
    unet = _spec_module(meta["spec"])
    encoder = _on_meta(lambda: TinyTextEncoder(TinyTextConfig.from_dict(meta["text_encoder"], "text_encoder")))
    report.facts["network"] = _network_facts(meta["spec"], unet)
    report.facts["text_encoder"] = {"class": "TinyTextEncoder", "parameters": sum(p.numel() for p in encoder.parameters())}
    parts = [("unet.", unet), ("text_encoder.", encoder)]
    if meta.get("vae"):
        parts.append(("vae.", _on_meta(lambda: AutoencoderKL(VAEConfig.from_dict(meta["vae"], "vae")))))
    return parts


def _own(cls, config_cls):
    def expected(meta: dict, tensors: dict, report: Verification) -> list:
        module = _on_meta(lambda: cls(config_cls.from_dict(meta["config"], "config")))
        report.facts["network"] = {"class": cls.__name__, "parameters": sum(p.numel() for p in module.parameters())}
        return [("", module)]
    expected.__doc__ = f"A {cls.__name__} on its own: its weights against one built from its config."
    return expected


def _lora(meta: dict, tensors: dict, report: Verification) -> list:
    """A LoRA file: rank and alpha; each module's A (r, ...) and B (..., r, ...) pair at its recorded rank."""
    modules = meta.get("modules") or {}
    report.facts["lora"] = {k: meta.get(k) for k in ("name", "rank", "alpha", "targets")} | {"modules": len(modules)}
    for m, spec in modules.items():
        for role, dim in (("lora_A", 0), ("lora_B", 1)):
            t = tensors.get(f"{m}.{role}.weight")
            if t is None:
                report.problems.append(f"{m}.{role}.weight: missing (the metadata lists module {m!r})")
            elif t.ndim < 2 or t.shape[dim] != spec.get("rank"):
                report.problems.append(f"{m}.{role}.weight: shape {tuple(t.shape)} does not have the recorded rank "
                                       f"{spec.get('rank')} along dim {dim}")
    return []


def _embeddings(meta: dict, tensors: dict, report: Verification) -> list:
    """Textual-inversion embeddings: one row of the recorded width per learned word."""
    words, width = meta.get("words") or [], meta.get("width")
    report.facts["embeddings"] = {"words": words, "width": width}
    for w in words:
        t = tensors.get(w)
        if t is None or tuple(t.shape) != (width,):
            report.problems.append(f"{w}: " + ("missing" if t is None else f"shape {tuple(t.shape)}, expected ({width},)"))
    return []


# kind in the metadata -> (what it is, the function returning the (prefix, module) pairs to compare).
# "difflab.train", "difflab.student", "difflab.text_model" and "difflab.textual_inversion" are written by difflab.train,
# a layer above io; tests/test_check_command.py checks the names agree.
KINDS = {
    "difflab.train": ("training checkpoint (difflab train)", _training),
    "difflab.student": ("distilled few-step student (difflab distill)", _training),
    "difflab.text_model": ("text-to-image model: U-Net and tiny text encoder (difflab dreambooth, demo --text)", _text_model),
    TEXT_ENCODER_KIND: ("tiny text encoder (difflab.io.save_tiny_text)", _own(TinyTextEncoder, TinyTextConfig)),
    "AutoencoderKL": ("VAE (difflab demo --text)", _own(AutoencoderKL, VAEConfig)),
    LORA_KIND: ("LoRA adapter (difflab.adapters.save_lora)", _lora),
    "difflab.textual_inversion": ("textual-inversion embeddings (save_learned_embeds)", _embeddings),
}


# ----------------------------------------------------------------------------------------------
# The checks


def _group(key: str) -> str:
    head = key.split(".", 1)[0]
    return head if head in GROUPS and "." in key else "weights"


def _tensor_facts(tensors: dict) -> dict:
    groups: dict = {}
    for k, v in tensors.items():
        g = groups.setdefault(_group(k), {"tensors": 0, "bytes": 0, "dtypes": set()})
        g["tensors"] += 1
        g["bytes"] += v.numel() * v.element_size()
        g["dtypes"].add(str(v.dtype).removeprefix("torch."))
    for g in groups.values():
        g["dtypes"] = sorted(g["dtypes"])
    groups = dict(sorted(groups.items(), key=lambda kv: (GROUPS + ("weights",)).index(kv[0])))
    return {"tensors": len(tensors), "bytes": sum(g["bytes"] for g in groups.values()),
            "dtypes": sorted({d for g in groups.values() for d in g["dtypes"]}), "groups": groups}


def _finite(tensors: dict, report: Verification) -> None:
    bad = non_finite(tensors)
    for k in bad:
        v = tensors[k]
        report.problems.append(f"{k}: not finite ({int(torch.isnan(v).sum())} NaN, {int(torch.isinf(v).sum())} inf "
                               f"of {v.numel()} values)")
    report.checks["finite"] = "failed" if bad else "ok"


def _compare(module: nn.Module, tensors: dict, prefix: str) -> list[str]:
    """One line per missing key, unexpected key or shape mismatch of ``tensors[prefix*]`` against ``module``."""
    expected = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in without_training_buffers(tensors).items() if k.startswith(prefix)}
    where = f"the {type(module).__name__} its metadata describes"
    out = [f"{k}: missing ({where} has it, shape {s})" for k, s in expected.items() if k not in found]
    out += [f"{k}: unexpected ({where} has no such tensor)" for k in found if k not in expected]
    out += [f"{k}: shape {found[k]}, but {where} has {s}" for k, s in expected.items() if k in found and found[k] != s]
    return out


def _shapes(meta: dict, tensors: dict, report: Verification) -> None:
    kind = meta.get("kind")
    if kind not in KINDS:
        report.checks["shapes"] = "skipped (a kind difflab does not write)"
        report.notes.append(f"kind {kind!r} is not one difflab writes ({', '.join(KINDS)}): format and finiteness checked only")
        return
    before = len(report.problems)
    try:
        pairs = KINDS[kind][1](meta, tensors, report)
    except (ValueError, KeyError, TypeError) as e:  # metadata whose spec or config builds no network
        report.problems.append(f"the {kind} metadata builds no network: {type(e).__name__}: {e}")
        pairs = []
    for prefix, module in pairs:
        report.problems += _compare(module, tensors, prefix)
    if report.checks["shapes"] == "not run":
        report.checks["shapes"] = "ok" if len(report.problems) == before else "failed"


def verify_checkpoint(path, sha256: str | None = None) -> Verification:
    """Check a difflab checkpoint (a ``.safetensors`` file, or a run folder holding
    ``checkpoint.safetensors``) and describe it; see the module docstring. Never raises for a bad
    file: every failure is a line of ``problems``. ``sha256``: the expected hash (64 hex digits)."""
    expected = None if sha256 is None else check_sha256(sha256)
    given, path = Path(path), checkpoint_path(path)
    report = Verification(str(path))
    # 1. Format
    if given.is_file() and given.suffix != ".safetensors":
        report.path = str(given)
        report.problems.append(f"{given} is a file but not a .safetensors checkpoint; give a .safetensors file or a run folder")
        report.checks["format"] = "failed"
        return report
    try:
        tensors, meta = load_checkpoint(path, finite=False)
        version = format_version(path)
    except (ValueError, OSError) as e:
        report.problems.append(str(e))
        report.checks["format"] = "failed"
        return report
    report.checks["format"] = "ok"
    if not isinstance(meta, dict):
        meta = {}
        report.problems.append("the header's difflab.metadata is not a JSON object")
        report.checks["format"] = "failed"
    if version is None or version > FORMAT_VERSION:
        report.problems.append(f"format version {version} in the header; this difflab reads versions 1 to {FORMAT_VERSION}")
        report.checks["format"] = "failed"
    kind = meta.get("kind")
    report.facts.update(kind=kind, what=KINDS.get(kind, ("not a kind difflab writes",))[0],
                        torch_version=meta.get("torch_version"), bytes_on_disk=path.stat().st_size)
    # 2. Hash
    report.facts["sha256"] = sha256_of(path)
    if expected is None:
        report.checks["sha256"] = "skipped (none given)"
    elif report.facts["sha256"] != expected:
        report.problems.append(f"sha256 mismatch: the file's is {report.facts['sha256']}, expected {expected}")
        report.checks["sha256"] = "failed"
    else:
        report.checks["sha256"] = "ok"
    # 3. Finiteness, 4. shapes against the networks the metadata names
    report.facts.update(_tensor_facts(tensors))
    _finite(tensors, report)
    _shapes(meta, tensors, report)
    return report


# ----------------------------------------------------------------------------------------------
# As text


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _kv(d: dict) -> str:
    def value(v):
        if isinstance(v, dict):
            return f"({_kv(v)})"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) and v >= 10_000 else str(v)
    return ", ".join(f"{k} {value(v)}" for k, v in d.items())


def format_report(report: Verification, max_problems: int = 20) -> str:
    """The report as lines for people: what the file holds, the checks, the problems, then OK or FAILED."""
    f = report.facts
    lines = [f"checkpoint   {report.path}"]
    if "kind" in f:
        lines.append(f"kind         {f['kind']}: {f['what']}")
        lines.append(f"file         {_size(f['bytes_on_disk'])}, sha256 {f['sha256']}")
        if f.get("step") is not None:
            lines.append(f"step         {f['step']} (objective {f.get('objective')})")
        lines += [f"{key:<12} {_kv(f[key])}" for key in ("network", "text_encoder", "lora", "embeddings", "train", "data",
                                                   "provenance")
                  if f.get(key)]
        lines.append(f"tensors      {f['tensors']}, {_size(f['bytes'])}, {', '.join(f['dtypes'])}")
        lines += [f"  {name:<12} {g['tensors']:>5} tensors {_size(g['bytes']):>10}  {', '.join(g['dtypes'])}"
                  for name, g in f["groups"].items()]
        if f.get("torch_version"):
            lines.append(f"torch        {f['torch_version']} (wrote it)")
    lines.append("checks       " + ", ".join(f"{k} {v}" for k, v in report.checks.items()))
    lines += [f"note: {n}" for n in report.notes]
    if report.ok:
        return "\n".join(lines + ["OK"])
    lines.append(f"problems ({len(report.problems)}):")
    lines += [f"  {p}" for p in report.problems[:max_problems]]
    if len(report.problems) > max_problems:
        lines.append(f"  ... and {len(report.problems) - max_problems} more (--json lists them all)")
    return "\n".join(lines + ["FAILED"])


__all__ = ["Verification", "verify_checkpoint", "format_report", "sha256_of", "check_sha256", "KINDS", "CHECKS"]
