"""Procedural 3-D shapes: ten classes of surfaces sampled as point clouds, generated from a seed.

Each shape is one class's surface with random size and proportions, turned by a random yaw about
the vertical (z) axis and a random tilt of up to :data:`MAX_TILT` radians, its bounding box
centred at the origin, and scaled so
its farthest point lies at a random radius in [0.6, 0.95]; ``num_points`` points are drawn
uniformly by area on the surface (default 2048). Shape ``i`` of a split is made from its own
generator, seeded by (seed, split, class, i), so a shape never depends on how many others are
asked for, and the ``train`` and ``test`` splits never share a shape.

The classes (:data:`CLASSES`): sphere, cube, cylinder (with caps), cone (with its base), torus,
pyramid (square base), capsule, ellipsoid (clearly unequal axes), ring (a flat annulus) and the
letter L extruded.
"""
from __future__ import annotations

import functools
import math

import torch

from ..core import sample_seed

CLASSES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "capsule", "ellipsoid", "ring", "letter_l")
NUM_CLASSES = len(CLASSES)
SPLITS = ("train", "test")
MAX_TILT = math.radians(25.0)
RADIUS_RANGE = (0.6, 0.95)


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0, n: int | None = None) -> torch.Tensor | float:
    x = torch.rand(() if n is None else (n,), generator=g, dtype=torch.float64)
    x = lo + (hi - lo) * x
    return float(x) if n is None else x


# ----------------------------------------------------------------------------------------------
# Surfaces: each (g, n) -> (n, 3) float64 points, uniform by area on a canonical, z-up surface


def sample_triangles(tris: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points uniform by area on a triangle mesh ``tris`` (T, 3, 3): a triangle chosen in
    proportion to its area, then ``sqrt``-warped barycentric coordinates (Osada et al. 2002, eq. 1)."""
    area = torch.linalg.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]).norm(dim=1)
    idx = torch.multinomial(area.float(), n, replacement=True, generator=g)
    r1, r2 = torch.rand(n, generator=g, dtype=torch.float64).sqrt(), torch.rand(n, generator=g, dtype=torch.float64)
    a, b, c = tris[idx, 0], tris[idx, 1], tris[idx, 2]
    return (1 - r1)[:, None] * a + (r1 * (1 - r2))[:, None] * b + (r1 * r2)[:, None] * c


def _quads(quads: list) -> torch.Tensor:
    """Quads (4 corners each, in order) as two triangles each."""
    tris = []
    for q in quads:
        q = torch.as_tensor(q, dtype=torch.float64)
        tris += [q[[0, 1, 2]], q[[0, 2, 3]]]
    return torch.stack(tris)


def box_mesh(a: float, b: float, c: float) -> torch.Tensor:
    """The 12 triangles of an a x b x c box centred at the origin."""
    x, y, z = a / 2, b / 2, c / 2
    return _quads([[(-x, -y, -z), (x, -y, -z), (x, y, -z), (-x, y, -z)], [(-x, -y, z), (x, -y, z), (x, y, z), (-x, y, z)],
                   [(-x, -y, -z), (x, -y, -z), (x, -y, z), (-x, -y, z)], [(-x, y, -z), (x, y, -z), (x, y, z), (-x, y, z)],
                   [(-x, -y, -z), (-x, y, -z), (-x, y, z), (-x, -y, z)], [(x, -y, -z), (x, y, -z), (x, y, z), (x, -y, z)]])


def prism_mesh(polygon: list, depth: float) -> torch.Tensor:
    """A polygon in the xy-plane extruded by ``depth`` along z. ``polygon`` = (rects, outline): the
    polygon as a union of rectangles ``(x0, y0, x1, y1)`` (its top and bottom faces) and its outline,
    the corners in order (one wall per edge)."""
    rects, outline = polygon
    z = depth / 2
    quads = []
    for x0, y0, x1, y1 in rects:
        for zz in (-z, z):
            quads.append([(x0, y0, zz), (x1, y0, zz), (x1, y1, zz), (x0, y1, zz)])
    for (xa, ya), (xb, yb) in zip(outline, outline[1:] + outline[:1]):
        quads.append([(xa, ya, -z), (xb, yb, -z), (xb, yb, z), (xa, ya, z)])
    return _quads(quads)


def _disc(g, n, r_in, r_out, z):
    rad = (r_in ** 2 + (r_out ** 2 - r_in ** 2) * torch.rand(n, generator=g, dtype=torch.float64)).sqrt()
    th = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    return torch.stack([rad * th.cos(), rad * th.sin(), torch.full_like(rad, z)], 1)


def _mix(g, n, parts):
    """``parts`` = [(area, sampler(k) -> (k, 3)), ...]: how many points each part gets is drawn
    in proportion to its area; the points are concatenated."""
    areas = torch.tensor([a for a, _ in parts], dtype=torch.float64)
    which = torch.multinomial(areas, n, replacement=True, generator=g)
    counts = torch.bincount(which, minlength=len(parts)).tolist()
    return torch.cat([f(k) for (_, f), k in zip(parts, counts)])


def sphere(g, n):
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def cube(g, n):
    return sample_triangles(box_mesh(1.0, 1.0, 1.0), n, g)


def cylinder(g, n):
    r, h = _u(g, 0.35, 0.6), _u(g, 0.8, 1.6)

    def side(k):
        th, z = 2 * math.pi * _u(g, n=k), _u(g, -h / 2, h / 2, k)
        return torch.stack([r * th.cos(), r * th.sin(), z], 1)
    return _mix(g, n, [(2 * math.pi * r * h, side), (math.pi * r * r, lambda k: _disc(g, k, 0, r, h / 2)),
                       (math.pi * r * r, lambda k: _disc(g, k, 0, r, -h / 2))])


def cone(g, n):
    r, h = _u(g, 0.4, 0.7), _u(g, 0.9, 1.5)

    def side(k):   # the distance from the apex grows as sqrt(u): uniform by area
        s, th = _u(g, n=k).sqrt(), 2 * math.pi * _u(g, n=k)
        return torch.stack([r * s * th.cos(), r * s * th.sin(), h / 2 - h * s], 1)
    return _mix(g, n, [(math.pi * r * math.hypot(r, h), side), (math.pi * r * r, lambda k: _disc(g, k, 0, r, -h / 2))])


def torus(g, n):
    big, small = 1.0, _u(g, 0.2, 0.4)
    out = []
    while sum(len(o) for o in out) < n:   # the tube angle phi by rejection: density proportional to R + r cos(phi)
        phi, th = 2 * math.pi * _u(g, n=2 * n), 2 * math.pi * _u(g, n=2 * n)
        keep = _u(g, n=2 * n) < (big + small * phi.cos()) / (big + small)
        phi, th = phi[keep], th[keep]
        rho = big + small * phi.cos()
        out.append(torch.stack([rho * th.cos(), rho * th.sin(), small * phi.sin()], 1))
    return torch.cat(out)[:n]


def pyramid(g, n):
    a, h = _u(g, 0.9, 1.4) / 2, _u(g, 0.8, 1.4)
    base = [(-a, -a, -h / 2), (a, -a, -h / 2), (a, a, -h / 2), (-a, a, -h / 2)]
    apex = (0.0, 0.0, h / 2)
    tris = [[base[i], base[(i + 1) % 4], apex] for i in range(4)] + [[base[0], base[1], base[2]], [base[0], base[2], base[3]]]
    return sample_triangles(torch.tensor(tris, dtype=torch.float64), n, g)


def capsule(g, n):
    r, h = _u(g, 0.3, 0.45), _u(g, 0.8, 1.4)

    def side(k):
        th, z = 2 * math.pi * _u(g, n=k), _u(g, -h / 2, h / 2, k)
        return torch.stack([r * th.cos(), r * th.sin(), z], 1)

    def caps(k):
        p = r * sphere(g, k)
        return p + torch.tensor([0.0, 0.0, h / 2], dtype=torch.float64) * p[:, 2:].sign()
    return _mix(g, n, [(2 * math.pi * r * h, side), (4 * math.pi * r * r, caps)])


def ellipsoid(g, n):
    axes = torch.tensor([1.0, _u(g, 0.35, 0.7), _u(g, 0.2, 0.5)], dtype=torch.float64)
    out = []
    while sum(len(o) for o in out) < n:   # sphere points mapped by diag(axes), kept in proportion to the area element
        u = sphere(g, 2 * n)
        dens = (u * axes[[1, 0, 0]] * axes[[2, 2, 1]]).norm(dim=1)
        keep = _u(g, n=2 * n) < dens / dens.max()
        out.append(u[keep] * axes)
    return torch.cat(out)[:n]


def ring(g, n):
    r_out = 1.0
    return _disc(g, n, _u(g, 0.45, 0.75) * r_out, r_out, 0.0)


def letter_l(g, n):
    w, t, hgt, d = _u(g, 0.6, 0.9), _u(g, 0.2, 0.3), _u(g, 1.0, 1.4), _u(g, 0.2, 0.4)
    rects = [(0.0, 0.0, t, hgt), (t, 0.0, w, t)]
    outline = [(0.0, 0.0), (w, 0.0), (w, t), (t, t), (t, hgt), (0.0, hgt)]
    centre = torch.tensor([w / 2, hgt / 2, 0.0], dtype=torch.float64)
    return sample_triangles(prism_mesh((rects, outline), d), n, g) - centre


SURFACES = (sphere, cube, cylinder, cone, torus, pyramid, capsule, ellipsoid, ring, letter_l)


# ----------------------------------------------------------------------------------------------
# Shapes


def rotation(yaw: float, tilt: float, tilt_axis: float) -> torch.Tensor:
    """R = Rz(yaw) Rv(tilt): a tilt by ``tilt`` about the horizontal axis at angle ``tilt_axis``, then a yaw."""
    c, s = math.cos(tilt), math.sin(tilt)
    v = torch.tensor([math.cos(tilt_axis), math.sin(tilt_axis), 0.0], dtype=torch.float64)
    k = torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=torch.float64)
    tilt_m = torch.eye(3, dtype=torch.float64) + s * k + (1 - c) * k @ k          # Rodrigues
    cy, sy = math.cos(yaw), math.sin(yaw)
    yaw_m = torch.tensor([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]], dtype=torch.float64)
    return yaw_m @ tilt_m


def make_shape(label: int, num_points: int, seed: int) -> torch.Tensor:
    """One shape of class ``label``: (num_points, 3) float32, from a generator seeded by ``seed``."""
    if not (isinstance(label, int) and 0 <= label < NUM_CLASSES):
        raise ValueError(f"label={label!r} must be an integer in [0, {NUM_CLASSES}): {', '.join(CLASSES)}")
    if not (isinstance(num_points, int) and num_points >= 1):
        raise ValueError(f"num_points={num_points!r} must be an integer >= 1")
    g = torch.Generator().manual_seed(int(seed))
    p = SURFACES[label](g, num_points)
    p = p / p.norm(dim=1).max() * _u(g, *RADIUS_RANGE)
    r = rotation(_u(g, 0.0, 2 * math.pi), _u(g, 0.0, MAX_TILT), _u(g, 0.0, 2 * math.pi))
    return (p @ r.T).float()


def shape_seed(seed: int, split: str, label: int, i: int) -> int:
    """The seed of shape ``i`` of class ``label`` in ``split``: disjoint streams per split and class."""
    return sample_seed(seed, (SPLITS.index(split) * NUM_CLASSES + label) * 1_000_000 + i)


@functools.lru_cache(maxsize=8)
def _cached(split: str, per_class: int, num_points: int, seed: int, classes: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    pts, labels = [], []
    for c in classes:
        for i in range(per_class):
            pts.append(make_shape(c, num_points, shape_seed(seed, split, c, i)))
            labels.append(c)
    return torch.stack(pts), torch.tensor(labels, dtype=torch.long)


def load_shapes3d(split: str = "train", per_class: int = 100, num_points: int = 2048, seed: int = 0,
                  classes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` shapes of every class in ``classes`` (default all) as (points (M, num_points, 3)
    float32 in the unit ball, labels (M,) long), class by class. Deterministic from ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    if not (isinstance(per_class, int) and per_class >= 1):
        raise ValueError(f"per_class={per_class!r} must be an integer >= 1")
    if not (isinstance(num_points, int) and num_points >= 1):
        raise ValueError(f"num_points={num_points!r} must be an integer >= 1")
    classes = tuple(range(NUM_CLASSES)) if classes is None else tuple(int(c) for c in classes)
    bad = [c for c in classes if not 0 <= c < NUM_CLASSES]
    if bad or not classes:
        raise ValueError(f"classes={list(classes)} must be non-empty class indices in [0, {NUM_CLASSES})")
    pts, labels = _cached(split, per_class, num_points, int(seed), classes)
    return pts.clone(), labels.clone()


__all__ = ["CLASSES", "NUM_CLASSES", "SPLITS", "MAX_TILT", "SURFACES", "load_shapes3d", "make_shape", "shape_seed",
           "sample_triangles", "box_mesh", "prism_mesh", "rotation"]
