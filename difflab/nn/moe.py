"""A mixture-of-experts feed-forward layer for (diffusion) transformers, and its bookkeeping.

``MoEFeedForward`` replaces a transformer block's MLP, tokens (B, N, D) -> (B, N, D):

    p(x) = softmax(W_r h(x))                     router probabilities over E experts
    y(x) = sum_{i in topk(p(x))} g_i(x) E_i(x)  [+ S(x)]

- **Router** (Shazeer et al. 2017; Fedus et al. 2022, "Switch Transformers", eq. 1): a bias-free
  linear map of the token, computed in float32 even under autocast (Switch, Section 2.4,
  "selective precision"). ``router_sees_sigma``: h(x) = x + W_c c, with c the block's
  conditioning vector (DiT's time embedding), so routing can depend on the noise level
  explicitly, as the timestep-conditioned gating of Switch-DiT (Park et al. 2024) does. (DiT-MoE,
  Fei et al. 2024, routes the adaLN-modulated token, in which the noise level enters only
  through the modulation.)
- **Gates**: top-1 keeps the raw probability g = p_i (Switch, eq. 2), top-k >= 2 renormalizes the
  k chosen ones to sum to 1 (GShard, Lepikhin et al. 2021, Algorithm 1, deterministic as in
  ST-MoE and Mixtral).
- **Experts**: 2-layer MLPs with tanh-GELU, DiT's MLP (Peebles & Xie 2023). Each expert runs on the
  tokens sent to it only (gather, then ``index_add`` back): no dense all-experts compute.
- **Capacity** (Switch, eq. 3; GShard): with ``capacity_factor`` each expert takes at most
  C = ceil(capacity_factor * T * k / E) of the T * k assignments of the forward's T = B * N tokens;
  first choices are served before second choices, then in token order. An assignment past C is
  dropped: it contributes zero and the token keeps only the block's residual path.
  ``capacity_factor=None`` is dropless routing. What was dropped is recorded (``routing``).
- **Shared expert** (DeepSeekMoE, Dai et al. 2024, Section 3.2; DiT-MoE's shared experts): one more
  MLP every token goes through, added to the routed output.
- **Load balancing** (Switch, eq. 4-6): aux = alpha * E * sum_i f_i P_i, with f_i the fraction of
  the T * k routed assignments (before capacity) given to expert i and P_i the mean router
  probability of expert i. f is not differentiable; the gradient reaches the router through P.
  For k = 1 this is Switch's loss exactly; for k > 1 it is DiT-MoE's (f over all k choices,
  so uniform routing gives alpha for any k). It is recorded as ``self.aux_loss`` after each
  forward: the training loop adds it to the loss through :mod:`difflab.nn.aux`.

After each forward ``self.routing`` (a :class:`Routing`) holds the assignments, gates, dropped
assignments and per-expert load of that forward; :func:`recording_routing` keeps every forward's,
and :func:`routing_by_sigma` runs a denoiser at given noise levels to show how routing changes
with sigma. :func:`active_parameters` / :func:`total_parameters` count a model's parameters.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMLP(nn.Module):
    """DiT's feed-forward: ``fc2(gelu_tanh(fc1(x)))`` (Peebles & Xie 2023; timm's ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class Routing:
    """What one forward of a :class:`MoEFeedForward` did, detached; T = B * N tokens, k choices each.

    ``experts`` (B, N, k) long: the chosen experts, best first; ``gates`` (B, N, k): their weights;
    ``dropped`` (B, N, k) bool: the assignments over capacity (they contributed zero);
    ``counts`` (E,): assignments routed to each expert (before capacity); ``probs_mean`` (E,): P_i;
    ``capacity``: C, or None (dropless)."""

    experts: torch.Tensor
    gates: torch.Tensor
    dropped: torch.Tensor
    counts: torch.Tensor
    probs_mean: torch.Tensor
    capacity: int | None

    @property
    def load(self) -> torch.Tensor:
        """f_i (E,): the fraction of the T * k routed assignments given to each expert (sums to 1)."""
        return self.counts / self.counts.sum()

    @property
    def dropped_assignments(self) -> int:
        return int(self.dropped.sum())

    @property
    def dropped_tokens(self) -> int:
        """Tokens all of whose assignments were dropped: the layer gave them zero."""
        return int(self.dropped.all(-1).sum())


# ----------------------------------------------------------------------------------------------
# Routing as plain functions


def top_k_gates(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts, gates)`` (T, k) of router probabilities ``probs`` (T, E): the k largest, best
    first; gates are p_i for k = 1 (Switch, eq. 2), renormalized to sum 1 for k >= 2 (GShard)."""
    gates, experts = probs.topk(k, dim=-1)
    if k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    return experts, gates


def expert_capacity(capacity_factor: float | None, tokens: int, k: int, num_experts: int) -> int | None:
    """C = ceil(capacity_factor * tokens * k / num_experts) (Switch, eq. 3, with k assignments per token)."""
    return None if capacity_factor is None else math.ceil(capacity_factor * tokens * k / num_experts)


def within_capacity(experts: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """(T, k) bool: which assignments an expert of ``capacity`` accepts. Every first choice queues
    before any second choice, then tokens in order (GShard's priority); None accepts all."""
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    T, k = experts.shape
    queue = experts.t().reshape(-1)  # slot-major: all first choices, then all second choices
    sorted_e, order = torch.sort(queue, stable=True)
    counts = torch.bincount(queue, minlength=num_experts)
    starts = counts.cumsum(0) - counts
    position = torch.empty_like(queue)
    position[order] = torch.arange(len(queue), device=queue.device) - starts[sorted_e]
    return (position < capacity).reshape(k, T).t()


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int, alpha: float = 0.01) -> torch.Tensor:
    """Switch Transformers' auxiliary loss (Fedus et al. 2022, eq. 4-6): alpha * E * sum_i f_i P_i.

    ``probs`` (T, E) router probabilities, ``experts`` (T, k) the routed choices. f_i: fraction of
    the T * k assignments that chose expert i (eq. 5, over all k choices as DiT-MoE does); P_i: mean
    of p_i over the tokens (eq. 6). Equal to alpha when routing and probabilities are uniform."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / experts.numel()
    return alpha * num_experts * (f * probs.mean(0)).sum()


# ----------------------------------------------------------------------------------------------
# The layer


class MoEFeedForward(nn.Module):
    """Mixture-of-experts MLP, (B, N, dim) -> (B, N, dim); see the module doc.

    ``forward(x, cond=None)``: ``cond`` (B, cond_dim), the block's conditioning vector (time
    embedding), is used when ``router_sees_sigma`` and ignored otherwise. After each forward:
    ``aux_loss`` (the load-balancing loss times ``aux_loss_alpha``) and ``routing``."""

    def __init__(self, dim: int, hidden: int, num_experts: int = 8, top_k: int = 1, capacity_factor: float | None = None,
                 shared_expert: bool = False, router_sees_sigma: bool = False, cond_dim: int | None = None,
                 aux_loss_alpha: float = 0.01):
        super().__init__()
        check_moe_args(dim, hidden, num_experts, top_k, capacity_factor, router_sees_sigma, cond_dim, aux_loss_alpha)
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.router_sees_sigma, self.aux_loss_alpha = router_sees_sigma, aux_loss_alpha
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.cond_proj = nn.Linear(cond_dim, dim) if router_sees_sigma else None
        self.experts = nn.ModuleList(ExpertMLP(dim, hidden) for _ in range(num_experts))
        self.shared = ExpertMLP(dim, hidden) if shared_expert else None
        self.aux_loss: torch.Tensor | None = None
        self.routing: Routing | None = None
        self.recorded: list[Routing] | None = None  # a list while recording_routing is on

    def router_probs(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """p(x) (B, N, E), in float32 with autocast off (Switch, Section 2.4)."""
        with torch.autocast(x.device.type, enabled=False):
            h = x.float()
            if self.router_sees_sigma:
                if cond is None or cond.ndim != 2 or cond.shape[0] != x.shape[0]:
                    raise ValueError(f"router_sees_sigma=True needs cond= a ({x.shape[0]}, cond_dim) tensor (the time "
                                     f"embedding), got {None if cond is None else tuple(cond.shape)}")
                h = h + F.linear(cond.float(), self.cond_proj.weight.float(), self.cond_proj.bias.float())[:, None, :]
            return F.linear(h, self.router.weight.float()).softmax(-1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"MoEFeedForward takes tokens (B, N, dim), got shape {tuple(x.shape)}")
        B, N, D = x.shape
        T = B * N
        probs = self.router_probs(x, cond).reshape(T, self.num_experts)
        experts, gates = top_k_gates(probs, self.top_k)
        capacity = expert_capacity(self.capacity_factor, T, self.top_k, self.num_experts)
        keep = within_capacity(experts, self.num_experts, capacity)
        tokens = x.reshape(T, D)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):  # every expert runs, on its own tokens only (maybe none)
            token, slot = torch.nonzero((experts == e) & keep, as_tuple=True)
            y = expert(tokens[token]) * gates[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(tokens).to(out.dtype)
        self.aux_loss = load_balancing_loss(probs, experts, self.num_experts, self.aux_loss_alpha)
        self.routing = Routing(experts.reshape(B, N, -1), gates.detach().reshape(B, N, -1), (~keep).reshape(B, N, -1),
                               torch.bincount(experts.reshape(-1), minlength=self.num_experts).float(),
                               probs.detach().mean(0), capacity)
        if self.recorded is not None:
            self.recorded.append(self.routing)
        return out.reshape(B, N, D)


def check_moe_args(dim, hidden, num_experts, top_k, capacity_factor, router_sees_sigma, cond_dim, aux_loss_alpha) -> None:
    """Errors naming the bad argument of :class:`MoEFeedForward`, before any weight is made."""
    for name, value in (("dim", dim), ("hidden", hidden), ("num_experts", num_experts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} must be an integer in 1..num_experts={num_experts} (1: Switch, 2: GShard)")
    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor)
                                            and capacity_factor > 0):
        raise ValueError(f"capacity_factor={capacity_factor!r} must be a finite number > 0, or None (dropless)")
    if router_sees_sigma and (not isinstance(cond_dim, int) or cond_dim < 1):
        raise ValueError(f"router_sees_sigma=True needs cond_dim, the size of the conditioning vector; got cond_dim={cond_dim!r}")
    if not (math.isfinite(aux_loss_alpha) and aux_loss_alpha >= 0):
        raise ValueError(f"aux_loss_alpha={aux_loss_alpha!r} must be a finite number >= 0")


# ----------------------------------------------------------------------------------------------
# Counting and analysis


def moe_layers(module: nn.Module) -> dict[str, MoEFeedForward]:
    """``{qualified name: layer}`` of the :class:`MoEFeedForward` layers in ``module``."""
    return {name: m for name, m in module.named_modules() if isinstance(m, MoEFeedForward)}


def total_parameters(module: nn.Module) -> int:
    """Every parameter of ``module`` (each shared one once)."""
    return sum(p.numel() for p in module.parameters())


def active_parameters(module: nn.Module) -> int:
    """The parameters one token goes through: everything outside the MoE layers, plus per layer
    its router (and condition projection), its shared expert and ``top_k`` routed experts'
    worth (Fedus et al. 2022, Section 2; "activated parameters" in DeepSeekMoE and DiT-MoE)."""
    idle = sum((m.num_experts - m.top_k) * total_parameters(m.experts[0]) for m in moe_layers(module).values())
    return total_parameters(module) - idle


@contextlib.contextmanager
def recording_routing(module: nn.Module):
    """Keep the :class:`Routing` of every forward of every MoE layer of ``module`` while inside:
    yields ``{layer name: [Routing, ...]}``, one entry per forward, in call order."""
    layers = moe_layers(module)
    records = {name: [] for name in layers}
    for name, m in layers.items():
        m.recorded = records[name]
    try:
        yield records
    finally:
        for m in layers.values():
            m.recorded = None


@torch.no_grad()
def routing_by_sigma(denoiser, x0: torch.Tensor, sigmas, *, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, **cond) -> dict:
    """How routing changes with the noise level: per-expert load of every MoE layer at each sigma.

    ``denoiser`` is called as ``denoiser(x0 + sigma * noise, sigma, **cond)`` (difflab's denoiser
    contract) in eval mode, once per sigma in ``sigmas`` (the buckets), with the same ``noise``
    (standard normal from ``generator`` when None). Returns ``{"sigmas": (S,), "load": {layer:
    (S, E)}, "dropped": {layer: (S,)}, "routing": {layer: [[Routing, ...] per sigma]}}``: the
    fraction of routed assignments each expert got and the fraction dropped over capacity, summed
    over all the layer's calls at that sigma, and the assignments themselves (:class:`Routing`)."""
    layers = moe_layers(denoiser)
    if not layers:
        raise ValueError(f"routing_by_sigma: {type(denoiser).__name__} has no MoEFeedForward layer")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
    if not len(sigmas) or not bool(torch.isfinite(sigmas).all() and (sigmas >= 0).all()):
        raise ValueError(f"sigmas={sigmas.tolist()} must be a non-empty list of finite noise levels >= 0")
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) if noise is None else noise
    load = {name: torch.zeros(len(sigmas), m.num_experts) for name, m in layers.items()}
    dropped = {name: torch.zeros(len(sigmas)) for name in layers}
    routing = {name: [] for name in layers}
    was_training = denoiser.training
    denoiser.eval()
    try:
        for i, s in enumerate(sigmas.tolist()):
            sigma = torch.full((len(x0),), s, device=x0.device)
            with recording_routing(denoiser) as records:
                denoiser(x0 + s * noise, sigma, **cond)
            for name, calls in records.items():
                routing[name].append(calls)
                if not calls:  # a layer this call did not reach
                    load[name][i], dropped[name][i] = math.nan, math.nan
                    continue
                counts = sum(r.counts.cpu() for r in calls)
                load[name][i] = counts / counts.sum()
                dropped[name][i] = sum(r.dropped_assignments for r in calls) / counts.sum()
    finally:
        denoiser.train(was_training)
    return {"sigmas": sigmas, "load": load, "dropped": dropped, "routing": routing}


__all__ = ["MoEFeedForward", "ExpertMLP", "Routing", "top_k_gates", "expert_capacity", "within_capacity",
           "load_balancing_loss", "moe_layers", "total_parameters", "active_parameters", "recording_routing",
           "routing_by_sigma"]
