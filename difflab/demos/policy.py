"""`difflab demo --policy`: diffusion over actions on the embedded Detour task
(:mod:`difflab.data.detour`: pass an obstacle left or right to reach a goal).

1. the scripted expert's bimodal demonstrations;
2. a diffusion policy (Chi et al. 2023): a :class:`~difflab.nn.temporal_unet.TemporalUNet`
   denoising 16-step action chunks conditioned on the last two observations, trained by the one
   training loop (:func:`difflab.train.train`, ``obs=`` as conditioning), sampled with 10 DDIM
   steps and executed receding-horizon (8 of 16 actions, then replan);
3. the behaviour-cloning baseline: an MLP regressing the same chunks with an L2 loss
   (:class:`difflab.train.Regression`), which averages the two ways round into the obstacle;
4. both evaluated on the 100 fixed evaluation episodes (:data:`~difflab.data.detour.EVAL_SEEDS`);
5. Diffuser (Janner et al. 2022): an unconditional TemporalUNet over whole state-action
   trajectories of a slower, wider-ranging demonstrator, start and goal fixed by inpainting, a
   learned return model's gradient as guidance; the plans are tracked in the environment and
   their return printed with and without guidance;
6. a GIF of roll-outs, diffusion policy beside the baseline, and ``report.json``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..data.detour import (ACTION_DIM, EVAL_SEEDS, OBS_DIM, DetourConfig, DetourEnv, action_chunks, demonstrations,
                           expert_action, expert_plan, run_episodes)
from ..io.rollouts import save_rollout_gif
from ..io.spec import build_denoiser, make_spec
from ..nn.mlp import MLP
from ..nn.temporal_unet import TemporalUNetConfig
from ..pipelines.policy import diffusion_policy, plan_trajectories, regression_policy
from ..train import Regression, TrainConfig, fit, train

N_OBS, HORIZON, EXECUTE = 2, 16, 8
POLICY_SPEC = make_spec("temporal_unet", TemporalUNetConfig(in_channels=ACTION_DIM, horizon=HORIZON, cond_dim=N_OBS * OBS_DIM,
                                                            model_channels=16, channel_mult=(1, 2), time_dim=32),
                        {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "v"})
POLICY_TRAIN = TrainConfig(steps=1500, batch_size=64, lr=1e-3, lr_schedule="cosine", warmup_steps=50, ema_decay=0.995,
                           checkpoint_every=0, log_every=500, seed=0)
BC_TRAIN = dataclasses.replace(POLICY_TRAIN, ema_decay=None)
N_DEMOS = 200

# Diffuser: whole trajectories (position, action / max_speed) of 48 steps.
PLAN_HORIZON = 48
PLAN_SPEC = make_spec("temporal_unet", TemporalUNetConfig(in_channels=2 + ACTION_DIM, horizon=PLAN_HORIZON, cond_dim=0,
                                                          model_channels=16, channel_mult=(1, 2, 2), time_dim=32),
                      {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "x0"})
PLAN_TRAIN = dataclasses.replace(POLICY_TRAIN, steps=1500, batch_size=64)
N_PLAN_DEMOS = 400


# ----------------------------------------------------------------------------------------------
# Diffuser's data: a demonstrator of varied speed and clearance, so returns differ


def varied_demonstrations(n: int, config: DetourConfig, first_seed: int = 50_000) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` trajectories (n, PLAN_HORIZON, 4) = (position, action / max_speed), padded by staying
    at the goal (or where it hit the obstacle), and their returns (n,): the expert's sides,
    clearances from r - 0.15 (into the obstacle: about a fifth collide) to r + 0.6 and speeds from
    40% to 100%, all drawn from the episode seeds. Mixed quality, as Diffuser's offline data is."""
    seeds = list(range(first_seed, first_seed + n))
    env = DetourEnv(seeds, config)
    side = torch.tensor([float(expert_plan(s, config)[0]) for s in seeds])
    g = torch.Generator().manual_seed(first_seed)
    clearance = config.obstacle_radius - 0.15 + 0.75 * torch.rand(n, generator=g)   # the tightest ones collide
    speed = 0.4 + 0.6 * torch.rand(n, generator=g)
    pos, acts = [env.pos.clone()], []
    for _ in range(PLAN_HORIZON):
        a = expert_action(env.pos, env.goal, side, clearance, config) * speed[:, None]
        a = torch.where(env.done[:, None], torch.zeros_like(a), a)
        env.step(a)
        acts.append(a / config.max_speed)
        pos.append(env.pos.clone())
    traj = torch.cat([torch.stack(pos[:-1], 1), torch.stack(acts, 1)], dim=2)
    return traj, env.ret.clone()


def track_plans(plans: torch.Tensor, seeds, config: DetourConfig) -> DetourEnv:
    """Follow each plan's positions in the environment: a_t = plan position at t + 1 - current position."""
    env = DetourEnv(seeds, config)
    for t in range(config.max_steps):
        target = plans[:, min(t + 1, plans.shape[1] - 1), :2]
        env.step(target - env.pos)
        if bool(env.done.all()):
            break
    return env


# ----------------------------------------------------------------------------------------------
# The demo


def run_policy_demo(out_dir="demo_policy_out", *, steps: int | None = None, sampler: str = "ddim", sampling_steps: int = 10,
                    guidance_scale: float = 1.0, seed: int = 0, plan: bool = True, gif: bool = True,
                    progress: bool = True) -> dict:
    """Train the diffusion policy and the BC baseline, evaluate both on :data:`EVAL_SEEDS`, plan
    with Diffuser (``plan``), write ``roll_outs.gif`` (``gif``) and ``report.json``; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start, c_start = time.time(), time.process_time()
    env_cfg = DetourConfig()
    pol_cfg = POLICY_TRAIN if steps is None else dataclasses.replace(POLICY_TRAIN, steps=steps)
    pol_cfg = dataclasses.replace(pol_cfg, progress=progress)
    bc_cfg = dataclasses.replace(BC_TRAIN, steps=pol_cfg.steps, progress=progress)
    report = {}

    # 1. Demonstrations.
    demos = demonstrations(N_DEMOS, env_cfg)
    obs, chunks = action_chunks(demos, N_OBS, HORIZON, env_cfg)
    right = sum(d["side"] > 0 for d in demos)
    print(f"[1/6] data: {N_DEMOS} expert demonstrations ({N_DEMOS - right} left, {right} right), {len(obs)} "
          f"(observation, {HORIZON}-step chunk) pairs")

    # 2. Diffusion policy through the one training loop.
    t0 = time.process_time()
    denoiser = build_denoiser(POLICY_SPEC, seed=pol_cfg.seed)
    state = train(denoiser, (chunks, None, {"obs": obs}), pol_cfg, out_dir / "diffusion_policy", spec=POLICY_SPEC,
                  resume=False)
    state.ema.copy_to(denoiser.net)
    denoiser.eval()
    report["policy_train_cpu_seconds"] = round(time.process_time() - t0, 1)
    print(f"[2/6] diffusion policy: temporal U-Net, {pol_cfg.steps} steps ({report['policy_train_cpu_seconds']:.0f} CPU s)")

    # 3. Behaviour cloning: the same chunks, L2.
    t0 = time.process_time()
    torch.manual_seed(bc_cfg.seed)
    bc = MLP(N_OBS * OBS_DIM, (HORIZON, ACTION_DIM), hidden=256, depth=3)
    fit(Regression(bc), {"x": obs, "y": chunks}, bc_cfg, out_dir / "bc", resume=False)
    bc.eval()
    report["bc_train_cpu_seconds"] = round(time.process_time() - t0, 1)
    print(f"[3/6] behaviour cloning: MLP, {bc_cfg.steps} steps ({report['bc_train_cpu_seconds']:.0f} CPU s)")

    # 4. Evaluate both on the fixed evaluation episodes.
    t0 = time.process_time()
    dp = run_episodes(diffusion_policy(denoiser, shape=(HORIZON, ACTION_DIM), seed=seed, sampler=sampler, steps=sampling_steps),
                      EVAL_SEEDS, n_obs=N_OBS, execute=EXECUTE, config=env_cfg)
    bcr = run_episodes(regression_policy(bc), EVAL_SEEDS, n_obs=N_OBS, execute=EXECUTE, config=env_cfg)
    for name, env in (("diffusion", dp), ("bc", bcr)):
        report[name] = episode_stats(env)
    report["eval_cpu_seconds"] = round(time.process_time() - t0, 1)
    print(f"[4/6] evaluated on {len(EVAL_SEEDS)} fixed-seed episodes ({sampler}, {sampling_steps} steps, "
          f"execute {EXECUTE} of {HORIZON})")

    # 5. Diffuser: guided, inpainted planning.
    if plan:
        report["planning"] = run_planning(out_dir, env_cfg, guidance_scale, seed, sampler, progress)

    # 6. The GIF and the report.
    if gif:
        report["gif"] = str(save_rollout_gif([dp.paths()[:12], bcr.paths()[:12]], dp.goal[:12],
                                             env_cfg.obstacle_radius, out_dir / "roll_outs.gif",
                                             titles=("diffusion policy", "BC (MLP)")))
    report.update(total_seconds=round(time.time() - t_start, 1), cpu_seconds=round(time.process_time() - c_start, 1),
                  steps=pol_cfg.steps, sampler=sampler, sampling_steps=sampling_steps, episodes=len(EVAL_SEEDS))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print("[6/6] results:")
    print(format_policy_report(report))
    return report


def episode_stats(env: DetourEnv) -> dict:
    """Success, collision, timeout rates, the sides taken by the successes and the mean return."""
    n = len(env.seeds)
    side = env.paths()[:, :, 0].mean(1)
    return {"success": float(env.success.float().mean()), "collision": float(env.collided.float().mean()),
            "timeout": float((~env.success & ~env.collided).float().mean()), "n": n,
            "left": int((env.success & (side < 0)).sum()), "right": int((env.success & (side > 0)).sum()),
            "mean_return": float(env.ret.mean())}


def run_planning(out_dir: Path, env_cfg: DetourConfig, scale: float, seed: int, sampler: str, progress: bool) -> dict:
    """Diffuser on the Detour task: train the trajectory model and the return model, plan the
    evaluation episodes with start and goal inpainted, with and without return guidance."""
    t0 = time.process_time()
    traj, returns = varied_demonstrations(N_PLAN_DEMOS, env_cfg)
    cfg = dataclasses.replace(PLAN_TRAIN, progress=progress)
    denoiser = build_denoiser(PLAN_SPEC, seed=cfg.seed)
    state = train(denoiser, traj, cfg, out_dir / "diffuser", spec=PLAN_SPEC, resume=False)
    state.ema.copy_to(denoiser.net)
    denoiser.eval()
    mu, sd = returns.mean(), returns.std()
    torch.manual_seed(cfg.seed)
    value = MLP(PLAN_HORIZON * traj.shape[2], (1,), hidden=128, depth=2)
    fit(Regression(value), {"x": traj, "y": ((returns - mu) / sd)[:, None]}, dataclasses.replace(cfg, ema_decay=None),
        out_dir / "return_model", resume=False)
    value.eval()
    for p in value.parameters():
        p.requires_grad_(False)

    env = DetourEnv(EVAL_SEEDS, env_cfg)
    known = torch.zeros(len(EVAL_SEEDS), PLAN_HORIZON, traj.shape[2])
    mask = torch.ones_like(known)
    known[:, 0, :2], mask[:, 0, :2] = env.pos, 0            # the start state
    known[:, -1, :2], mask[:, -1, :2] = env.goal, 0         # the goal state at the horizon
    seeds = [seed * 1_000_003 + s for s in EVAL_SEEDS]
    out = {"demo_return_mean": float(returns.mean()), "demo_return_max": float(returns.max())}
    for name, s in (("unguided", 0.0), ("guided", scale)):
        plans = plan_trajectories(denoiser, known, mask, seeds, value_fn=lambda z: value(z)[:, 0], scale=s,
                                  sampler=sampler, steps=20)
        tracked = track_plans(plans, EVAL_SEEDS, env_cfg)
        out[name] = {**episode_stats(tracked), "predicted_return": float(value(plans)[:, 0].mean() * sd + mu),
                     "start_error": float((plans[:, 0, :2] - known[:, 0, :2]).abs().max()),
                     "goal_error": float((plans[:, -1, :2] - known[:, -1, :2]).abs().max())}
    out.update(guidance_scale=scale, cpu_seconds=round(time.process_time() - t0, 1))
    print(f"[5/6] Diffuser: {N_PLAN_DEMOS} varied trajectories, {cfg.steps} steps; return unguided "
          f"{out['unguided']['mean_return']:.2f}, guided (scale {scale}) {out['guided']['mean_return']:.2f}")
    return out


def format_policy_report(r: dict) -> str:
    rows = [("policy", "success", "collision", "timeout", "left/right", "mean return")]
    for key, name in (("diffusion", "diffusion policy (temporal U-Net)"), ("bc", "behaviour cloning (MLP, L2)")):
        s = r[key]
        rows.append((name, f"{s['success']:.0%}", f"{s['collision']:.0%}", f"{s['timeout']:.0%}",
                     f"{s['left']}/{s['right']}", f"{s['mean_return']:.2f}"))
    if "planning" in r:
        p = r["planning"]
        for key, name in (("unguided", "Diffuser plan, unguided"), ("guided", f"Diffuser plan, guided x{p['guidance_scale']:g}")):
            s = p[key]
            rows.append((name, f"{s['success']:.0%}", f"{s['collision']:.0%}", f"{s['timeout']:.0%}",
                         f"{s['left']}/{s['right']}", f"{s['mean_return']:.2f}"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.append(f"  ({r['n'] if 'n' in r else r['episodes']} fixed-seed episodes; total {r['total_seconds']:.0f}s wall, "
                 f"{r['cpu_seconds']:.0f} CPU s)")
    if "planning" in r:
        p = r["planning"]
        lines.append(f"  Diffuser inpainting: max |start error| {max(p['guided']['start_error'], p['unguided']['start_error']):.1e}, "
                     f"max |goal error| {max(p['guided']['goal_error'], p['unguided']['goal_error']):.1e}")
    return "\n".join(lines)
