"""Detour: an embedded, deterministic planar control task with two good ways to succeed.

A point robot starts below a round obstacle and must reach a goal above it, passing the obstacle
on the left or on the right: both are equally good, so demonstrations are bimodal, the setting
of Chi et al. 2023 ("Diffusion Policy", Section 4, multimodal action distributions).

- state: the robot's position p in [-1, 1]^2; the goal g; the obstacle is a disc of radius
  ``obstacle_radius`` at the origin.
- observation: ``(p_x, p_y, g_x, g_y)`` (:data:`OBS_DIM` = 4).
- action: a displacement ``a`` (2,), its norm clipped to ``max_speed``: p <- p + a.
- an episode ends on success (||p - g|| <= ``goal_tolerance``), on a collision (the step's
  segment enters the obstacle: a failure) or after ``max_steps`` steps (a failure).
- reward (for planning): -||p - g|| per step, after the move; a collision ends the episode and
  every step it had left is charged -2 (the worst distance), so hitting the obstacle costs more
  than any way round.

Episode ``seed`` fixes the start (x jittered about 0, y = -0.8) and the goal (x jittered, y = 0.8),
drawn from a generator seeded with it; :meth:`DetourEnv.step` draws nothing, so a seed and an
action sequence fix an episode. :data:`EVAL_SEEDS` are the fixed evaluation episodes, disjoint
from the demonstration seeds (0, 1, 2, ...).

The scripted expert (:func:`expert_action`) flips a fair coin per episode for the side, picks a
lateral clearance beside the obstacle, heads for that waypoint at full speed and then for the
goal: half its demonstrations go left and half right, whatever the start.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

OBS_DIM = 4
ACTION_DIM = 2
EVAL_SEEDS = tuple(range(100_000, 100_100))  # 100 fixed evaluation episodes, never demonstrated


@dataclass(frozen=True)
class DetourConfig:
    """The task's geometry and limits."""

    obstacle_radius: float = 0.3
    max_speed: float = 0.08         # the largest displacement of one step
    max_steps: int = 60
    goal_tolerance: float = 0.05
    start_y: float = -0.8
    goal_y: float = 0.8
    jitter: float = 0.15            # start and goal x ~ U(-jitter, jitter)

    def __post_init__(self):
        for name in ("obstacle_radius", "max_speed", "goal_tolerance", "jitter"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DetourConfig.{name}={getattr(self, name)!r} must be > 0")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"DetourConfig.max_steps={self.max_steps!r} must be an integer >= 1")


def check_seeds(seeds) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of integers >= 0, got {seeds[:5]}")
    return seeds


def episode_start(seed: int, config: DetourConfig = DetourConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """(start (2,), goal (2,)) of episode ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    jx = (torch.rand(2, generator=g) * 2 - 1) * config.jitter
    return torch.tensor([float(jx[0]), config.start_y]), torch.tensor([float(jx[1]), config.goal_y])


def segment_hits_disc(p: torch.Tensor, q: torch.Tensor, radius: float) -> torch.Tensor:
    """(B,) bool: whether the segment p -> q (B, 2) comes within ``radius`` of the origin."""
    d = q - p
    t = (-(p * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-12)).clamp(0, 1)
    closest = p + t[:, None] * d
    return closest.norm(dim=-1) < radius


class DetourEnv:
    """A batch of Detour episodes, one per seed, stepped together. Tensors are float32 (B, ...)."""

    def __init__(self, seeds: Sequence[int], config: DetourConfig = DetourConfig()):
        self.seeds, self.config = check_seeds(seeds), config
        starts, goals = zip(*(episode_start(s, config) for s in self.seeds))
        self.pos, self.goal = torch.stack(starts), torch.stack(goals)
        B = len(self.seeds)
        self.t = 0
        self.done = torch.zeros(B, dtype=torch.bool)
        self.success = torch.zeros(B, dtype=torch.bool)
        self.collided = torch.zeros(B, dtype=torch.bool)
        self.ret = torch.zeros(B)
        self.path = [self.pos.clone()]

    def obs(self) -> torch.Tensor:
        """(B, 4): position and goal."""
        return torch.cat([self.pos, self.goal], dim=1)

    def step(self, action: torch.Tensor) -> torch.Tensor:
        """Apply ``action`` (B, 2) to the running episodes (finished ones stay put); returns the
        step's reward (B,) (0 for episodes already over)."""
        c = self.config
        action = torch.as_tensor(action, dtype=torch.float32)
        if action.shape != self.pos.shape or not bool(torch.isfinite(action).all()):
            raise ValueError(f"action must be a finite (B, 2) = {tuple(self.pos.shape)} tensor, got {tuple(action.shape)}")
        norm = action.norm(dim=-1, keepdim=True)
        action = action * (c.max_speed / norm.clamp(min=c.max_speed))
        running = ~self.done
        new = (self.pos + action).clamp(-1, 1)
        hit = running & segment_hits_disc(self.pos, new, c.obstacle_radius)
        self.pos = torch.where(running[:, None] & ~hit[:, None], new, self.pos)
        self.t += 1
        dist = (self.pos - self.goal).norm(dim=-1)
        reward = torch.where(running, -dist, torch.zeros_like(dist))
        reward = torch.where(hit, torch.full_like(dist, -2.0 * (c.max_steps - self.t + 1)), reward)
        self.ret += reward
        reached = running & ~hit & (dist <= c.goal_tolerance)
        self.collided |= hit
        self.success |= reached
        self.done |= hit | reached | (self.t >= c.max_steps)
        self.path.append(self.pos.clone())
        return reward

    def paths(self) -> torch.Tensor:
        """(B, t + 1, 2): every position so far (a finished episode repeats its last one)."""
        return torch.stack(self.path, dim=1)


# ----------------------------------------------------------------------------------------------
# The scripted expert and its demonstrations


def expert_plan(seed: int, config: DetourConfig = DetourConfig()) -> tuple[int, float]:
    """(side, clearance) of the expert in episode ``seed``: side -1 (left) or +1 (right) by a fair
    coin, the waypoint's distance from the obstacle's centre in [r + 0.1, r + 0.25]."""
    g = torch.Generator().manual_seed(int(seed) + 7_919_000)   # apart from the episode's own draws
    u = torch.rand(2, generator=g)
    return (1 if float(u[0]) < 0.5 else -1), config.obstacle_radius + 0.1 + 0.15 * float(u[1])


def expert_action(pos: torch.Tensor, goal: torch.Tensor, side: torch.Tensor, clearance: torch.Tensor,
                  config: DetourConfig = DetourConfig()) -> torch.Tensor:
    """The expert's displacement (B, 2): full speed towards the waypoint (side * clearance, 0)
    while below it, then towards the goal (the last step lands on it)."""
    waypoint = torch.stack([side * clearance, torch.zeros_like(clearance)], dim=1)
    target = torch.where((pos[:, 1] < -0.02)[:, None], waypoint, goal)
    d = target - pos
    n = d.norm(dim=-1, keepdim=True)
    return d * (torch.minimum(n, torch.full_like(n, config.max_speed)) / n.clamp(min=1e-9))


def demonstrations(n: int, config: DetourConfig = DetourConfig(), first_seed: int = 0) -> list[dict]:
    """``n`` expert episodes (seeds first_seed ...): dicts of ``obs`` (T + 1, 4), ``actions``
    (T, 2), ``rewards`` (T,), ``side`` (-1 left, +1 right), ``success``. Deterministic."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n={n!r} must be an integer >= 1")
    seeds = list(range(first_seed, first_seed + n))
    env = DetourEnv(seeds, config)
    plans = [expert_plan(s, config) for s in seeds]
    side = torch.tensor([float(p[0]) for p in plans])
    clearance = torch.tensor([p[1] for p in plans])
    obs, acts, rews, alive = [env.obs()], [], [], []
    while not bool(env.done.all()):
        alive.append(~env.done)
        a = expert_action(env.pos, env.goal, side, clearance, config)
        rews.append(env.step(a))
        acts.append(a)
        obs.append(env.obs())
    obs, acts, rews, alive = (torch.stack(v, dim=1) for v in (obs, acts, rews, alive))
    out = []
    for i in range(n):
        T = int(alive[i].sum())
        out.append({"obs": obs[i, :T + 1], "actions": acts[i, :T], "rewards": rews[i, :T], "side": int(side[i]),
                    "success": bool(env.success[i]), "seed": seeds[i]})
    return out


def observation_history(obs: torch.Tensor, t: int, n_obs: int) -> torch.Tensor:
    """The last ``n_obs`` observations up to step t of one episode (T + 1, D) -> (n_obs, D), the
    first repeated before the start."""
    idx = torch.arange(t - n_obs + 1, t + 1).clamp(min=0)
    return obs[idx]


def action_chunks(episodes: list[dict], n_obs: int, horizon: int, config: DetourConfig = DetourConfig()):
    """Training pairs of a diffusion policy: for every step t of every episode, the observations
    (n_obs, 4) up to t and the next ``horizon`` actions (horizon, 2) divided by ``max_speed``
    (so in [-1, 1]); past the episode's end the robot stays put (zero actions)."""
    obs, chunks = [], []
    for ep in episodes:
        a = torch.cat([ep["actions"], torch.zeros(horizon, ACTION_DIM)]) / config.max_speed
        for t in range(len(ep["actions"])):
            obs.append(observation_history(ep["obs"], t, n_obs))
            chunks.append(a[t:t + horizon])
    return torch.stack(obs), torch.stack(chunks)


# ----------------------------------------------------------------------------------------------
# Running a policy


def run_episodes(policy: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], seeds: Sequence[int] = EVAL_SEEDS, *,
                 n_obs: int = 2, execute: int = 8, config: DetourConfig = DetourConfig()) -> DetourEnv:
    """Roll out a chunked policy receding-horizon (Chi et al. 2023, Section 3.1): every ``execute``
    steps, ``policy(obs_history (b, n_obs, 4), episodes (b,) long, replan)`` returns displacement
    chunks (b, >= execute, 2) (in units of ``max_speed``) for the episodes still running, whose
    first ``execute`` actions are applied. Returns the finished :class:`DetourEnv`."""
    if not (isinstance(execute, int) and execute >= 1):
        raise ValueError(f"execute={execute!r} must be an integer >= 1")
    env = DetourEnv(seeds, config)
    history = [env.obs()]
    replan = 0
    while not bool(env.done.all()):
        running = (~env.done).nonzero()[:, 0]
        idx = torch.arange(len(history) - n_obs, len(history)).clamp(min=0)
        hist = torch.stack(history, 1)[running][:, idx]
        chunk = policy(hist, running, replan)
        if chunk.ndim != 3 or chunk.shape[0] != len(running) or chunk.shape[1] < execute or chunk.shape[2] != ACTION_DIM:
            raise ValueError(f"the policy must return ({len(running)}, >= {execute}, {ACTION_DIM}) chunks, got {tuple(chunk.shape)}")
        for k in range(execute):
            a = torch.zeros_like(env.pos)
            a[running] = chunk[:, k].float() * config.max_speed
            env.step(a)
            history.append(env.obs())
            if bool(env.done.all()):
                break
        replan += 1
    return env


__all__ = ["DetourConfig", "DetourEnv", "OBS_DIM", "ACTION_DIM", "EVAL_SEEDS", "episode_start", "segment_hits_disc",
           "expert_plan", "expert_action", "demonstrations", "observation_history", "action_chunks", "run_episodes"]
