"""Key maps for foreign checkpoints, kept as data tables (STYLE.md, rule 9).

A table is a list of rows ``(foreign, difflab)`` or ``(foreign, difflab, transform)``. Each side
is a key *prefix template*: literal text with placeholders ``{name}`` that match one key segment
(no dot) and are copied to the other side. ``{name:rev}`` is an integer index counted from the
other end, ``num_levels - 1 - value`` (the original Stable Diffusion decoder numbers its levels
from the top, diffusers and difflab from the bottom).

A key is renamed by the first row whose template matches the start of the key; the rest of the
key (``weight``, ``norm1.bias``, ...) is kept. Keys that no row matches keep their name, so a
table lists only the names that differ. ``transform`` names an entry of :data:`TRANSFORMS`: a
pair of functions reshaping a tensor from the foreign layout to difflab's and back (a 1x1
convolution's (C, C, 1, 1) weight <-> a linear layer's (C, C)).

The same table converts both ways (:func:`to_difflab`, :func:`from_difflab`); converting foreign
-> difflab -> other foreign (:func:`convert`) is two lookups, no extra code.
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch


def _conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 1, 1) -> (C_out, C_in); a tensor that is already 2-D is kept."""
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        return t[:, :, 0, 0]
    return t


def _linear_to_conv1x1(t: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in) -> (C_out, C_in, 1, 1)."""
    return t[:, :, None, None] if t.ndim == 2 else t


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0 (its own inverse): an adaptive norm's (shift, scale) rows in the
    original SD3 / Flux layouts, (scale, shift) in diffusers' ``AdaLayerNormContinuous``."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# name -> (foreign -> difflab, difflab -> foreign)
TRANSFORMS = {
    "conv1x1": (_conv1x1_to_linear, _linear_to_conv1x1),
    "swap_halves": (_swap_halves, _swap_halves),
}

_PLACEHOLDER = re.compile(r"\{(\w+)(:rev)?\}")


@lru_cache(maxsize=None)
def _compile(template: str) -> tuple[re.Pattern, tuple[tuple[str, bool], ...]]:
    """A regex matching the template at the start of a key, and its placeholders (name, reversed)."""
    parts, fields, pos = [], [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        parts.append(f"(?P<{m.group(1)}>[^.]+)")
        fields.append((m.group(1), m.group(2) is not None))
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts)), tuple(fields)


def prefixed(foreign: str, ours: str, rows) -> list[tuple]:
    """``(foreign + a, ours + b[, transform])`` for each row ``(a, b[, transform])`` of ``rows``: a
    sub-table (the names inside a residual block, a transformer layer) placed under one prefix on each side."""
    return [(foreign + row[0], ours + row[1], *row[2:]) for row in rows]


def _reverse(value: str, num_levels: int | None, template: str) -> str:
    if num_levels is None:
        raise ValueError(f"key template {template!r} counts levels from the other end: pass num_levels")
    return str(num_levels - 1 - int(value))


def _fill(template: str, values: dict[str, str], num_levels: int | None) -> str:
    def sub(m):
        v = values[m.group(1)]
        return _reverse(v, num_levels, template) if m.group(2) else v
    return _PLACEHOLDER.sub(sub, template)


def rename_key(key: str, table, *, reverse: bool = False, num_levels: int | None = None) -> tuple[str, str | None]:
    """``(new_key, transform_name)`` for one key: foreign -> difflab, or difflab -> foreign when
    ``reverse``. A key no row matches is returned unchanged with no transform."""
    for row in table:
        src, dst = (row[1], row[0]) if reverse else (row[0], row[1])
        pattern, fields = _compile(src)
        m = pattern.match(key)
        if m is None:
            continue
        values = m.groupdict()
        for name, rev in fields:  # undo the source side's reversal: values hold plain indices
            if rev:
                values[name] = _reverse(values[name], num_levels, src)
        return _fill(dst, values, num_levels) + key[m.end():], (row[2] if len(row) > 2 else None)
    return key, None


def _apply(tensors: dict, table, reverse: bool, num_levels: int | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        new, transform = rename_key(key, table, reverse=reverse, num_levels=num_levels)
        if new in out:
            raise ValueError(f"two checkpoint keys map to the same name {new!r} (the second is {key!r})")
        if transform is not None:
            value = TRANSFORMS[transform][1 if reverse else 0](value)
        out[new] = value
    return out


def to_difflab(tensors: dict[str, torch.Tensor], table, *, num_levels: int | None = None) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a foreign state dict into difflab's layout with ``table``."""
    return _apply(tensors, table, False, num_levels)


def from_difflab(tensors: dict[str, torch.Tensor], table, *, num_levels: int | None = None) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a difflab state dict into the foreign layout of ``table``."""
    return _apply(tensors, table, True, num_levels)


def convert(tensors: dict[str, torch.Tensor], source_table, target_table, *, num_levels: int | None = None) -> dict[str, torch.Tensor]:
    """Foreign layout ``source_table`` -> difflab -> foreign layout ``target_table``."""
    return from_difflab(to_difflab(tensors, source_table, num_levels=num_levels), target_table, num_levels=num_levels)


def split_fused(tensors: dict[str, torch.Tensor], fused) -> dict[str, torch.Tensor]:
    """Split fused tensors into their pieces, before the renaming table applies.

    ``fused``: rows ``(fused prefix template, (piece prefix templates...), proportions)``; a key
    ``fused prefix + rest`` (``weight``, ``bias``) becomes one key ``piece + rest`` per piece,
    holding consecutive rows of dim 0 in the given proportions (a fused q/k/v projection:
    ``(1, 1, 1)``; Flux's single-block ``linear1``, q/k/v and the 4x-wide MLP: ``(1, 1, 1, 4)``).
    Keys no row matches are kept."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for template, pieces, shares in fused:
            pattern, _ = _compile(template)
            m = pattern.match(key)
            if m is None:
                continue
            unit, left = divmod(value.shape[0], sum(shares))
            if left:
                raise ValueError(f"{key}: {value.shape[0]} rows do not split in proportions {tuple(shares)}")
            for piece, part in zip(pieces, value.split([unit * s for s in shares], dim=0)):
                out[_fill(piece, m.groupdict(), None) + key[m.end():]] = part
            break
        else:
            out[key] = value
    return out


def join_fused(tensors: dict[str, torch.Tensor], fused) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_fused`: the pieces concatenated back into their fused tensor."""
    out = dict(tensors)
    for template, pieces, _ in fused:
        first, _ = _compile(pieces[0])
        for key in [k for k in out if first.match(k)]:
            m = first.match(key)
            values, rest = m.groupdict(), key[m.end():]
            names = [_fill(p, values, None) + rest for p in pieces]
            if all(n in out for n in names):
                out[_fill(template, values, None) + rest] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


__all__ = ["TRANSFORMS", "prefixed", "rename_key", "to_difflab", "from_difflab", "convert", "split_fused", "join_fused"]
