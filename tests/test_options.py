"""SampleOptions: frozen, validated up front, unknown keys named; the same options give the same
images through generate and sample_checkpoint; every registered sampler takes the shared keywords."""
import dataclasses
import inspect
import math

import pytest
import torch

from difflab.config import ConfigError
from difflab.core import Denoiser, VPDiscrete
from difflab.io.spec import build_denoiser, load_denoiser
from difflab.pipelines import SampleOptions, generate, sample_checkpoint
from difflab.pipelines.options import SHARED_SAMPLER_KEYWORDS, resolve
from difflab.samplers import SAMPLERS
from difflab.train import TrainConfig, train

SPEC = {"network": {"kind": "unet", "config": {"in_channels": 1, "model_channels": 16, "channel_mult": [1, 2],
                                               "num_res_blocks": 1, "attention_levels": [], "num_classes": 3,
                                               "groups": 8}},
        "diffusion": {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}}


def test_options_are_frozen_and_round_trip():
    opts = SampleOptions(sampler="euler", steps=7, sampler_kwargs={"s_churn": 0.5}, dtype="float64")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.steps = 3
    with pytest.raises(TypeError):
        opts.sampler_kwargs["s_churn"] = 1.0   # read-only too
    assert opts.dtype == torch.float64
    again = SampleOptions.from_dict(opts.to_dict())
    assert again.to_dict() == opts.to_dict() and again.replace(steps=8).steps == 8 and opts.steps == 7


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="nope"), r"sampler='nope' is unknown; choose one of \[.*'ddim'"),
    (dict(steps=0), "steps=0 must be an int >= 1"),
    (dict(steps=2.5), "steps=2.5 must be an int"),
    (dict(batch_size=0), "batch_size=0 must be an int >= 1"),
    (dict(guidance_scale=math.nan), "guidance_scale=nan must be a finite number"),
    (dict(guidance_scale=math.inf), "guidance_scale=inf must be a finite number"),
    (dict(guidance_rescale=2.0), r"guidance_rescale=2.0 must be in \[0, 1\]"),
    (dict(grid="nope"), "grid='nope' is unknown"),
    (dict(spacing="sideways"), "spacing='sideways' is unknown"),
    (dict(dtype="int8"), "dtype='int8' is unknown"),
    (dict(device="gpu7"), "device='gpu7' is not a torch device"),
    (dict(sampler_kwargs={"noise": None}), "supplied by the pipeline"),
])
def test_options_are_validated_when_made(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SampleOptions(**kwargs)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="unknown key 'stpes' in options; did you mean 'steps'"):
        SampleOptions.from_dict({"stpes": 3})
    with pytest.raises(ConfigError, match="unknown key 'sed' in SampleOptions; did you mean 'seed'"):
        SampleOptions().replace(sed=1)
    # a pipeline's keywords: option fields replace, anything else is the sampler's
    opts = resolve(None, SampleOptions(guidance_scale=7.5), {"steps": 4, "eta": 0.3})
    assert opts.steps == 4 and opts.guidance_scale == 7.5 and dict(opts.sampler_kwargs) == {"eta": 0.3}
    with pytest.raises(TypeError, match="options must be a SampleOptions"):
        resolve({"steps": 3}, SampleOptions(), {})


def test_every_sampler_takes_the_shared_keywords():
    """One signature for every sampler, so no pipeline dispatches on signatures at run time."""
    frame = VPDiscrete.from_name("linear", 100)
    d = Denoiser(lambda x_in, t: 0.5 * x_in, frame, "eps")
    sigmas = torch.tensor([frame.sigma_max, 1.0, 0.3, 0.0], dtype=torch.float64)
    for name, sampler in sorted(SAMPLERS.items()):
        params = inspect.signature(sampler).parameters
        forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        assert all(k in params for k in SHARED_SAMPLER_KEYWORDS) or forwards, name
        seen = []
        x = sampler(d, torch.randn(2, 1, 4, 4, dtype=torch.float64) * 10, sigmas, noise=None, extra_args={},
                    callback=seen.append, progress=False)
        assert x.shape == (2, 1, 4, 4) and torch.isfinite(x).all() and seen, name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    denoiser = build_denoiser(SPEC)
    images, labels = torch.rand(12, 1, 8, 8) * 2 - 1, torch.arange(12) % 3
    train(denoiser, (images, labels), TrainConfig(steps=2, batch_size=4, checkpoint_every=0, progress=False,
                                                  cfg_dropout=0.2), out, spec=SPEC, metadata={"size": 8})
    return out


def test_the_same_options_give_the_same_images_through_generate_and_sample_checkpoint(checkpoint):
    opts = SampleOptions(sampler="ddpm", steps=4, guidance_scale=2.0, seed=5, batch_size=2, progress=False)
    from_checkpoint = sample_checkpoint(checkpoint, labels=[0, 2, 1], options=opts)
    denoiser, meta = load_denoiser(checkpoint)
    direct = generate(denoiser, [0, 2, 1], shape=(1, 8, 8), null_class=meta.get("null_class"), options=opts)
    assert torch.equal(from_checkpoint, direct)
    # the keywords of old give the same images as the options object
    keywords = generate(denoiser, [0, 2, 1], shape=(1, 8, 8), sampler="ddpm", steps=4, guidance_scale=2.0, seed=5,
                        batch_size=2, progress=False)
    assert torch.equal(keywords, direct)
    balanced = sample_checkpoint(checkpoint, labels="balanced", num=4, options=opts)
    torch.testing.assert_close(balanced[:3], sample_checkpoint(checkpoint, labels=[0, 1, 2], options=opts), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="num=None must be a positive number"):
        sample_checkpoint(checkpoint, labels="balanced", options=opts)


def test_eta_samplers_are_the_samplers_that_take_eta():
    import inspect

    from difflab.samplers import ETA_SAMPLERS, SAMPLERS

    assert set(ETA_SAMPLERS) == {n for n, f in SAMPLERS.items() if "eta" in inspect.signature(f).parameters}
