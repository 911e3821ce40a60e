"""ControlNet: spatial control of a frozen U-Net (Zhang et al. 2023, "Adding Conditional Control to
Text-to-Image Diffusion Models", Section 3, Fig. 2-3).

A locked block F(.; Theta) gets a trainable copy F(.; Theta_c) fed through zero convolutions
Z(.; Theta_z), 1x1 convolutions whose weight and bias start at zero (eq. 2):

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2).

For the Stable Diffusion U-Net (Section 3.2, Fig. 3) the trainable copy is the whole encoder --
``conv_in``, the time embedding, every down block and the middle block -- and its outputs reach the
locked U-Net through one zero convolution per skip connection and one on the middle block's
output, *added* to the locked U-Net's skips and middle output. The condition image c (edges,
depth, pose, ...) is encoded by a small convolution stack E (:class:`ControlNetConditioningEmbedding`:
3x3 convolutions with SiLU, one stride-2 convolution per extra width, down to the latent
resolution; its last convolution is zero-initialized and plays Z(.; Theta_z1)) and added to the
copy's ``conv_in`` output. Because every zero convolution outputs exactly 0 at initialization, a
fresh ControlNet changes nothing: the controlled U-Net computes what the base U-Net computes.

Pieces:

- :class:`ControlNet` -- the trainable copy, zero convolutions and condition encoder, with the
  module names of diffusers' ``ControlNetModel`` (so its ``config.json`` + safetensors load as they
  are: :func:`load_diffusers_controlnet`, :func:`save_diffusers_controlnet`; the authors' layout
  through a key-map table: :func:`controlnet_from_original`); ``forward`` returns
  the residuals (one per skip connection, and the middle one) times ``conditioning_scale``.
  :meth:`ControlNet.from_unet` copies the encoder weights of a :class:`~difflab.nn.unet_sd.UNetSD`.
- :class:`ControlledUNet` -- a network ``net(x_in, t, context=, control=, conditioning_scale=)``:
  runs each ControlNet, sums the scaled residuals (several ControlNets compose by adding their
  outputs, Section 3.4) and runs the U-Net with them (``down_block_additional_residuals``,
  ``mid_block_additional_residual``). Wrap it with :class:`difflab.core.Denoiser` as any net.
- :class:`ControlledDenoiser` -- a denoiser -> denoiser wrapper choosing each ControlNet's
  conditioning scale from sigma: a weight, and the part of the sampling grid where it acts
  (diffusers' ``control_guidance_start`` / ``control_guidance_end`` as fractions of the steps,
  turned into a sigma range by :func:`control_sigma_range`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from ..io.folders import CONFIG_NAME, load_into, read_json, read_safetensors, save_model_folder
from ..io.keymaps import controlnet as keymap
from ..io.keymaps import rename_key, to_difflab
from ..nn.layers import timestep_embedding, zero_
from ..nn.unet_sd import UNetSD, UNetSDConfig

DIFFUSERS_CLASS = "ControlNetModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class ControlNetConfig:
    """The shape of a ControlNet: the U-Net it copies, and its condition encoder E.

    ``conditioning_embedding_out_channels`` are E's widths; E has one stride-2 convolution per
    width after the first, so the control image is ``2 ** (len - 1)`` times the latent size
    (Stable Diffusion: (16, 32, 96, 256), 512x512 images for 64x64 latents; a pixel-space model
    uses a single width and a control image of its own size). ``conditioning_channel_order``
    ``"bgr"`` flips the control's channels first (diffusers' ``controlnet_conditioning_channel_order``).
    """

    unet: UNetSDConfig = UNetSDConfig()  # the U-Net whose encoder is copied (only the encoder's fields matter)
    conditioning_channels: int = 3  # channels of the control image
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)  # widths of E
    conditioning_channel_order: str = "rgb"

    def __post_init__(self):
        object.__setattr__(self, "conditioning_embedding_out_channels", tuple(self.conditioning_embedding_out_channels))
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetSDConfig.from_dict(self.unet))
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels must name at least one width")
        if self.unet.addition_embed_type is not None:
            raise ValueError(f"addition_embed_type={self.unet.addition_embed_type!r}: SDXL ControlNets are not supported "
                             "(only the SD 1.x / 2.x family)")
        if self.conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"conditioning_channel_order={self.conditioning_channel_order!r} must be one of {CHANNEL_ORDERS}")

    @property
    def control_factor(self) -> int:
        """How much larger the control image is than the U-Net's input: 2 ** (len(widths) - 1)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["unet"] = self.unet.to_dict()
        d["conditioning_embedding_out_channels"] = list(self.conditioning_embedding_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict, section: str = "ControlNetConfig") -> "ControlNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys and wrong types are a :class:`~difflab.config.ConfigError`."""
        if isinstance(d, dict) and isinstance(d.get("unet"), dict):
            d = {**d, "unet": UNetSDConfig.from_dict(d["unet"], f"{section}.unet")}
        return from_dict(cls, d, section)

    # -- diffusers' config.json ----------------------------------------------------------------

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "ControlNetConfig":
        """Read a diffusers ``ControlNetModel`` ``config.json`` dict (SD 1.x / 2.x family).

        The encoder settings are checked as :meth:`UNetSDConfig.from_diffusers_config` checks a
        U-Net's (the decoder's block types are taken as the mirror of the encoder's);
        ``global_pool_conditions`` (shuffle ControlNets) raises ValueError.
        """
        if d.get("global_pool_conditions", False):
            raise ValueError("global_pool_conditions=True (spatially pooled residuals) is not supported")
        down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        unet_dict = {**d, "down_block_types": down, "up_block_types": [mirror.get(b, b) for b in reversed(down)],
                     "out_channels": d.get("in_channels", 4)}
        return cls(unet=UNetSDConfig.from_diffusers_config(unet_dict),
                   conditioning_channels=d.get("conditioning_channels", 3),
                   conditioning_embedding_out_channels=tuple(d.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
                   conditioning_channel_order=d.get("controlnet_conditioning_channel_order", "rgb"))

    def to_diffusers_config(self) -> dict:
        """The diffusers ``config.json`` dict of the same ControlNet."""
        unet = self.unet.to_diffusers_config()
        d = {k: unet[k] for k in _DIFFUSERS_KEYS}
        d.update({"_class_name": DIFFUSERS_CLASS, "conditioning_channels": self.conditioning_channels,
                  "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
                  "controlnet_conditioning_channel_order": self.conditioning_channel_order, "global_pool_conditions": False})
        return d


# the keys of a diffusers ControlNetModel config that describe the copied encoder (as in a U-Net config)
_DIFFUSERS_KEYS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
                   "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
                   "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
                   "encoder_hid_dim_type", "attention_head_dim", "use_linear_projection", "class_embed_type",
                   "addition_embed_type", "num_class_embeds", "resnet_time_scale_shift")


class ControlNetConditioningEmbedding(nn.Module):
    """The condition encoder E (Zhang et al. 2023, Section 3.2), named as diffusers names it.

    ``conv_in`` (3x3, control channels -> widths[0]), then per further width a 3x3 convolution and
    a stride-2 3x3 convolution to that width, SiLU after each; ``conv_out`` (3x3, to the U-Net's
    first width) is zero-initialized, so E(c) = 0 until trained.
    """

    def __init__(self, embedding_channels: int, conditioning_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], embedding_channels, 3, padding=1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(c))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


def skip_channels(config: UNetSDConfig) -> list[int]:
    """Widths of a UNetSD's skip connections, in the order its down pass keeps them: ``conv_in``'s
    output, then per level ``layers_per_block`` block outputs and the downsampler's (not after the last)."""
    chans, n = config.block_out_channels, len(config.block_out_channels)
    out = [chans[0]]
    for i in range(n):
        out += [chans[i]] * (config.layers_per_block + (1 if i < n - 1 else 0))
    return out


def _scale_like(scale, h: torch.Tensor):
    """A float, or a (B,) tensor of per-sample scales shaped to broadcast against (B, C, H, W)."""
    if torch.is_tensor(scale) and scale.ndim > 0:
        return scale.to(h.dtype).reshape(-1, *([1] * (h.ndim - 1)))
    return scale


class ControlNet(nn.Module):
    """The trainable encoder copy with zero convolutions (Zhang et al. 2023, eq. 2 and Fig. 3).

    Module names are diffusers' ``ControlNetModel``'s: ``conv_in``, ``time_embedding``,
    ``controlnet_cond_embedding`` (E), ``down_blocks``, ``mid_block`` (the copy, built like
    :class:`~difflab.nn.unet_sd.UNetSD`'s), ``controlnet_down_blocks`` (one zero 1x1 convolution per
    skip connection) and ``controlnet_mid_block``. Freshly built, the copy has PyTorch's default
    initialization; :meth:`from_unet` copies a U-Net's encoder into it.
    """

    def __init__(self, config: ControlNetConfig, device=None):
        super().__init__()
        self.config = c = config
        # the copy is the encoder half of a UNetSD: build one without memory, keep its encoder
        with torch.device("meta"):
            template = UNetSD(c.unet)
        self.conv_in, self.time_embedding = template.conv_in, template.time_embedding
        self.down_blocks, self.mid_block = template.down_blocks, template.mid_block
        del template
        chans = c.unet.block_out_channels
        with torch.device("meta"):
            self.controlnet_cond_embedding = ControlNetConditioningEmbedding(chans[0], c.conditioning_channels,
                                                                             c.conditioning_embedding_out_channels)
            self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(ch, ch, 1) for ch in skip_channels(c.unet)])
            self.controlnet_mid_block = nn.Conv2d(chans[-1], chans[-1], 1)
        self.to_empty(device=device or "cpu")
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        # the zero convolutions Z(.; Theta_z1) (E's last conv) and Z(.; Theta_z2)
        zero_(self.controlnet_cond_embedding.conv_out)
        zero_(self.controlnet_down_blocks)
        zero_(self.controlnet_mid_block)

    @classmethod
    def from_unet(cls, unet: UNetSD, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)) -> "ControlNet":
        """A ControlNet whose trainable copy starts as ``unet``'s encoder (Section 3.1: Theta_c <- Theta),
        on ``unet``'s device and dtype; E and the zero convolutions start as in ``__init__``."""
        p = next(unet.parameters())
        config = ControlNetConfig(unet.config, conditioning_channels, tuple(conditioning_embedding_out_channels))
        net = cls(config, device=p.device).to(p.dtype)
        for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net

    def forward(self, x: torch.Tensor, t: torch.Tensor, control: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, conditioning_scale=1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the locked U-Net: ``(down, mid)``, one tensor per skip connection and the middle one.

        ``x``, ``t``, ``context``, ``context_mask`` are what the U-Net gets; ``control`` (B or 1,
        conditioning_channels, H * f, W * f) with f = ``config.control_factor``, values as the
        ControlNet was trained on (diffusers: [0, 1]). ``conditioning_scale``: a float or a (B,)
        tensor multiplying every residual.
        """
        # 1. Check inputs, embed time
        u = self.config.unet
        if x.ndim != 4 or x.shape[1] != u.in_channels:
            raise ValueError(f"x must be (B, {u.in_channels}, H, W), got shape {tuple(x.shape)}")
        f, (b, _, hgt, wid) = self.config.control_factor, x.shape
        want = (self.config.conditioning_channels, hgt * f, wid * f)
        if not torch.is_tensor(control):
            raise ValueError(f"control must be a (B or 1, {want[0]}, {want[1]}, {want[2]}) tensor, got a {type(control).__name__}"
                             " (torch.as_tensor converts an array; values as the ControlNet was trained on)")
        if control.ndim != 4 or tuple(control.shape[1:]) != want or control.shape[0] not in (1, b):
            raise ValueError(f"control must be (B or 1, {want[0]}, {want[1]}, {want[2]}) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(control.shape)}")
        if self.config.conditioning_channel_order == "bgr":
            control = control.flip(1)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        emb = self.time_embedding(timestep_embedding(t, u.block_out_channels[0]).to(self.conv_in.weight.dtype))

        # 2. x + Z(c; Theta_z1): the encoded control is added after conv_in
        h = self.conv_in(x) + self.controlnet_cond_embedding(control.to(x.dtype))

        # 3. The trainable copy of the encoder, keeping every skip
        skips = [h]
        for block in self.down_blocks:
            h, out = block(h, emb, context, context_mask)
            skips += out
        h = self.mid_block(h, emb, context, context_mask)

        # 4. Zero convolutions Z(.; Theta_z2), scaled
        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if not (isinstance(conditioning_scale, (int, float)) and conditioning_scale == 1):
            down = [r * _scale_like(conditioning_scale, r) for r in down]
            mid = mid * _scale_like(conditioning_scale, mid)
        return down, mid


def _is_zero(scale) -> bool:
    if torch.is_tensor(scale):
        return not bool(scale.detach().ne(0).any())
    return scale == 0


def _as_list(value, n: int, name: str) -> list:
    """``value`` for each of ``n`` ControlNets: a list/tuple of length n, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} ControlNets")
        return list(value)
    return [value] * n


class ControlledUNet(nn.Module):
    """A U-Net steered by ControlNets (Zhang et al. 2023, Section 3.2; several at once, Section 3.4).

    A network in difflab's contract, ``net(x_in, t, context=, context_mask=, control=,
    conditioning_scale=)``: ControlNet k gets ``control[k]``; its residuals, times
    ``conditioning_scale[k]`` (a float or a (B,) tensor), are summed over the ControlNets and added
    to the U-Net's skip connections and middle output. ``control`` is a tensor when there is one
    ControlNet, else a list with one entry per ControlNet (None skips that one). A ControlNet whose
    scale is 0 (or whose control is None) is not run; with no ControlNet left the U-Net runs
    alone, so the output is exactly the base model's. A control with batch 1 serves every sample;
    one whose batch divides x's is repeated (the stacking of classifier-free guidance).

    Train a ControlNet through this module with the U-Net frozen (``requires_grad_(False)``):
    :func:`difflab.train.train` then moves only the ControlNet's parameters.
    """

    def __init__(self, unet: UNetSD, controlnets):
        super().__init__()
        self.unet = unet
        self.controlnets = nn.ModuleList([controlnets] if isinstance(controlnets, ControlNet) else list(controlnets))
        if not self.controlnets:
            raise ValueError("ControlledUNet needs at least one ControlNet")

    @property
    def config(self):
        return self.unet.config

    def residuals(self, x, t, context=None, context_mask=None, control=None, conditioning_scale=1.0):
        """The summed, scaled residuals ``(down, mid)`` of the ControlNets, or ``(None, None)`` when none runs."""
        n = len(self.controlnets)
        controls = [control] if torch.is_tensor(control) or control is None else list(control)
        if len(controls) != n:
            raise ValueError(f"control has {len(controls)} entries for {n} ControlNets")
        scales = _as_list(conditioning_scale, n, "conditioning_scale")
        down = mid = None
        for controlnet, c, s in zip(self.controlnets, controls, scales):
            if c is None or _is_zero(s):
                continue
            d, m = controlnet(x, t, _match_batch(c, x.shape[0]), context, context_mask, s)
            down = d if down is None else [a + r for a, r in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                control=None, conditioning_scale=1.0) -> torch.Tensor:
        down, mid = self.residuals(x, t, context, context_mask, control, conditioning_scale)
        return self.unet(x, t, context, context_mask, class_labels,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid)


def _match_batch(control: torch.Tensor, batch: int) -> torch.Tensor:
    n = control.shape[0]
    if n in (1, batch):
        return control
    if batch % n == 0:
        return control.repeat(batch // n, *([1] * (control.ndim - 1)))
    raise ValueError(f"control has batch {n}, which does not divide the batch {batch} of x")


# ----------------------------------------------------------------------------------------------
# Where on the grid a ControlNet acts


def control_sigma_range(sigmas: torch.Tensor, start: float = 0.0, end: float = 1.0) -> tuple[float, float] | None:
    """The sigma range ``(sigma_low, sigma_high)`` of the steps a ControlNet acts on, or None for no step.

    ``sigmas`` is a sampling grid (decreasing, ending in 0) of n = len - 1 steps; step i evaluates
    the denoiser at ``sigmas[i]`` and is kept when ``i / n >= start`` and ``(i + 1) / n <= end``,
    diffusers' rule for ``control_guidance_start`` / ``control_guidance_end``.
    """
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    n = len(sigmas) - 1
    kept = [i for i in range(n) if not (i / n < start or (i + 1) / n > end)]
    if not kept:
        return None
    return float(sigmas[kept[-1]]), float(sigmas[kept[0]])


class ControlledDenoiser(nn.Module):
    """Choose each ControlNet's conditioning scale from sigma: a denoiser -> denoiser wrapper.

    ``denoiser`` wraps a :class:`ControlledUNet`. ControlNet k gets the weight ``scale[k]`` where
    sigma lies in its range and 0 elsewhere (so it is not run there). The range comes from the
    fractions ``start[k]``, ``end[k]`` of the sampling grid ``sigmas`` (:func:`control_sigma_range`),
    or is given as ``sigma_range``: one ``(low, high)`` tuple (inclusive) for all, or a list with
    one tuple (or None: never) per ControlNet. With neither, every ControlNet acts everywhere.
    ``scale``, ``start`` and ``end`` are one value for all ControlNets or a list with one per ControlNet.

    ``forward(x, sigma, control=..., **cond)`` passes ``control`` and the (B,) per-sample scales
    (``conditioning_scale``) to the denoiser. Inside classifier-free guidance,
    ``ClassifierFreeGuidance(ControlledDenoiser(D), ...)``, both branches are controlled.
    """

    def __init__(self, denoiser, scale=1.0, *, start=0.0, end=1.0, sigmas: torch.Tensor | None = None, sigma_range=None):
        super().__init__()
        fractions = [v for v in _flat(start) if v != 0.0] + [v for v in _flat(end) if v != 1.0]
        if fractions and sigmas is None:
            raise ValueError("start/end fractions of the grid need the sampling grid: pass sigmas=")
        if fractions and sigma_range is not None:
            raise ValueError("give start/end fractions (with sigmas=) or sigma_range, not both")
        self.denoiser, self.scale = denoiser, scale
        self.start, self.end, self.sigmas, self.sigma_range = start, end, sigmas, sigma_range

    def ranges(self, n: int) -> list:
        """``(low, high)`` or None (never) for each of ``n`` ControlNets."""
        if self.sigma_range is not None:
            return _as_list(self.sigma_range, n, "sigma_range") if isinstance(self.sigma_range, list) else [tuple(self.sigma_range)] * n
        if self.sigmas is None:
            return [(0.0, float("inf"))] * n
        return [control_sigma_range(self.sigmas, s, e) for s, e in zip(_as_list(self.start, n, "start"), _as_list(self.end, n, "end"))]

    def scales(self, sigma: torch.Tensor, n: int) -> list[torch.Tensor]:
        """The (B,) conditioning scale of each of ``n`` ControlNets at the (B,) ``sigma``."""
        out = []
        for w, r in zip(_as_list(self.scale, n, "scale"), self.ranges(n)):
            inside = torch.zeros_like(sigma, dtype=torch.bool)
            if r is not None:  # grid values may have passed through float32: a relative tolerance
                inside = (sigma >= r[0] * (1 - 1e-6)) & (sigma <= r[1] * (1 + 1e-6))
            out.append(w * inside.to(sigma.dtype))
        return out

    def forward(self, x: torch.Tensor, sigma, control=None, **cond) -> torch.Tensor:
        if control is None:
            return self.denoiser(x, sigma, **cond)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        single = torch.is_tensor(control)
        scales = self.scales(s, 1 if single else len(control))
        return self.denoiser(x, sigma, control=control, conditioning_scale=scales[0] if single else scales, **cond)


def _flat(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------------------------
# diffusers' ControlNetModel folders


def load_diffusers_controlnet(folder, *, variant: str | None = None, dtype: torch.dtype | None = None) -> ControlNet:
    """A :class:`ControlNet` from a diffusers ``ControlNetModel`` folder (config.json + safetensors), in eval mode.

    diffusers' names are difflab's (:data:`difflab.io.keymaps.controlnet.DIFFUSERS` is empty), so
    the tensors load as they are; a mismatch raises ValueError naming the keys.
    """
    folder = Path(folder)
    config = ControlNetConfig.from_diffusers_config(read_json(folder / CONFIG_NAME, "a diffusers ControlNetModel config"))
    net = ControlNet(config)
    load_into(net, read_safetensors(folder, WEIGHTS_NAME, variant), f"diffusers ControlNetModel weights in {folder}",
               lambda k: k)
    return net.to(dtype).eval() if dtype is not None else net.eval()


def controlnet_from_original(tensors: dict[str, torch.Tensor], config: ControlNetConfig) -> ControlNet:
    """A :class:`ControlNet` from the authors' (``cldm``) layout: ``control_model.*`` keys (the
    prefix is optional), renamed by :func:`difflab.io.keymaps.controlnet.original_table`. Those
    files record no config: ``config`` says the shape (e.g. ``ControlNetConfig(PRESETS["sd1"])``)."""
    prefix = keymap.ORIGINAL_PREFIX
    tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    net = ControlNet(config)
    load_into(net, to_difflab(tensors, keymap.original_table(config)), "original ControlNet weights",
               lambda k: rename_key(k, keymap.original_table(config), reverse=True)[0])
    return net.eval()


def save_diffusers_controlnet(net: ControlNet, folder) -> Path:
    """Write ``net`` as a diffusers ``ControlNetModel`` folder (config.json + weights); returns the folder."""
    return save_model_folder(folder, WEIGHTS_NAME, net.state_dict(), net.config.to_diffusers_config())


__all__ = ["ControlNetConfig", "ControlNetConditioningEmbedding", "ControlNet", "ControlledUNet", "ControlledDenoiser",
           "control_sigma_range", "skip_channels", "load_diffusers_controlnet", "save_diffusers_controlnet",
           "controlnet_from_original"]
