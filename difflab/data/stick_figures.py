"""Stick-figure motions: an embedded, procedural data set of human-like actions for motion
diffusion (the stand-in for HumanML3D in Tevet et al. 2023, "Human Motion Diffusion Model").

A skeleton of 17 joints (:data:`JOINTS`, :data:`PARENTS`, :data:`BONE_LENGTHS` in metres, y up)
performs one of eight actions (:data:`ACTIONS`) with a random speed (cycle frequency), amplitude,
height (all bone lengths scaled), facing (yaw) and start phase. Every clip is ``(frames, 17, 3)``
joint positions at :data:`FPS` frames per second, grounded (the lowest foot on y = 0) and with
its root moved by *foot locking*: the stance foot (the lower one) stays put in the world while
the body moves over it, so the real data has the little foot skating that a generator should
match.

- :func:`make_motions`: ``n`` clips from a seed; clip i depends only on (seed, i);
- :func:`motion_split`: the seeded train / held-out split (disjoint seeds);
- :func:`canonicalize`: the HumanML3D preprocessing, each clip turned to face +z at frame 0 with
  its root over the origin;
- :class:`MotionNormalizer`: per-(joint, coordinate) mean and standard deviation, the model's
  space (MDM normalizes its features the same way);
- :func:`foot_contacts`, :func:`bone_lengths`: what geometric losses and metrics read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

JOINTS = ("pelvis", "spine", "chest", "neck", "head",
          "l_shoulder", "l_elbow", "l_hand", "r_shoulder", "r_elbow", "r_hand",
          "l_hip", "l_knee", "l_foot", "r_hip", "r_knee", "r_foot")
PARENTS = (-1, 0, 1, 2, 3, 2, 5, 6, 2, 8, 9, 0, 11, 12, 0, 14, 15)
# length of the bone from each joint's parent to it, metres, for height factor 1 (the root has none)
BONE_LENGTHS = (0.0, 0.12, 0.18, 0.14, 0.12, 0.18, 0.28, 0.26, 0.18, 0.28, 0.26, 0.10, 0.44, 0.44, 0.10, 0.44, 0.44)
FEET = (JOINTS.index("l_foot"), JOINTS.index("r_foot"))
UPPER_BODY = tuple(range(1, 11))                      # spine .. right hand
LOWER_BODY = (0, 11, 12, 13, 14, 15, 16)              # pelvis and legs
ACTIONS = ("walk", "run", "jump", "wave", "squat", "kick", "turn", "punch")
VERBS = ("walks", "runs", "jumps", "waves", "squats", "kicks", "turns around", "punches")
FPS = 20
FRAMES = 32


@dataclass(frozen=True)
class MotionParams:
    """The random draws of one clip."""

    action: int
    speed: float       # cycle frequency factor, [0.75, 1.3]
    amplitude: float   # swing factor, [0.7, 1.2]
    height: float      # bone-length factor, [0.85, 1.15]
    facing: float      # yaw at frame 0, radians in [0, 2 pi)
    phase: float       # start phase of the cycle, radians
    side: float        # +1 / -1: which way turn turns, which leg kicks first

    def caption(self) -> str:
        size = "short " if self.height < 0.95 else "tall " if self.height > 1.05 else ""
        pace = " slowly" if self.speed < 0.9 else " quickly" if self.speed > 1.15 else ""
        return f"a {size}figure {VERBS[self.action]}{pace}"


def draw_params(action: int, generator: torch.Generator) -> MotionParams:
    u = torch.rand(6, generator=generator).tolist()
    return MotionParams(action, 0.75 + 0.55 * u[0], 0.7 + 0.5 * u[1], 0.85 + 0.3 * u[2], 2 * math.pi * u[3],
                        2 * math.pi * u[4], 1.0 if u[5] < 0.5 else -1.0)


# ----------------------------------------------------------------------------------------------
# Forward kinematics in the body's own frame (x: the figure's left, y: up, z: forward)


def limb_direction(pitch: torch.Tensor, abduct: torch.Tensor, side: float) -> torch.Tensor:
    """Unit vectors (F, 3) of a limb hanging down, raised sideways by ``abduct`` (away from the
    body on ``side``: +1 left, -1 right) and swung forward by ``pitch``."""
    return torch.stack([side * torch.sin(abduct), -torch.cos(abduct) * torch.cos(pitch),
                        torch.cos(abduct) * torch.sin(pitch)], dim=-1)


def body_pose(angles: dict[str, torch.Tensor], height: float) -> torch.Tensor:
    """Local joint positions (F, 17, 3), pelvis at the origin, from per-frame angles:
    ``lean`` (torso pitch), per side ``s`` in (l, r): ``{s}_arm`` / ``{s}_arm_out`` (upper-arm pitch
    and abduction), ``{s}_fore`` / ``{s}_fore_out`` (forearm), ``{s}_hip`` / ``{s}_hip_out`` and
    ``{s}_knee`` (flexion, the shin swings back)."""
    lean = angles["lean"]
    n = len(lean)
    L = [b * height for b in BONE_LENGTHS]
    up = torch.stack([torch.zeros(n), torch.cos(lean), torch.sin(lean)], -1)
    p = torch.zeros(n, 17, 3)
    for j in (1, 2, 3, 4):
        p[:, j] = p[:, j - 1] + L[j] * up
    zero = torch.zeros(n)
    for s, sign, (sh, el, ha, hip, kn, ft) in (("l", 1.0, (5, 6, 7, 11, 12, 13)), ("r", -1.0, (8, 9, 10, 14, 15, 16))):
        across = torch.tensor([sign, 0.0, 0.0])
        p[:, sh] = p[:, 2] + L[sh] * across
        p[:, el] = p[:, sh] + L[el] * limb_direction(angles[f"{s}_arm"], angles.get(f"{s}_arm_out", zero), sign)
        p[:, ha] = p[:, el] + L[ha] * limb_direction(angles[f"{s}_fore"], angles.get(f"{s}_fore_out", zero), sign)
        p[:, hip] = L[hip] * across.expand(n, 3)
        out = angles.get(f"{s}_hip_out", zero)
        p[:, kn] = p[:, hip] + L[kn] * limb_direction(angles[f"{s}_hip"], out, sign)
        p[:, ft] = p[:, kn] + L[ft] * limb_direction(angles[f"{s}_hip"] - angles[f"{s}_knee"], out, sign)
    return p


def action_angles(params: MotionParams, frames: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                                              torch.Tensor | None]:
    """(angles, yaw offset (F,), flight height (F,), stance foot (F,) long or None) of one clip's
    action; the stance foot (0 left, 1 right) is the one moving back under the body in a gait,
    None where it is simply the lower foot."""
    t = torch.arange(frames, dtype=torch.float32) / FPS
    a, k = params.amplitude, params.action
    freq = {0: 0.9, 1: 1.4, 2: 1.0, 3: 1.8, 4: 0.8, 5: 1.0, 6: 1.0, 7: 1.2}[k] * params.speed
    ph = 2 * math.pi * freq * t + params.phase
    s, c = torch.sin(ph), torch.cos(ph)
    zero = torch.zeros(frames)
    g = {"lean": zero + 0.04, "l_arm": zero, "r_arm": zero, "l_fore": zero + 0.15, "r_fore": zero + 0.15,
         "l_arm_out": zero + 0.12, "r_arm_out": zero + 0.12, "l_hip": zero, "r_hip": zero, "l_knee": zero + 0.05, "r_knee": zero + 0.05}
    yaw, lift, stance = zero.clone(), zero.clone(), None
    if k in (0, 1, 6):                          # walk, run, turn: alternating legs, opposite arms
        hip, knee, arm = {0: (0.42, 0.7, 0.4), 1: (0.6, 1.4, 0.7), 6: (0.2, 0.6, 0.15)}[k]
        bend = torch.cos(ph + math.pi / 4)      # knee bends from toe-off, straight for the last of the swing
        g.update(l_hip=a * hip * s, r_hip=-a * hip * s,
                 l_knee=a * knee * torch.relu(bend) + 0.05, r_knee=a * knee * torch.relu(-bend) + 0.05,
                 l_arm=-a * arm * s, r_arm=a * arm * s)
        stance = (c > 0).long()                 # the left foot swings forward while cos > 0
        if k == 1:
            g.update(lean=zero + 0.22, l_fore=g["l_arm"] + 1.5, r_fore=g["r_arm"] + 1.5)
        else:
            g.update(l_fore=g["l_arm"] + 0.25, r_fore=g["r_arm"] + 0.25)
        if k == 6:
            yaw = params.side * (0.6 + 0.8 * a) * math.pi / 2 * t / t[-1].clamp(min=1e-6)
    elif k == 2:                                # jump: crouch, take off with the arms up, fly
        crouch = a * 0.9 * torch.relu(-s)
        flight = 0.35 * a * torch.relu(s) ** 1.5
        g.update(l_knee=2 * crouch + 0.05, r_knee=2 * crouch + 0.05, l_hip=crouch, r_hip=crouch, lean=0.5 * crouch + 0.04,
                 l_arm=-0.6 * crouch + 2.2 * torch.relu(s), r_arm=-0.6 * crouch + 2.2 * torch.relu(s))
        g.update(l_fore=g["l_arm"] + 0.2, r_fore=g["r_arm"] + 0.2)
        lift = flight
    elif k == 3:                                # wave: one arm raised, the forearm swinging side to side
        arm = "r" if params.side > 0 else "l"
        g.update({f"{arm}_arm_out": zero + 2.3, f"{arm}_arm": zero + 0.2, f"{arm}_fore_out": 2.6 + 0.45 * a * s,
                  f"{arm}_fore": zero + 0.2})
    elif k == 4:                                # squat: knees and hips bend, arms forward for balance
        d = a * 0.5 * (1 - c)
        g.update(l_knee=1.7 * d + 0.05, r_knee=1.7 * d + 0.05, l_hip=1.0 * d, r_hip=1.0 * d, lean=0.45 * d + 0.04,
                 l_arm=1.3 * d, r_arm=1.3 * d, l_fore=1.4 * d, r_fore=1.4 * d)
    elif k == 5:                                # kick: the right leg swings high in front, arms out
        leg, other = "r", "l"
        b = torch.relu(s) ** 1.5
        stance = torch.zeros(frames, dtype=torch.long)
        g.update({f"{leg}_hip": a * 1.35 * b - 0.15 * torch.relu(-s), f"{leg}_knee": 0.9 * torch.relu(c) * torch.relu(s) + 0.05,
                  f"{other}_knee": zero + 0.12, "lean": -0.25 * b + 0.04, "l_arm_out": zero + 0.5, "r_arm_out": zero + 0.5})
    elif k == 7:                                # punch: alternating straight punches from a guard
        for arm, e in (("l", torch.relu(s)), ("r", torch.relu(-s))):
            g.update({f"{arm}_arm": 0.5 + a * 1.0 * e, f"{arm}_fore": 2.3 - (0.8 - 0.8 * a * e).clamp(min=0) - 0.8 * e,
                      f"{arm}_arm_out": zero + 0.25})
        g.update(l_knee=zero + 0.2, r_knee=zero + 0.2, l_hip=zero + 0.12, r_hip=zero + 0.12, lean=zero + 0.1)
    return g, yaw, lift, stance


def rotate_y(p: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Rotate points (..., 3) about the vertical axis by ``yaw`` (broadcast over the leading dims):
    +z goes to (sin yaw, 0, cos yaw)."""
    cs, sn = torch.cos(yaw)[..., None], torch.sin(yaw)[..., None]
    x, y, z = p.unbind(-1)
    return torch.stack([x * cs[..., 0] + z * sn[..., 0], y, -x * sn[..., 0] + z * cs[..., 0]], -1)


def make_motion(params: MotionParams, frames: int = FRAMES) -> torch.Tensor:
    """One clip (frames, 17, 3): the action's pose, grounded, turned by its yaw and carried by foot locking."""
    angles, yaw_offset, lift, stance = action_angles(params, frames)
    local = body_pose(angles, params.height)
    yaw = params.facing + yaw_offset
    world = rotate_y(local, yaw[:, None].expand(frames, 17))
    feet_y = local[:, list(FEET), 1]
    if stance is None:
        stance = feet_y.argmin(1)                              # 0: left foot, 1: right foot
    root = torch.zeros(frames, 3)
    root[:, 1] = -feet_y.min(1).values + lift
    for f in range(1, frames):
        foot = FEET[int(stance[f])]
        step = world[f - 1, foot] - world[f, foot]
        root[f, 0], root[f, 2] = root[f - 1, 0] + step[0], root[f - 1, 2] + step[2]
    return world + root[:, None]


# ----------------------------------------------------------------------------------------------
# Data sets


@dataclass
class MotionSet:
    """Clips (N, F, 17, 3), action labels (N,) long, captions and the draws behind them."""

    motions: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    params: list[MotionParams]

    def __len__(self) -> int:
        return len(self.labels)


def motion_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def make_motions(n_per_action: int, seed: int = 0, *, frames: int = FRAMES, canonical: bool = True) -> MotionSet:
    """``n_per_action`` clips of every action (labels cycle through :data:`ACTIONS`); clip i is drawn
    from its own generator of (seed, i), so it does not depend on ``n_per_action``. ``canonical``:
    :func:`canonicalize` them (the model's data); otherwise facings are as drawn."""
    if not (isinstance(n_per_action, int) and n_per_action >= 1):
        raise ValueError(f"n_per_action={n_per_action!r} must be an integer >= 1")
    if not (isinstance(frames, int) and frames >= 2):
        raise ValueError(f"frames={frames!r} must be an integer >= 2")
    params = [draw_params(i % len(ACTIONS), motion_generator(seed, i)) for i in range(n_per_action * len(ACTIONS))]
    motions = torch.stack([make_motion(p, frames) for p in params])
    if canonical:
        motions = canonicalize(motions)
    return MotionSet(motions, torch.tensor([p.action for p in params]), [p.caption() for p in params], params)


def motion_split(n_train_per_action: int, n_heldout_per_action: int, seed: int = 0, **kwargs) -> tuple[MotionSet, MotionSet]:
    """The seeded train / held-out split: train clips from seed ``2 seed``, held-out ones from
    ``2 seed + 1`` (never the same draws)."""
    return make_motions(n_train_per_action, 2 * seed, **kwargs), make_motions(n_heldout_per_action, 2 * seed + 1, **kwargs)


def facing_angle(motions: torch.Tensor, frame: int = 0) -> torch.Tensor:
    """(N,) yaw of each clip at ``frame``: the forward direction, hips' left-right axis x up."""
    across = motions[:, frame, JOINTS.index("l_hip")] - motions[:, frame, JOINTS.index("r_hip")]
    return torch.atan2(-across[:, 2], across[:, 0])  # forward = (-across_z, across_x) in (x, z) = (sin, cos) yaw


def canonicalize(motions: torch.Tensor) -> torch.Tensor:
    """Clips (N, F, J, 3) turned about y to face +z at frame 0, the root's frame-0 x and z at 0."""
    check_motions(motions)
    yaw = facing_angle(motions)
    root = motions[:, :1, :1].clone()
    root[..., 1] = 0
    return rotate_y(motions - root, -yaw[:, None, None].expand(motions.shape[:3]))


def check_motions(motions, name: str = "motions", joints: int = len(JOINTS)) -> torch.Tensor:
    if not torch.is_tensor(motions) or motions.ndim != 4 or motions.shape[2] != joints or motions.shape[3] != 3:
        raise ValueError(f"{name} must be a tensor (N, frames, {joints}, 3), got "
                         f"{tuple(motions.shape) if torch.is_tensor(motions) else type(motions).__name__}")
    return motions


def bone_lengths(motions: torch.Tensor) -> torch.Tensor:
    """(N, F, J - 1) lengths of every bone (joint to parent), frame by frame."""
    child = torch.arange(1, len(PARENTS))
    parent = torch.tensor(PARENTS[1:])
    return (motions[:, :, child] - motions[:, :, parent]).norm(dim=-1)


def foot_velocities(motions: torch.Tensor) -> torch.Tensor:
    """(N, F - 1, 2, 3) per-frame displacement of both feet."""
    feet = motions[:, :, list(FEET)]
    return feet[:, 1:] - feet[:, :-1]


def foot_contacts(motions: torch.Tensor, height: float = 0.05, speed: float = 0.01) -> torch.Tensor:
    """(N, F - 1, 2) bool: foot j is on the ground between frames t and t + 1 (below ``height``
    metres at frame t and moving less than ``speed`` metres in that frame), as MDM's contact labels."""
    v = foot_velocities(motions)
    return (motions[:, :-1, list(FEET), 1] < height) & (v.norm(dim=-1) < speed)


class MotionNormalizer:
    """x = (positions - mean) / std per (joint, coordinate), statistics over all clips and frames."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.float(), std.float()

    @classmethod
    def fit(cls, motions: torch.Tensor, min_std: float = 0.05) -> MotionNormalizer:
        check_motions(motions)
        flat = motions.reshape(-1, *motions.shape[2:])
        return cls(flat.mean(0), flat.std(0).clamp(min=min_std))

    def normalize(self, motions: torch.Tensor) -> torch.Tensor:
        return (motions - self.mean.to(motions)) / self.std.to(motions)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


__all__ = ["ACTIONS", "BONE_LENGTHS", "FEET", "FPS", "FRAMES", "JOINTS", "LOWER_BODY", "PARENTS", "UPPER_BODY",
           "MotionNormalizer", "MotionParams", "MotionSet", "action_angles", "body_pose", "bone_lengths",
           "canonicalize", "check_motions", "draw_params", "facing_angle", "foot_contacts", "foot_velocities",
           "limb_direction", "make_motion", "make_motions", "motion_split", "rotate_y"]
