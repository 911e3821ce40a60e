"""One table of network kinds (difflab.io.spec.NETWORKS): a toy kind registered with one entry is
built from a spec, trained, saved, loaded and sampled by `difflab sample`; a kind whose samples are
not images is refused early; both spec forms are read and every unknown key is named."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from difflab.cli import main
from difflab.config import ConfigError, JSONConfig
from difflab.core import EDM, FRAMES, VE, Flow, VPContinuous, VPDiscrete
from difflab.io.checkpoint import load_checkpoint, save_checkpoint
from difflab.io.spec import (DEFAULT_DIFFUSION, NETWORKS, NetworkKind, build_denoiser, build_frame, build_network,
                             load_denoiser, make_spec, read_spec, sample_shape)
from difflab.nn.unet import UNet, UNetConfig
from difflab.nn.unet_sd import UNetSD
from difflab.train import TrainConfig, train


@dataclass(frozen=True)
class ToyConfig(JSONConfig):
    in_channels: int = 3
    size: int = 4
    hidden: int = 8


class ToyNet(nn.Module):
    """A per-pixel MLP of (x, t): the smallest network a denoiser can wrap."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        c = config.in_channels
        self.body = nn.Sequential(nn.Conv2d(c + 1, config.hidden, 1), nn.SiLU(), nn.Conv2d(config.hidden, c, 1))

    def forward(self, x, t, **cond):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.body(torch.cat([x, t / 1000], dim=1))


def toy_shape(config, meta):
    return (config.in_channels, config.size, config.size)


TOY_SPEC = {"network": {"kind": "toy", "config": {"in_channels": 3, "size": 4, "hidden": 8}},
            "diffusion": {"frame": "vp_discrete", "schedule": "linear", "T": 100, "prediction": "eps"}}


@pytest.fixture
def toy_kinds(monkeypatch):
    """The toy kind (images) and a kind of the same network whose samples are points: one entry each."""
    monkeypatch.setitem(NETWORKS, "toy", NetworkKind(ToyNet, ToyConfig, "image", toy_shape))
    monkeypatch.setitem(NETWORKS, "toy_points", NetworkKind(ToyNet, ToyConfig, "points", toy_shape))


@pytest.fixture
def toy_run(toy_kinds, tmp_path):
    denoiser = build_denoiser(TOY_SPEC)
    images = torch.rand(16, 3, 4, 4) * 2 - 1
    config = TrainConfig(steps=2, batch_size=4, checkpoint_every=0, log_every=1, progress=False)
    train(denoiser, images, config, tmp_path / "run", spec=TOY_SPEC)
    return tmp_path / "run"


def test_a_toy_kind_builds_trains_loads_and_samples_through_the_cli(toy_run, tmp_path, capsys):
    meta = load_checkpoint(toy_run)[1]
    assert meta["spec"]["network"]["kind"] == "toy"   # the checkpoint names the kind
    denoiser, meta = load_denoiser(toy_run)
    assert isinstance(denoiser.net, ToyNet) and denoiser.net.config == ToyConfig()
    assert sample_shape(meta["spec"], meta) == (3, 4, 4)
    png = tmp_path / "toy.png"
    assert main(["sample", "--checkpoint", str(toy_run), "--num", "3", "--steps", "2", "--out", str(png),
                 "--device", "cpu"]) == 0
    assert png.is_file() and "wrote 3 samples" in capsys.readouterr().out


def test_a_kind_whose_samples_are_not_images_is_refused_early(toy_run, tmp_path, capsys):
    tensors, meta = load_checkpoint(toy_run)
    meta["spec"]["network"]["kind"] = "toy_points"
    save_checkpoint(tmp_path / "points.safetensors", tensors, meta)
    png = tmp_path / "points.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "points.safetensors"), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not png.exists()
    assert "'toy_points'" in err and "points" in err and "toy, unet" in err


def test_both_spec_forms_build_the_same_unet():
    config = {"in_channels": 1, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1}
    old = {"unet": config, "diffusion": DEFAULT_DIFFUSION}
    new = make_spec("unet", UNetConfig.from_dict(config), DEFAULT_DIFFUSION)
    assert new["network"]["kind"] == "unet" and read_spec(old)[0] == read_spec(new)[0] == "unet"
    a, b = build_denoiser(old), build_denoiser(new)
    assert isinstance(a.net, UNet) and a.net.config == b.net.config
    assert sample_shape(old, {"metadata": {"size": 16}}) == (1, 16, 16)
    sd = build_network("unet_sd", {"block_out_channels": [8, 16], "down_attention": [False, True],
                                   "up_attention": [True, False], "num_heads": [2, 2], "cross_attention_dim": 8,
                                   "norm_num_groups": 4, "sample_size": 8})
    assert isinstance(sd, UNetSD)


@pytest.mark.parametrize("spec,match", [
    ({"unet": {}, "difusion": {}}, "unknown key 'difusion' in spec; did you mean 'diffusion'"),
    ({"network": {"kind": "unet", "confg": {}}}, "unknown key 'confg' in spec.network"),
    ({"network": {"kind": "unet", "config": {"widht": 3}}}, "unknown key 'widht' in spec.network.config"),
    ({"network": {"kind": "transformer9"}}, "network kind 'transformer9' is unknown; choose one of .*unet, unet_sd, vae"),
    ({"network": {"config": {}}}, "needs a 'kind'"),
    ({"unet": {}, "network": {"kind": "unet"}}, "exactly one of 'network'"),
    ({"unet": {}, "diffusion": {"frame": "ve", "schedule": "cosine"}}, r"unknown key 'schedule' in spec.diffusion \(frame 've'\)"),
    ({"unet": {}, "diffusion": {"frame": "vq"}}, "frame='vq' is unknown; choose one of vp_discrete, vp, ve, edm, flow"),
    ({"network": {"kind": "vae"}}, "'vae' is a codec, not a denoiser"),
])
def test_spec_errors_name_the_key_and_section(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_denoiser(spec)


def test_build_frame_covers_every_frame_of_the_table():
    built = {name: build_frame({"frame": name}) for name in FRAMES}
    assert set(built) == set(FRAMES)
    for name, cls in FRAMES.items():
        assert type(built[name]) is cls, name
    expected = {"vp_discrete": VPDiscrete, "vp": VPContinuous, "ve": VE, "edm": EDM, "flow": Flow}
    assert {k: type(v) for k, v in built.items()} == expected
    vp = build_frame({"frame": "vp_discrete", "schedule": "linear", "T": 50, "prediction": "v"})
    torch.testing.assert_close(vp.alpha_bars, VPDiscrete.from_name("linear", 50).alpha_bars)
    assert build_frame({"frame": "edm", "sigma_data": 0.25}).sigma_data == 0.25


def test_learned_variance_doubles_any_kinds_output_channels_that_has_them(toy_kinds):
    d = build_denoiser({"unet": {"in_channels": 3, "model_channels": 16, "channel_mult": [1], "num_res_blocks": 1,
                                 "attention_levels": []},
                        "diffusion": {**DEFAULT_DIFFUSION, "learned_variance": True}})
    assert d.learned_variance and d.net.config.out_channels == 6
    with pytest.raises(ConfigError, match="learned_variance needs a network with in_channels and out_channels"):
        build_denoiser({**TOY_SPEC, "diffusion": {**TOY_SPEC["diffusion"], "learned_variance": True}})
