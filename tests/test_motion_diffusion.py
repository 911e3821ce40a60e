"""Human-motion diffusion (issue 20, motion half): the stick-figure data, MDM, its geometric
losses, editing by inpainting, the action judge and its metrics, and a short demo run."""
from __future__ import annotations

import json

import pytest
import torch

from difflab.core import sample_seed
from difflab.data.stick_figures import (
    ACTIONS,
    FEET,
    FRAMES,
    JOINTS,
    UPPER_BODY,
    MotionNormalizer,
    bone_lengths,
    facing_angle,
    foot_contacts,
    make_motions,
    motion_split,
)
from difflab.demos.motion import run_motion_demo
from difflab.eval.motion_judge import (
    MotionJudge,
    MotionJudgeConfig,
    bone_length_drift,
    diversity,
    foot_skate_ratio,
    multimodality,
)
from difflab.io.spec import build_denoiser, load_denoiser, make_spec, sample_shape
from difflab.io.stick_gif import stick_frames
from difflab.nn.mdm import MDMConfig
from difflab.pipelines.motion import (
    edit_motions,
    joint_mask,
    keyframe_mask,
    sample_motions,
)
from difflab.train import TrainConfig, fit
from difflab.train.objectives.motion import MotionObjective, geometric_losses

SHAPE = (16, len(JOINTS), 3)
TINY = make_spec("mdm", MDMConfig(frames=16, d_model=32, depth=2, heads=2, ff_mult=2, dropout=0.0),
                 {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "x0"})


@pytest.fixture(scope="module")
def clips():
    return make_motions(3, seed=5, frames=16)


def test_data_is_deterministic_per_seed_and_per_clip(clips):
    again = make_motions(3, seed=5, frames=16)
    assert torch.equal(clips.motions, again.motions) and clips.captions == again.captions
    fewer = make_motions(1, seed=5, frames=16)                      # clip i depends on (seed, i) alone
    assert torch.equal(fewer.motions, clips.motions[:len(ACTIONS)])
    assert not torch.allclose(make_motions(1, seed=6, frames=16).motions, fewer.motions)
    train, held = motion_split(1, 1, seed=0, frames=16)
    assert not torch.allclose(train.motions, held.motions)
    assert clips.labels.tolist() == list(range(len(ACTIONS))) * 3
    assert all(ACTIONS[0] in c or "walks" in c for c in clips.captions[::len(ACTIONS)])


def test_data_is_a_rigid_grounded_skeleton_facing_forward(clips):
    m = clips.motions
    assert m.shape == (3 * len(ACTIONS), 16, len(JOINTS), 3)
    assert float(bone_lengths(m).std(1).max()) < 1e-5                  # bones keep their lengths
    assert float(m[..., 1].amin((1, 2)).abs().max()) < 1e-5             # the lowest foot touches y = 0
    assert float(facing_angle(m).abs().max()) < 1e-5                    # canonical: facing +z at frame 0
    travel = (m[:, -1, 0, [0, 2]] - m[:, 0, 0, [0, 2]]).norm(dim=-1)
    assert float(travel[1]) > float(travel[3]) + 0.5                     # running goes somewhere, waving does not


def test_mdm_is_a_network_kind_that_trains_saves_and_loads(tmp_path, clips):
    assert sample_shape(TINY) == SHAPE
    den = build_denoiser(TINY, seed=0)
    norm = MotionNormalizer.fit(clips.motions)
    data = {"x0": norm.normalize(clips.motions), "class_labels": clips.labels}
    obj = MotionObjective(den, norm.mean, norm.std, cfg_dropout=0.2)
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, ema_decay=0.9, log_every=3, checkpoint_every=0, progress=False)
    state = fit(obj, data, cfg, tmp_path / "run", spec=TINY)
    assert {"simple", "pos", "vel", "foot"} <= set(state.history[-1])
    loaded, _ = load_denoiser(tmp_path / "run", weights="model")
    x, sigma, labels = torch.randn(2, *SHAPE), torch.tensor([0.5, 3.0]), torch.tensor([1, len(ACTIONS)])
    den.eval()
    with torch.no_grad():
        assert torch.allclose(den(x, sigma, class_labels=labels), loaded(x, sigma, class_labels=labels), atol=1e-6)


def test_geometric_losses_on_closed_form_cases():
    wave = make_motions(1, seed=0, frames=16).motions[3:4].double()     # waving: both feet on the ground
    p = wave[:, :1].expand(2, 16, -1, -1).clone()                        # held still: velocities 0, feet in contact
    assert bool(foot_contacts(p).all())
    shifted = geometric_losses(p + 0.1, p)                               # L_pos = 0.1^2, nothing moves
    assert torch.allclose(shifted["pos"], torch.full((2,), 0.01, dtype=torch.float64), atol=1e-12)
    assert float(shifted["vel"].abs().max()) < 1e-20 and float(shifted["foot"].abs().max()) < 1e-20
    sliding = p.clone()
    sliding[:, :, FEET[0], 0] += 0.01 * torch.arange(16.0, dtype=torch.float64)   # the left foot slides 1 cm a frame
    terms = geometric_losses(sliding, p)
    # L_foot: 0.01^2 on one of the 2 feet x 3 axes in every frame step; L_vel the same over all 17 x 3 entries
    assert torch.allclose(terms["foot"], torch.full((2,), 1e-4 / 6, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(terms["vel"], torch.full((2,), 1e-4 / (17 * 3), dtype=torch.float64), atol=1e-15)


def test_inpainting_keeps_given_frames_and_joints_exactly():
    den = build_denoiser(TINY, seed=1).eval()
    known = torch.randn(3, *SHAPE)
    labels, seeds = torch.tensor([0, 3, 7]), [11, 12, 13]
    for mask, keep in ((keyframe_mask(SHAPE, [0, 8, 15]), (slice(None), [0, 8, 15])),
                       (joint_mask(SHAPE, list(UPPER_BODY)), (slice(None), slice(None), list(UPPER_BODY)))):
        out = edit_motions(den, known, mask, labels, seeds, guidance_scale=2.0, steps=4)
        assert torch.equal(out[keep], known[keep])
        assert not torch.allclose(out, known)                            # the rest was generated


def test_a_motion_is_the_same_whatever_the_batch_size():
    den = build_denoiser(TINY, seed=2).eval()
    seeds = [sample_seed(0, i) for i in range(3)]
    labels = torch.tensor([2, 5, 6])
    batch = sample_motions(den, labels, seeds, shape=SHAPE, guidance_scale=2.0, steps=4)
    alone = sample_motions(den, labels[1:2], seeds[1:2], shape=SHAPE, guidance_scale=2.0, steps=4)
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    again = sample_motions(den, labels, seeds, shape=SHAPE, guidance_scale=2.0, steps=4)
    assert torch.equal(batch, again)
    mask = keyframe_mask(SHAPE, [0, 15])
    known = torch.randn(3, *SHAPE)
    e3 = edit_motions(den, known, mask, labels, seeds, steps=3)
    e1 = edit_motions(den, known[2:], mask, labels[2:], seeds[2:], steps=3)
    assert torch.allclose(e3[2], e1[0], atol=1e-5)


def test_judge_reads_held_out_actions_and_metrics_behave():
    train, held = motion_split(8, 3, seed=1, frames=16)
    judge = MotionJudge.fit(train.motions, train.labels, MotionJudgeConfig(epochs=25, width=32, batch_size=16))
    assert judge.accuracy(held.motions, held.labels) >= 0.9
    f = judge.features(held.motions)
    assert f.shape == (len(held), judge.config.feature_dim)
    assert diversity(f) > 0 and multimodality(f, held.labels) > 0
    assert multimodality(f, held.labels) < diversity(f)                 # same action: closer together
    assert bone_length_drift(held.motions) < 1e-5
    stretched = held.motions.clone()
    stretched[:, :, 7] *= 1 + 0.2 * torch.rand(len(held), 16, 1)        # hands wander off their forearms
    assert bone_length_drift(stretched) > 0.01
    skating = held.motions.clone()
    skating[:, :, list(FEET), 0] += 0.05 * torch.arange(16.0)[None, :, None]
    assert foot_skate_ratio(skating) > foot_skate_ratio(held.motions)


def test_stick_frames_draw_every_frame(clips):
    frames = stick_frames(clips.motions[:3], titles=["a", "b", "c"], columns=2, size=64)
    assert len(frames) == 16 and frames[0].size == (128, 2 * (64 + 12))
    assert min(lo for lo, _ in frames[0].getextrema()) < 100                # something dark is drawn on white
    assert frames[0] != frames[8]


def test_short_demo_run_writes_report_and_gifs(tmp_path):
    r = run_motion_demo(tmp_path / "demo", steps=3, sampling_steps=2, samples_per_class=2, n_train=3, n_heldout=4,
                        progress=False, spec=make_spec("mdm", MDMConfig(frames=FRAMES, d_model=32, depth=1, heads=2),
                                                       {"frame": "vp_discrete", "schedule": "cosine", "T": 100,
                                                        "prediction": "x0"}))
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["generated"]["fid"] == pytest.approx(r["generated"]["fid"])
    assert r["editing"]["inbetween"]["key_pose_error"] == 0 and r["editing"]["legs"]["given_joint_error"] == 0
    for name in ("samples.gif", "inbetween.gif", "legs.gif"):
        assert (tmp_path / "demo" / name).stat().st_size > 1000
    assert (tmp_path / "demo" / "mdm" / "checkpoint.safetensors").exists()
