"""LoRA by module surgery (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3).

A frozen weight W0 (d x k) is adapted by a low-rank update ΔW = B A, B (d x r), A (r x k):
``h = W0 x + (alpha / r) B A x`` (eq. 3, scaled by alpha / r as in Section 4.1). A is random
(Kaiming-uniform, as PEFT), B is zero, so an injected model computes exactly what the base model
does until it is trained. On a convolution, A is a convolution with the base kernel's shape,
stride, padding and dilation (r output channels) and B a 1x1 convolution (PEFT; kohya's LoCon):
together they are the convolution with kernel ``ΔW[o, i] = sum_r B[o, r] A[r, i]``, so they merge
exactly.

Surgery (STYLE.md, rule 9): :func:`inject_lora` replaces every ``nn.Linear`` / ``nn.Conv2d`` whose
name matches a pattern by a :class:`LoRALinear` / :class:`LoRAConv2d`. The wrapper *is* an
``nn.Linear`` / ``nn.Conv2d`` holding the same weight and bias Parameters, so the base keys of the
state dict do not change (``to_q.weight``); adapter ``a`` adds ``to_q.lora_A.a.weight`` and
``to_q.lora_B.a.weight``. Several adapters may sit on one layer, each with a weight w
(:func:`set_adapter_weights`); the layer computes

    h = W0 x + sum_a w_a (alpha_a / r_a) B_a A_a dropout_a(x).

:func:`merge_lora` folds ``w_a (alpha_a / r_a) B_a A_a`` into W0 and remembers that scale;
:func:`unmerge_lora` subtracts the same product, so W0 comes back up to float rounding. Merging a
merged adapter is a no-op; changing the weight of a merged adapter is an error (unmerge first);
merged adapters must not be trained (their A and B no longer act on the output separately).

Files: :func:`save_lora` / :func:`load_lora` write and read one small safetensors file (the
adapter's tensors in PEFT's key layout, rank/alpha/targets in its metadata);
:func:`save_lora_weights` writes diffusers' layout and :func:`load_lora_weights` reads the PEFT /
diffusers and kohya layouts (the files through
:mod:`difflab.io.lora_files`, the keys through the key-map tables of :mod:`difflab.io.keymaps.lora`).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..io.keymaps import TRANSFORMS
from ..io.keymaps import lora as keymap
from ..io.lora_files import LORA_FILE, LORA_KIND, component_config, config_alpha, kohya_to_peft, read_lora_file, write_diffusers_lora
from .surgery import matches, outermost, replace_module, select


@dataclass
class AdapterSpec:
    """One adapter on one layer: rank r, alpha, dropout probability, weight w; its scale is w alpha / r."""

    rank: int
    alpha: float
    dropout: float = 0.0
    weight: float = 1.0
    targets: tuple[str, ...] = ()  # the patterns it was injected with (for the saved metadata)

    @property
    def scale(self) -> float:
        return self.weight * self.alpha / self.rank


class _LoRA:
    """What LoRALinear and LoRAConv2d share: the adapters, eq. 3's forward, merging."""

    def _init_lora(self, base: nn.Module) -> None:
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.lora: dict[str, AdapterSpec] = {}
        self.merged: dict[str, float] = {}  # adapter -> the scale it was merged with
        self.train(base.training)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, *, targets=(),
                    generator: torch.Generator | None = None) -> None:
        """Add adapter ``name``: A Kaiming-uniform (a = sqrt 5, PEFT's init), B zero."""
        if name in self.lora:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        A, B = self._make(rank)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(self.training)  # new modules start in training mode: follow the layer's
        self.lora[name] = AdapterSpec(int(rank), float(alpha), float(dropout), 1.0, tuple(targets))

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` as it is: a merged adapter stays folded into the weight."""
        self.merged.pop(name, None)
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.lora):
            del d[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = B A of adapter ``name`` (unscaled), shaped like the base weight, in at least float32."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return self._product(self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype))

    @torch.no_grad()
    def merge(self, names=None) -> None:
        """W0 += w alpha / r B A for each adapter of ``names`` (all when None) not merged yet."""
        for name in list(self.lora) if names is None else [n for n in names if n in self.lora]:
            if name not in self.merged:
                scale = self.lora[name].scale
                self.weight.add_((scale * self.delta_weight(name)).to(self.weight.dtype))
                self.merged[name] = scale

    @torch.no_grad()
    def unmerge(self, names=None) -> None:
        """W0 -= the product each merged adapter of ``names`` (all when None) was merged with."""
        for name in list(self.merged) if names is None else [n for n in names if n in self.merged]:
            scale = self.merged.pop(name)
            self.weight.sub_((scale * self.delta_weight(name)).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hu et al. 2021, eq. 3: h = W0 x + sum_a w_a (alpha_a / r_a) B_a A_a dropout_a(x), merged adapters already in W0."""
        h = self._base_forward(x)
        for name, spec in self.lora.items():
            if name in self.merged or spec.weight == 0:
                continue
            h = h + spec.scale * self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
        return h

    def _factory(self) -> dict:
        return dict(device=self.weight.device, dtype=self.weight.dtype)


class LoRALinear(_LoRA, nn.Linear):
    """An ``nn.Linear`` with LoRA adapters (Hu et al. 2021, eq. 3); A: Linear(k, r), B: Linear(r, d), no biases."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self._init_lora(base)

    def _make(self, rank: int):
        return (nn.Linear(self.in_features, rank, bias=False, **self._factory()),
                nn.Linear(rank, self.out_features, bias=False, **self._factory()))

    @staticmethod
    def _product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return B @ A

    def _base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def to_base(self) -> nn.Linear:
        """A plain nn.Linear holding the same weight and bias Parameters."""
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        m.weight, m.bias = self.weight, self.bias
        return m.train(self.training)


_CONV_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                    "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class LoRAConv2d(_LoRA, nn.Conv2d):
    """An ``nn.Conv2d`` with LoRA adapters (Hu et al. 2021, eq. 3): A a conv with the base kernel, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution (groups={base.groups}) does not merge into one kernel; not supported")
        nn.Module.__init__(self)
        for a in _CONV_ATTRIBUTES:
            setattr(self, a, getattr(base, a))
        self.weight, self.bias = base.weight, base.bias
        self._init_lora(base)

    def _make(self, rank: int):
        A = nn.Conv2d(self.in_channels, rank, self.kernel_size, self.stride, self.padding, self.dilation, bias=False,
                      padding_mode=self.padding_mode, **self._factory())
        return A, nn.Conv2d(rank, self.out_channels, 1, bias=False, **self._factory())

    @staticmethod
    def _product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A)

    def _base_forward(self, x):
        return self._conv_forward(x, self.weight, self.bias)

    def to_base(self) -> nn.Conv2d:
        """A plain nn.Conv2d holding the same weight and bias Parameters."""
        m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                      bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        m.weight, m.bias = self.weight, self.bias
        return m.train(self.training)


WRAPPERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}  # exact types: a subclass may compute something else


# ----------------------------------------------------------------------------------------------
# Finding and wrapping modules


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the modules LoRA can adapt: plain nn.Linear / nn.Conv2d and LoRA
    layers (not the A and B inside them)."""
    return outermost(model, lambda m: isinstance(m, _LoRA) or type(m) in WRAPPERS)


def first_present(model: nn.Module, families, what: str = "layers") -> list[str]:
    """The patterns of the first family in ``families`` (tuples of name patterns) that name at least
    one adaptable layer of ``model``: those of its patterns that do. A ValueError when none does."""
    names = list(adaptable_modules(model))
    for family in families:
        found = [p for p in family if any(matches(n, p) for n in names)]
        if found:
            return found
    raise ValueError(f"{type(model).__name__} has none of the {what} {[list(f) for f in families]}: give the targets")


def find_modules(model: nn.Module, target) -> list[str]:
    """Names of the adaptable modules matching any pattern of ``target`` (see :func:`matches`), in
    model order. A pattern that matches none is a ValueError naming it."""
    candidates = adaptable_modules(model)
    fused = any(n.endswith(("to_qkv", "to_kv")) for n in candidates)
    hint = ("; its attention projections are fused (optimize's fuse_qkv): add LoRA before optimize, or target "
            "to_qkv / to_kv") if fused else ""
    return select(candidates, target, f"nn.Linear or nn.Conv2d of {type(model).__name__}", hint)


def _wrap(model: nn.Module, name: str) -> _LoRA:
    """The LoRA layer at ``name``, replacing a plain nn.Linear / nn.Conv2d there if needed."""
    module = model.get_submodule(name)
    if isinstance(module, _LoRA):
        return module
    if type(module) not in WRAPPERS:
        raise ValueError(f"module {name!r} is a {type(module).__name__}; LoRA adapts nn.Linear and nn.Conv2d")
    wrapper = WRAPPERS[type(module)](module)
    replace_module(model, name, wrapper)
    return wrapper


def lora_layers(model: nn.Module) -> dict[str, _LoRA]:
    """``{name: layer}`` of the model's LoRA layers."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRA)}


def list_adapters(model: nn.Module) -> dict[str, list[str]]:
    """``{adapter name: [module names]}``."""
    out: dict[str, list[str]] = {}
    for module, layer in lora_layers(model).items():
        for name in layer.lora:
            out.setdefault(name, []).append(module)
    return out


def _check_name(model: nn.Module, name: str) -> dict[str, _LoRA]:
    """The layers holding adapter ``name``; a ValueError listing the adapters when there are none."""
    layers = {m: layer for m, layer in lora_layers(model).items() if name in layer.lora}
    if not layers:
        raise ValueError(f"the model has no LoRA adapter named {name!r} (it has {sorted(list_adapters(model))})")
    return layers


# ----------------------------------------------------------------------------------------------
# The public operations


def inject_lora(model: nn.Module, target, rank: int, alpha: float | None = None, dropout: float = 0.0,
                name: str = "default", *, generator: torch.Generator | None = None) -> list[str]:
    """Add LoRA adapter ``name`` (Hu et al. 2021, eq. 3) to every nn.Linear / nn.Conv2d matching ``target``.

    ``target``: a pattern or a list of them (:func:`matches`: globs on the name or a dotted tail,
    ``"re:..."`` for a full-name regex). ``rank`` r, ``alpha`` (default r: scale 1), ``dropout``
    on the adapter's input. Returns the names of the adapted modules.
    """
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be non-empty and contain no dot")
    modules = find_modules(model, target)
    targets = (target,) if isinstance(target, str) else tuple(target)
    taken = [m for m in modules if name in getattr(model.get_submodule(m), "lora", {})]
    if taken:
        raise ValueError(f"adapter {name!r} already exists on {taken[:5]}")
    for m in modules:
        _wrap(model, m).add_adapter(name, rank, rank if alpha is None else alpha, dropout, targets=targets, generator=generator)
    return modules


def set_adapter_weights(model: nn.Module, weights: dict[str, float]) -> None:
    """Set the weight w of each named adapter (0 turns one off); adapters not named keep theirs.
    Changing the weight of a merged adapter is a RuntimeError: unmerge it first."""
    for name in weights:
        _check_name(model, name)
    for module, layer in lora_layers(model).items():
        for name, w in weights.items():
            if name in layer.merged and float(w) != layer.lora[name].weight:
                raise RuntimeError(f"adapter {name!r} is merged into {module!r}: unmerge_lora before changing its weight")
    for layer in lora_layers(model).values():
        for name, w in weights.items():
            if name in layer.lora:
                layer.lora[name].weight = float(w)


def merge_lora(model: nn.Module, names=None) -> None:
    """Fold adapters ``names`` (all when None) into the base weights, W0 += w alpha / r B A; a no-op for merged ones."""
    for name in [names] if isinstance(names, str) else names or []:
        _check_name(model, name)
    for layer in lora_layers(model).values():
        layer.merge([names] if isinstance(names, str) else names)


def unmerge_lora(model: nn.Module, names=None) -> None:
    """Take merged adapters ``names`` (all when None) back out of the base weights; a no-op for unmerged ones."""
    for name in [names] if isinstance(names, str) else names or []:
        _check_name(model, name)
    for layer in lora_layers(model).values():
        layer.unmerge([names] if isinstance(names, str) else names)


def remove_lora(model: nn.Module, name: str | None = None, *, merge: bool = False) -> list[str]:
    """Remove adapter ``name`` (all when None). ``merge=False`` restores the base weights first
    (unmerge); ``merge=True`` leaves the adapters folded into them ("merge and unload"). A layer
    left without adapters becomes a plain nn.Linear / nn.Conv2d again. Returns those layers' names."""
    if name is not None:
        _check_name(model, name)
    restored = []
    for module, layer in lora_layers(model).items():
        names = list(layer.lora) if name is None else [n for n in [name] if n in layer.lora]
        (layer.merge if merge else layer.unmerge)(names)
        for n in names:
            layer.remove_adapter(n)
        if not layer.lora:
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to_base())
            restored.append(module)
    return restored


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The A and B parameters of adapter ``name`` (all adapters when None)."""
    out = []
    for layer in lora_layers(model).values():
        for n in layer.lora if name is None else [name] if name in layer.lora else []:
            out += [layer.lora_A[n].weight, layer.lora_B[n].weight]
    return out


def mark_only_lora_trainable(model: nn.Module, name: str | None = None) -> int:
    """Freeze every parameter except the A and B of adapter ``name`` (all adapters when None);
    returns the number of trainable parameters (elements)."""
    if name is not None:
        _check_name(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    params = lora_parameters(model, name)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Only adapter ``name``'s tensors, in PEFT's layout: ``{module}.lora_A.weight``, ``{module}.lora_B.weight``."""
    out = {}
    for module, layer in _check_name(model, name).items():
        out[f"{module}.lora_A.weight"] = layer.lora_A[name].weight.detach()
        out[f"{module}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    return out


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def save_lora(path, model: nn.Module, name: str = "default") -> Path:
    """Write adapter ``name`` as one small safetensors file (atomically; :func:`difflab.io.save_checkpoint`):
    its A and B tensors and, in the metadata, rank, alpha, dropout, target patterns and the rank and
    alpha of every module. ``path``: a ``.safetensors`` file, or a directory that gets ``lora.safetensors``.
    Returns the file's path."""
    layers = _check_name(model, name)
    specs = {m: layer.lora[name] for m, layer in layers.items()}
    first = next(iter(specs.values()))
    meta = {
        "kind": LORA_KIND,
        "name": name,
        "rank": _most_common(s.rank for s in specs.values()),
        "alpha": _most_common(s.alpha for s in specs.values()),
        "dropout": first.dropout,
        "targets": list(first.targets),
        "modules": {m: {"rank": s.rank, "alpha": s.alpha} for m, s in specs.items()},
    }
    path = Path(path)
    return save_checkpoint(path if path.suffix == ".safetensors" else path / LORA_FILE, lora_state_dict(model, name), meta)


def save_lora_weights(path, model: nn.Module, name: str = "default", *, prefix: str = "unet.") -> Path:
    """Write adapter ``name`` in diffusers' layout (:func:`difflab.io.lora_files.write_diffusers_lora`):
    keys ``{prefix}{module}.lora_A.weight`` / ``.lora_B.weight`` and the PEFT ``LoraConfig`` (rank,
    alpha, their per-module exceptions as ``rank_pattern`` / ``alpha_pattern`` keyed by full module
    names, the modules as ``target_modules``) in the ``lora_adapter_metadata`` header. The module
    names are the model's own: a file of difflab's ``UNetSD`` (diffusers' names) loads into
    diffusers' ``UNet2DConditionModel``; :func:`load_lora_weights` reads any such file back.
    ``path``: a ``.safetensors`` file or a directory (gets ``pytorch_lora_weights.safetensors``)."""
    specs = {m: layer.lora[name] for m, layer in _check_name(model, name).items()}
    rank, alpha = _most_common(s.rank for s in specs.values()), _most_common(s.alpha for s in specs.values())
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(specs),
              "rank_pattern": {m: s.rank for m, s in specs.items() if s.rank != rank},
              "alpha_pattern": {m: s.alpha for m, s in specs.items() if s.alpha != alpha},
              "lora_dropout": next(iter(specs.values())).dropout, "bias": "none", "use_rslora": False,
              "use_dora": False, "init_lora_weights": True}
    return write_diffusers_lora(path, lora_state_dict(model, name), config, prefix)


def load_lora(path, model: nn.Module, name: str | None = None, *, weight: float = 1.0) -> list[str]:
    """Load a file written by :func:`save_lora` as adapter ``name`` (default: the saved name);
    returns the adapted modules' names."""
    tensors, meta = load_checkpoint(path if Path(path).suffix == ".safetensors" else Path(path) / LORA_FILE)
    if meta.get("kind") != LORA_KIND:
        raise ValueError(f"{path} is a difflab checkpoint but not a LoRA (kind={meta.get('kind')!r})")
    return _load(model, tensors, meta, "difflab", name or meta["name"], prefix="", alpha=None, weight=weight,
                 module_table=None)


# ----------------------------------------------------------------------------------------------
# Foreign formats


def _adapter_shapes(module: nn.Module, rank: int) -> tuple[tuple, tuple]:
    """The shapes of A and B for ``module``: (r, k), (d, r) for a linear layer; (r, C_in, kh, kw), (C_out, r, 1, 1) for a conv."""
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return (rank, module.in_features), (module.out_features, rank)


def _fit(t: torch.Tensor, shape: tuple, key: str) -> torch.Tensor:
    """A 1x1 convolution's tensor for a linear layer or back (TRANSFORMS["conv1x1"]); the shape must then agree."""
    to_linear, to_conv = TRANSFORMS["conv1x1"]
    t = to_linear(t) if len(shape) == 2 else to_conv(t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {tuple(t.shape)} does not fit its layer, which needs {tuple(shape)}")
    return t


def load_lora_weights(model: nn.Module, source, format: str = "auto", name: str = "default", *, prefix: str = "unet.",
                      alpha=None, weight: float = 1.0, config: dict | None = None, module_table=None,
                      fused=None) -> list[str]:
    """Load a LoRA file users have into ``model`` as adapter ``name`` (Hu et al. 2021, eq. 3); returns the adapted modules.

    ``source``: a state dict, a ``.safetensors`` file, or a directory (difflab's ``lora.safetensors``,
    PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``, diffusers'
    ``pytorch_lora_weights.safetensors``). ``format``: ``"auto"``, ``"peft"`` (PEFT / diffusers,
    including the old attention-processor keys), ``"kohya"`` or ``"difflab"``. ``prefix``: the
    component this model is in a pipeline-level file (``"unet."``, ``"text_encoder."``; kohya's
    ``lora_unet_``, ``lora_te_`` follow from it); keys of other components are skipped.
    ``module_table``: key-map rows ``(foreign, difflab)`` when module paths are spelled in another
    layout (e.g. :func:`difflab.io.keymaps.unet_sd.original_table` for kohya's SDXL names).
    ``fused``: with a kohya file and ``module_table``, the table's fused layers (e.g.
    :data:`difflab.io.keymaps.flux.FUSED` for kohya's ``lora_unet_double_blocks_*_img_attn_qkv``):
    a LoRA on one is split over its pieces (:func:`difflab.io.lora_files.kohya_to_peft`).

    alpha per module, first found: the ``alpha`` argument (a number, or ``{pattern: alpha}`` with
    PEFT's pattern rule), the file's ``.alpha`` key (kohya), ``config`` or the file's own config
    (difflab metadata, diffusers' ``lora_adapter_metadata``, PEFT's ``adapter_config.json``:
    ``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else r (scale 1, the PEFT/diffusers default).
    Keys that name no module of the model are a ValueError listing them.
    """
    if format not in ("auto", *keymap.FORMATS):
        raise ValueError(f"format={format!r} must be 'auto' or one of {sorted(keymap.FORMATS)}")
    tensors, file_config = read_lora_file(source)
    if format == "auto":
        format = "difflab" if file_config.get("kind") == LORA_KIND else keymap.detect_format(tensors)
    if fused is not None:
        if format != "kohya" or module_table is None:
            raise ValueError("fused= is for kohya files whose module paths a module_table spells (e.g. Flux's BFL names)")
        kohya_prefix = next((ps[0] for p, ps in keymap.KOHYA_PREFIXES if p == prefix), "lora_" + prefix.rstrip(".") + "_")
        tensors = kohya_to_peft(tensors, adaptable_modules(model), kohya_prefix=kohya_prefix, table=module_table, fused=fused)
        return _load(model, tensors, config or {}, "peft", name, prefix="", alpha=alpha, weight=weight, module_table=None)
    config = component_config(file_config, prefix) if config is None else dict(config)
    if config.get("use_dora") or config.get("lora_bias"):
        raise ValueError("the LoRA config asks for DoRA or lora_bias, which difflab's LoRA does not load")
    return _load(model, tensors, config, format, name, prefix=prefix, alpha=alpha, weight=weight, module_table=module_table)


def _load(model, tensors, config, fmt, name, *, prefix, alpha, weight, module_table) -> list[str]:
    # 1. Check the keys and pick this model's component
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be non-empty and contain no dot")
    keymap.check_supported(tensors)
    selected, _ = keymap.select_component(tensors, prefix, fmt)  # other components' keys are skipped

    # 2. Group the keys by module
    candidates = adaptable_modules(model)
    groups, unmatched = keymap.parse_keys(selected, fmt, candidates, module_table=module_table)
    if unmatched:
        listing = ", ".join(selected[k] for k in unmatched[:10])
        raise ValueError(f"{len(unmatched)} LoRA keys match no nn.Linear or nn.Conv2d of {type(model).__name__} "
                         f"({fmt} format, prefix {prefix!r}): {listing}{' ...' if len(unmatched) > 10 else ''}")
    incomplete = [m for m, roles in groups.items() if not {"A", "B"} <= set(roles)]
    if incomplete:
        raise ValueError(f"LoRA modules without both a down (A) and an up (B) tensor: {incomplete[:10]}")
    taken = [m for m in groups if name in getattr(candidates[m], "lora", {})]
    if taken:
        raise ValueError(f"adapter {name!r} already exists on {taken[:5]}: pass another name= or remove_lora first")

    # 3. Rank, alpha and shape-checked tensors per module (before any surgery)
    modules = [m for m in candidates if m in groups]  # model order
    plan = {}
    for m in modules:
        roles, module = groups[m], candidates[m]
        A, B = tensors[selected[roles["A"]]], tensors[selected[roles["B"]]]
        rank = A.shape[0]
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"module {m!r} is a grouped convolution (groups={module.groups}); LoRA on it is not supported")
        shape_A, shape_B = _adapter_shapes(module, rank)
        a = keymap.pattern_value(alpha, m) if isinstance(alpha, dict) else alpha
        if a is None and "alpha" in roles:
            a = float(tensors[selected[roles["alpha"]]])
        if a is None:
            a = config_alpha(config, fmt, m, rank)
        plan[m] = (rank, rank if a is None else float(a), _fit(A, shape_A, selected[roles["A"]]),
                   _fit(B, shape_B, selected[roles["B"]]))

    # 4. Inject and copy
    difflab_file = fmt == "difflab"
    for m, (rank, a, A, B) in plan.items():
        layer = _wrap(model, m)
        layer.add_adapter(name, rank, a, config.get("dropout", 0.0) if difflab_file else 0.0,
                          targets=tuple(config.get("targets", ())) if difflab_file else ())
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)
        layer.lora[name].weight = float(weight)
    return modules


__all__ = ["first_present", "AdapterSpec", "LoRALinear", "LoRAConv2d", "inject_lora", "set_adapter_weights", "merge_lora", "unmerge_lora",
           "remove_lora", "lora_state_dict", "lora_parameters", "mark_only_lora_trainable", "save_lora", "load_lora",
           "save_lora_weights", "load_lora_weights", "list_adapters", "lora_layers", "adaptable_modules", "find_modules",
           "matches"]  # matches lives in .surgery; named here for train.dreambooth
