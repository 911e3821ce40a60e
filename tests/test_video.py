"""Video diffusion on moving digits: the data, the space-time U-Net, the pipeline and its tasks,
the judge, the writers and the demo (a tiny run; the real run's figures are in docs/video.md)."""
import json
import math

import pytest
import torch
from PIL import Image

from difflab.data import load_digits
from difflab.data.moving_digits import DIRECTIONS, moving_digits, still_frames
from difflab.eval import DigitsJudge
from difflab.eval.judge import FitConfig
from difflab.eval.video import crop_digits, estimated_directions, moves_as_asked, video_judge_report
from difflab.guidance.reconstruction import ReconstructionGuidance
from difflab.io.spec import build_denoiser, load_denoiser, make_spec, sample_shape
from difflab.io.video import save_frame_grid, save_gif, save_mp4
from difflab.nn.video_unet import PRESETS, VideoUNet
from difflab.pipelines.video import extend_video, generate_video, image_to_video, interpolate_video
from difflab.train import TrainConfig, train
from difflab.train.objectives.diffusion import draw_diffusion

TINY = PRESETS["tiny"]  # 8x8 frames, up to 8 of them
DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}


def random_net(seed=0, config=TINY):
    """A tiny VideoUNet with every weight random (zero-initialized layers included), so each path matters."""
    torch.manual_seed(seed)
    net = VideoUNet(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def random_denoiser(seed=0):
    den = build_denoiser(make_spec("video_unet", TINY, DIFFUSION), seed=seed)
    with torch.no_grad():
        for p in den.net.parameters():
            p.normal_(0, 0.05)
    return den.eval()


# ---- data ---------------------------------------------------------------------------------------

def test_moving_digits_are_deterministic_bounce_and_split_by_source():
    a, b = moving_digits(12, seed=3), moving_digits(12, seed=3)
    assert torch.equal(a.clips, b.clips) and torch.equal(a.directions, b.directions)
    assert not torch.equal(a.clips, moving_digits(12, seed=4).clips)
    assert a.clips.shape == (12, 1, 8, 24, 24) and a.clips.min() >= -1 and a.clips.max() <= 1
    assert a.positions.min() >= 0 and a.positions.max() <= 16
    steps = (a.positions[:, 1:] - a.positions[:, :-1]).abs().sum(-1)
    assert bool((steps <= a.speeds[:, None]).all())  # a bounce step is shorter, never longer
    # every frame holds the source digit of its split at its position
    test_digits, test_labels = load_digits(8, split="test")
    c = moving_digits(5, split="test", seed=0)
    for i in range(5):
        r, q = c.positions[i, 4].tolist()
        assert torch.equal(c.clips[i, 0, 4, r:r + 8, q:q + 8], test_digits[c.sources[i], 0])
        assert int(c.labels[i]) == int(test_labels[c.sources[i]])
    assert c.captions[0] == f"a {int(c.labels[0])} moving {DIRECTIONS[int(c.directions[0])]}"
    stills, labels = still_frames(3, seed=0)
    assert stills.shape == (3, 1, 8, 24, 24) and labels.shape == (3,)
    with pytest.raises(ValueError, match="split"):
        moving_digits(2, split="val")


# ---- the network --------------------------------------------------------------------------------

def test_video_unet_shapes_and_bad_shapes():
    net = random_net()
    x, t = torch.randn(2, 1, 5, 8, 8), torch.tensor([10.0, 500.0])
    assert net(x, t, class_labels=torch.tensor([1, 10]), direction_labels=torch.tensor([0, 4])).shape == x.shape
    with pytest.raises(ValueError, match="video .*add a frames axis"):
        net(torch.randn(2, 1, 8, 8), t)
    with pytest.raises(ValueError, match="9 frames, more than this network's max_frames=8"):
        net(torch.randn(2, 1, 9, 8, 8), t)
    with pytest.raises(ValueError, match="direction_labels"):
        net(x, t, direction_labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="independent_frames"):
        net(x, t, independent_frames=torch.tensor([1, 0]))


def test_masked_temporal_attention_makes_frames_independent_and_equals_f1():
    net = random_net()
    x, t = torch.randn(2, 1, 6, 8, 8), torch.tensor([30.0, 700.0])
    labels = dict(class_labels=torch.tensor([3, 7]), direction_labels=torch.tensor([1, 2]))
    y = net(x, t, independent_frames=True, **labels)
    x2 = x.clone()
    x2[:, :, 4] += 1.0
    y2 = net(x2, t, independent_frames=True, **labels)
    others = [0, 1, 2, 3, 5]
    assert torch.equal(y[:, :, others], y2[:, :, others])  # image mode: frame 4 reaches no other frame
    assert not torch.allclose(y[:, :, others], net(x2, t, **labels)[:, :, others])  # video mode: it does
    # at F = 1 temporal attention is the same mask: each frame alone is the image model
    for f in (0, 4):
        torch.testing.assert_close(net(x[:, :, f:f + 1], t, **labels)[:, :, 0], y[:, :, f], rtol=1e-5, atol=1e-5)
    # the flag per sample: sample 1 in image mode, sample 0 not
    mixed = net(x2, t, independent_frames=torch.tensor([False, True]), **labels)
    assert torch.equal(mixed[1, :, others], y2[1, :, others])


def test_training_step_and_checkpoint_round_trip(tmp_path):
    spec = make_spec("video_unet", TINY, DIFFUSION)
    den = build_denoiser(spec, seed=0)
    clips = moving_digits(8, size=24, seed=0).clips[:, :, :4, 8:16, 8:16].contiguous()
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, cfg_dropout=0.5, log_every=0, seed=0, progress=False)
    cond = {"direction_labels": torch.arange(8) % 4, "independent_frames": torch.arange(8) < 2}
    train(den, (clips, torch.arange(8), cond), cfg, tmp_path / "run", spec=spec,
          null_cond={"direction_labels": 4, "independent_frames": None}, metadata={"size": 8, "frames": 4})
    loaded, meta = load_denoiser(tmp_path / "run")
    assert sample_shape(meta["spec"], meta) == (1, 4, 8, 8)
    x = torch.randn(2, 1, 4, 8, 8)
    out = loaded(x, torch.tensor([1.0, 5.0]), class_labels=torch.tensor([0, 1]), direction_labels=torch.tensor([2, 3]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_end_frame_weights_uniform_reproduce_the_loss_and_heavier_ends_weigh_the_ends():
    from difflab.demos.video import end_frame_weights
    from difflab.train.objectives.diffusion import DiffusionObjective
    w = end_frame_weights(4, 3.0)
    assert torch.allclose(w, torch.tensor([1.5, 0.5, 0.5, 1.5])) and math.isclose(w.mean().item(), 1.0, rel_tol=1e-6)
    assert torch.equal(end_frame_weights(4, 1.0), torch.ones(4))
    with pytest.raises(ValueError, match="must be > 0"):
        end_frame_weights(4, 0.0)
    den = build_denoiser(make_spec("video_unet", TINY, DIFFUSION), seed=0)
    torch.manual_seed(0)
    batch = {"x0": torch.randn(2, 1, 4, 8, 8), "sigma": torch.tensor([0.5, 3.0]), "noise": torch.randn(2, 1, 4, 8, 8),
             "class_labels": torch.tensor([0, 1]), "direction_labels": torch.tensor([2, 3])}

    def loss_and_grad(frame_weights):
        den.net.zero_grad()
        loss = DiffusionObjective(den, frame_weights=frame_weights).loss(batch)
        loss.mean().backward()
        return loss.detach(), [p.grad.clone() for p in den.net.parameters() if p.grad is not None]

    plain, g_plain = loss_and_grad(None)
    uniform, g_uniform = loss_and_grad(torch.ones(4))
    assert torch.equal(plain, uniform) and all(torch.equal(a, b) for a, b in zip(g_plain, g_uniform))
    # the weighted loss is the weighted mean of the per-frame errors: only frame 0 weighted, only frame 0's error
    per_frame = torch.stack([loss_and_grad(torch.eye(4)[f])[0] * 4 for f in range(4)], 1)  # (B, F): frame f's mean error
    assert torch.allclose(per_frame.mean(1), plain, rtol=1e-5)
    weighted, g_weighted = loss_and_grad(w)
    assert torch.allclose(weighted, (per_frame * w).mean(1), rtol=1e-5)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(g_plain, g_weighted))  # the weights change the gradient
    with pytest.raises(ValueError, match="frame_weights"):
        DiffusionObjective(den, frame_weights=torch.ones(4), loss="hybrid")


def test_a_flag_with_null_cond_none_is_never_dropped():
    batch = {"x0": torch.zeros(64, 1, 2, 2), "class_labels": torch.zeros(64, dtype=torch.long),
             "direction_labels": torch.zeros(64, dtype=torch.long), "independent_frames": torch.ones(64, dtype=torch.bool)}
    out = draw_diffusion(batch, torch.Generator().manual_seed(0), build_denoiser(make_spec("video_unet", TINY, DIFFUSION)).frame,
                         cfg_dropout=0.5, null_class=10, null_cond={"direction_labels": 4, "independent_frames": None})
    dropped = out["class_labels"] == 10
    assert 0 < int(dropped.sum()) < 64 and torch.equal(out["direction_labels"] == 4, dropped)
    assert bool(out["independent_frames"].all())


# ---- the pipeline and its tasks -----------------------------------------------------------------

def test_a_clip_is_the_same_whatever_the_batch_size():
    den = random_denoiser()
    kw = dict(shape=(1, 4, 8, 8), steps=3, guidance_scale=2.0, seed=5, progress=False)
    labels, dirs = [1, 2, 3], [0, 1, 3]
    one = generate_video(den, labels, dirs, batch_size=1, **kw)
    three = generate_video(den, labels, dirs, batch_size=3, **kw)
    assert one.shape == (3, 1, 4, 8, 8)
    torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="frames=9"):
        generate_video(den, [1], [0], shape=(1, 9, 8, 8), steps=2, progress=False)
    with pytest.raises(ValueError, match="directions must be in"):
        generate_video(den, [1], [4], shape=(1, 4, 8, 8), steps=2, progress=False)


def test_direction_guidance_is_cfg_plus_a_term_on_the_direction_alone():
    from difflab.guidance import ClassifierFreeGuidance
    from difflab.pipelines.video import DirectionGuidance, opposite_directions
    den = random_denoiser()
    null_c, null_d = den.net.config.null_class, den.net.config.null_direction
    x, sigma = torch.randn(3, 1, 4, 8, 8), torch.tensor([0.5, 2.0, 9.0])
    c, d = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    opp = opposite_directions(d)
    assert opp.tolist() == [1, 0, 2] and opposite_directions(torch.arange(4)).tolist() == [1, 0, 3, 2]
    uncond = {"class_labels": null_c, "direction_labels": null_d}
    with torch.no_grad():
        got = DirectionGuidance(den, 2.0, 1.5, uncond, opp)(x, sigma, class_labels=c, direction_labels=d)
        d_cd = den(x, sigma, class_labels=c, direction_labels=d)
        d_u = den(x, sigma, class_labels=torch.full_like(c, null_c), direction_labels=torch.full_like(d, null_d))
        d_cn = den(x, sigma, class_labels=c, direction_labels=opp)
        cfg = ClassifierFreeGuidance(den, 2.0, uncond)(x, sigma, class_labels=c, direction_labels=d)
        scale0 = DirectionGuidance(den, 2.0, 0.0, uncond, opp)(x, sigma, class_labels=c, direction_labels=d)
    torch.testing.assert_close(got, d_u + 2.0 * (d_cd - d_u) + 1.5 * (d_cd - d_cn), rtol=1e-5, atol=1e-5)
    assert (got - cfg).abs().max() > 1e-3  # the term acts
    torch.testing.assert_close(scale0, cfg, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a guidance interval: the term only where sigma >= min_sigma (rows 1 and 2), none above all
        interval = DirectionGuidance(den, 2.0, 1.5, uncond, opp, min_sigma=1.0)(x, sigma, class_labels=c, direction_labels=d)
        above = DirectionGuidance(den, 2.0, 1.5, uncond, opp, min_sigma=10.0)(x, sigma, class_labels=c, direction_labels=d)
    torch.testing.assert_close(interval[1:], got[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(interval[:1], cfg[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(above, cfg, rtol=1e-5, atol=1e-6)
    kw = dict(shape=(1, 4, 8, 8), steps=3, guidance_scale=2.0, seed=5, progress=False, sampler="euler_ancestral")
    plain = generate_video(den, c, d, **kw)
    assert torch.equal(generate_video(den, c, d, direction_guidance=0.0, negative_directions=opp, **kw), plain)
    away = generate_video(den, c, d, direction_guidance=1.0, negative_directions=opp, **kw)
    assert (away - plain).abs().max() > 1e-4
    first = moving_digits(3, seed=0).clips[:, :, 0, 8:16, 8:16].contiguous()
    i2v = image_to_video(den, first, c, d, frames=4, reconstruction_weight=1.0, direction_guidance=1.0,
                         negative_directions=opp, steps=2, progress=False)
    assert torch.allclose(i2v[:, :, 0], first)  # the given frame held under the three-branch guidance too
    with pytest.raises(ValueError, match="needs directions"):
        generate_video(den, c, None, direction_guidance=1.0, **kw)
    with pytest.raises(ValueError, match=r"negative_directions \(2\) must have one entry per clip \(3\)"):
        generate_video(den, c, d, direction_guidance=1.0, negative_directions=[0, 1], **kw)
    with pytest.raises(ValueError, match=r"negative_directions must be in \[0, 4\]"):
        generate_video(den, c, d, direction_guidance=1.0, negative_directions=[0, 1, 5], **kw)
    with pytest.raises(ValueError, match="direction_guidance=nan must be a finite number"):
        generate_video(den, c, d, direction_guidance=float("nan"), **kw)
    with pytest.raises(ValueError, match="direction_guidance_min_sigma=-1 must be a finite number >= 0"):
        generate_video(den, c, d, direction_guidance=1.0, direction_guidance_min_sigma=-1, **kw)
    with pytest.raises(ValueError, match="guidance_rescale=0.5 is not applied with direction_guidance"):
        generate_video(den, c, d, direction_guidance=1.0, guidance_rescale=0.5, **kw)


def test_class_guidance_adds_a_term_on_the_class_alone_on_its_interval():
    from difflab.pipelines.video import DirectionGuidance, opposite_directions
    den = random_denoiser()
    null_c, null_d = den.net.config.null_class, den.net.config.null_direction
    x, sigma = torch.randn(3, 1, 4, 8, 8), torch.tensor([0.5, 2.0, 9.0])
    c, d = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    opp, uncond = opposite_directions(d), {"class_labels": null_c, "direction_labels": null_d}
    with torch.no_grad():
        d_cd = den(x, sigma, class_labels=c, direction_labels=d)
        d_u = den(x, sigma, class_labels=torch.full_like(c, null_c), direction_labels=torch.full_like(d, null_d))
        d_cn = den(x, sigma, class_labels=c, direction_labels=opp)
        d_ud = den(x, sigma, class_labels=torch.full_like(c, null_c), direction_labels=d)
        both = DirectionGuidance(den, 2.0, 1.5, uncond, opp, class_scale=0.7)(x, sigma, class_labels=c, direction_labels=d)
        only = DirectionGuidance(den, 2.0, 0.0, uncond, None, class_scale=0.7)(x, sigma, class_labels=c, direction_labels=d)
        # intervals: the direction's at sigma >= 1 (rows 1, 2), the class's below 1 (row 0): three branches a row
        split = DirectionGuidance(den, 2.0, 1.5, uncond, opp, min_sigma=1.0, class_scale=0.7, class_max_sigma=1.0)(
            x, sigma, class_labels=c, direction_labels=d)
    cfg = d_u + 2.0 * (d_cd - d_u)
    torch.testing.assert_close(both, cfg + 1.5 * (d_cd - d_cn) + 0.7 * (d_cd - d_ud), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(only, cfg + 0.7 * (d_cd - d_ud), rtol=1e-5, atol=1e-5)
    assert (d_cd - d_ud).abs().max() > 1e-4  # the term acts
    torch.testing.assert_close(split[:1], (cfg + 0.7 * (d_cd - d_ud))[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[1:], (cfg + 1.5 * (d_cd - d_cn))[1:], rtol=1e-5, atol=1e-5)
    kw = dict(shape=(1, 4, 8, 8), steps=3, guidance_scale=2.0, seed=5, progress=False, sampler="euler_ancestral")
    plain = generate_video(den, c, d, direction_guidance=1.0, negative_directions=opp, **kw)
    assert torch.equal(generate_video(den, c, d, direction_guidance=1.0, negative_directions=opp, class_guidance=0.0, **kw),
                       plain)
    assert (generate_video(den, c, d, direction_guidance=1.0, negative_directions=opp, class_guidance=1.0, **kw)
            - plain).abs().max() > 1e-4
    assert (generate_video(den, c, d, class_guidance=1.0, **kw) - generate_video(den, c, d, **kw)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="class_guidance=1.0 needs labels"):
        generate_video(den, None, d, class_guidance=1.0, **kw)
    with pytest.raises(ValueError, match="class_guidance=nan must be a finite number"):
        generate_video(den, c, d, class_guidance=float("nan"), **kw)
    with pytest.raises(ValueError, match="class_guidance_max_sigma=0 must be a number > 0"):
        generate_video(den, c, d, class_guidance=1.0, class_guidance_max_sigma=0, **kw)
    with pytest.raises(ValueError, match="guidance_rescale=0.5 is not applied"):
        generate_video(den, c, d, class_guidance=1.0, guidance_rescale=0.5, **kw)


def test_the_demo_samples_with_its_eta_and_refuses_one_its_sampler_lacks():
    from difflab.demos.video import SAMPLER, SAMPLER_ETA, check_sampling
    assert SAMPLER == "euler_ancestral" and SAMPLER_ETA > 1  # stop 40: more fresh noise a step than DDPM's
    assert check_sampling(SAMPLER, None) == SAMPLER_ETA and check_sampling("heun", None) is None
    assert check_sampling("ddim", 0.3) == 0.3 and check_sampling(SAMPLER, 1.0, class_guidance=0.5) == 1.0
    with pytest.raises(ValueError, match="sampler 'heun' has no eta"):
        check_sampling("heun", 1.0)
    with pytest.raises(ValueError, match="eta=-1.0 must be a finite number >= 0"):
        check_sampling(SAMPLER, -1.0)
    with pytest.raises(ValueError, match="class_guidance=inf must be a finite number >= 0"):
        check_sampling(SAMPLER, None, float("inf"))
    den = random_denoiser()  # eta reaches the sampler: 2 draws more fresh noise than 1, the same seed
    kw = dict(shape=(1, 4, 8, 8), steps=3, guidance_scale=2.0, seed=5, progress=False, sampler="euler_ancestral")
    one = generate_video(den, [1, 2], [0, 1], **kw)
    assert torch.equal(generate_video(den, [1, 2], [0, 1], sampler_kwargs={"eta": 1.0}, **kw), one)
    assert (generate_video(den, [1, 2], [0, 1], sampler_kwargs={"eta": 2.0}, **kw) - one).abs().max() > 1e-3


def test_tasks_keep_the_given_frames():
    den = random_denoiser()
    clips = moving_digits(2, seed=0).clips[:, :, :4, 8:16, 8:16].contiguous()
    kw = dict(steps=3, progress=False)
    i2v = image_to_video(den, clips[:, :, 0], [1, 2], [0, 1], frames=4, reconstruction_weight=1.0, **kw)
    assert i2v.shape == (2, 1, 4, 8, 8) and torch.allclose(i2v[:, :, 0], clips[:, :, 0])
    inter = interpolate_video(den, clips[:, :, :3], [1, 2], factor=2, **kw)
    assert inter.shape == (2, 1, 5, 8, 8) and torch.allclose(inter[:, :, ::2], clips[:, :, :3])
    longer = extend_video(den, clips, [1, 2], context=2, new_frames=5, window=4, reconstruction_weight=0.5, **kw)
    assert longer.shape == (2, 1, 9, 8, 8) and torch.equal(longer[:, :, :4], clips)


def test_reconstruction_guidance_pulls_towards_the_known_part():
    den = random_denoiser()
    x, sigma = torch.randn(1, 1, 4, 8, 8), torch.tensor([2.0])
    known = torch.zeros_like(x)
    mask = torch.tensor([0.0, 1, 1, 1]).reshape(1, 1, 4, 1, 1)  # frame 0 known
    plain = den(x, sigma)
    assert torch.equal(ReconstructionGuidance(den, known, mask, 0.0)(x, sigma), plain)
    guided = ReconstructionGuidance(den, known, mask, 0.5)(x, sigma)

    def err(x0):
        return float((x0[:, :, 0] - known[:, :, 0]).detach().square().sum())
    # one guided step: the known frame's error falls for a small weight (a gradient step on it)
    assert err(guided) < err(plain)


# ---- the judge ----------------------------------------------------------------------------------

def test_the_motion_judge_reads_real_clips():
    c = moving_digits(40, split="test", seed=0)
    assert bool(moves_as_asked(c.clips, c.directions).all())
    assert torch.equal(estimated_directions(c.clips), c.directions)
    backwards = c.clips.flip(2)  # played backwards, a clip that did not bounce moves the other way
    moves = c.positions[:, 1:] - c.positions[:, :-1]
    no_bounce = (moves * moves[:, :1] >= 0).all(2).all(1)
    assert not bool(moves_as_asked(backwards, c.directions)[no_bounce].any())
    still = c.clips[:, :, :1].expand(-1, -1, 8, -1, -1)
    assert not bool(moves_as_asked(still, c.directions).any())
    # the crop around the centre of mass holds most of the digit
    frames = c.clips[:, :, 0]
    assert bool(((crop_digits(frames) + 1).sum((1, 2, 3)) >= 0.8 * (frames + 1).sum((1, 2, 3))).all())


def test_video_judge_report_floor_and_scores():
    judge = DigitsJudge.fit(fit_config=FitConfig(epochs=2))
    real, ref = moving_digits(40, split="test", seed=0), moving_digits(40, split="train", seed=1)
    r = video_judge_report(judge, real.clips[:20], real.labels[:20], real.directions[:20], real.clips, real.labels,
                           real.directions, reference=ref.clips)
    assert r["motion_accuracy"] == 1.0 and r["same_class"] >= r["all_frames_correct"]
    noise = torch.rand(20, 1, 8, 24, 24) * 2 - 1
    r2 = video_judge_report(judge, noise, real.labels[:20], real.directions[:20], real.clips, real.labels, real.directions)
    assert r2["frechet"] > r["frechet"] and r2["motion_accuracy"] < 0.5


# ---- writers and the demo -----------------------------------------------------------------------

def test_writers(tmp_path):
    clips = moving_digits(4, seed=0).clips
    gif = Image.open(save_gif(clips, tmp_path / "a.gif", nrow=2, upscale=2))
    assert gif.n_frames == 8 and gif.size == (2 * (2 * 25 + 1), 2 * (2 * 25 + 1))
    png = Image.open(save_frame_grid(clips, tmp_path / "a.png"))
    assert png.size == (8 * 25 + 1, 4 * 25 + 1)
    import imageio_ffmpeg
    mp4 = save_mp4(clips, tmp_path / "a.mp4", nrow=2, fps=4)
    assert mp4.read_bytes()[4:8] == b"ftyp" and imageio_ffmpeg.count_frames_and_secs(str(mp4))[0] == 8
    with pytest.raises(ValueError, match="clips must be"):
        save_gif(clips[:, :, 0], tmp_path / "b.gif")


def test_centroid_velocity_loss_closed_form_and_the_judges_centres():
    from difflab.eval.video import centres
    from difflab.train.objectives.centroid_motion import centroid_velocity_loss, ink_centres
    still = -torch.ones(1, 1, 4, 8, 8)
    still[..., 2, 3] = 1.0                                   # one lit pixel at (2, 3) in every frame
    moving = -torch.ones(1, 1, 4, 8, 8)
    for f in range(4):
        moving[0, 0, f, 2, 3 + f] = 1.0                      # one pixel a frame to the right
    assert torch.allclose(ink_centres(still)[0, 0], torch.tensor([[2.0, 3.0]] * 4))
    assert torch.equal(centroid_velocity_loss(moving, moving), torch.zeros(1))
    # steps (0, 0) against (0, 1): squared error 1 in the column, 0 in the row, mean over (pairs, 2 coords) = 0.5
    assert torch.allclose(centroid_velocity_loss(still, moving), torch.tensor([0.5]))
    clips = moving_digits(6, frames=4, size=16, seed=0, bounce=False, speeds=(1,)).clips
    assert torch.allclose(ink_centres(clips)[:, 0], centres(clips[:, 0]), atol=1e-5)  # the judge's centre of mass
    x = (clips + 0.3 * torch.randn_like(clips)).requires_grad_()
    centroid_velocity_loss(x, clips).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="F >= 2"):
        centroid_velocity_loss(clips[:, :, :1], clips[:, :, :1])


def test_centroid_motion_objective_adds_only_the_velocity_term_and_skips_dropped_directions(tmp_path):
    from difflab.train import fit
    from difflab.train.objectives.centroid_motion import CentroidMotionObjective, centroid_velocity_loss
    from difflab.train.objectives.diffusion import DiffusionObjective
    den = build_denoiser(make_spec("video_unet", TINY, DIFFUSION), seed=0)
    torch.manual_seed(0)
    clips = moving_digits(4, frames=4, size=24, seed=0).clips[:, :, :, 8:16, 8:16].contiguous()
    batch = {"x0": clips, "sigma": torch.tensor([0.5, 3.0, 20.0, 1.0]), "noise": torch.randn_like(clips),
             "class_labels": torch.tensor([0, 1, 2, 3]), "direction_labels": torch.tensor([2, 4, 0, 1])}
    plain = DiffusionObjective(den).loss(batch)
    off = CentroidMotionObjective(den, lambda_vel=0.0).loss(batch)
    assert torch.equal(off["loss"], plain) and torch.equal(off["simple"], plain)
    on = CentroidMotionObjective(den, lambda_vel=2.0, skip_key="direction_labels", skip_value=4).loss(batch)
    assert on["vel"][1] == 0 and (on["vel"][[0, 2, 3]] > 0).all()  # example 1's direction was dropped (the null 4)
    assert torch.allclose(on["loss"], plain + 2.0 * on["vel"])
    with torch.no_grad():
        x_in = batch["x0"] + batch["sigma"].reshape(-1, 1, 1, 1, 1) * batch["noise"]
        x0_hat = den(x_in, batch["sigma"], class_labels=batch["class_labels"], direction_labels=batch["direction_labels"])
    assert torch.allclose(on["vel"][0], centroid_velocity_loss(x0_hat, clips)[0], rtol=1e-4)
    with pytest.raises(ValueError, match="lambda_vel"):
        CentroidMotionObjective(den, lambda_vel=-1.0)
    with pytest.raises(ValueError, match="loss='mse' only"):
        CentroidMotionObjective(den, loss="hybrid")
    # through fit: a resumed run ends where a straight one does, bit for bit
    rows = {"x0": clips, "class_labels": torch.arange(4), "direction_labels": torch.arange(4)}

    def run(out, steps):
        d = build_denoiser(make_spec("video_unet", TINY, DIFFUSION), seed=0)
        cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-3, cfg_dropout=0.5, log_every=0, seed=0, progress=False)
        obj = CentroidMotionObjective(d, lambda_vel=1.0, skip_key="direction_labels", skip_value=4, cfg_dropout=0.5,
                                      null_class=10, null_cond={"direction_labels": 4})
        return fit(obj, rows, cfg, out).module.state_dict()

    run(tmp_path / "a", 1)
    resumed, straight = run(tmp_path / "a", 2), run(tmp_path / "b", 2)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_video_demo_tiny_run(tmp_path, capsys):
    from difflab.demos.video import run_video_demo
    DigitsJudge.fit(fit_config=FitConfig(epochs=2)).save(tmp_path / "digits_judge.safetensors")  # a quick judge
    r = run_video_demo(tmp_path, network="space_time_unet", steps=2, sampling_steps=2, clips_per_pair=1, image_fraction=0.25,
                       tiny=True, progress=False)
    assert r["n_generated"] == 40 and r["kind"] == "video_unet"
    for key in ("frame_accuracy", "same_class", "motion_accuracy", "frechet", "frechet_real_halves", "cpu_seconds"):
        assert math.isfinite(r[key]), key
    assert Image.open(tmp_path / "samples.gif").n_frames == 8
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 2
    assert "clips moving as asked" in capsys.readouterr().out
    with pytest.raises(ValueError, match="network='nope' is unknown"):
        run_video_demo(tmp_path, network="nope")


def test_video_demo_motion_module_route_trains_only_the_motion_modules(tmp_path):
    from difflab.demos.video import run_video_demo
    from difflab.io.checkpoint import load_checkpoint
    DigitsJudge.fit(fit_config=FitConfig(epochs=2)).save(tmp_path / "digits_judge.safetensors")
    r = run_video_demo(tmp_path, network="motion_modules", steps=2, sampling_steps=2, clips_per_pair=1, tiny=True, progress=False,
                       end_frame_weight=2.0, velocity_weight=1.0, class_guidance=0.5)
    assert r["kind"] == "motion_unet" and r["image_steps"] > 0 and 0 < r["trainable_parameters"] < r["parameters"]
    assert r["end_frame_weight"] == 2.0 and r["velocity_weight"] == 1.0 and r["class_guidance"] == 0.5
    assert r["sampler"] == "euler_ancestral" and r["eta"] == 2.0  # the demo's SAMPLER_ETA
    assert json.loads((tmp_path / "motion_modules" / "checkpoint.json").read_text())["objective"] == "centroid_motion"
    image = load_checkpoint(tmp_path / "motion_modules" / "image")
    video = load_checkpoint(tmp_path / "motion_modules")
    image_ema = {k[len("ema."):]: v for k, v in image[0].items() if k.startswith("ema.")}
    frozen = {k[len("model.unet."):]: v for k, v in video[0].items() if k.startswith("model.unet.")}
    assert frozen and all(torch.equal(frozen[k], image_ema[k]) for k in frozen)  # the pretrained image network, untouched
    with pytest.raises(ValueError, match="joint image-and-video training is the space-time U-Net's"):
        run_video_demo(tmp_path, network="motion_modules", image_fraction=0.25, tiny=True)
    with pytest.raises(ValueError, match="class_guidance=-1 must be a finite number >= 0"):
        run_video_demo(tmp_path, class_guidance=-1, tiny=True)


def test_video_demo_default_network_is_the_frozen_motion_module_route(monkeypatch, tmp_path):
    import inspect

    from difflab.cli import demo as cli_demo
    from difflab.cli import main
    from difflab.demos.video import CLASS_GUIDANCE, NETWORK, NETWORKS, run_video_demo
    assert NETWORK == "motion_modules" and NETWORK in NETWORKS
    assert inspect.signature(run_video_demo).parameters["network"].default == NETWORK
    assert NETWORKS[NETWORK]().freeze_image and NETWORKS[NETWORK]().image_spec is not None
    seen = []
    monkeypatch.setattr(cli_demo, "run_video_demo",
                        lambda out, **kw: seen.append((kw["network"], kw["end_frame_weight"], kw["velocity_weight"],
                                                       kw["class_guidance"], kw["eta"])))
    assert main(["demo", "--video", "--out-dir", str(tmp_path)]) == 0
    assert main(["demo", "--video", "--video-network", "space_time_unet", "--end-frame-weight", "2.5",
                 "--velocity-weight", "0.5", "--class-guidance", "0.25", "--eta", "0.5", "--out-dir", str(tmp_path)]) == 0
    assert seen == [("motion_modules", None, None, CLASS_GUIDANCE, None), ("space_time_unet", 2.5, 0.5, 0.25, 0.5)]
