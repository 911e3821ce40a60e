"""The sampling options every pipeline shares, defined and validated in one place.

:class:`SampleOptions` is a frozen dataclass; each pipeline takes ``options=`` (or its own
defaults) plus keyword overrides, and builds one object up front with :func:`resolve`, so a bad
value fails before any model runs. Keywords that are not options (``eta=``, ``s_churn=``,
``callback=``, ...) go to the sampler as ``sampler_kwargs``.

Usage::

    opts = SampleOptions(sampler="dpmpp_2m", steps=20, guidance_scale=2.0, seed=1)
    images = generate(denoiser, labels=[3, 7], shape=(1, 8, 8), options=opts)
    images = generate(denoiser, labels=[3, 7], shape=(1, 8, 8), sampler="dpmpp_2m", steps=20)  # the same
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from ..config import ConfigError, check_keys
from ..core import grids
from ..samplers import SAMPLERS

# What every sampler of difflab.samplers.SAMPLERS takes besides (denoiser, x, sigmas); the pipeline
# supplies ``noise`` and ``extra_args`` itself.
SHARED_SAMPLER_KEYWORDS = ("noise", "extra_args", "callback", "progress")
PIPELINE_SUPPLIED = ("noise", "extra_args")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SampleOptions:
    """How to sample: the sampler and its grid, guidance, seed, batching, device and precision.

    ``sampler``: a name of :data:`difflab.samplers.SAMPLERS`; ``steps``: sampler steps;
    ``grid``: a name of :data:`difflab.core.grids.GRIDS` or an explicit 1-D tensor of sigmas
    ending in 0 (then ``steps`` is ignored); ``spacing``: the timestep spacing of a discrete
    model's grid; ``steps_offset``: diffusers' scheduler offset (SD: 1 with ``"leading"``);
    ``guidance_scale``: classifier-free guidance (Ho & Salimans 2022, eq. 6; 1 = off);
    ``guidance_rescale``: Lin et al. 2024, Section 3.4; ``seed``: sample i draws from its own
    generator seeded by (seed, i), so it never depends on ``batch_size``; ``device``: where to
    sample (None: the denoiser's); ``dtype``: the samples' dtype (sampler arithmetic);
    ``sampler_kwargs``: extra keywords of the sampler (``eta``, ``s_churn``, ``callback``, ...).
    """

    sampler: str = "ddim"
    steps: int = 50
    grid: object = "default"
    spacing: str = "trailing"
    steps_offset: int = 0
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    seed: int = 0
    batch_size: int = 64
    device: object = None
    dtype: object = torch.float32
    progress: bool = True
    sampler_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an int >= 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed={self.seed!r} must be an int")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ConfigError(f"steps_offset={self.steps_offset!r} must be an int >= 0")
        for name in ("guidance_scale", "guidance_rescale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name}={v!r} must be a finite number")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(f"guidance_rescale={self.guidance_rescale} must be in [0, 1]")
        if isinstance(self.grid, str) and self.grid not in grids.GRIDS:
            raise ConfigError(f"grid={self.grid!r} is unknown; choose one of {list(grids.GRIDS)}")
        if self.spacing not in grids.SPACINGS:
            raise ConfigError(f"spacing={self.spacing!r} is unknown; choose one of {list(grids.SPACINGS)}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"device={self.device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise ConfigError(f"dtype={self.dtype!r} is unknown; choose one of {list(DTYPES)}")
            object.__setattr__(self, "dtype", DTYPES[self.dtype])
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ConfigError(f"dtype={self.dtype!r} must be a floating torch dtype")
        supplied = [k for k in self.sampler_kwargs if k in PIPELINE_SUPPLIED]
        if supplied:
            raise ConfigError(f"sampler_kwargs {supplied} are supplied by the pipeline (per-sample noise, conditioning)")
        check_sampler_keywords(self.sampler, self.sampler_kwargs)
        object.__setattr__(self, "sampler_kwargs", MappingProxyType(dict(self.sampler_kwargs)))

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict, section: str = "options") -> "SampleOptions":
        """Options from a dict (e.g. JSON); an unknown key is a ConfigError naming it."""
        check_keys(d, cls.fields(), section)
        return cls(**d)

    def replace(self, **changes) -> "SampleOptions":
        """A copy with ``changes``; an unknown key is a ConfigError naming it."""
        check_keys(changes, self.fields(), "SampleOptions")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The options as a plain dict (dtype by name, sampler_kwargs a dict)."""
        d = {name: getattr(self, name) for name in self.fields()}
        d["dtype"] = next((k for k, v in DTYPES.items() if v == self.dtype), str(self.dtype))
        d["sampler_kwargs"] = dict(self.sampler_kwargs)
        return d

    def resolved_device(self, module) -> torch.device:
        """``device``, or the device of ``module``'s first parameter when None (CPU without any)."""
        if self.device is not None:
            return torch.device(self.device)
        return next((p.device for p in module.parameters()), torch.device("cpu"))


def check_sampler_keywords(sampler: str, keywords) -> None:
    """A ConfigError naming the keywords (a pipeline's ``eta=``, ``s_churn=``, ...) that the sampler
    does not take, with the option fields and the keywords it does take, before any model runs.
    A sampler that forwards ``**kwargs`` is taken at its word."""
    params = inspect.signature(SAMPLERS[sampler]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    own = [k for k, p in list(params.items())[3:] if k not in PIPELINE_SUPPLIED and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = [k for k in keywords if k not in params]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*own, *SampleOptions.fields()], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{', '.join(map(repr, unknown))} is neither a SampleOptions field nor a keyword of sampler "
                          f"{sampler!r}{hint}. Fields: {', '.join(SampleOptions.fields())}; {sampler!r} takes: {', '.join(own)}")


# The defaults of the class-conditional pipeline (generate) and of the text pipelines (diffusers').
CLASS_DEFAULTS = SampleOptions()
TEXT_DEFAULTS = SampleOptions(guidance_scale=7.5, batch_size=8)


def resolve(options: SampleOptions | None, defaults: SampleOptions, overrides: dict) -> SampleOptions:
    """One options object for a pipeline call: ``options`` (or the pipeline's ``defaults``) with
    the keyword ``overrides`` applied; overrides that are not fields of :class:`SampleOptions`
    join ``sampler_kwargs`` (the sampler's own keywords, as before options existed)."""
    base = defaults if options is None else options
    if not isinstance(base, SampleOptions):
        raise TypeError(f"options must be a SampleOptions, got {type(base).__name__}")
    fields = SampleOptions.fields()
    changes = {k: v for k, v in overrides.items() if k in fields}
    extra = {k: v for k, v in overrides.items() if k not in fields}
    if extra:
        changes["sampler_kwargs"] = {**changes.get("sampler_kwargs", base.sampler_kwargs), **extra}
    return dataclasses.replace(base, **changes) if changes else base


__all__ = ["SampleOptions", "resolve", "check_sampler_keywords", "CLASS_DEFAULTS", "TEXT_DEFAULTS", "SHARED_SAMPLER_KEYWORDS", "DTYPES"]
