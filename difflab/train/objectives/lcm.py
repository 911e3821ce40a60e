"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference", Algorithm 1, LCD) and LCM-LoRA (Luo et al. 2023,
"LCM-LoRA: A Universal Stable-Diffusion Acceleration Module").

A consistency function f_theta (:class:`difflab.core.ConsistencyFunction`, ``form="lcm"``) of a
copy of a latent text-to-image teacher learns to map a point of the *guided* probability-flow ODE
(the augmented PF-ODE, section 4.2) to its origin, skipping k timesteps at a time (section 4.3)::

    z_{t_{n+k}} = alpha z + sigma eps                                  (canonical: x0 + sigma_{n+k} eps)
    z_hat_{t_n} = Psi(z_{t_{n+k}}, t_{n+k} -> t_n; x0_u + w (x0_c - x0_u))  one guided DDIM step of the teacher
    loss        = d(f_theta(z_{t_{n+k}}, w, c, t_{n+k}), f_theta-(z_hat_{t_n}, w, c, t_n))

with t_{n+k} drawn from LCM's skipping schedule k - 1, 2k - 1, ..., T - 1 (k = T / ``original_steps``,
the schedule :func:`difflab.core.grids.lcm_timesteps` samples from), t_n = max(t_{n+k} - k, 0), w
uniform in [w_min, w_max] per example, and theta- an EMA of theta (Algorithm 1's mu) or theta
itself without a gradient. One teacher call on the conditional and unconditional branches
stacked (:func:`~difflab.train.objectives.guided.guided_x0`). A DDIM step is linear in the x0
estimate, so guiding x0 (as here) and guiding eps (as the paper writes it) give the same point.

w is difflab's guidance scale (1 = conditional, diffusers' ``guidance_scale``); the LCM paper's w
is this minus one, and so is the number LCM's U-Net embeds (``guidance_scale - 1`` in diffusers'
``LatentConsistencyModelPipeline``).

Two students (both start as the teacher):

- :func:`lcm_student` (LCM): the whole network, with the scale as an input
  (:class:`difflab.nn.GuidanceEmbedding`, LCM's "w-embedding" in the time embedding); sampled
  with ``guidance_scale=w`` at one evaluation per step.
- :func:`lcm_lora_student` (LCM-LoRA): only LoRA adapters on the network's linear and conv layers
  train (rank 64 in the paper), and the network takes *no* w: the guided map over [w_min, w_max]
  is baked into the adapter, as in the LCM-LoRA paper and diffusers'
  ``train_lcm_distill_lora_sd_wds.py`` (whose students get ``timestep_cond=None``); the
  adapter is sampled with guidance 1 (no unconditional branch). :func:`save_lcm_lora` writes it in
  diffusers' LoRA layout; :func:`apply_lcm_lora` plugs a file into a base model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from difflab.adapters import first_present, inject_lora, load_lora_weights, mark_only_lora_trainable, save_lora_weights
from difflab.core import ConsistencyFunction, Denoiser, VPDiscrete, append_dims
from difflab.guidance import takes_guidance_scale
from difflab.nn import GuidanceEmbedding
from difflab.pipelines.common import encode_prompts

from .consistency import _ConsistencyLoss, _module, teacher_ode_step
from .guided import UniformScale, guided_x0

DRAWN = ("x0", "sigma", "sigma_lower", "noise", "guidance_scale")  # every other key of a batch is a keyword of the nets
DISTANCES = ("l2", "huber")
SOLVERS = {"ddim": "euler", "heun": "heun"}  # in the canonical frame a DDIM step is an Euler step in sigma
LORA_NAME = "lcm"
# The layers LCM-LoRA adapts, the first family a network has: every linear and conv layer of the
# U-Net's blocks (diffusers' names, the default of its LCM-LoRA script), then the same layers of
# difflab's ADM U-Net (attention qkv/q/kv/proj, ResBlock convs, skips and time projections, resamplers).
LORA_TARGETS = (("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                 "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"),
                ("qkv", "q", "kv", "proj", "in_layers.2", "out_layers.2", "skip", "emb_layers.1", "conv"))


# ----------------------------------------------------------------------------------------------
# The pieces


def skipping_timesteps(T: int, original_steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """LCD's pairs (t_{n+k}, t_n) (Luo et al. 2023, section 4.3, skipping-step): t_{n+k} runs over
    k - 1, 2k - 1, ..., T - 1 with k = T // ``original_steps`` (the schedule of
    :func:`difflab.core.grids.lcm_timesteps`, diffusers' ``DDIMSolver``), t_n = max(t_{n+k} - k, 0);
    the first pair ends at t = 0, where f is the identity (the boundary condition)."""
    if not 1 <= original_steps <= T:
        raise ValueError(f"original_steps={original_steps} must be between 1 and the model's {T} training steps")
    k = T // original_steps
    start = torch.arange(1, original_steps + 1) * k - 1
    return start, (start - k).clamp(min=0)


def lcd_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """Per example (B,): ``l2`` the mean squared error, or ``huber`` the mean of the element-wise
    pseudo-Huber sqrt((a - b)^2 + c^2) - c, c = ``huber_c`` (the losses of diffusers' LCD scripts)."""
    if kind == "huber":
        return (((a - b) ** 2 + huber_c**2).sqrt() - huber_c).flatten(1).mean(1)
    return (a - b).flatten(1).pow(2).mean(1)


def _check_teacher(teacher) -> None:
    if not isinstance(getattr(teacher, "frame", None), VPDiscrete):
        raise ValueError("latent consistency distillation needs a Denoiser in a VPDiscrete frame (LCM's timesteps "
                         f"and scalings); got {type(getattr(teacher, 'frame', None)).__name__}")


def lcm_student(teacher: Denoiser, embed: str = "time_embed", **kwargs) -> ConsistencyFunction:
    """LCM's student (Luo et al. 2023, section 4.2): a trainable copy of the teacher's network that
    takes the guidance scale as an input (:class:`difflab.nn.GuidanceEmbedding` on the submodule
    ``embed``: ``time_embed`` in difflab's ADM U-Net, ``time_embedding`` in ``UNetSD``; ``kwargs`` go
    to it), in the teacher's frame and prediction, as a consistency function of LCM's form."""
    _check_teacher(teacher)
    net = GuidanceEmbedding(copy.deepcopy(teacher.net).requires_grad_(True), embed, **kwargs)
    return ConsistencyFunction(Denoiser(net, teacher.frame, teacher.prediction, teacher.sigma_data), form="lcm")


def lora_targets(net: nn.Module) -> list[str]:
    """The patterns of the first family of :data:`LORA_TARGETS` that ``net`` has (those naming a layer)."""
    return first_present(net, LORA_TARGETS)


def lcm_lora_student(teacher: Denoiser, targets=None, *, rank: int = 64, alpha: float | None = None,
                     name: str = LORA_NAME, generator: torch.Generator | None = None) -> ConsistencyFunction:
    """LCM-LoRA's student (Luo et al. 2023b): a copy of the teacher's network with LoRA adapter
    ``name`` (Hu et al. 2021) of ``rank`` (the paper's 64) and ``alpha`` (default: the rank, scale 1)
    on ``targets`` (default :func:`lora_targets`), only the adapter trainable, no w input; a
    consistency function of LCM's form. The teacher is untouched."""
    _check_teacher(teacher)
    net = copy.deepcopy(teacher.net)
    inject_lora(net, lora_targets(net) if targets is None else targets, rank, alpha, name=name, generator=generator)
    mark_only_lora_trainable(net, name)
    return ConsistencyFunction(Denoiser(net, teacher.frame, teacher.prediction, teacher.sigma_data), form="lcm")


def caption_conditioning(text_encoder, captions, empty: str = "") -> tuple[dict, dict]:
    """``(cond, uncond)`` for :class:`LatentConsistencyDistillation` on text: the keywords the
    pipelines give a denoiser (``context`` (N, L, D) and, from a TinyTextEncoder, ``context_mask``
    (N, L)), one row per caption, to go into the data beside ``x0``; and those of the ``empty``
    prompt, one row, the teacher's unconditional branch (:func:`difflab.pipelines.common.encode_prompts`)."""
    with torch.no_grad():
        cond, _, _ = encode_prompts(text_encoder, list(captions), guided=False)
        empty_cond, _, _ = encode_prompts(text_encoder, [empty], guided=False)
    return {k: v.detach() for k, v in cond.items()}, {k: v[0].detach() for k, v in empty_cond.items()}


def _lora_net(student) -> nn.Module:
    """The network inside a student (a ConsistencyFunction or Denoiser), or the network itself."""
    for _ in range(4):
        if getattr(student, "net", None) is None:
            return student
        student = student.net
    return student


def save_lcm_lora(path, student, name: str = LORA_NAME, *, prefix: str = "unet."):
    """Write the LCM-LoRA adapter ``name`` of ``student`` (or of its network) alone, in diffusers'
    LoRA layout (:func:`difflab.adapters.save_lora_weights`: ``unet.{module}.lora_A.weight``, the
    PEFT ``LoraConfig`` in the ``lora_adapter_metadata`` header). Returns the file's path."""
    return save_lora_weights(path, _lora_net(student), name, prefix=prefix)


def apply_lcm_lora(denoiser: Denoiser, source, *, weight: float = 1.0, name: str = LORA_NAME,
                   prefix: str = "unet.") -> ConsistencyFunction:
    """Plug an LCM-LoRA file (diffusers', PEFT's or kohya's layout; :func:`difflab.adapters.load_lora_weights`)
    into the base model ``denoiser`` (its network is changed in place) and return the consistency
    function to sample it with (``sampler="lcm"``, ``grid="lcm"``, guidance 1)."""
    load_lora_weights(denoiser.net, source, name=name, prefix=prefix, weight=weight)
    return ConsistencyFunction(denoiser, form="lcm")


# ----------------------------------------------------------------------------------------------
# The objective


class LatentConsistencyDistillation(_ConsistencyLoss):
    """Latent consistency distillation (Luo et al. 2023, Algorithm 1; module doc) of the frozen
    ``teacher`` (a :class:`~difflab.core.Denoiser` in a ``VPDiscrete`` frame) into ``student`` (a
    :func:`lcm_student` or :func:`lcm_lora_student`; default :func:`lcm_student` of the teacher).
    ``uncond``: the teacher's unconditional keywords (:func:`caption_conditioning`'s second value,
    or ``{"class_labels": null}``). A student whose network takes the scale (``takes_guidance_scale``)
    gets ``guidance_scale=w``; any other learns the guided map over [w_min, w_max] without it
    (LCM-LoRA; ``w_min == w_max`` bakes in one scale). ``original_steps``: the skipping schedule
    (k = T / original_steps; the paper's k = 20 of 1000). ``solver``: ``ddim`` (the paper's Psi) or
    ``heun``. ``target_ema``: mu of theta- (Algorithm 1; 0.95 in LCM's training script), 0 for the
    stop-gradient student (diffusers' LCM-LoRA script). ``distance``: ``l2`` or ``huber``
    (:func:`lcd_distance`). Data: ``{"x0": latents, **per-example keywords}`` (``context``, ...).

    ``module`` is ``{"student"[, "target"]}`` with a ``step`` buffer; checkpoints hold the whole
    student (for LCM-LoRA the frozen base weights too); :func:`save_lcm_lora` writes the adapter alone.
    """

    name = "latent_consistency_distillation"

    def __init__(self, teacher: Denoiser, uncond: dict, *, student: nn.Module | None = None, w_min: float = 2.0,
                 w_max: float = 8.0, original_steps: int = 50, solver: str = "ddim", target_ema: float = 0.95,
                 distance: str = "l2", huber_c: float = 0.001):
        _check_teacher(teacher)
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r} is unknown; choose one of {list(SOLVERS)}")
        if distance not in DISTANCES:
            raise ValueError(f"distance={distance!r} is unknown; choose one of {list(DISTANCES)}")
        student = lcm_student(teacher) if student is None else student
        self.teacher = teacher.eval().requires_grad_(False)
        self.uncond, self.scales = dict(uncond), UniformScale(w_min, w_max)
        self.module, self.target_ema = _module(student, target_ema), target_ema
        self.takes_w = takes_guidance_scale(student)
        self.t_start, self.t_end = skipping_timesteps(teacher.frame.T, original_steps)
        self.solver, self.distance, self.huber_c = SOLVERS[solver], distance, huber_c

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        """n ~ U{0 .. original_steps - 1} (the pair), eps ~ N(0, I), w ~ U[w_min, w_max]: the loop's generator only."""
        x0 = batch["x0"]
        n = torch.randint(0, len(self.t_start), (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        sigmas = self.teacher.frame.sigmas
        return {"sigma": sigmas[self.t_start[n]].to(x0.dtype), "sigma_lower": sigmas[self.t_end[n]].to(x0.dtype),
                "noise": noise, **self.scales(batch, generator)}

    def loss(self, batch: dict) -> torch.Tensor:
        x0, s_hi, s_lo, w = batch["x0"], batch["sigma"], batch["sigma_lower"], batch["guidance_scale"]
        cond = {k: v for k, v in batch.items() if k not in DRAWN and v is not None}
        student = self.module["student"]
        target = self.module["target"] if "target" in self.module else student
        w_in = {"guidance_scale": w} if self.takes_w else {}
        x_hi = x0 + append_dims(s_hi, x0.ndim) * batch["noise"]
        with torch.no_grad():
            guided = lambda x, s, **c: guided_x0(self.teacher, x, s, w, self.uncond, **c)  # noqa: E731
            x_lo = teacher_ode_step(guided, x_hi, s_hi, s_lo, self.solver, **cond)
            target_x0 = target(x_lo, s_lo, **w_in, **cond)
        return lcd_distance(student(x_hi, s_hi, **w_in, **cond), target_x0, self.distance, self.huber_c)


__all__ = ["LatentConsistencyDistillation", "lcm_student", "lcm_lora_student", "lora_targets", "caption_conditioning",
           "save_lcm_lora", "apply_lcm_lora", "skipping_timesteps", "lcd_distance", "LORA_TARGETS", "LORA_NAME",
           "DISTANCES", "SOLVERS"]
