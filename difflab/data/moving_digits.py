"""Moving digits: an embedded video data set made from scikit-learn's 8x8 digits
(:mod:`difflab.data.digits`), in the manner of Moving MNIST (Srivastava et al. 2015).

A clip is ``frames`` (default 8) grey frames of a ``size`` x ``size`` (default 24) canvas at -1 on
which one 8x8 digit moves in one of :data:`DIRECTIONS` at a speed of :data:`SPEEDS` pixels a
frame, bouncing off the edges (its velocity along the axis flips when its box would leave the
canvas; the position is reflected). Positions are whole pixels, so every frame holds the source
digit's own pixels. The first step never bounces: the label says where the digit starts going.
With ``bounce=False`` the start is drawn among the positions from which the whole clip stays
inside the canvas: the digit goes the labelled way in every frame (a clip then needs
``(frames - 1) * speed <= size - 8``).

Labels: the digit's class, the direction (an index of :data:`DIRECTIONS`), the speed, the source
digit's index, and a caption ("a 3 moving left"). Everything is drawn from
``numpy.random.default_rng(seed)``. The ``train`` / ``test`` clips are made from the two sides of
the digits' seeded split (:func:`difflab.data.digits.stratified_split`), so a judge or a generator
trained on train clips never saw a test clip's digit.

Clips are (N, 1, F, H, W) float32 in [-1, 1] (channels, then frames: the layout of every video
network of :mod:`difflab.nn`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .digits import load_digits

DIRECTIONS = ("left", "right", "up", "down")
# (dy, dx) per frame for a speed of 1: rows grow downwards
VELOCITIES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPEEDS = (1, 2)
DIGIT_SIZE = 8
SPLITS = ("all", "train", "test")


class Clips(NamedTuple):
    """A batch of moving-digit clips and their labels (see the module docstring)."""

    clips: torch.Tensor       # (N, 1, F, H, W) float32 in [-1, 1]
    labels: torch.Tensor      # (N,) long: the digit's class
    directions: torch.Tensor  # (N,) long: index of DIRECTIONS
    speeds: torch.Tensor      # (N,) long: pixels per frame
    positions: torch.Tensor   # (N, F, 2) long: (row, column) of the digit box's top-left corner
    sources: torch.Tensor     # (N,) long: the source digit's index in its split

    @property
    def captions(self) -> list[str]:
        return [caption(int(c), int(d)) for c, d in zip(self.labels, self.directions)]


def caption(label: int, direction: int) -> str:
    """``"a 3 moving left"``."""
    return f"a {label} moving {DIRECTIONS[direction]}"


def bounce_path(start: tuple[int, int], velocity: tuple[int, int], frames: int, span: int) -> np.ndarray:
    """(frames, 2) positions of a box starting at ``start`` with ``velocity`` (pixels a frame) that
    bounces inside [0, span] on each axis: past an edge, the position is reflected and the velocity
    flips."""
    pos, vel = np.array(start, dtype=np.int64), np.array(velocity, dtype=np.int64)
    out = [pos.copy()]
    for _ in range(frames - 1):
        pos = pos + vel
        for a in range(2):
            if pos[a] < 0:
                pos[a], vel[a] = -pos[a], -vel[a]
            elif pos[a] > span:
                pos[a], vel[a] = 2 * span - pos[a], -vel[a]
        out.append(pos.copy())
    return np.stack(out)


def render(digits: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """Paste (N, 8, 8) digits in [-1, 1] onto -1 canvases at ``positions`` (N, F, 2) -> (N, 1, F, size, size)."""
    n, f = positions.shape[:2]
    out = torch.full((n, 1, f, size, size), -1.0)
    for i in range(n):
        for t in range(f):
            r, c = (int(v) for v in positions[i, t])
            out[i, 0, t, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE] = digits[i]
    return out


def check_args(num: int, frames: int, size: int, split: str, directions, speeds, bounce: bool = True) -> None:
    """A ValueError naming the bad argument."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {list(SPLITS)}")
    for name, v, least in (("num", num, 0), ("frames", frames, 1), ("size", size, DIGIT_SIZE + 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ValueError(f"{name}={v!r} must be an int >= {least}")
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad or not directions:
        raise ValueError(f"directions {bad or list(directions)} must be a non-empty list of {list(DIRECTIONS)}")
    span = size - DIGIT_SIZE
    if not speeds or any(not isinstance(s, int) or s < 1 or s > span // 2 for s in speeds):
        raise ValueError(f"speeds={list(speeds)} must be ints in [1, {span // 2}] (pixels a frame on a {size}-pixel canvas)")
    if not bounce and (frames - 1) * max(speeds) > span:
        raise ValueError(f"bounce=False: {frames} frames at speeds={list(speeds)} travel {(frames - 1) * max(speeds)} pixels, "
                         f"more than the {span} a {size}-pixel canvas leaves an 8-pixel digit; use fewer frames, lower "
                         f"speeds or a larger size")


def moving_digits(num: int, *, frames: int = 8, size: int = 24, split: str = "train", seed: int = 0,
                  directions=DIRECTIONS, speeds=SPEEDS, classes=None, direction_of=None, bounce: bool = True) -> Clips:
    """``num`` clips, the same for the same arguments (``numpy.random.default_rng(seed)``).

    Per clip, in order: a source digit of ``split`` (uniform; ``classes`` restricts its class),
    a direction of ``directions`` (uniform, or ``direction_of[i]``, an index of
    :data:`DIRECTIONS`), a speed of ``speeds``, and a start position uniform among those from which
    the first step stays inside the canvas (``bounce=False``: the whole clip)."""
    directions = tuple(directions)
    check_args(num, frames, size, split, directions, tuple(speeds), bounce)
    digits, digit_labels = load_digits(8, split=split)
    rng = np.random.default_rng(seed)
    pool = np.arange(len(digits)) if classes is None else np.flatnonzero(np.isin(digit_labels.numpy(), list(classes)))
    if len(pool) == 0:
        raise ValueError(f"classes={list(classes)} selects no digit")
    span = size - DIGIT_SIZE
    src, dirs, spd, pos = [], [], [], []
    for i in range(num):
        s = int(pool[rng.integers(len(pool))])
        d = DIRECTIONS.index(directions[rng.integers(len(directions))]) if direction_of is None else int(direction_of[i])
        v = int(speeds[rng.integers(len(speeds))])
        dy, dx = VELOCITIES[DIRECTIONS[d]]
        # the first step (bounce=False: every step) stays inside [0, span] on the moving axis
        travel = v if bounce else v * (frames - 1)
        lo = (max(0, -dy * travel), max(0, -dx * travel))
        hi = (span - max(0, dy * travel), span - max(0, dx * travel))
        start = (int(rng.integers(lo[0], hi[0] + 1)), int(rng.integers(lo[1], hi[1] + 1)))
        src.append(s), dirs.append(d), spd.append(v)
        pos.append(bounce_path(start, (dy * v, dx * v), frames, span))
    sources = torch.tensor(src, dtype=torch.long)
    positions = torch.from_numpy(np.stack(pos)) if num else torch.zeros(0, frames, 2, dtype=torch.long)
    clips = render(digits[sources, 0], positions, size)
    return Clips(clips, digit_labels[sources], torch.tensor(dirs, dtype=torch.long), torch.tensor(spd, dtype=torch.long),
                 positions, sources)


def still_frames(num: int, *, frames: int = 8, size: int = 24, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` stacks of ``frames`` independent still images for joint image-and-video training
    (Ho et al. 2022, Section 3.2): each frame a different digit of the stack's class at its own
    uniform position. Returns (stacks (N, 1, F, H, W), labels (N,)); deterministic from ``seed``."""
    check_args(num, frames, size, split, DIRECTIONS, SPEEDS)
    digits, digit_labels = load_digits(8, split=split)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(digit_labels.numpy() == c) for c in range(10)]
    span = size - DIGIT_SIZE
    out = torch.full((num, 1, frames, size, size), -1.0)
    labels = torch.tensor(rng.integers(10, size=num), dtype=torch.long)
    for i in range(num):
        members = by_class[int(labels[i])]
        for t in range(frames):
            r, c = (int(v) for v in rng.integers(0, span + 1, size=2))
            out[i, 0, t, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE] = digits[int(members[rng.integers(len(members))]), 0]
    return out, labels


def ink_centres(frames: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., 2) centre of mass (row, column) in pixels of the ink (x + 1) / 2, clamped to [0, 1], of
    frames (..., H, W) in [-1, 1]; the canvas centre for a frame of ink mass <= ``eps``. Differentiable:
    the video judge reads motion by it (:mod:`difflab.eval.video`) and the centre-of-mass velocity loss
    trains by it (:mod:`difflab.train.objectives.centroid_motion`)."""
    ink = ((frames.float() + 1) / 2).clamp(0, 1)
    h, w = ink.shape[-2:]
    mass = ink.sum((-2, -1))
    rows = (ink.sum(-1) * torch.arange(h, dtype=ink.dtype, device=ink.device)).sum(-1)
    cols = (ink.sum(-2) * torch.arange(w, dtype=ink.dtype, device=ink.device)).sum(-1)
    safe = mass.clamp(min=eps)
    out = torch.stack([rows / safe, cols / safe], -1)
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=ink.dtype, device=ink.device)
    return torch.where((mass > eps)[..., None], out, centre)


__all__ = ["Clips", "ink_centres", "moving_digits", "still_frames", "caption", "bounce_path", "render", "DIRECTIONS", "VELOCITIES",
           "SPEEDS", "DIGIT_SIZE"]
