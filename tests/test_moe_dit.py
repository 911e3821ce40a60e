"""The mixture-of-experts DiT (the ``moe-dit`` network kind: DiTConfig.moe_experts >= 1): a tiny
instance's shapes and weights at the dense DiT's active compute, the router seeing the block's
conditioning, a training step whose load-balancing loss flows through the aux-loss seam, a
checkpoint round trip through build_denoiser / load_denoiser, the routing statistics of the loaded
model, `difflab train --network moe-dit` and its exact resume."""
import dataclasses
import json

import pytest
import torch

from difflab.cli import main
from difflab.io.checkpoint import load_checkpoint
from difflab.io.spec import NETWORKS, build_denoiser, load_denoiser, make_spec
from difflab.nn.dit import MOE_PRESETS, PRESETS, DiT, DiTConfig, parameter_count
from difflab.nn.moe import MoEFeedForward, active_parameters, recording_routing, routing_by_sigma, total_parameters
from difflab.train import TrainConfig, train

DENSE = DiTConfig(in_channels=1, sample_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=3)
MOE = dataclasses.replace(DENSE, moe_experts=4, moe_top_k=2, moe_router_sees_sigma=True)
DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}


def randomized(net, std=0.3, seed=0):
    """Every weight redrawn (the zero-initialized adaLN and output layers too), so every path carries a signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def test_tiny_moe_dit_shapes_and_same_active_compute_as_the_dense_dit():
    torch.manual_seed(0)
    net, dense = DiT(MOE), DiT(DENSE)
    assert all(isinstance(b.mlp, MoEFeedForward) and len(b.mlp.experts) == 4 and b.mlp.top_k == 2 for b in net.blocks)
    # each expert is half the dense hidden width: top-2 computes what the dense feed-forward does
    assert net.blocks[0].mlp.experts[0].fc1.out_features == dense.blocks[0].mlp.fc1.out_features // 2 == 32
    assert total_parameters(net) == parameter_count(MOE) and total_parameters(dense) == parameter_count(DENSE)
    extra = 16 * 4 + (16 * 16 + 16) + 16  # per block: the router, its projection of c, a second expert's output bias
    assert active_parameters(net) == total_parameters(dense) + 2 * extra
    assert total_parameters(net) == active_parameters(net) + 2 * 2 * (2 * 16 * 32 + 32 + 16)  # 2 idle experts per block
    randomized(net)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 10.5, 999.0]), torch.tensor([0, 2, 3])
    out = net(x, t, class_labels=y)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    assert all(b.mlp.aux_loss.ndim == 0 and b.mlp.routing.experts.shape == (3, 16, 2) for b in net.blocks)
    # a shared expert takes its share of the dense width too: top-2 + shared = 3 experts of 64 // 3
    shared = DiT(dataclasses.replace(MOE, moe_shared_expert=True))
    assert shared.blocks[0].mlp.shared.fc1.out_features == shared.blocks[0].mlp.experts[0].fc1.out_features == 21
    assert total_parameters(shared) == parameter_count(shared.config)


def test_the_router_sees_the_blocks_conditioning():
    """The block hands c (time + class embedding) to the router: the same tokens route differently at
    another time; without moe_router_sees_sigma they route the same when the token is the same."""
    torch.manual_seed(0)
    net = randomized(DiT(MOE)).eval()
    block = net.blocks[0]
    tokens, c0, c1 = torch.randn(2, 16, 16), torch.randn(2, 16), torch.randn(2, 16)
    with recording_routing(block) as rec:
        block.mlp(tokens, cond=c0)
        block.mlp(tokens, cond=c1)
    first, second = rec["mlp"]
    assert not torch.equal(first.experts, second.experts)
    # through the whole net: the routing of block 0 changes with t alone
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 1])
    with recording_routing(net) as rec:
        net(x, torch.tensor([5.0, 5.0]), class_labels=y)
        net(x, torch.tensor([900.0, 900.0]), class_labels=y)
    a, b = rec["blocks.0.mlp"]
    assert not torch.equal(a.experts, b.experts)
    blind = randomized(DiT(dataclasses.replace(MOE, moe_router_sees_sigma=False))).eval()
    assert blind.blocks[0].mlp.cond_proj is None
    tokens_out = [blind.blocks[0].mlp(tokens, cond=c) for c in (c0, c1)]
    torch.testing.assert_close(*tokens_out, rtol=0, atol=0)


def test_training_step_adds_the_load_balancing_loss_and_round_trips(tmp_path):
    spec = make_spec("moe-dit", MOE, DIFFUSION)
    denoiser = build_denoiser(spec, seed=0)
    before = {k: v.clone() for k, v in denoiser.net.state_dict().items()}
    images, labels = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 3
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, cfg_dropout=0.5, checkpoint_every=0, progress=False, ema_decay=0.0,
                      log_every=1)
    state = train(denoiser, (images, labels), cfg, tmp_path / "run", spec=spec)
    # the aux term of both blocks is logged: alpha (0.01) per block at uniform load, up to alpha * E with skew
    aux = [e["aux_loss"] for e in state.history]
    assert len(aux) == 2 and all(0.02 * 0.99 <= a <= 0.02 * 4 for a in aux)
    after = denoiser.net.state_dict()
    for name in ("blocks.0.mlp.router.weight", "blocks.1.mlp.cond_proj.weight", "blocks.0.mlp.experts.3.fc1.weight"):
        assert not torch.equal(after[name], before[name]), name
    loaded, meta = load_denoiser(tmp_path / "run", weights="model")
    assert meta["spec"]["network"]["kind"] == "moe-dit" and isinstance(loaded.net.blocks[1].mlp, MoEFeedForward)
    assert loaded.net.config == MOE
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, class_labels=y), denoiser.eval()(x, sigma, class_labels=y), atol=0, rtol=0)
    # the routing statistics of the loaded model: every block's load at each sigma sums to 1
    stats = routing_by_sigma(loaded, images[:8], [0.1, 1.0, 10.0], generator=torch.Generator().manual_seed(0),
                             class_labels=labels[:8])
    assert sorted(stats["load"]) == ["net.blocks.0.mlp", "net.blocks.1.mlp"]
    for load in stats["load"].values():
        assert load.shape == (3, 4) and torch.allclose(load.sum(1), torch.ones(3))
    assert all(bool((d == 0).all()) for d in stats["dropped"].values())  # dropless


def test_capacity_and_gradient_checkpointing_in_a_dit():
    """A capacity factor below 1 drops assignments (reported per block); recomputing the blocks in
    backward gives the same gradients."""
    torch.manual_seed(0)
    net = randomized(DiT(dataclasses.replace(MOE, moe_capacity_factor=0.5)))
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 999, torch.tensor([0, 1, 2, 3])
    net(x, t, class_labels=y).square().mean().backward()
    r = net.blocks[0].mlp.routing
    assert r.capacity == 16  # ceil(0.5 * 64 tokens * 2 / 4 experts): half of the 128 assignments fit
    assert r.dropped_assignments == int((r.counts - 16).clamp(min=0).sum()) >= 64
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    ckpt = DiT(dataclasses.replace(net.config, gradient_checkpointing=True))
    ckpt.load_state_dict(net.state_dict())
    ckpt(x, t, class_labels=y).square().mean().backward()
    for k, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-7, msg=k)


def test_moe_dit_kind_and_presets():
    kind = NETWORKS["moe-dit"]
    assert kind.cls is DiT and kind.presets is MOE_PRESETS and set(MOE_PRESETS) == set(PRESETS)
    for name, dense in PRESETS.items():
        moe = MOE_PRESETS[name]
        assert (moe.moe_experts, moe.moe_top_k, moe.moe_capacity_factor) == (8, 2, None)
        assert dataclasses.replace(moe, moe_experts=0, moe_router_sees_sigma=False) == dense
    assert MOE_PRESETS["digits"].moe_router_sees_sigma and MOE_PRESETS["digits"].expert_hidden == 256
    assert PRESETS["digits-small"].hidden_size == 64
    # DiT-XL/2 with 8 experts top-2 (each half the dense width): per block six more experts than the
    # dense feed-forward's worth, the router and a second output bias (1.57 B weights, 0.68 B active)
    xl, moe_xl = PRESETS["DiT-XL/2"], MOE_PRESETS["DiT-XL/2"]
    assert parameter_count(moe_xl) - parameter_count(xl) == 28 * (1152 * 8 + 1152 + 6 * (2 * 1152 * 2304 + 2304 + 1152))


def test_train_command_moe_dit_resumes_exactly(tmp_path):
    spec = {"network": {"kind": "moe-dit", "config": {**MOE.to_dict(), "moe_experts": 3, "depth": 1}}}
    train_cfg = {"batch_size": 8, "checkpoint_every": 0, "progress": False, "log_every": 1}
    (tmp_path / "cfg.json").write_text(json.dumps({"spec": spec, "train": train_cfg}))
    cmd = ["train", "--config", str(tmp_path / "cfg.json"), "--device", "cpu"]
    assert main([*cmd, "--steps", "4", "--out", str(tmp_path / "a")]) == 0
    assert main([*cmd, "--steps", "2", "--out", str(tmp_path / "b")]) == 0
    assert main([*cmd, "--steps", "4", "--out", str(tmp_path / "b")]) == 0  # resumes at step 2
    ta, _ = load_checkpoint(tmp_path / "a")
    tb, _ = load_checkpoint(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert "model.blocks.0.mlp.experts.2.fc2.weight" in ta and "model.blocks.0.mlp.router.weight" in ta
    logs = [[json.loads(line) for line in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab"]
    assert [e["aux_loss"] for e in logs[0]] == [e["aux_loss"] for e in logs[1]][-4:]
    denoiser, _ = load_denoiser(tmp_path / "a")
    c = denoiser.net.config
    assert (c.moe_experts, c.num_classes, c.in_channels, c.sample_size) == (3, 10, 1, 8)
    assert main(["sample", "--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / "s.png"), "--steps", "2",
                 "--num", "4", "--device", "cpu"]) == 0


@pytest.mark.parametrize("field,value,phrase", [("moe_experts", -1, "moe_experts=-1"), ("moe_top_k", 5, "moe_top_k=5"),
                                                ("moe_capacity_factor", 0.0, "moe_capacity_factor=0.0"),
                                                ("moe_mlp_ratio", -2.0, "moe_mlp_ratio=-2.0"),
                                                ("moe_aux_alpha", float("nan"), "moe_aux_alpha=nan")])
def test_bad_moe_fields_are_named(field, value, phrase):
    with pytest.raises(ValueError, match=phrase):
        dataclasses.replace(MOE, **{field: value})


def test_memory_command_takes_moe_dit_presets(capsys):
    assert main(["memory", "--preset", "moe-dit:digits", "--batch-size", "2", "--image-size", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "moe-dit:digits" in out and "activations" in out
