"""Judging moving-digit clips: what is in each frame, how it moves, and how far the clips'
distribution is from real ones.

- **Frames**: the digit of a frame is found by its centre of mass (ink = (x + 1) / 2 on the
  [-1, 1] canvas), an 8x8 window is cropped around it (:func:`crop_digits`) and read by the
  digits judge (:class:`~difflab.eval.judge.DigitsJudge`, trained on the digits' train split,
  with its one-pixel shift augmentation absorbing the rounding of the crop).
- **Motion**: the frame-to-frame steps of the centre of mass (:func:`centre_steps`). A clip
  moves as asked (:func:`moves_as_asked`) when its first step along the asked axis goes the asked
  way by at least half a pixel, the steps along that axis reverse at most once (the one bounce
  that the data's speeds allow in 8 frames), and the mean step across it is under half a pixel.
- **Clip features** (:func:`clip_features`): the judge's penultimate features averaged over the
  frames, then six motion statistics in pixels (mean step along rows and columns, mean absolute
  step along each, the step's spread, the reversals along the larger axis); the Frechet distance
  (FID's, Heusel et al. 2017) on them is set beside the real-data floor, two disjoint halves of
  real clips.
"""
from __future__ import annotations

import torch

from ..data.moving_digits import DIGIT_SIZE, DIRECTIONS, VELOCITIES
from ..data.moving_digits import ink_centres as centres  # the judge's reading of where a digit is
from .judge import DigitsJudge
from .metrics import fid

STEP_MIN = 0.5  # pixels: a smaller centre-of-mass step is no motion


def check_clips(clips: torch.Tensor, name: str = "clips") -> torch.Tensor:
    """Grey clips (N, 1, F, H, W), float."""
    if clips.ndim != 5 or clips.shape[1] != 1 or clips.shape[2] < 2:
        raise ValueError(f"{name} must be grey clips (N, 1, F, H, W) with F >= 2, got shape {tuple(clips.shape)}")
    return clips.float()


def crop_digits(frames: torch.Tensor, size: int = DIGIT_SIZE) -> torch.Tensor:
    """(N, 1, size, size) windows of frames (N, 1, H, W) centred on each frame's centre of mass
    (top-left corner round(centre - (size - 1) / 2), kept inside the canvas)."""
    n, _, h, w = frames.shape
    corner = (centres(frames[:, 0]) - (size - 1) / 2).round().long()
    corner[:, 0].clamp_(0, h - size)
    corner[:, 1].clamp_(0, w - size)
    idx = torch.arange(size)
    rows = (corner[:, 0, None] + idx)[:, :, None].expand(n, size, size)
    cols = (corner[:, 1, None] + idx)[:, None, :].expand(n, size, size)
    return frames[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def frame_crops(clips: torch.Tensor) -> torch.Tensor:
    """Every frame of clips (N, 1, F, H, W) cropped to its digit: (N * F, 1, 8, 8), clip-major."""
    clips = check_clips(clips)
    n, _, f, h, w = clips.shape
    return crop_digits(clips.transpose(1, 2).reshape(n * f, 1, h, w))


def centre_steps(clips: torch.Tensor) -> torch.Tensor:
    """(N, F - 1, 2) frame-to-frame steps (rows, columns) of the centre of mass."""
    c = centres(check_clips(clips)[:, 0])
    return c[:, 1:] - c[:, :-1]


def direction_axis_sign(direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The axis (0 rows, 1 columns) and sign (+1 / -1) of each direction index of :data:`DIRECTIONS`."""
    table = torch.tensor([VELOCITIES[d] for d in DIRECTIONS])  # (D, 2) (dy, dx)
    v = table[direction]
    axis = (v[:, 1] != 0).long()
    return axis, v.gather(1, axis[:, None])[:, 0]


def reversals(steps_1d: torch.Tensor) -> torch.Tensor:
    """(N,) number of sign changes among the steps of magnitude >= :data:`STEP_MIN` (N, T)."""
    s = torch.sign(steps_1d) * (steps_1d.abs() >= STEP_MIN)
    out = torch.zeros(len(s), dtype=torch.long)
    for i, row in enumerate(s):
        nz = row[row != 0]
        out[i] = int((nz[1:] != nz[:-1]).sum()) if len(nz) > 1 else 0
    return out


def moves_as_asked(clips: torch.Tensor, directions) -> torch.Tensor:
    """(N,) bool: the clip moves in the asked direction (see the module docstring)."""
    steps = centre_steps(clips)
    directions = torch.as_tensor(directions, dtype=torch.long)
    axis, sign = direction_axis_sign(directions)
    along = steps.gather(2, axis[:, None, None].expand(-1, steps.shape[1], 1))[..., 0] * sign[:, None]
    across = steps.gather(2, (1 - axis)[:, None, None].expand(-1, steps.shape[1], 1))[..., 0]
    return (along[:, 0] >= STEP_MIN) & (reversals(along) <= 1) & (across.abs().mean(1) < STEP_MIN)


def estimated_directions(clips: torch.Tensor) -> torch.Tensor:
    """(N,) direction index read off a clip: the axis with the larger total motion, the way its
    first step of at least :data:`STEP_MIN` goes (its first step when none is that large)."""
    steps = centre_steps(clips)
    axis = (steps[..., 1].abs().sum(1) > steps[..., 0].abs().sum(1)).long()
    along = steps.gather(2, axis[:, None, None].expand(-1, steps.shape[1], 1))[..., 0]
    big = along.abs() >= STEP_MIN
    first = torch.where(big.any(1), big.float().argmax(1), torch.zeros_like(axis))
    positive = along.gather(1, first[:, None])[:, 0] >= 0
    lookup = {(0, False): "up", (0, True): "down", (1, False): "left", (1, True): "right"}
    return torch.tensor([DIRECTIONS.index(lookup[(int(a), bool(p))]) for a, p in zip(axis, positive)], dtype=torch.long)


def motion_statistics(clips: torch.Tensor) -> torch.Tensor:
    """(N, 6) float64, pixels: mean step (rows, columns), mean |step| (rows, columns), the spread
    (std) of the step length, the reversals along the axis of larger motion."""
    steps = centre_steps(clips).double()
    axis = (steps[..., 1].abs().sum(1) > steps[..., 0].abs().sum(1)).long()
    along = steps.gather(2, axis[:, None, None].expand(-1, steps.shape[1], 1))[..., 0]
    return torch.cat([steps.mean(1), steps.abs().mean(1), steps.norm(dim=-1).std(1, keepdim=True),
                      reversals(along).double()[:, None]], 1)


def clip_features(judge: DigitsJudge, clips: torch.Tensor) -> torch.Tensor:
    """(N, feature_dim + 6) float64: the judge's features averaged over a clip's frames, then
    :func:`motion_statistics`."""
    clips = check_clips(clips)
    n, f = clips.shape[:2][0], clips.shape[2]
    per_frame = judge.features(frame_crops(clips)).double().reshape(n, f, -1).mean(1)
    return torch.cat([per_frame, motion_statistics(clips)], 1)


def frame_predictions(judge: DigitsJudge, clips: torch.Tensor) -> torch.Tensor:
    """(N, F) the judge's class for every frame."""
    clips = check_clips(clips)
    return judge.predict(frame_crops(clips)).reshape(clips.shape[0], clips.shape[2])


def clip_scores(judge: DigitsJudge, clips: torch.Tensor, labels, directions) -> dict:
    """Per-frame class accuracy, the fraction of clips whose every frame is read as one class
    (``same_class``) and as the asked one (``all_frames_correct``), the fraction that move as
    asked, and the fraction whose direction read off the clip is the asked one."""
    labels, directions = torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(directions, dtype=torch.long)
    pred = frame_predictions(judge, clips)
    return {
        "frame_accuracy": (pred == labels[:, None]).float().mean().item(),
        "same_class": (pred == pred[:, :1]).all(1).float().mean().item(),
        "all_frames_correct": (pred == labels[:, None]).all(1).float().mean().item(),
        "motion_accuracy": moves_as_asked(clips, directions).float().mean().item(),
        "direction_accuracy": (estimated_directions(clips) == directions).float().mean().item(),
    }


@torch.no_grad()
def video_judge_report(judge: DigitsJudge, generated: torch.Tensor, labels, directions, real, real_labels, real_directions,
                       reference: torch.Tensor | None = None, seed: int = 0) -> dict:
    """The scores of :func:`clip_scores` for the generated clips and (``real_*``) real held-out
    clips; ``frechet``: clip-feature Frechet distance, generated vs held-out; ``frechet_real_halves``:
    two disjoint random halves of the held-out clips (the floor at half the size); with
    ``reference`` (e.g. train clips): ``frechet_real_reference``, ``len(generated)`` of them vs
    held-out, the floor at the same sizes."""
    report = {k: v for k, v in clip_scores(judge, generated, labels, directions).items()}
    report.update({f"real_{k}": v for k, v in clip_scores(judge, real, real_labels, real_directions).items()})
    g = torch.Generator().manual_seed(seed)
    held = clip_features(judge, real)
    perm = torch.randperm(len(real), generator=g)
    half = len(real) // 2
    report.update(frechet=fid(clip_features(judge, generated), held),
                  frechet_real_halves=fid(held[perm[:half]], held[perm[half:2 * half]]),
                  n_generated=len(generated), n_real=len(real))
    if reference is not None:
        pick = torch.randperm(len(reference), generator=g)[:len(generated)]
        report["frechet_real_reference"] = fid(clip_features(judge, reference[pick]), held)
    return report


__all__ = ["centres", "crop_digits", "frame_crops", "centre_steps", "moves_as_asked", "estimated_directions",
           "motion_statistics", "clip_features", "frame_predictions", "clip_scores", "video_judge_report", "STEP_MIN"]
