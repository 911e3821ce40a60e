"""Diffusion over actions (issue 20): the Detour environment is deterministic per seed and its
expert bimodal; the temporal U-Net is a network kind (shapes, a training step, a checkpoint round
trip); a diffusion policy's action chunk does not depend on the batch; Diffuser's inpainting keeps
the given states exactly; the regression objective is the per-example MSE."""
import pytest
import torch

from difflab.data.detour import (EVAL_SEEDS, DetourConfig, DetourEnv, action_chunks, demonstrations, run_episodes,
                                 segment_hits_disc)
from difflab.io.spec import NETWORKS, build_denoiser, load_denoiser, make_spec, sample_shape
from difflab.nn.mlp import MLP
from difflab.nn.temporal_unet import TemporalUNet, TemporalUNetConfig
from difflab.pipelines.policy import diffusion_policy, plan_trajectories, regression_policy, sample_action_chunks
from difflab.train import Regression, TrainConfig, fit, train

TINY = TemporalUNetConfig(in_channels=2, horizon=8, cond_dim=8, model_channels=8, channel_mult=(1, 2), time_dim=8, groups=4)
DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "eps"}


def randomized(denoiser, seed=0):
    """The denoiser with every weight redrawn (the zero-initialized output included), so it is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return denoiser.eval()


def test_environment_is_deterministic_per_seed():
    actions = torch.randn(30, 3, 2, generator=torch.Generator().manual_seed(1)) * 0.1
    runs = []
    for _ in range(2):
        env = DetourEnv([5, 6, 7])
        for a in actions:
            env.step(a)
        runs.append((env.paths(), env.ret.clone(), env.done.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    # an episode is a function of its own seed: alone or in a batch, the same
    alone = DetourEnv([6])
    for a in actions:
        alone.step(a[1:2])
    assert torch.equal(alone.paths()[0], runs[0][0][1])
    assert not torch.equal(DetourEnv([5]).obs(), DetourEnv([6]).obs())


def test_collisions_success_and_bad_actions():
    env = DetourEnv([0])
    while not bool(env.done.all()):
        env.step(torch.tensor([[0.0, 1.0]]))     # straight up: into the obstacle
    assert bool(env.collided[0]) and not bool(env.success[0])
    assert bool(segment_hits_disc(torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), 0.3)[0])
    assert not bool(segment_hits_disc(torch.tensor([[-1.0, 0.5]]), torch.tensor([[1.0, 0.5]]), 0.3)[0])
    with pytest.raises(ValueError, match="action"):
        DetourEnv([0, 1]).step(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="seeds"):
        DetourEnv([])


def test_expert_is_bimodal_and_succeeds():
    demos = demonstrations(40)
    assert all(d["success"] for d in demos)
    sides = [d["side"] for d in demos]
    assert 10 <= sides.count(1) <= 30
    # the side a demonstration took is where it passed the obstacle
    for d in demos:
        y = d["obs"][:, 1]
        assert float(d["obs"][y.abs().argmin(), 0]) * d["side"] > 0.3
    obs, chunks = action_chunks(demos[:3], n_obs=2, horizon=8)
    assert obs.shape[1:] == (2, 4) and chunks.shape[1:] == (8, 2) and len(obs) == sum(len(d["actions"]) for d in demos[:3])
    assert float(chunks.norm(dim=-1).max()) <= 1 + 1e-6
    assert not set(EVAL_SEEDS) & {d["seed"] for d in demonstrations(5)}


def test_temporal_unet_kind_trains_and_round_trips(tmp_path):
    spec = make_spec("temporal_unet", TINY, DIFFUSION)
    assert NETWORKS["temporal_unet"].output == "sequence" and sample_shape(spec) == (8, 2)
    denoiser = build_denoiser(spec, seed=0)
    x, obs = torch.randn(4, 8, 2), torch.randn(4, 2, 4)
    torch.testing.assert_close(denoiser(x, torch.full((4,), 3.0), obs=obs), x)  # zero-initialized output: eps_hat = 0
    with pytest.raises(ValueError, match="obs"):
        denoiser(x, torch.full((4,), 3.0))
    chunks = torch.randn(32, 8, 2).clamp(-1, 1)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, checkpoint_every=0, progress=False, ema_decay=0.9)
    state = train(denoiser, (chunks, None, {"obs": torch.randn(32, 2, 4)}), cfg, tmp_path, spec=spec)
    assert state.step == 3
    loaded, _ = load_denoiser(tmp_path, weights="model")
    assert torch.equal(loaded(x, torch.full((4,), 3.0), obs=obs), denoiser.eval()(x, torch.full((4,), 3.0), obs=obs))
    with pytest.raises(ValueError, match="horizon"):
        TemporalUNetConfig(horizon=7, channel_mult=(1, 2))


def test_action_chunk_is_the_same_whatever_the_batch_size():
    denoiser = randomized(build_denoiser(make_spec("temporal_unet", TINY, DIFFUSION), seed=0))
    obs = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(2))
    seeds = [11, 12, 13]
    together = sample_action_chunks(denoiser, obs, seeds, shape=(8, 2), steps=4)
    alone = torch.cat([sample_action_chunks(denoiser, obs[i:i + 1], seeds[i:i + 1], shape=(8, 2), steps=4) for i in range(3)])
    assert together.shape == (3, 8, 2)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(together[0], together[1])
    # the receding-horizon policy: seeds from (seed, episode, replan) alone
    policy = diffusion_policy(denoiser, shape=(8, 2), seed=0, steps=4)
    a = policy(obs, torch.tensor([0, 1, 2]), 0)
    b = policy(obs[1:2], torch.tensor([1]), 0)
    torch.testing.assert_close(a[1:2], b, rtol=0, atol=1e-5)
    assert not torch.allclose(policy(obs[1:2], torch.tensor([1]), 1), b)
    env = run_episodes(policy, [3, 4], n_obs=2, execute=4, config=DetourConfig(max_steps=8))
    assert env.paths().shape[:2] == (2, 9)


def test_inpainting_keeps_the_given_states_exactly():
    cfg = TemporalUNetConfig(in_channels=4, horizon=8, cond_dim=0, model_channels=8, channel_mult=(1, 2), time_dim=8, groups=4)
    denoiser = randomized(build_denoiser(make_spec("temporal_unet", cfg, DIFFUSION), seed=0))
    known = torch.randn(3, 8, 4)
    mask = torch.ones_like(known)
    mask[:, 0, :2] = 0       # start state
    mask[:, -1, :2] = 0      # goal state
    value = MLP(32, (1,), hidden=8, depth=1)
    for scale in (0.0, 2.0):
        plans = plan_trajectories(denoiser, known, mask, [1, 2, 3], value_fn=lambda z: value(z)[:, 0], scale=scale, steps=4)
        assert torch.equal(plans[mask == 0], known[mask == 0])
        assert not torch.allclose(plans[mask == 1], known[mask == 1])
    with pytest.raises(ValueError, match="mask"):
        plan_trajectories(denoiser, known, mask[:, :4], [1, 2, 3])


def test_regression_objective_is_per_example_mse():
    model = MLP(3, (2, 2), hidden=4, depth=1)
    x, y = torch.randn(5, 3), torch.randn(5, 2, 2)
    torch.testing.assert_close(Regression(model).loss({"x": x, "y": y}), ((model(x) - y) ** 2).mean(dim=(1, 2)))
    state = fit(Regression(model), {"x": x, "y": y}, TrainConfig(steps=2, batch_size=5, progress=False, checkpoint_every=0))
    assert state.step == 2
    act = regression_policy(model)(x, torch.arange(5), 0)
    assert float(act.abs().max()) <= 1
