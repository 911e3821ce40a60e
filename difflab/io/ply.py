"""Point clouds out and in: PLY files (Turk 1994; the Stanford format every 3-D viewer reads).

:func:`write_ply` writes a binary little-endian PLY of float x, y, z vertices (and optional 8-bit
r, g, b colours) atomically; :func:`read_ply` reads back the files it writes (binary
little-endian or ASCII, float vertices), enough for round trips and tests."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def check_cloud(points) -> np.ndarray:
    arr = points.detach().cpu().numpy() if torch.is_tensor(points) else np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.isfinite(arr).all():
        raise ValueError(f"points must be a finite (N, 3) array, got shape {tuple(arr.shape)}")
    return arr.astype("<f4")


def write_ply(path, points, colors=None, *, binary: bool = True) -> Path:
    """Write ``points`` (N, 3) (and ``colors`` (N, 3) uint8 or floats in [0, 1]) as a PLY file."""
    pts = check_cloud(points)
    props = [("x", "f4", "float"), ("y", "f4", "float"), ("z", "f4", "float")]
    fields = [pts[:, 0], pts[:, 1], pts[:, 2]]
    if colors is not None:
        col = colors.detach().cpu().numpy() if torch.is_tensor(colors) else np.asarray(colors)
        if col.shape != pts.shape:
            raise ValueError(f"colors must be (N, 3) like points {pts.shape}, got {col.shape}")
        if col.dtype.kind == "f":
            col = np.clip(np.round(col * 255), 0, 255)
        col = col.astype("u1")
        props += [("red", "u1", "uchar"), ("green", "u1", "uchar"), ("blue", "u1", "uchar")]
        fields += [col[:, 0], col[:, 1], col[:, 2]]
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", "comment written by difflab",
              f"element vertex {len(pts)}"] + [f"property {t} {n}" for n, _, t in props] + ["end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            rec = np.empty(len(pts), dtype=[(n, "<" + d) for n, d, _ in props])
            for (n, _, _), v in zip(props, fields):
                rec[n] = v
            f.write(rec.tobytes())
        else:
            for row in zip(*fields):
                f.write((" ".join(f"{v:.7g}" if isinstance(v, np.floating) else str(int(v)) for v in row) + "\n").encode())
    os.replace(tmp, path)
    return path


PLY_TYPES = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1",
             "int": "i4", "int32": "i4", "uint": "u4", "short": "i2", "ushort": "u2", "char": "i1"}


def read_ply(path) -> torch.Tensor:
    """The vertices (N, 3) float32 of a PLY file with one ``vertex`` element (binary little-endian or ASCII)."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path} is not a PLY file (no 'ply' magic or no end_header)")
    lines = data[:end].decode("ascii").splitlines()
    fmt = next(line.split()[1] for line in lines if line.startswith("format"))
    n = next(int(line.split()[2]) for line in lines if line.startswith("element vertex"))
    props = [line.split() for line in lines if line.startswith("property")]
    if fmt not in ("binary_little_endian", "ascii") or any(p[1] == "list" or p[1] not in PLY_TYPES for p in props):
        raise ValueError(f"{path}: only binary_little_endian or ascii PLY with scalar vertex properties is read, got {fmt}")
    body = data[end + len(b"end_header\n"):]
    if fmt == "ascii":
        table = np.array([line.split() for line in body.decode("ascii").split("\n")[:n]], dtype=np.float64)
        cols = {p[2]: table[:, i] for i, p in enumerate(props)}
    else:
        rec = np.frombuffer(body, dtype=[(p[2], "<" + PLY_TYPES[p[1]]) for p in props], count=n)
        cols = {p[2]: rec[p[2]] for p in props}
    return torch.from_numpy(np.stack([cols["x"], cols["y"], cols["z"]], 1).astype(np.float32))


__all__ = ["write_ply", "read_ply", "check_cloud"]
