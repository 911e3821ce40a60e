"""Embedded scenes: 1-4 objects on a ground plane before a back wall, ray-cast from a pinhole
camera into an RGB image, an exact depth map and per-object masks (the data of joint image+depth
diffusion and of slot diffusion, :mod:`difflab.pipelines.image_depth`, :mod:`difflab.pipelines.slots`).

Geometry (world units; x right, y up, z forward; the camera at the origin looks along +z):

- the ground is the plane y = -``height`` (the camera stands ``height`` above it), the back wall
  the plane z = ``wall``;
- a pixel (row v, column u) is the ray ``t * ((u + 0.5 - cx) / f, -(v + 0.5 - cy) / f, 1)``;
  its depth is t, the z of the first surface it meets (z-depth, as depth sensors report);
- an object is an extrusion along z of an 8x8 bitmap (a box, a disc, a triangle, or one of the
  embedded digits, :mod:`difflab.data.digits`): every set cell is an axis-aligned box of side
  ``size / 8`` and depth ``0.3 * size``, the bitmap's lowest row standing on the ground. A ray
  meets a box at t_enter = max over axes of the slab entries (Kay & Kajiya 1986), so the depth is
  exact: the ground's 1 / (v + 0.5 - cy) law, each front face at its z, sides and tops in between.

Shading: flat colours (the object's palette colour, darker on sides, lighter on tops; a plain
ground and wall) mixed with a grey fog that grows with depth. Each scene's objects have distinct
colours, and every object keeps at least half of its own pixels in view (scenes are redrawn
otherwise). Everything is drawn from ``numpy.random.default_rng((seed, split))``; the ``train``
and ``test`` splits use the two sides of the digits' seeded split.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .digits import load_digits

SHAPES = ("box", "disc", "triangle")
KINDS = SHAPES + tuple(str(d) for d in range(10))  # a kind's index is its label; digits are kinds 3..12
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = np.array([[0.9, 0.15, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1],
                    [0.85, 0.2, 0.85], [0.1, 0.85, 0.9]], dtype=np.float32)
GROUND, WALL, FOG = np.array([0.45, 0.4, 0.35]), np.array([0.75, 0.75, 0.8]), np.array([0.6, 0.6, 0.6])
SHADES = (0.7, 1.0, 0.85)  # a hit through the x slab (a side), z (the front face), y (the top)
SPLITS = ("all", "train", "test")
Z_RANGE = (1.6, 4.0)  # the front faces' depths
SIZE_RANGE = (0.7, 1.0)  # the objects' heights (world units)
THICKNESS = 0.3  # extrusion depth, as a fraction of the object's size


@dataclass(frozen=True)
class Camera:
    """A pinhole camera of ``size`` x ``size`` pixels: focal length ``f`` and principal point
    (``cx``, ``cy``) in pixels, standing ``height`` above the ground, facing a wall at z = ``wall``."""
    size: int = 32
    f: float = 32.0
    cx: float = 16.0
    cy: float = 8.0
    height: float = 1.0
    wall: float = 5.0

    @property
    def near(self) -> float:
        """The smallest depth in view: the ground under the bottom row."""
        return self.f * self.height / (self.size - 0.5 - self.cy)

    def rays(self) -> np.ndarray:
        """(size * size, 3) ray directions with unit z, row-major over (v, u)."""
        v, u = np.meshgrid(np.arange(self.size) + 0.5, np.arange(self.size) + 0.5, indexing="ij")
        return np.stack([(u - self.cx) / self.f, -(v - self.cy) / self.f, np.ones_like(u)], -1).reshape(-1, 3)


def camera(size: int = 32) -> Camera:
    """The scenes' camera at ``size`` pixels: f = size, the horizon a quarter down the image."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 8 or size % 4:
        raise ValueError(f"size={size!r} must be an int >= 8 divisible by 4")
    return Camera(size=size, f=float(size), cx=size / 2, cy=size / 4)


class SceneObject(NamedTuple):
    """One object: its kind (index of :data:`KINDS`), colour (index of :data:`COLOURS`), bitmap
    (8x8 bool, row 0 on top), height ``size``, centre ``x`` and front-face depth ``z``."""
    kind: int
    colour: int
    bitmap: np.ndarray
    size: float
    x: float
    z: float


class Scenes(NamedTuple):
    """Rendered scenes (see the module docstring); ``max_objects`` slots per scene, unused ones
    padded (kind and colour -1, empty mask)."""
    images: torch.Tensor   # (N, 3, H, W) float32 in [-1, 1]
    depth: torch.Tensor    # (N, 1, H, W) float32, z-depth in world units
    masks: torch.Tensor    # (N, max_objects, H, W) bool: the visible pixels of each object
    counts: torch.Tensor   # (N,) long: objects in the scene
    kinds: torch.Tensor    # (N, max_objects) long: index of KINDS, or -1
    colours: torch.Tensor  # (N, max_objects) long: index of COLOURS, or -1
    positions: torch.Tensor  # (N, max_objects, 2) float32: (x, z) of each object

    def segmentation(self) -> torch.Tensor:
        """(N, H, W) long: 0 on the ground and wall, i + 1 where object i is seen."""
        ids = torch.arange(1, self.masks.shape[1] + 1).view(1, -1, 1, 1)
        return (self.masks.long() * ids).sum(1)


def shape_bitmap(kind: str) -> np.ndarray:
    """The 8x8 bitmap of a shape of :data:`SHAPES`."""
    r = np.arange(8) + 0.5
    yy, xx = np.meshgrid(r, r, indexing="ij")
    if kind == "box":
        return np.ones((8, 8), dtype=bool)
    if kind == "disc":
        return (yy - 4) ** 2 + (xx - 4) ** 2 <= 16
    if kind == "triangle":
        return np.abs(xx - 4) <= yy / 2
    raise ValueError(f"kind={kind!r} is not one of {list(SHAPES)}")


@functools.lru_cache(maxsize=4)
def _digit_bitmaps(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_digits(split="all" if split == "all" else split)
    return (images[:, 0] > -0.25).numpy(), labels.numpy()


def object_boxes(obj: SceneObject, cam: Camera) -> np.ndarray:
    """(M, 6) boxes (x0, y0, z0, x1, y1, z1) of the set cells of the object's bitmap; its lowest
    set row stands on the ground, its front face at z."""
    rows, cols = np.nonzero(obj.bitmap)
    cell = obj.size / 8
    bottom = rows.max()
    x0 = obj.x - cell * (cols.min() + cols.max() + 1) / 2 + cols * cell
    y0 = -cam.height + (bottom - rows) * cell
    z0 = np.full_like(x0, obj.z)
    return np.stack([x0, y0, z0, x0 + cell, y0 + cell, z0 + THICKNESS * obj.size], -1)


def _slabs(rays: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, M) entry t of each ray into each box (inf on a miss) and (P, M, 3) the slab entries."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = boxes[None, :, :3] / rays[:, None, :]
        t2 = boxes[None, :, 3:] / rays[:, None, :]
    lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
    enter, exit_ = lo.max(-1), hi.min(-1)
    return np.where((enter <= exit_) & (enter > 0), enter, np.inf), lo


def ray_boxes(rays: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab test (Kay & Kajiya 1986) of rays (P, 3) from the origin against boxes (M, 6): the
    nearest entry t (P,) (inf on a miss) and the axis (0 x, 1 y, 2 z) through which it entered.
    Only rays that meet the boxes' bounding box are tested against every box."""
    t = np.full(len(rays), np.inf)
    axis = np.zeros(len(rays), dtype=np.int64)
    if len(boxes) == 0:
        return t, axis
    bound = np.concatenate([boxes[:, :3].min(0), boxes[:, 3:].max(0)])[None]
    near = np.flatnonzero(np.isfinite(_slabs(rays, bound)[0][:, 0]))
    enter, lo = _slabs(rays[near], boxes)
    best = enter.argmin(1)
    rows = np.arange(len(near))
    t[near] = enter[rows, best]
    axis[near] = lo[rows, best].argmax(-1)
    return t, axis


def background_depth(cam: Camera) -> np.ndarray:
    """(size, size) depth of the empty room: the ground y = -height where its ray meets it before
    the wall (t = f height / (v + 0.5 - cy)), else the wall (t = wall)."""
    v = np.arange(cam.size) + 0.5 - cam.cy
    with np.errstate(divide="ignore"):
        ground = np.where(v > 0, cam.f * cam.height / v, np.inf)
    return np.broadcast_to(np.minimum(ground, cam.wall)[:, None], (cam.size, cam.size)).copy()


def object_hits(obj: SceneObject, cam: Camera) -> tuple[np.ndarray, np.ndarray]:
    """The object alone: (P,) depth of each pixel's first hit (inf on a miss) and its axis."""
    return ray_boxes(cam.rays(), object_boxes(obj, cam))


def render(objects: list[SceneObject], cam: Camera, hits=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast one scene: image (3, H, W) in [0, 1], depth (H, W) and the visible masks
    (len(objects), H, W) bool. ``hits``: the objects' :func:`object_hits`, when already cast."""
    hits = [object_hits(o, cam) for o in objects] if hits is None else hits
    depth = background_depth(cam).reshape(-1)
    colour = np.where((depth < cam.wall)[:, None], GROUND, WALL)
    owner = np.full(len(depth), -1)
    for i, (obj, (t, axis)) in enumerate(zip(objects, hits)):
        hit = t < depth
        depth = np.where(hit, t, depth)
        owner = np.where(hit, i, owner)
        shaded = PALETTE[obj.colour][None, :] * np.array(SHADES)[axis][:, None]
        colour = np.where(hit[:, None], shaded, colour)
    fog = 0.6 * (depth - cam.near) / (cam.wall - cam.near)
    image = colour * (1 - fog[:, None]) + FOG * fog[:, None]
    n = cam.size
    masks = np.stack([owner == i for i in range(len(objects))]).reshape(-1, n, n) if objects else np.zeros((0, n, n), bool)
    return image.T.reshape(3, n, n).astype(np.float32), depth.reshape(n, n), masks


def _draw_object(rng, cam: Camera, colour: int, digits) -> SceneObject:
    kind = int(rng.integers(len(KINDS)))
    if kind < len(SHAPES):
        bitmap = shape_bitmap(SHAPES[kind])
    else:
        bitmaps, labels = digits
        pool = np.flatnonzero(labels == kind - len(SHAPES))
        bitmap = bitmaps[pool[rng.integers(len(pool))]]
    z = float(rng.uniform(*Z_RANGE))
    u = rng.uniform(0.15, 0.85) * cam.size
    return SceneObject(kind, colour, bitmap, float(rng.uniform(*SIZE_RANGE)), float((u - cam.cx) * z / cam.f), z)


def draw_scene(rng, cam: Camera, count: int, digits, min_visible: float = 0.5, tries: int = 100):
    """``count`` objects of distinct colours, each with at least ``min_visible`` of its own pixels
    (and 3 pixels) in view (redrawn up to ``tries`` times), and their :func:`render`."""
    for _ in range(tries):
        colours = rng.permutation(len(COLOURS))[:count]
        objects = [_draw_object(rng, cam, int(c), digits) for c in colours]
        hits = [object_hits(o, cam) for o in objects]
        rendered = render(objects, cam, hits)
        alone = [np.isfinite(t).sum() for t, _ in hits]
        if all(m.sum() >= max(3, min_visible * a) for m, a in zip(rendered[2], alone)):
            return objects, rendered
    raise RuntimeError(f"no scene of {count} objects with every object visible in {tries} tries")


@functools.lru_cache(maxsize=8)
def _drawn(n: int, size: int, split: str, seed: int, max_objects: int, min_objects: int) -> tuple:
    """The scenes' objects and renders, as :func:`draw_scene` gives them, in order."""
    cam = camera(size)
    rng = np.random.default_rng((seed, SPLITS.index(split)))
    digits = _digit_bitmaps(split)
    counts = rng.integers(min_objects, max_objects + 1, size=n)
    return tuple(draw_scene(rng, cam, int(count), digits) for count in counts)


@functools.lru_cache(maxsize=8)
def _scenes(n: int, size: int, split: str, seed: int, max_objects: int, min_objects: int) -> Scenes:
    images = np.zeros((n, 3, size, size), np.float32)
    depth = np.zeros((n, 1, size, size), np.float32)
    masks = np.zeros((n, max_objects, size, size), bool)
    kinds, colours = np.full((n, max_objects), -1), np.full((n, max_objects), -1)
    positions = np.zeros((n, max_objects, 2), np.float32)
    counts = np.zeros(n, np.int64)
    for i, (objects, (image, d, m)) in enumerate(_drawn(n, size, split, seed, max_objects, min_objects)):
        count = counts[i] = len(objects)
        images[i], depth[i, 0], masks[i, :count] = image, d, m
        kinds[i, :count] = [o.kind for o in objects]
        colours[i, :count] = [o.colour for o in objects]
        positions[i, :count] = [(o.x, o.z) for o in objects]
    t = torch.from_numpy
    return Scenes(t(images) * 2 - 1, t(depth), t(masks), t(counts).long(), t(kinds).long(), t(colours).long(), t(positions))


def load_scenes(n: int, *, size: int = 32, split: str = "train", seed: int = 0, max_objects: int = 4,
                min_objects: int = 1) -> Scenes:
    """``n`` scenes of ``min_objects``..``max_objects`` objects (uniform counts), rendered at
    ``size`` x ``size``; the same arguments give the same scenes (cached). See the module docstring."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {list(SPLITS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int")
    if not 1 <= min_objects <= max_objects <= len(COLOURS):
        raise ValueError(f"min_objects={min_objects}, max_objects={max_objects} must satisfy 1 <= min <= max <= {len(COLOURS)}")
    camera(size)
    return _scenes(n, size, split, seed, max_objects, min_objects)


def rerender_scenes(n: int, drop: torch.Tensor, add: torch.Tensor | None = None, *, size: int = 32, split: str = "train",
                    seed: int = 0, max_objects: int = 4, min_objects: int = 1) -> torch.Tensor:
    """(n, 3, size, size) images in [-1, 1] of the scenes of :func:`load_scenes` (the same
    arguments) re-rendered without object ``drop[i]`` of scene i (an index into its objects, in
    the order of its masks and labels; -1 keeps them all) and, with ``add`` (n, 2) long, with
    object ``add[i, 1]`` of scene ``add[i, 0]`` put in (at its own place; -1: none): exact "scene
    minus one object" or "one object swapped" images (what the object hid shows), e.g. the
    targets of slot-edit training."""
    load_scenes(n, size=size, split=split, seed=seed, max_objects=max_objects, min_objects=min_objects)  # checks
    drawn = _drawn(n, size, split, seed, max_objects, min_objects)
    add = torch.full((n, 2), -1) if add is None else add
    if drop.shape != (n,) or drop.dtype != torch.long or add.shape != (n, 2) or add.dtype != torch.long:
        raise ValueError(f"drop must be a long tensor ({n},) and add ({n}, 2), got {drop.dtype} {tuple(drop.shape)}, "
                         f"{add.dtype} {tuple(add.shape)}")
    cam = camera(size)
    images = np.zeros((n, 3, size, size), np.float32)
    for i, ((objects, (image, _, _)), j, (donor, k)) in enumerate(zip(drawn, drop.tolist(), add.tolist())):
        if not -1 <= j < len(objects) or not (donor == -1 or (0 <= donor < n and 0 <= k < len(drawn[donor][0]))):
            raise ValueError(f"scene {i} ({len(objects)} objects): drop {j}, add {(donor, k)} is not an object")
        kept = [o for o_i, o in enumerate(objects) if o_i != j] + ([drawn[donor][0][k]] if donor >= 0 else [])
        images[i] = image if j < 0 and donor < 0 else render(kept, cam)[0]
    return torch.from_numpy(images) * 2 - 1


def depth_to_unit(depth: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Depth mapped linearly from [near, wall] of the camera at ``size`` to [-1, 1] (the model's channel)."""
    cam = camera(size)
    return (depth - cam.near) / (cam.wall - cam.near) * 2 - 1


def unit_to_depth(unit: torch.Tensor, size: int = 32) -> torch.Tensor:
    """The inverse of :func:`depth_to_unit`, clamped to [near, wall]."""
    cam = camera(size)
    return ((unit.clamp(-1, 1) + 1) / 2) * (cam.wall - cam.near) + cam.near


__all__ = ["SHAPES", "KINDS", "COLOURS", "PALETTE", "Camera", "camera", "SceneObject", "Scenes", "shape_bitmap",
           "object_boxes", "ray_boxes", "object_hits", "background_depth", "render", "draw_scene", "load_scenes", "rerender_scenes",
           "depth_to_unit",
           "unit_to_depth"]
