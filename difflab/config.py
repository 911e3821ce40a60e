"""One config policy for every JSON-backed config: unknown keys are an error that names the key,
the section it sits in, the valid keys and the closest match; values of the wrong type are an
error of the same kind, never a traceback from deep inside.

``JSONConfig`` gives a frozen dataclass ``to_dict`` (JSON-safe: tuples become lists) and
``from_dict`` (checked by :func:`check_keys` and :func:`check_types`). Any other dict of
settings (a command's ``--config`` file, a model spec) goes through :func:`check_keys`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing


class ConfigError(ValueError):
    """A config key or value a user can fix; the message says which and what would be valid."""


def check_keys(d, valid, section: str) -> None:
    """Raise :class:`ConfigError` if ``d`` is not a dict or has a key outside ``valid``, naming the
    key, its ``section`` (e.g. ``"train"``, ``"spec.unet"``), the valid keys and the closest one."""
    if not isinstance(d, dict):
        raise ConfigError(f"{section} must be a JSON object (a dict), got {type(d).__name__}")
    valid = list(valid)
    for key in d:
        if key not in valid:
            close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {section}{hint} valid keys: {', '.join(sorted(map(str, valid)))}")


def _type_ok(value, annotation) -> bool:
    """Whether a JSON value fits a (string or real) annotation of a dataclass field; lenient where unsure."""
    if isinstance(annotation, str):
        base = {part.strip() for part in re.sub(r"\[.*\]", "", annotation).split("|")}
    else:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
        base = {getattr(a, "__name__", str(a)).split("[")[0] for a in args}
    if value is None:
        return "None" in base or "NoneType" in base or "Optional" in base
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str),
              "tuple": lambda v: isinstance(v, (list, tuple)), "list": lambda v: isinstance(v, (list, tuple)),
              "dict": lambda v: isinstance(v, dict)}
    known = [checks[b] for b in base if b in checks]
    unknown = base - set(checks) - {"None", "NoneType", "Optional"}
    return bool(unknown) or not known or any(c(value) for c in known)


def check_types(cls, d: dict, section: str) -> None:
    """Raise :class:`ConfigError` when a value of ``d`` does not fit the type of ``cls``'s field."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key in fields and not _type_ok(value, fields[key]):
            raise ConfigError(f"{section}.{key} = {value!r} has the wrong type: expected {fields[key]}")


def from_dict(cls, d, section: str | None = None):
    """``cls(**d)`` for a dataclass, after :func:`check_keys` and :func:`check_types`; lists become
    tuples where the field's default is a tuple."""
    section = section or cls.__name__
    fields = dataclasses.fields(cls)
    check_keys(d, [f.name for f in fields], section)
    check_types(cls, d, section)
    d = dict(d)
    for f in fields:
        if f.name in d and isinstance(d[f.name], list) and isinstance(f.default, tuple):
            d[f.name] = tuple(d[f.name])
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"{section}: {e}") from None


class JSONConfig:
    """``to_dict`` (JSON-safe: tuples become lists) and ``from_dict`` (:func:`from_dict`: unknown
    keys and wrong types are a :class:`ConfigError`) for a dataclass config."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, section: str | None = None):
        return from_dict(cls, d, section)


__all__ = ["ConfigError", "JSONConfig", "check_keys", "check_types", "from_dict"]
