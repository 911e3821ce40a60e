"""Video pipelines: class and direction in, clips (N, C, F, H, W) out; and clips from known frames
(image-to-video, extending a clip, frame interpolation).

The samplers are difflab's own over a denoiser: a clip is one sample whose frames axis rides
along. Known frames are held by replacement (RePaint's step, :func:`~difflab.guidance.inpaint.sample_repaint`,
with a mask over frames) and, with ``reconstruction_weight`` > 0, by reconstruction guidance
(Ho et al. 2022, eq. 7, :class:`~difflab.guidance.reconstruction.ReconstructionGuidance`), as Ho
et al. extend their clips. ``direction_guidance`` adds a guidance term on the direction alone
(:class:`DirectionGuidance`), towards the asked direction and away from ``negative_directions``.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..data.moving_digits import DIRECTIONS, VELOCITIES
from ..guidance.cfg import stack_branches
from ..guidance.inpaint import sample_repaint
from ..guidance.reconstruction import ReconstructionGuidance
from ..samplers import get_sampler
from .common import denoise, guided, net_config, run_options, sample_device, sampling_grid
from .options import CLASS_DEFAULTS, SampleOptions, resolve


def check_video_request(denoiser, labels, directions, num_samples, shape) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """``(labels, directions, N)`` as (N,) long tensors (or None); a ValueError naming the argument
    for values outside the model's classes or directions, lengths that disagree, or a ``shape``
    that is not (C, F, H, W) with F within the network's ``max_frames``."""
    config = net_config(denoiser)
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"shape must be one clip's (C, F, H, W), got {shape}")
    max_frames = getattr(config, "max_frames", None)
    if max_frames is not None and not 1 <= shape[1] <= max_frames:
        raise ValueError(f"frames={shape[1]} must be in [1, {max_frames}] (the network's max_frames)")
    out, n = [], None
    for name, values, count in (("labels", labels, getattr(config, "num_classes", None)),
                                ("directions", directions, getattr(config, "num_directions", None))):
        if values is None:
            out.append(None)
            continue
        values = torch.as_tensor(values, dtype=torch.long).reshape(-1)
        if count is None:
            raise ValueError(f"{name} given, but the network takes none (its config has no "
                             f"{'num_classes' if name == 'labels' else 'num_directions'})")
        bad = values[(values < 0) | (values >= count)]
        if len(bad):
            raise ValueError(f"{name} must be in [0, {count - 1}], got {bad.tolist()}")
        if n is not None and len(values) != n:
            raise ValueError(f"labels ({n}) and directions ({len(values)}) must have one entry per clip")
        n = len(values)
        out.append(values)
    if n is None:
        if num_samples is None or num_samples < 1:
            raise ValueError("give labels or directions, or num_samples >= 1 for unconditional clips")
        n = num_samples
    return out[0], out[1], n


def conditioning(denoiser, labels, directions, start: int, b: int, device) -> tuple[dict, dict]:
    """The (cond, uncond) keywords of clips start .. start+b: class and direction labels, the
    unconditional branch seeing both null tokens."""
    config = net_config(denoiser)
    cond, uncond = {}, {}
    for key, values, null in (("class_labels", labels, getattr(config, "null_class", None)),
                              ("direction_labels", directions, getattr(config, "null_direction", None))):
        if values is not None:
            cond[key] = values[start:start + b].to(device)
            uncond[key] = torch.full((b,), null, dtype=torch.long, device=device)
    return cond, uncond


class DirectionGuidance(nn.Module):
    """Classifier-free guidance plus a term on the direction alone and, optionally, one on the class
    alone (the two-scale guidance of InstructPix2Pix, Brooks et al. 2023, eq. 3, and Composable
    Diffusion, Liu et al. 2022, eq. 10, with a negative condition as a negative prompt):
    D = D_u + scale (D_cd - D_u) + direction_scale (D_cd - D_cn) + class_scale (D_cd - D_ud),
    D_cd the asked class and direction, D_u both null, D_cn the asked class with the ``negative``
    direction of each clip (the null direction, or e.g. the opposite one), D_ud the null class with
    the asked direction. Each term applies on a guidance interval (Kynkaenniemi et al. 2024): the
    direction's where sigma >= ``min_sigma`` (the direction is set at high noise), the class's where
    sigma < ``class_max_sigma``; a branch whose term is off at a step is not run. ``direction_scale``
    and ``class_scale`` 0 is plain CFG."""

    def __init__(self, denoiser, scale: float, direction_scale: float, uncond: dict, negative: torch.Tensor | None,
                 min_sigma: float = 0.0, class_scale: float = 0.0, class_max_sigma: float = float("inf")):
        super().__init__()
        self.denoiser, self.scale, self.direction_scale = denoiser, float(scale), float(direction_scale)
        self.uncond, self.negative, self.min_sigma = dict(uncond), negative, float(min_sigma)
        self.class_scale, self.class_max_sigma = float(class_scale), float(class_max_sigma)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        off = torch.zeros(b, dtype=torch.bool, device=x.device)
        on = (sigma >= self.min_sigma) if self.direction_scale else off
        on_class = (sigma < self.class_max_sigma) if self.class_scale else off
        extra = [(term, scale) for term, scale, mask in (("direction", self.direction_scale, on),
                                                          ("class", self.class_scale, on_class)) if bool(mask.any())]
        k = 2 + len(extra)
        both = {}
        for name, c in cond.items():  # CFG's pairing (guidance.cfg), then a row block per term that is on
            rows = [stack_branches(name, c, self.uncond.get(name, c), b)]
            for term, _ in extra:
                if term == "direction":
                    rows.append(self.negative.to(c.device) if name == "direction_labels" else c)
                else:
                    null = torch.as_tensor(self.uncond.get(name, c), device=c.device, dtype=c.dtype)
                    rows.append(null.expand(c.shape) if name == "class_labels" else c)
            both[name] = torch.cat(rows)
        out = self.denoiser(torch.cat([x] * k), torch.cat([sigma] * k), **both).chunk(k)
        guided = out[1] + self.scale * (out[0] - out[1])
        for i, (term, scale) in enumerate(extra):
            mask = on if term == "direction" else on_class
            guided = guided + scale * ((out[0] - out[2 + i]) * mask.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype))
        return guided


def opposite_directions(directions) -> torch.Tensor:
    """The opposite of each direction index of :data:`~difflab.data.moving_digits.DIRECTIONS`
    (left <-> right, up <-> down), e.g. as ``negative_directions``."""
    table = [DIRECTIONS.index(next(d for d in DIRECTIONS if VELOCITIES[d] == tuple(-v for v in VELOCITIES[a])))
             for a in DIRECTIONS]
    return torch.tensor(table)[torch.as_tensor(directions, dtype=torch.long)]


def check_direction_guidance(denoiser, directions, negative_directions, direction_guidance: float, n: int,
                             min_sigma: float = 0.0):
    """The negative direction of each clip as an (N,) long tensor (the null direction when
    ``negative_directions`` is None), or None without direction guidance; a ValueError naming the
    argument otherwise."""
    if not isinstance(direction_guidance, (int, float)) or not direction_guidance == direction_guidance \
            or abs(direction_guidance) == float("inf"):
        raise ValueError(f"direction_guidance={direction_guidance!r} must be a finite number (0 = none)")
    if not isinstance(min_sigma, (int, float)) or not 0 <= min_sigma < float("inf"):
        raise ValueError(f"direction_guidance_min_sigma={min_sigma!r} must be a finite number >= 0 (0 = every step)")
    if direction_guidance == 0:
        return None
    if directions is None:
        raise ValueError(f"direction_guidance={direction_guidance} needs directions to guide towards")
    null = net_config(denoiser).null_direction
    if negative_directions is None:
        return torch.full((n,), null, dtype=torch.long)
    negative = torch.as_tensor(negative_directions, dtype=torch.long).reshape(-1)
    if len(negative) != n:
        raise ValueError(f"negative_directions ({len(negative)}) must have one entry per clip ({n})")
    bad = negative[(negative < 0) | (negative > null)]
    if len(bad):
        raise ValueError(f"negative_directions must be in [0, {null}] ({null} = the null direction), got {bad.tolist()}")
    return negative


def check_class_guidance(labels, class_guidance: float, max_sigma: float) -> None:
    """A ValueError naming the argument unless ``class_guidance`` is a finite number (0 = none) with
    ``labels`` to guide towards and ``max_sigma`` > 0 (inf = every step)."""
    if not isinstance(class_guidance, (int, float)) or not class_guidance == class_guidance \
            or abs(class_guidance) == float("inf"):
        raise ValueError(f"class_guidance={class_guidance!r} must be a finite number (0 = none)")
    if not isinstance(max_sigma, (int, float)) or not max_sigma > 0:
        raise ValueError(f"class_guidance_max_sigma={max_sigma!r} must be a number > 0 (inf = every step)")
    if class_guidance != 0 and labels is None:
        raise ValueError(f"class_guidance={class_guidance} needs labels (classes) to guide towards")


@torch.no_grad()
def generate_video(denoiser, labels=None, directions=None, *, num_samples: int | None = None, shape: tuple[int, ...],
                   known: torch.Tensor | None = None, known_frames=None, reconstruction_weight: float = 0.0,
                   resample: int = 1, direction_guidance: float = 0.0, negative_directions=None,
                   direction_guidance_min_sigma: float = 0.0, class_guidance: float = 0.0,
                   class_guidance_max_sigma: float = float("inf"), options: SampleOptions | None = None,
                   **overrides) -> torch.Tensor:
    """Clips (N, *shape) for class ``labels`` and direction indices ``directions`` (sequences of
    ints, one per clip; either may be omitted), with classifier-free guidance towards both
    (``guidance_scale``; the unconditional branch sees the null tokens). ``shape`` is (C, F, H, W).

    ``direction_guidance`` > 0 adds guidance on the direction alone (:class:`DirectionGuidance`),
    away from ``negative_directions`` (one per clip; default the null direction;
    :func:`opposite_directions` for the opposite way) at the steps where sigma >=
    ``direction_guidance_min_sigma``; 0 is the plain guidance. ``class_guidance`` > 0 adds a term on
    the class alone (towards the asked class, away from the null class with the asked direction) at
    the steps where sigma < ``class_guidance_max_sigma``.

    ``known`` (N or 1, C, F, H, W) with ``known_frames`` (F,) bool (True = given) conditions on
    those frames: replacement after every step (``resample`` RePaint passes) and reconstruction
    guidance of weight ``reconstruction_weight`` (Ho et al. 2022, eq. 7; 0 = replacement only).

    ``options`` / ``overrides``: as :func:`~difflab.pipelines.generate`. Clip i is drawn from its
    own generator seeded by (``seed``, i), so it never depends on ``batch_size``. Returns clips in
    [-1, 1] on the CPU.
    """
    # 1. Check inputs.
    opts = resolve(options, CLASS_DEFAULTS, overrides)
    labels, directions, n = check_video_request(denoiser, labels, directions, num_samples, shape)
    if opts.guidance_scale != 1.0 and labels is None and directions is None:
        raise ValueError("guidance_scale != 1 needs labels or directions to guide towards")
    negative = check_direction_guidance(denoiser, directions, negative_directions, direction_guidance, n,
                                        direction_guidance_min_sigma)
    check_class_guidance(labels, class_guidance, class_guidance_max_sigma)
    two_scale = negative is not None or class_guidance != 0
    if two_scale and opts.guidance_rescale:
        raise ValueError(f"guidance_rescale={opts.guidance_rescale} is not applied with direction_guidance or "
                         f"class_guidance: give one")
    mask = None
    if known is not None or known_frames is not None:
        known, mask = check_known(known, known_frames, n, tuple(shape))
    _, device = sample_device(denoiser, opts)

    # 2. Build the grid.
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset).to(device, torch.float32)
    prior = float(denoiser.prior_std(sigmas[0].double()))

    def sample_batch(start, b, noise):
        # 3-4. Per-clip noise, scaled to the prior at the first level.
        x = noise() * prior
        # 5. Conditioning: class and direction, null tokens for the unconditional branch.
        cond, uncond = conditioning(denoiser, labels, directions, start, b, device)
        if not two_scale:
            model = guided(denoiser, opts.guidance_scale, uncond or None, opts.guidance_rescale)
        else:  # 5'. Guidance on the direction or the class too: one wrapper, with CFG's scale inside it.
            model = DirectionGuidance(denoiser, opts.guidance_scale, direction_guidance if negative is not None else 0.0,
                                      uncond, None if negative is None else negative[start:start + b],
                                      direction_guidance_min_sigma, class_guidance, class_guidance_max_sigma)
        if mask is None:
            # 6. Guidance and the sampler.
            if not two_scale:
                return denoise(denoiser, x, sigmas, opts, noise, cond or None, uncond or None).clamp(-1, 1)
            return denoise(model, x, sigmas, opts.replace(guidance_scale=1.0), noise, cond or None, None).clamp(-1, 1)
        # 6'. Known frames: replacement around the sampler, reconstruction guidance around CFG.
        rows = known[start:start + b].to(device, x.dtype)
        if reconstruction_weight > 0:
            model = ReconstructionGuidance(model, rows, mask.to(device), reconstruction_weight)
        repaint = functools.partial(sample_repaint, sampler=get_sampler(opts.sampler), resample=resample, known=rows,
                                    mask=mask.to(device))
        return denoise(model, x, sigmas, opts.replace(guidance_scale=1.0), noise, cond or None, None,
                       sampler=repaint).clamp(-1, 1)

    # 7. Return in the data range.
    return run_options(n, tuple(shape), sample_batch, opts, device=device,
                       desc=f"sampling clips ({opts.sampler}, {opts.steps} steps)")


def check_known(known, known_frames, n: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(known (N, C, F, H, W), fill mask (1, 1, F, 1, 1) float, 1 = the model fills)``."""
    if known is None or known_frames is None:
        raise ValueError("give known (the clips holding the given frames) and known_frames (which frames) together")
    known = torch.as_tensor(known).float()
    if known.ndim != 5 or known.shape[0] not in (1, n) or tuple(known.shape[1:]) != shape:
        raise ValueError(f"known must be clips (N or 1, *shape) = ({n} or 1, {', '.join(map(str, shape))}), got shape "
                         f"{tuple(known.shape)}")
    frames = torch.as_tensor(known_frames)
    if frames.dtype != torch.bool or frames.shape != (shape[1],):
        raise ValueError(f"known_frames must be a ({shape[1]},) bool tensor (True = a given frame), got {frames.dtype} "
                         f"of shape {tuple(frames.shape)}")
    if not bool(frames.any()):
        raise ValueError("known_frames marks no frame as given: use generate_video without known")
    return known.expand(n, *shape), (~frames).float().reshape(1, 1, -1, 1, 1)


def image_to_video(denoiser, first_frames: torch.Tensor, labels=None, directions=None, *, frames: int, **kwargs) -> torch.Tensor:
    """Clips (N, C, frames, H, W) that start from ``first_frames`` (N, C, H, W): the first frame given."""
    first_frames = torch.as_tensor(first_frames).float()
    if first_frames.ndim != 4:
        raise ValueError(f"first_frames must be images (N, C, H, W), got shape {tuple(first_frames.shape)}")
    n, c, h, w = first_frames.shape
    known = first_frames[:, :, None].expand(n, c, frames, h, w)
    given = torch.zeros(frames, dtype=torch.bool)
    given[0] = True
    return generate_video(denoiser, labels, directions, shape=(c, frames, h, w), known=known, known_frames=given,
                          num_samples=n, **kwargs)


def extend_video(denoiser, clips: torch.Tensor, labels=None, directions=None, *, context: int, new_frames: int,
                 window: int | None = None, **kwargs) -> torch.Tensor:
    """``clips`` (N, C, F, H, W) followed by ``new_frames`` more, generated window by window: each
    window of ``window`` frames (default: the network's ``max_frames``) holds the last ``context``
    frames so far as given frames (Ho et al. 2022, Section 3.1: autoregressive extension with
    reconstruction guidance, ``reconstruction_weight=``). ``directions`` are those of the clips'
    start; later windows are sampled without a direction (the null token), as the motion
    continues from the context."""
    clips = torch.as_tensor(clips).float()
    if clips.ndim != 5:
        raise ValueError(f"clips must be (N, C, F, H, W), got shape {tuple(clips.shape)}")
    window = window or getattr(net_config(denoiser), "max_frames", None)
    if window is None or not 1 <= context < window or context > clips.shape[2]:
        raise ValueError(f"context={context} must be >= 1, below the window ({window}) and at most the clip's "
                         f"{clips.shape[2]} frames")
    if new_frames < 1:
        raise ValueError(f"new_frames={new_frames} must be >= 1")
    n, c, _, h, w = clips.shape
    out = clips
    while out.shape[2] < clips.shape[2] + new_frames:
        known = torch.full((n, c, window, h, w), -1.0)
        known[:, :, :context] = out[:, :, -context:]
        given = torch.arange(window) < context
        new = generate_video(denoiser, labels, None, shape=(c, window, h, w), known=known, known_frames=given,
                             num_samples=n, **kwargs)
        out = torch.cat([out, new[:, :, context:]], dim=2)
    return out[:, :, :clips.shape[2] + new_frames]


def interpolate_video(denoiser, clips: torch.Tensor, labels=None, directions=None, *, factor: int = 2, **kwargs) -> torch.Tensor:
    """Frame interpolation as inpainting in time: ``clips`` (N, C, F, H, W) become frames 0,
    factor, 2 factor, ... of clips of (F - 1) factor + 1 frames; the model fills the rest."""
    clips = torch.as_tensor(clips).float()
    if clips.ndim != 5 or factor < 2:
        raise ValueError(f"clips must be (N, C, F, H, W) and factor >= 2, got shape {tuple(clips.shape)}, factor {factor}")
    n, c, f, h, w = clips.shape
    total = (f - 1) * factor + 1
    known = torch.full((n, c, total, h, w), -1.0)
    known[:, :, ::factor] = clips
    given = torch.zeros(total, dtype=torch.bool)
    given[::factor] = True
    return generate_video(denoiser, labels, directions, shape=(c, total, h, w), known=known, known_frames=given,
                          num_samples=n, **kwargs)


__all__ = ["generate_video", "image_to_video", "extend_video", "interpolate_video", "check_video_request", "check_known",
           "DirectionGuidance", "opposite_directions", "check_direction_guidance", "check_class_guidance"]
