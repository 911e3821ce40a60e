"""Classifier-free guidance: the limits, the formula, one batched call, negative labels, rescale."""
import pytest
import torch

from difflab.core import Denoiser, VPDiscrete, append_dims, grids
from difflab.guidance import ClassifierFreeGuidance
from difflab.samplers import sample_ddim

F64 = torch.float64
NULL = 10  # the "no class" label


class LabelDenoiser:
    """A denoiser whose output depends on sigma and the class label, recording every call."""

    def __init__(self, shape=(2, 4, 4)):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn((NULL + 1,) + shape, generator=g, dtype=F64)
        self.calls = []

    def __call__(self, x, sigma, *, class_labels, **rest):
        self.calls.append(dict(batch=x.shape[0], sigma=sigma, class_labels=class_labels, **rest))
        s = append_dims(torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]), x.ndim)
        return x / (1 + s**2) + self.table[class_labels] * s / (1 + s)


def setup(B=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 2, 4, 4, generator=g, dtype=F64)
    sigma = torch.rand(B, generator=g, dtype=F64) * 5
    labels = torch.randint(0, NULL, (B,), generator=g)
    return LabelDenoiser(), x, sigma, labels


def test_scale_one_is_the_conditional_and_scale_zero_the_unconditional():
    D, x, sigma, y = setup()
    null = torch.full_like(y, NULL)
    assert torch.equal(ClassifierFreeGuidance(D, 1.0, {"class_labels": NULL})(x, sigma, class_labels=y),
                       D(x, sigma, class_labels=y))
    assert torch.equal(ClassifierFreeGuidance(D, 0.0, {"class_labels": NULL})(x, sigma, class_labels=y),
                       D(x, sigma, class_labels=null))


@pytest.mark.parametrize("scale", [0.5, 3.0, 7.5])
def test_scale_w_is_the_guidance_formula_in_one_batched_call(scale):
    D, x, sigma, y = setup()
    null = torch.full_like(y, NULL)
    d_c, d_u = D(x, sigma, class_labels=y), D(x, sigma, class_labels=null)
    D.calls.clear()
    out = ClassifierFreeGuidance(D, scale, {"class_labels": NULL})(x, sigma, class_labels=y)
    torch.testing.assert_close(out, d_u + scale * (d_c - d_u), rtol=1e-12, atol=1e-12)
    assert len(D.calls) == 1 and D.calls[0]["batch"] == 10
    assert torch.equal(D.calls[0]["class_labels"], torch.cat([y, null]))
    assert torch.equal(D.calls[0]["sigma"], torch.cat([sigma, sigma]))


def test_negative_labels_are_the_unconditional_branch():
    D, x, sigma, y = setup()
    negative = (y + 3) % NULL
    d_c, d_n = D(x, sigma, class_labels=y), D(x, sigma, class_labels=negative)
    out = ClassifierFreeGuidance(D, 4.0, {"class_labels": negative})(x, sigma, class_labels=y)
    torch.testing.assert_close(out, d_n + 4.0 * (d_c - d_n), rtol=1e-12, atol=1e-12)


def test_scalar_sigma_shared_and_broadcast_keywords():
    D, x, _, y = setup()
    context = torch.randn(5, 3, dtype=F64)
    null_context = torch.zeros(1, 3, dtype=F64)  # one null embedding for the whole batch
    cfg = ClassifierFreeGuidance(D, 2.0, {"class_labels": NULL, "context": null_context})
    cfg(x, 1.5, class_labels=y, context=context, mask=torch.ones(5, 4), note="kept")
    call = D.calls[-1]
    assert torch.equal(call["sigma"], torch.full((10,), 1.5, dtype=F64))
    assert torch.equal(call["context"], torch.cat([context, null_context.expand(5, 3)]))
    assert torch.equal(call["mask"], torch.ones(10, 4)) and call["note"] == "kept"
    with pytest.raises(ValueError, match="context"):
        cfg(x, 1.5, class_labels=y)
    with pytest.raises(ValueError, match="guidance_rescale"):
        ClassifierFreeGuidance(D, 2.0, {}, guidance_rescale=2.0)


def reference_rescale(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' ``rescale_noise_cfg`` (pipeline_stable_diffusion.py, 0.42.1), copied as the reference."""
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def test_guidance_rescale():
    D, x, sigma, y = setup()
    null = torch.full_like(y, NULL)
    d_c, d_u = D(x, sigma, class_labels=y), D(x, sigma, class_labels=null)
    guided = d_u + 6.0 * (d_c - d_u)
    plain = ClassifierFreeGuidance(D, 6.0, {"class_labels": NULL})(x, sigma, class_labels=y)
    assert torch.equal(ClassifierFreeGuidance(D, 6.0, {"class_labels": NULL}, guidance_rescale=0.0)(
        x, sigma, class_labels=y), plain)
    full = ClassifierFreeGuidance(D, 6.0, {"class_labels": NULL}, guidance_rescale=1.0)(x, sigma, class_labels=y)
    dims = [1, 2, 3]
    torch.testing.assert_close(full.std(dims), d_c.std(dims), rtol=1e-12, atol=0)
    assert not torch.allclose(plain.std(dims), d_c.std(dims), rtol=1e-3)  # guidance did inflate it
    part = ClassifierFreeGuidance(D, 6.0, {"class_labels": NULL}, guidance_rescale=0.7)(x, sigma, class_labels=y)
    torch.testing.assert_close(part, reference_rescale(guided, d_c, 0.7), rtol=1e-12, atol=1e-12)


def test_guided_sampling_through_a_wrapped_network():
    """CFG around a core.Denoiser, inside a sampler: scale 1 reproduces unguided sampling."""
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(NULL + 1, 2, 4, 4, generator=g, dtype=F64)

    def net(x_in, t, class_labels):  # an eps-predicting "network"
        return 0.5 * x_in + emb[class_labels] * append_dims(t / 1000, x_in.ndim)

    frame = VPDiscrete.from_name("linear", 1000)
    D = Denoiser(net, frame, "eps")
    sigmas = grids.timestep_sigmas(frame, grids.discrete_timesteps(1000, 10, "trailing"))
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=F64) * D.prior_std(sigmas[0])
    args = {"extra_args": {"class_labels": torch.tensor([0, 4, 9])}}
    plain = sample_ddim(D, x, sigmas, **args)
    assert torch.equal(sample_ddim(ClassifierFreeGuidance(D, 1.0, {"class_labels": NULL}), x, sigmas, **args), plain)
    guided = sample_ddim(ClassifierFreeGuidance(D, 3.0, {"class_labels": NULL}), x, sigmas, **args)
    assert guided.shape == plain.shape and torch.isfinite(guided).all() and not torch.allclose(guided, plain)


def test_guided_x0_and_v_takes_v_from_the_conditional_branch():
    from difflab.core import Denoiser, VPDiscrete
    from difflab.guidance import ClassifierFreeGuidance

    class Net(torch.nn.Module):  # eps and a label-dependent variance channel, 2C outputs
        def forward(self, x, t, class_labels=None):
            lab = class_labels.to(x.dtype).reshape(-1, 1, 1)
            return torch.cat([0.1 * x * (1 + lab), torch.tanh(lab - 1).expand_as(x)], dim=1)

    d = Denoiser(Net(), VPDiscrete.from_name("linear", 100), "eps", learned_variance=True).double()
    x = torch.randn(3, 1, 4, dtype=torch.float64)
    sigma = torch.full((3,), 2.0, dtype=torch.float64)
    cond, null = torch.tensor([2, 3, 4]), torch.zeros(3, dtype=torch.long)
    cfg = ClassifierFreeGuidance(d, 2.5, uncond={"class_labels": null})
    x0, v = cfg.x0_and_v(x, sigma, class_labels=cond)
    x0_c, v_c = d.x0_and_v(x, sigma, class_labels=cond)
    x0_u, _ = d.x0_and_v(x, sigma, class_labels=null)
    torch.testing.assert_close(x0, x0_u + 2.5 * (x0_c - x0_u))
    torch.testing.assert_close(v, v_c)
    torch.testing.assert_close(cfg(x, sigma, class_labels=cond), x0)
