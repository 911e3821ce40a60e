"""Chapter 49: guided diffusion for sampling policies in reinforcement learning (Diffusion Policy; Diffuser).

On the Detour task (pass a round obstacle left or right to reach a goal; the expert's
demonstrations go either way), trains a small diffusion policy over 16-step action chunks and the
behaviour-cloning MLP on the same chunks, and rolls both out on fixed evaluation episodes. Then
trains Diffuser's trajectory model and a return model on mixed-quality trajectories and plans the
same episodes with start and goal fixed by inpainting, unguided and guided up the return.
``python examples/guide/49_policies.py [--fast --out DIR]`` (full: 59 CPU s with one torch thread, measured on the loaded 2-core CPU; writes a PNG and a GIF).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time

import torch

import _guide as guide
from difflab.data.detour import ACTION_DIM, EVAL_SEEDS, OBS_DIM, DetourConfig, DetourEnv, action_chunks, demonstrations, run_episodes
from difflab.demos.policy import (HORIZON, N_OBS, PLAN_HORIZON, PLAN_SPEC, POLICY_SPEC, episode_stats, track_plans,
                                  varied_demonstrations)
from difflab.io.rollouts import save_rollout_gif
from difflab.io.spec import build_denoiser
from difflab.nn.mlp import MLP
from difflab.pipelines.policy import diffusion_policy, plan_trajectories, regression_policy
from difflab.train import Regression, TrainConfig, fit, train

EXECUTE = 8

BOUNDS = {
    "policy_success": (0.0, 1.0),           # 25 steps of training in --fast: only that it runs
    "bc_success": (0.0, 0.3),               # the L2 regressor averages left and right into the obstacle
    "bc_collision": (0.5, 1.0),
    "plan_start_error": (0.0, 1e-6),        # inpainting gives the start state back exactly
    "plan_goal_error": (0.0, 1e-6),         # ... and the goal
    "demo_return_mean": (-60.0, -45.0),     # the mixed-quality data (the demo: -52.6)
}


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    t0, c0 = time.time(), time.process_time()
    fast, env_cfg = args.fast, DetourConfig()
    steps = 25 if fast else 500
    episodes = list(EVAL_SEEDS[:8 if fast else 50])
    cfg = TrainConfig(steps=steps, batch_size=64, lr=1e-3, lr_schedule="cosine", warmup_steps=max(1, steps // 20),
                      ema_decay=0.99, checkpoint_every=0, log_every=10_000, progress=False, seed=args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        # 1. Diffusion policy (Chi et al. 2023) and behaviour cloning on the same expert chunks.
        demos = demonstrations(60 if fast else 200, env_cfg)
        obs, chunks = action_chunks(demos, N_OBS, HORIZON, env_cfg)
        c1 = time.process_time()
        policy = build_denoiser(POLICY_SPEC, seed=args.seed)
        state = train(policy, (chunks, None, {"obs": obs}), cfg, f"{tmp}/policy", spec=POLICY_SPEC)
        state.ema.copy_to(policy.net)
        policy.eval()
        policy_cpu = time.process_time() - c1
        torch.manual_seed(args.seed)
        bc = MLP(N_OBS * OBS_DIM, (HORIZON, ACTION_DIM), hidden=256, depth=3)
        fit(Regression(bc), {"x": obs, "y": chunks}, dataclasses.replace(cfg, ema_decay=None), f"{tmp}/bc")
        bc.eval()
        dp = run_episodes(diffusion_policy(policy, shape=(HORIZON, ACTION_DIM), seed=args.seed, steps=10), episodes,
                          n_obs=N_OBS, execute=EXECUTE, config=env_cfg)
        bcr = run_episodes(regression_policy(bc), episodes, n_obs=N_OBS, execute=EXECUTE, config=env_cfg)

        # 2. Diffuser (Janner et al. 2022): trajectories of a mixed-quality demonstrator and their returns.
        traj, returns = varied_demonstrations(100 if fast else 400, env_cfg)
        c1 = time.process_time()
        planner = build_denoiser(PLAN_SPEC, seed=args.seed)
        state = train(planner, traj, cfg, f"{tmp}/diffuser", spec=PLAN_SPEC)
        state.ema.copy_to(planner.net)
        planner.eval()
        mu, sd = returns.mean(), returns.std()
        torch.manual_seed(args.seed)
        value = MLP(PLAN_HORIZON * traj.shape[2], (1,), hidden=128, depth=2)
        fit(Regression(value), {"x": traj, "y": ((returns - mu) / sd)[:, None]}, dataclasses.replace(cfg, ema_decay=None),
            f"{tmp}/value")
        value.eval().requires_grad_(False)
        planner_cpu = time.process_time() - c1

    # 3. Plan every episode: start and goal inpainted, with and without the return's gradient.
    env = DetourEnv(episodes, env_cfg)
    known = torch.zeros(len(episodes), PLAN_HORIZON, traj.shape[2])
    mask = torch.ones_like(known)
    known[:, 0, :2], mask[:, 0, :2] = env.pos, 0
    known[:, -1, :2], mask[:, -1, :2] = env.goal, 0
    seeds = [args.seed * 1_000_003 + s for s in episodes]
    plans, tracked = {}, {}
    for name, scale in (("unguided", 0.0), ("guided", 1.0)):
        plans[name] = plan_trajectories(planner, known, mask, seeds, value_fn=lambda z: value(z)[:, 0], scale=scale, steps=20)
        tracked[name] = episode_stats(track_plans(plans[name], episodes, env_cfg))

    dps, bcs = episode_stats(dp), episode_stats(bcr)
    figures = guide.report({
        "policy_success": dps["success"], "policy_collision": dps["collision"], "policy_left": dps["left"],
        "policy_right": dps["right"], "policy_return": dps["mean_return"],
        "bc_success": bcs["success"], "bc_collision": bcs["collision"], "bc_return": bcs["mean_return"],
        "demo_return_mean": float(returns.mean()), "demo_return_max": float(returns.max()),
        "plan_unguided_success": tracked["unguided"]["success"], "plan_unguided_return": tracked["unguided"]["mean_return"],
        "plan_guided_success": tracked["guided"]["success"], "plan_guided_return": tracked["guided"]["mean_return"],
        "plan_unguided_predicted_return": float(value(plans["unguided"])[:, 0].mean() * sd + mu),
        "plan_guided_predicted_return": float(value(plans["guided"])[:, 0].mean() * sd + mu),
        "plan_start_error": float((plans["guided"][:, 0, :2] - known[:, 0, :2]).abs().max()),
        "plan_goal_error": float((plans["guided"][:, -1, :2] - known[:, -1, :2]).abs().max()),
        "policy_train_cpu_seconds": policy_cpu, "diffuser_train_cpu_seconds": planner_cpu,
    })

    # 4. The picture: roll-outs of each, the obstacle, the goals.
    plt = guide.pyplot()
    panels = [("diffusion policy", dp.paths(), dps), ("behaviour cloning (L2)", bcr.paths(), bcs),
              ("Diffuser plans, unguided", plans["unguided"][:, :, :2], tracked["unguided"]),
              ("Diffuser plans, return-guided", plans["guided"][:, :, :2], tracked["guided"])]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.9))
    for ax, (name, paths, stats) in zip(axes, panels):
        ax.add_patch(plt.Circle((0, 0), env_cfg.obstacle_radius, color="0.75"))
        for i in range(min(len(paths), 20)):
            ax.plot(paths[i, :, 0], paths[i, :, 1], lw=0.8)
        ax.scatter(env.goal[:20, 0], env.goal[:20, 1], marker="*", c="k", s=15)
        ax.set(xlim=(-1, 1), ylim=(-1, 1), aspect="equal", title=f"{name}\nsuccess {stats['success']:.0%}")
        ax.set_xticks([]), ax.set_yticks([])
    guide.save(fig, guide.picture(args, "49_policies.png"))
    gif = save_rollout_gif([dp.paths()[:8], bcr.paths()[:8]], dp.goal[:8], env_cfg.obstacle_radius,
                           guide.picture(args, "49_policies.gif"), titles=("diffusion policy", "BC (MLP)"), size=128)
    print(f"gif: {gif}")
    guide.print_time(t0, c0)
    return figures


# one thread: on a shared CPU two threads spin and cost far more CPU time
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
