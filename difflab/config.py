"""JSON round trips for the frozen dataclass configs of networks (written into checkpoints)."""
from __future__ import annotations

import dataclasses


class JSONConfig:
    """``to_dict`` (JSON-safe: tuples become lists) and ``from_dict`` (unknown keys are an error)
    for a dataclass config."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**d)
