"""Mixture of experts (difflab.nn.moe) and the auxiliary-loss seam of the training loop
(difflab.nn.aux): Switch's load-balancing loss (its value at uniform load, parity with
transformers' Mixtral implementation, its gradient), capacity drops exactly what it reports,
dropless routing, top-1/top-2 gates, the layer against a token-by-token reference, the shared
expert, noise-level-aware routing, parameter counts, the aux loss reaching the router through
difflab.train.fit, bit-exact resume, routing by sigma."""
import math

import pytest
import torch
from torch import nn

from difflab.core import Denoiser, VPDiscrete
from difflab.io import load_checkpoint
from difflab.nn.aux import aux_losses, clear_aux_losses, collect_aux_loss
from difflab.nn.layers import timestep_embedding
from difflab.nn.moe import (MoEFeedForward, active_parameters, load_balancing_loss, recording_routing, routing_by_sigma,
                            top_k_gates, total_parameters, within_capacity)
from difflab.train import DiffusionObjective, TrainConfig, fit
from difflab.train.loop import accumulate_gradients, draw_step


def quiet(**kw):
    return TrainConfig(**{"progress": False, "log_every": 0, "checkpoint_every": 0, **kw})


# ----------------------------------------------------------------------------------------------
# The load-balancing loss


def test_load_balancing_loss_is_alpha_at_uniform_load_and_grows_with_skew():
    E, T, alpha = 4, 12, 0.01
    uniform = torch.full((T, E), 1 / E)
    balanced = torch.arange(T)[:, None] % E  # every expert gets T / E tokens
    assert float(load_balancing_loss(uniform, balanced, E, alpha)) == pytest.approx(alpha, rel=1e-6)
    # balanced assignments give alpha whatever the probabilities: sum_i P_i = 1
    random_probs = torch.rand(T, E, generator=torch.Generator().manual_seed(0)).softmax(-1)
    assert float(load_balancing_loss(random_probs, balanced, E, alpha)) == pytest.approx(alpha, rel=1e-6)
    # every token prefers expert 0 by s: loss = alpha (1 + (E - 1) s), alpha at s = 0 and growing
    values = []
    for s in (0.0, 0.1, 0.5, 1.0):
        probs = (1 - s) / E + s * torch.eye(E)[0].expand(T, E)
        values.append(float(load_balancing_loss(probs, torch.zeros(T, 1, dtype=torch.long), E, alpha)))
        assert values[-1] == pytest.approx(alpha * (1 + (E - 1) * s), rel=1e-6)
    assert values == sorted(values) and values[-1] == pytest.approx(E * alpha)
    # half the tokens on one expert, the rest spread evenly, probabilities following the choices
    half = torch.cat([torch.zeros(T // 2, dtype=torch.long), torch.arange(T // 2) % E])[:, None]
    skewed = torch.nn.functional.one_hot(half[:, 0], E).float() * 0.5 + 0.5 / E
    assert float(load_balancing_loss(skewed, half, E, alpha)) > 1.2 * alpha


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_matches_transformers_mixtral(k):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    E = 6
    logits = torch.randn(40, E, generator=torch.Generator().manual_seed(k))
    probs = logits.softmax(-1)
    experts, _ = top_k_gates(probs, k)
    ours = load_balancing_loss(probs, experts, E, alpha=1.0)
    theirs = mixtral.load_balancing_loss_func((logits,), E, top_k=k)  # f_i over the k choices sums to k there
    torch.testing.assert_close(ours * k, theirs, rtol=1e-6, atol=1e-7)


def test_load_balancing_gradient_flows_through_the_router_probabilities_only():
    E, T, alpha = 4, 10, 0.1
    logits = torch.randn(T, E, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    experts = logits.detach().topk(2, -1).indices
    assert torch.autograd.gradcheck(lambda z: load_balancing_loss(z.softmax(-1), experts, E, alpha), (logits,))
    # d loss / d p_ti = alpha E f_i / T: the more loaded an expert, the harder its probability is pushed down
    probs = logits.detach().softmax(-1).requires_grad_(True)
    load_balancing_loss(probs, experts, E, alpha).backward()
    f = torch.bincount(experts.reshape(-1), minlength=E).double() / experts.numel()
    torch.testing.assert_close(probs.grad, (alpha * E * f / T).expand(T, E))


# ----------------------------------------------------------------------------------------------
# Routing, capacity and the layer's output


def forced(x_features, k=1, capacity_factor=None, E=4, dim=8):
    """A layer whose router scores expert i by 5 * feature i of the token (features 0, 1 only)."""
    torch.manual_seed(0)
    layer = MoEFeedForward(dim, 16, num_experts=E, top_k=k, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, :2] = torch.tensor([5.0, 4.0])
        layer.router.weight[1, :2] = torch.tensor([4.0, 5.0])
    x = 0.01 * torch.randn(2, 6, dim, generator=torch.Generator().manual_seed(2))
    x[..., :2] += x_features
    return layer, x


def test_capacity_overflow_drops_exactly_the_tokens_it_reports():
    layer, x = forced(torch.tensor([10.0, 0.0]), k=1, capacity_factor=1.0)  # every token wants expert 0
    y = layer(x)
    r = layer.routing
    assert (r.experts == 0).all() and r.capacity == math.ceil(1.0 * 12 * 1 / 4) == 3
    dropped = r.dropped.reshape(12)
    assert dropped.tolist() == [False] * 3 + [True] * 9  # the first three tokens in order fit
    assert r.dropped_assignments == r.dropped_tokens == 9
    flat_x, flat_y = x.reshape(12, -1), y.reshape(12, -1)
    assert torch.equal(flat_y[dropped], torch.zeros(9, 8))  # a dropped token gets nothing from the layer
    gates = r.gates.reshape(12, 1)
    torch.testing.assert_close(flat_y[:3], layer.experts[0](flat_x[:3]) * gates[:3], rtol=0, atol=1e-6)
    assert r.load.tolist() == [1.0, 0.0, 0.0, 0.0]  # the load counts routed assignments, before capacity
    # dropless: the same router processes every token
    layer.capacity_factor = None
    y = layer(x)
    assert layer.routing.capacity is None and layer.routing.dropped_assignments == 0
    torch.testing.assert_close(y.reshape(12, -1), layer.experts[0](flat_x) * layer.routing.gates.reshape(12, 1),
                               rtol=0, atol=1e-6)


def test_capacity_serves_first_choices_before_second_choices():
    # tokens alternate between preferring (0, then 1) and (1, then 0); C = 12 * 2 / 4 = 6 per expert
    features = torch.tensor([[10.0, 0.0], [0.0, 10.0]]).repeat(3, 1)  # (6, 2): A, B, A, B, ...
    layer, x = forced(features, k=2, capacity_factor=1.0)
    layer(x)
    r = layer.routing
    kind_a = (torch.arange(6) % 2 == 0).repeat(2, 1)  # (2, 6)
    assert torch.equal(r.experts[..., 0], torch.where(kind_a, 0, 1)) and torch.equal(r.experts[..., 1], torch.where(kind_a, 1, 0))
    # each expert's 6 places go to its 6 first choices, though second choices come earlier in token order
    assert not r.dropped[..., 0].any() and r.dropped[..., 1].all()
    assert r.dropped_assignments == 12 and r.dropped_tokens == 0
    assert within_capacity(torch.tensor([[0, 1], [1, 0]]), 2, None).all()


@pytest.mark.parametrize("k,capacity_factor,shared,sigma", [(1, None, False, False), (2, None, True, True),
                                                              (1, 0.75, True, False), (2, 0.6, False, True)])
def test_layer_equals_a_token_by_token_reference(k, capacity_factor, shared, sigma):
    torch.manual_seed(0)
    E, dim = 4, 8
    layer = MoEFeedForward(dim, 12, num_experts=E, top_k=k, capacity_factor=capacity_factor, shared_expert=shared,
                           router_sees_sigma=sigma, cond_dim=5 if sigma else None)
    x, c = torch.randn(3, 5, dim), torch.randn(3, 5)
    y = layer(x, cond=c).detach()
    torch.set_grad_enabled(False)
    # reference: one token at a time, its own router, top-k, gates and a capacity count in priority order
    tokens = x.reshape(15, dim)
    h = tokens + (layer.cond_proj(c).repeat_interleave(5, 0) if sigma else 0)
    probs = (h @ layer.router.weight.t()).softmax(-1)
    capacity = math.ceil(capacity_factor * 15 * k / E) if capacity_factor else 15 * k
    taken, ref = [0] * E, torch.zeros(15, dim)
    for slot in range(k):
        for t in range(15):
            order = sorted(range(E), key=lambda i: -float(probs[t, i]))[:k]
            gate = probs[t, order[slot]] / (probs[t, order].sum() if k > 1 else 1)
            if taken[order[slot]] < capacity:
                taken[order[slot]] += 1
                ref[t] += gate * layer.experts[order[slot]](tokens[t])
    if shared:
        ref += torch.stack([layer.shared(tokens[t]) for t in range(15)])
    torch.set_grad_enabled(True)
    torch.testing.assert_close(y.reshape(15, dim), ref, rtol=0, atol=1e-6)
    assert layer.routing.dropped_assignments == 15 * k - sum(taken)
    assert (sum(taken) < 15 * k) == (capacity_factor is not None)  # the capacity cases do drop


def test_top1_gate_is_the_probability_and_top2_gates_are_renormalized():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 8)
    for k in (1, 2):
        torch.manual_seed(1)
        layer = MoEFeedForward(8, 16, num_experts=5, top_k=k)
        layer(x)
        probs = layer.router_probs(x).reshape(14, 5)
        top, _ = probs.topk(2, -1)
        gates = layer.routing.gates.reshape(14, k)
        if k == 1:
            torch.testing.assert_close(gates[:, 0], top[:, 0])  # Switch: y = p_i E_i(x), not renormalized
        else:
            torch.testing.assert_close(gates.sum(-1), torch.ones(14))
            torch.testing.assert_close(gates[:, 0] / gates[:, 1], top[:, 0] / top[:, 1])
            assert (gates[:, 0] >= gates[:, 1]).all()


def test_router_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 16, num_experts=4, top_k=2, router_sees_sigma=True, cond_dim=3)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = layer.router_probs(x, c)
        y = layer(x, cond=c)
        assert layer.experts[0].fc1(x).dtype == torch.bfloat16  # the experts do run in bf16
    assert probs.dtype == layer.aux_loss.dtype == torch.float32
    torch.testing.assert_close(probs, layer.router_probs(x, c), rtol=0, atol=0)  # the same routing as in fp32
    torch.testing.assert_close(y, layer(x, cond=c), rtol=0.05, atol=0.05)


def test_shared_expert_is_added_for_every_token():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 16, num_experts=4, top_k=1, capacity_factor=0.25, shared_expert=True)
    x = torch.randn(2, 6, 8)
    y = layer(x)
    assert layer.routing.dropped_tokens > 0  # even a dropped token goes through the shared expert
    shared = layer.shared
    layer.shared = None
    routed = layer(x)
    torch.testing.assert_close(y, routed + shared(x), rtol=0, atol=1e-6)
    layer.shared = shared
    layer(x).pow(2).sum().backward()
    assert shared.fc1.weight.grad.abs().sum() > 0


def test_sigma_aware_routing_changes_assignments_with_cond():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 16, num_experts=4, top_k=2, router_sees_sigma=True, cond_dim=6)
    x = torch.randn(2, 10, 8)
    c = torch.randn(1, 6)
    layer(x, cond=c.expand(2, 6))
    a = layer.routing.experts.clone()
    layer(x, cond=(5 * c).expand(2, 6))
    assert not torch.equal(a, layer.routing.experts)  # the same tokens, another noise level: other experts
    layer(x, cond=c.expand(2, 6))
    assert torch.equal(a, layer.routing.experts)
    with pytest.raises(ValueError, match="router_sees_sigma=True needs cond="):
        layer(x)
    # a router that does not see sigma ignores cond
    plain = MoEFeedForward(8, 16, num_experts=4)
    assert torch.equal(plain(x), plain(x, cond=torch.randn(2, 6)))


def test_active_and_total_parameters_on_a_known_config():
    layer = MoEFeedForward(8, 16, num_experts=4, top_k=2, shared_expert=True, router_sees_sigma=True, cond_dim=5)
    expert = (8 * 16 + 16) + (16 * 8 + 8)  # 280
    router, cond_proj = 8 * 4, 5 * 8 + 8
    assert total_parameters(layer) == 4 * expert + router + cond_proj + expert == 1480
    assert active_parameters(layer) == 2 * expert + router + cond_proj + expert == 920
    model = nn.Sequential(nn.Linear(3, 8), layer, MoEFeedForward(8, 4, num_experts=8, top_k=1))
    small = (8 * 4 + 4) + (4 * 8 + 8)  # 76
    assert total_parameters(model) == 32 + 1480 + 8 * small + 64
    assert active_parameters(model) == 32 + 920 + 1 * small + 64


def test_bad_arguments_are_named():
    for kw, match in [(dict(num_experts=0), "num_experts=0"), (dict(top_k=3, num_experts=2), "top_k=3"),
                      (dict(capacity_factor=0.0), "capacity_factor=0.0"), (dict(capacity_factor=math.inf), "capacity_factor"),
                      (dict(router_sees_sigma=True), "cond_dim"), (dict(aux_loss_alpha=-1.0), "aux_loss_alpha")]:
        with pytest.raises(ValueError, match=match):
            MoEFeedForward(8, 16, **kw)
    with pytest.raises(ValueError, match=r"tokens \(B, N, dim\)"):
        MoEFeedForward(8, 16)(torch.randn(4, 8))


# ----------------------------------------------------------------------------------------------
# The seam: aux losses reach the training loss


class TokenNet(nn.Module):
    """net(x_in, t) on (B, N, 3) token data: a DiT-like block whose MLP is a mixture of experts,
    the router seeing the time embedding."""

    def __init__(self, dim=8, **moe):
        super().__init__()
        self.inp, self.temb, self.out = nn.Linear(3, dim), nn.Linear(16, dim), nn.Linear(dim, 3)
        self.norm = nn.LayerNorm(dim)
        self.mlp = MoEFeedForward(dim, 2 * dim, router_sees_sigma=True, cond_dim=dim, **moe)

    def forward(self, x, t):
        c = self.temb(timestep_embedding(t, 16))
        h = self.inp(x) + c[:, None]
        return self.out(h + self.mlp(self.norm(h), cond=c))


def token_data(n=16):
    return {"x0": torch.rand(n, 5, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1}


def moe_objective(seed=0, **moe):
    torch.manual_seed(seed)
    moe = {"num_experts": 4, "top_k": 2, **moe}
    return DiffusionObjective(Denoiser(TokenNet(**moe), VPDiscrete.from_name("linear", 100), "eps"))


def test_aux_loss_reaches_the_router_through_the_loop():
    data, grads = token_data(), {}
    batch = draw_step(moe_objective(), data, quiet(batch_size=8), 0)
    for weight in (0.0, 1.0, 3.0):
        obj = moe_objective(aux_loss_alpha=0.5)
        losses, terms = accumulate_gradients(obj, batch, quiet(batch_size=8, aux_loss_weight=weight))
        grads[weight] = {n: p.grad.clone() for n, p in obj.module.named_parameters()}
        assert torch.equal(terms["aux_loss"], obj.module.mlp.aux_loss.detach().expand(8))
    # weight 0: the gradient of the objective's mean loss alone, bit for bit
    obj = moe_objective(aux_loss_alpha=0.5)
    loss = obj.loss(batch).mean()
    layer = obj.module.mlp
    names = ["router.weight", "cond_proj.weight", "cond_proj.bias"]
    aux_grad = dict(zip(names, torch.autograd.grad(layer.aux_loss, [layer.get_parameter(n) for n in names],
                                                   retain_graph=True)))
    loss.backward()
    assert all(torch.equal(p.grad, grads[0.0][n]) for n, p in obj.module.named_parameters())
    # the aux term adds weight * d aux / d theta to the router and its condition projection; the experts
    # and the layers after it get nothing from it
    for name in grads[0.0]:
        diff = grads[3.0][name] - grads[0.0][name]
        short = name.removeprefix("mlp.")
        if short in aux_grad:
            assert aux_grad[short].abs().sum() > 0
            torch.testing.assert_close(diff, 3.0 * aux_grad[short], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(grads[1.0][name] - grads[0.0][name], aux_grad[short], rtol=1e-4, atol=1e-7)
        elif not name.startswith(("temb", "inp", "norm")):  # upstream of the router: its input
            assert torch.equal(diff, torch.zeros_like(diff)), name


def test_fit_logs_the_aux_loss_and_it_balances_the_router():
    data = token_data(32)
    obj = moe_objective(aux_loss_alpha=1.0, top_k=1)
    with torch.no_grad():  # start badly unbalanced: one expert is everyone's first choice
        obj.module.mlp.router.weight[0] += 3 * obj.module.mlp.router.weight[0].sign()
    layer = obj.module.mlp
    state = fit(obj, data, quiet(steps=30, batch_size=16, lr=1e-2, log_every=5, ema_decay=None, aux_loss_weight=5.0))
    aux = [e["aux_loss"] for e in state.history]
    assert all(math.isfinite(a) for a in aux) and "loss" in state.history[0]
    assert aux[-1] < 0.9 * aux[0] and aux[-1] < 1.15  # alpha = 1: near the minimum, uniform load
    # and without the term, the logged aux loss does not come down as far
    obj0 = moe_objective(aux_loss_alpha=1.0, top_k=1)
    with torch.no_grad():
        obj0.module.mlp.router.weight[0] += 3 * obj0.module.mlp.router.weight[0].sign()
    free = fit(obj0, data, quiet(steps=30, batch_size=16, lr=1e-2, log_every=5, ema_decay=None, aux_loss_weight=0.0))
    assert free.history[-1]["aux_loss"] > aux[-1]
    assert layer.aux_loss is not None and layer.routing is not None


def test_resume_with_an_moe_is_bit_exact(tmp_path):
    data = token_data()
    cfg = lambda steps: quiet(steps=steps, batch_size=8, grad_accum=2, lr=1e-2, ema_decay=0.9, log_every=1)  # noqa: E731
    a = fit(moe_objective(capacity_factor=1.0), data, cfg(4), tmp_path / "a")
    fit(moe_objective(capacity_factor=1.0), data, cfg(2), tmp_path / "b")
    b = fit(moe_objective(seed=5, capacity_factor=1.0), data, cfg(4), tmp_path / "b")
    ta, _ = load_checkpoint(tmp_path / "a")
    tb, _ = load_checkpoint(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [e["aux_loss"] for e in a.history][2:] == [e["aux_loss"] for e in b.history]
    assert any(k.startswith("model.mlp.experts.3.") for k in ta)


class Penalized(nn.Module):
    """Any layer may record an aux loss: here the mean |activation| of a linear map."""

    def __init__(self, weight):
        super().__init__()
        self.lin, self.weight = nn.Linear(3, 3), weight

    def forward(self, x, t):
        h = self.lin(x)
        if self.weight is not None:
            self.aux_loss = self.weight * h.abs().mean()
        return h


def test_the_seam_is_generic_and_absent_without_aux_losses():
    data = {"x0": torch.rand(16, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1}
    runs = {}
    for weight in (None, 0.0, 10.0):
        torch.manual_seed(0)
        d = Denoiser(Penalized(weight), VPDiscrete.from_name("linear", 100), "eps")
        state = fit(DiffusionObjective(d), data, quiet(steps=20, batch_size=8, lr=1e-2, log_every=20, ema_decay=None))
        runs[weight] = (d.net.lin.weight.detach().clone(), state.history[-1])
    assert "aux_loss" not in runs[None][1] and runs[0.0][1]["aux_loss"] == 0.0
    assert torch.equal(runs[None][0], runs[0.0][0])  # a zero term changes nothing, bit for bit
    assert runs[10.0][0].abs().sum() < 0.8 * runs[None][0].abs().sum()  # the penalty reached the weights


def test_aux_protocol_collects_sums_and_clears():
    plain = nn.Sequential(nn.Linear(2, 2))
    assert collect_aux_loss(plain) is None and aux_losses(plain) == {}
    model = nn.Sequential(MoEFeedForward(4, 8, num_experts=2), MoEFeedForward(4, 8, num_experts=2))
    x = torch.randn(1, 3, 4)
    model(x)
    found = aux_losses(model)
    assert list(found) == ["0", "1"]
    torch.testing.assert_close(collect_aux_loss(model), found["0"] + found["1"])
    clear_aux_losses(model)
    assert collect_aux_loss(model) is None
    model[0].aux_loss = torch.ones(3)
    with pytest.raises(ValueError, match="aux_loss must be a scalar"):
        collect_aux_loss(model)
    with pytest.raises(ValueError, match="aux_loss_weight"):
        TrainConfig(aux_loss_weight=-1.0)


# ----------------------------------------------------------------------------------------------
# Routing by noise level


def test_routing_by_sigma_reports_the_load_at_each_sigma():
    obj = moe_objective(top_k=1, capacity_factor=1.0)
    denoiser, x0 = obj.denoiser, token_data(6)["x0"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    sigmas = [0.05, 1.0, 20.0]
    out = routing_by_sigma(denoiser, x0, sigmas, noise=noise)
    load = out["load"]["net.mlp"]
    assert load.shape == (3, 4) and torch.allclose(load.sum(-1), torch.ones(3))
    assert not torch.equal(load[0], load[2])  # routing changes with the noise level
    # the same as one call by hand
    with torch.no_grad(), recording_routing(denoiser) as records:
        denoiser(x0 + 20.0 * noise, torch.full((6,), 20.0))
    assert torch.equal(load[2], records["net.mlp"][0].load)
    assert len(out["routing"]["net.mlp"]) == 3 and len(out["routing"]["net.mlp"][2]) == 1
    assert torch.equal(out["routing"]["net.mlp"][2][0].experts, records["net.mlp"][0].experts)  # (6, 5, 1)
    assert float(out["dropped"]["net.mlp"][2]) == pytest.approx(records["net.mlp"][0].dropped_assignments / 30)
    assert denoiser.net.mlp.recorded is None and denoiser.training  # left as it was
    with pytest.raises(ValueError, match="no MoEFeedForward"):
        routing_by_sigma(Denoiser(nn.Identity(), VPDiscrete.from_name("linear", 100), "eps"), x0, sigmas)
