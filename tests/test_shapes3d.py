"""3-D generation: procedural shapes, the point transformer, point-cloud metrics, PLY files, the
voxel renderer's gradient and score distillation."""
from __future__ import annotations

import math

import pytest
import torch

from difflab.data.shapes3d import CLASSES, load_shapes3d, make_shape
from difflab.eval.point_judge import PointJudge, PointJudgeConfig
from difflab.eval.point_metrics import chamfer, coverage, emd, mmd, one_nna, pairwise_chamfer, shape_set_metrics, sinkhorn_emd
from difflab.io.ply import read_ply, write_ply
from difflab.io.spec import build_denoiser, load_denoiser, make_spec, sample_shape
from difflab.nn.point_transformer import PointTransformer, PointTransformerConfig, VectorAttention, knn_indices
from difflab.nn.voxels import VoxelGrid, orbit_rays, render, render_views
from difflab.pipelines.points import fit_gaussians, gaussian_points, generate_points
from difflab.pipelines.score_distillation import SDSConfig, View, distill_views, sds_gradient
from difflab.train import TrainConfig, train

# ----------------------------------------------------------------------------------------------
# data


def test_shapes_are_seeded_on_the_surface_and_splits_differ():
    a, la = load_shapes3d("train", per_class=2, num_points=64)
    b, _ = load_shapes3d("train", per_class=3, num_points=64)
    t, _ = load_shapes3d("test", per_class=2, num_points=64)
    assert a.shape == (2 * len(CLASSES), 64, 3) and la.tolist() == [c for c in range(10) for _ in range(2)]
    assert torch.equal(a[0:2], b[0:2])                               # shape i never depends on how many are asked
    assert not torch.allclose(a, t)                                  # the held-out split is other shapes
    r = a.norm(dim=-1).amax(1)
    assert bool(((r > 0.59) & (r < 0.951)).all())                    # farthest point at the drawn radius
    s = make_shape(0, 500, seed=3)
    assert torch.allclose(s.norm(dim=1), s.norm(dim=1).max().expand(500), atol=1e-5)  # a sphere's points on its surface
    with pytest.raises(ValueError, match="split"):
        load_shapes3d("val")


# ----------------------------------------------------------------------------------------------
# metrics against hand-computed cases


def test_chamfer_and_emd_by_hand():
    a = torch.tensor([[0.0, 0, 0]])
    b = torch.tensor([[1.0, 0, 0], [0, 2, 0]])
    assert float(chamfer(a, b)) == pytest.approx(1.0 + (1 + 4) / 2)      # a->b: 1; b->a: mean(1, 4)
    x = make_shape(3, 50, seed=1)
    assert float(chamfer(x, x)) == 0.0
    assert float(chamfer(x, x[torch.randperm(50)])) == 0.0
    assert emd(x, x[torch.randperm(50)]) == pytest.approx(0.0, abs=1e-7)
    p = torch.tensor([[0.0, 0, 0], [1, 0, 0]])
    q = torch.tensor([[1.0, 1, 0], [0, 1, 0]])
    assert emd(p, q) == pytest.approx(1.0)                               # match straight up, not across (sqrt 2)
    assert sinkhorn_emd(p, q) == pytest.approx(1.0, rel=0.05)


def test_set_metrics_by_hand():
    # one-point "clouds" on a line; D = |u - v|^2 * 2 (Chamfer of single points)
    def clouds(xs):
        return torch.tensor([[[float(v), 0.0, 0.0]] for v in xs])
    g, r = clouds([0, 1, 10, 30]), clouds([11, 20, 21, 31])
    d_gr, d_gg, d_rr = pairwise_chamfer(g, r), pairwise_chamfer(g, g), pairwise_chamfer(r, r)
    # nearest of 0 is 1 (own), of 1 is 0 (own), of 10 is 11 (other), of 30 is 31 (other); and so for r: 4 of 8
    assert one_nna(d_gg, d_gr, d_rr) == 0.5
    # the generated nearest to each reference: 10 for 11 (1), 10 for 20 (100), 30 for 21 (81), 30 for 31 (1)
    assert mmd(d_gr) == pytest.approx(2 * (1 + 100 + 81 + 1) / 4)
    # nearest references of 0, 1, 10, 30: 11, 11, 11, 31 -> 2 of 4 covered
    assert coverage(d_gr) == 0.5
    # identical sets: Chamfer 0 to the copy, full coverage, and 1-NNA 0% (every sample's nearest is its copy)
    x, _ = load_shapes3d("test", per_class=1, num_points=32)
    m = shape_set_metrics(x, x.clone())
    assert m["mmd"] == 0.0 and m["cov"] == 1.0 and m["1nna"] == 0.0
    # far apart sets: 100%
    assert shape_set_metrics(x, x + 5.0)["1nna"] == 1.0


def test_one_nna_is_near_half_for_two_samples_of_one_distribution():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 1, 3, generator=g), torch.randn(200, 1, 3, generator=g)
    m = shape_set_metrics(a, b)
    assert 0.4 < m["1nna"] < 0.6 and m["cov"] > 0.4
    far = shape_set_metrics(a, b * 0.2)                               # a collapsed set is told apart and covers less
    assert far["1nna"] > 0.7 and far["cov"] < m["cov"]


# ----------------------------------------------------------------------------------------------
# the point transformer


@pytest.mark.parametrize("inducing,knn,local", [(0, 0, "vector_attention"), (4, 0, "vector_attention"),
                                                (4, 6, "vector_attention"), (4, 6, "edgeconv")])
def test_point_transformer_is_permutation_equivariant(inducing, knn, local):
    torch.manual_seed(0)
    net = PointTransformer(PointTransformerConfig(num_points=40, width=32, depth=2, num_heads=4, num_inducing=inducing,
                                                  num_classes=3, knn=knn, local=local)).double()
    for p in net.parameters():                                        # leave the zero-initialized identity
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(2, 40, 3, dtype=torch.float64), torch.tensor([3.0, 500.0]), torch.tensor([0, 2])
    perm = torch.randperm(40)
    out = net(x, t, class_labels=y)
    assert torch.allclose(net(x[:, perm], t, class_labels=y), out[:, perm], atol=1e-10)
    assert not torch.allclose(out[:, perm], out)                      # the output is per point, not a constant
    assert not torch.allclose(net(x, t, class_labels=torch.tensor([1, 2])), out)   # the class is heard
    other = x.clone()
    other[0, 0] += 1.0                                                # moving one point changes the others' outputs
    assert not torch.allclose(net(other, t, class_labels=y)[0, 1:], out[0, 1:])


def test_vector_attention_is_eq3_of_point_transformer():
    """The factorized layer equals Zhao et al. 2021, eq. 3 written out over the gathered neighbours,
    and reads only the k nearest: moving a point outside a neighbourhood leaves that point's output."""
    torch.manual_seed(0)
    m = VectorAttention(16, share=4).double()
    x, p = torch.randn(2, 20, 16, dtype=torch.float64), torch.randn(2, 20, 3, dtype=torch.float64)
    idx = knn_indices(p, 5)
    assert (idx[..., 0] == torch.arange(20)).all()                    # itself first
    q, k, v = m.qkv(x).chunk(3, -1)
    nb = lambda f: torch.stack([f[b][idx[b]] for b in range(2)])      # (B, N, k, C)
    delta = m.theta2(torch.relu(m.theta1(p[:, :, None] - nb(p))))
    w = m.gamma2(torch.relu(m.gamma1(q[:, :, None] - nb(k) + delta))).softmax(2)
    ref = m.out(((nb(v) + delta).reshape(2, 20, 5, 4, 4) * w[:, :, :, None]).sum(2).reshape(2, 20, 16))
    out = m(x, p, idx)
    assert torch.allclose(out, ref, atol=1e-12)
    far = next(j for j in range(20) if j not in idx[0, 0])
    x2 = x.clone()
    x2[0, far] += 1.0
    assert torch.allclose(m(x2, p, idx)[0, 0], out[0, 0]) and not torch.allclose(m(x2, p, idx)[0, far], out[0, far])


def test_point_transformer_without_knn_loads_old_configs():
    old = {k: v for k, v in PointTransformerConfig(width=8, depth=1, num_heads=2).to_dict().items()
           if k not in ("knn", "local", "local_blocks")}
    c = PointTransformerConfig.from_dict(old)
    assert c.knn == 0 and all(b.local is None for b in PointTransformer(c).blocks)
    net = PointTransformer(PointTransformerConfig(width=8, depth=3, num_heads=2, knn=4, local_blocks=1))
    assert [b.local is not None for b in net.blocks] == [True, False, False]


def test_point_diffusion_trains_saves_loads_and_samples(tmp_path):
    pts, labels = load_shapes3d("train", per_class=4, num_points=32, classes=[0, 1])
    cfg = PointTransformerConfig(num_points=32, width=32, depth=1, num_heads=2, num_inducing=8, num_classes=10)
    spec = make_spec("point_transformer", cfg, {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "v"})
    den = build_denoiser(spec, seed=0)
    state = train(den, (pts, labels), TrainConfig(steps=3, batch_size=4, lr=1e-3, cfg_dropout=0.1, checkpoint_every=0,
                                                  log_every=0, progress=False), tmp_path / "run", spec=spec,
                  metadata={"num_points": 32}, resume=False)
    assert state.step == 3
    loaded, meta = load_denoiser(tmp_path / "run")
    assert sample_shape(meta["spec"], meta) == (32, 3)
    a = generate_points(loaded, [0, 1, 1], num_points=32, steps=3, guidance_scale=2.0, seed=5, batch_size=3, progress=False,
                        ply_dir=tmp_path / "ply")
    b = generate_points(loaded, [0, 1, 1], num_points=32, steps=3, guidance_scale=2.0, seed=5, batch_size=1, progress=False)
    assert a.shape == (3, 32, 3) and torch.allclose(a, b, atol=1e-5)   # per-cloud noise: batch size changes nothing
    assert torch.allclose(read_ply(tmp_path / "ply" / "cloud_0001.ply"), a[1])
    with pytest.raises(ValueError, match="num_points"):
        generate_points(loaded, [0], num_points=0)


def test_gaussian_baseline_and_ply_round_trip(tmp_path):
    pts, labels = load_shapes3d("train", per_class=3, num_points=64, classes=[0, 4])
    means, covs = fit_gaussians(pts, labels, 10)
    x = gaussian_points(means, covs, [4, 4], 2000)
    assert torch.allclose(x[0].mean(0), means[4], atol=0.05)
    assert torch.allclose(torch.cov(x[0].T), covs[4], atol=0.05)
    write_ply(tmp_path / "a.ply", x[0][:10], colors=torch.rand(10, 3))
    write_ply(tmp_path / "b.ply", x[0][:10], binary=False)
    assert torch.allclose(read_ply(tmp_path / "a.ply"), x[0][:10]) and torch.allclose(read_ply(tmp_path / "b.ply"), x[0][:10], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        write_ply(tmp_path / "c.ply", torch.zeros(4, 2))


def test_point_judge_is_order_invariant_and_learns():
    pts, labels = load_shapes3d("train", per_class=12, num_points=64, classes=[0, 1, 8])
    held, held_labels = load_shapes3d("test", per_class=8, num_points=64, classes=[0, 1, 8])
    judge = PointJudge.fit(pts, labels, PointJudgeConfig(widths=(32, 64), feature_dim=32, epochs=60, batch_size=12, lr=5e-3))
    assert torch.allclose(judge.logits(held), judge.logits(held[:, torch.randperm(64)]), atol=1e-5)
    assert judge.accuracy(held, held_labels) > 0.8                      # sphere, cube and ring, from 12 shapes each


# ----------------------------------------------------------------------------------------------
# the renderer and score distillation


def test_renderer_gradient_matches_finite_differences():
    torch.manual_seed(0)
    grid = VoxelGrid(4, density_scale=3.0).double()
    with torch.no_grad():
        grid.raw_density.normal_(0, 1.0)
        grid.raw_colour.normal_(0, 1.0)
    for perspective in (False, True):
        o, d = orbit_rays(torch.tensor([20.0, 100.0]), torch.tensor([10.0, -5.0]), 3, perspective=perspective, dtype=torch.float64)
        weights = torch.randn(2, 1, 3, 3, dtype=torch.float64)

        def f():
            density, colour = grid()
            i, a = render(density, colour, o, d, samples=16)
            return (weights * i).sum() + (weights * a).sum() ** 2

        grid.zero_grad()
        f().backward()
        for param in (grid.raw_density, grid.raw_colour):
            flat = param.data.view(-1)
            for k in torch.randperm(flat.numel())[:6].tolist():
                old = flat[k].item()
                flat[k] = old + 1e-6
                up = f().item()
                flat[k] = old - 1e-6
                down = f().item()
                flat[k] = old
                assert param.grad.view(-1)[k].item() == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-8)


def test_renderer_by_hand():
    # a uniform grid of density s: a ray crossing the cube (length 2) front to back has opacity 1 - exp(-2 s)
    grid = VoxelGrid(4, density_scale=1.0)
    with torch.no_grad():
        grid.raw_density.fill_(math.log(math.expm1(0.5)))
        grid.raw_colour.fill_(10.0)
    o, d = orbit_rays(torch.tensor([0.0]), torch.tensor([0.0]), 2, extent=0.5, dtype=torch.float32)
    density, colour = grid()
    _, alpha = render(density, colour, o, d, samples=400)
    assert torch.allclose(alpha, torch.full_like(alpha, 1 - math.exp(-1.0)), atol=0.01)
    # front and side views see different faces: an opaque bar along x is wide from the front, a dot from the side
    bar = VoxelGrid(8, init_density=1e-4)
    with torch.no_grad():
        bar.raw_density[0, 0, 3:5, 3:5, :] = 5.0
    front, side = render_views(bar, torch.tensor([0.0, 90.0]), torch.zeros(2), 8)
    assert (front[0] > 0).sum() > 2 * (side[0] > 0).sum()


def test_sds_gradient_points_from_the_render_to_the_prior():
    class Constant(torch.nn.Module):   # a denoiser whose x0_hat is always `target`
        def __init__(self, target):
            super().__init__()
            self.target, self.net = target, torch.nn.Identity()

        def forward(self, x, sigma, class_labels=None):
            return self.target.expand_as(x)

    target = torch.zeros(1, 1, 2, 2)
    x = torch.ones(3, 1, 2, 2)
    g = sds_gradient(Constant(target), x, torch.zeros(3, dtype=torch.long), torch.tensor([0.5, 1.0, 2.0]), torch.randn(3, 1, 2, 2))
    assert torch.allclose(g, torch.ones_like(g) / torch.tensor([1.25, 2.0, 5.0]).sqrt().reshape(3, 1, 1, 1))


def test_distill_views_makes_renders_match_a_fixed_prior():
    # with a prior whose x0_hat is an opaque square in front and a bar from the side, SDS descends towards them
    class Target(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Identity()
            self.net.config = type("C", (), {"num_classes": 2})()
            self.images = -torch.ones(2, 1, 8, 8)
            self.images[0, :, 2:6, 2:6] = 1.0
            self.images[1, :, 2:6, 3:5] = 1.0

        def forward(self, x, sigma, class_labels=None):
            return self.images[class_labels.clamp(max=1)]

    views = [View(0, 0, 0), View(90, 0, 1)]
    grid, hist = distill_views(Target(), views, SDSConfig(steps=60, views_per_step=2, jitter=0.0, guidance_scale=1.0, lr=0.1))
    x = render_views(grid, torch.tensor([0.0, 90.0]), torch.zeros(2), 8)
    target = Target().images
    assert (x - target).abs().mean() < 0.5 * (render_views(VoxelGrid(16), torch.tensor([0.0, 90.0]), torch.zeros(2), 8) - target).abs().mean()
    with pytest.raises(ValueError, match="labels"):
        distill_views(Target(), [View(0, 0, 5)], SDSConfig(steps=1))


# ----------------------------------------------------------------------------------------------
# the demo, tiny


def test_tiny_3d_demo_runs_end_to_end(tmp_path, monkeypatch):
    import difflab.demos.shapes3d as demo
    from difflab.eval.point_judge import PointJudgeConfig as JC
    monkeypatch.setattr(demo, "TRAIN_PER_CLASS", 3)
    monkeypatch.setattr(demo.PointJudge, "fit", classmethod(lambda cls, x, y, config=JC(): cls(config).eval()))
    monkeypatch.setattr(demo.DigitsJudge, "load_or_train", classmethod(lambda cls, path=None: cls().eval()))  # untrained: fast
    report = demo.run_shapes3d_demo(tmp_path, steps=2, sampling_steps=2, samples_per_class=2, num_points=16, prior_steps=2,
                                    sds_steps=2, pairs=((3, 7),), progress=False)
    rows = report["points"]["per_class"]
    assert len(rows) == 10 and all(0 <= r["gen"]["1nna"] <= 1 and 0 <= r["real"]["cov"] <= 1 for r in rows)
    # each generated cloud is read as its class or counted once among the confusions
    assert all(round(r["judge"] * 2) + sum(r["read_as"].values()) == 2 and r["class"] not in r["read_as"] for r in rows)
    assert report["sds"]["pairs"][0]["n"] == 26
    for name in ("point_views.png", "points_turntable.gif", "sds_views.png", "sds_turntable.gif", "report.json",
                 "ply/sphere_000.ply"):
        assert (tmp_path / name).is_file(), name


def test_3d_cli_passes_the_demo_guidance_default_and_an_override(tmp_path, monkeypatch):
    """`difflab demo --3d` samples the point clouds at POINTS_GUIDANCE (1.5) unless --guidance is given."""
    import difflab.cli.demo as cli_demo
    from difflab.cli import main
    from difflab.demos.shapes3d import POINTS_GUIDANCE
    seen = []
    monkeypatch.setattr(cli_demo, "run_shapes3d_demo", lambda out, **kw: seen.append(kw["guidance_scale"]) or {})
    main(["demo", "--3d", "--skip-sds", "--out-dir", str(tmp_path / "a")])
    main(["demo", "--3d", "--skip-sds", "--guidance", "2", "--out-dir", str(tmp_path / "b")])
    assert seen == [POINTS_GUIDANCE, 2.0] and POINTS_GUIDANCE == 1.5
