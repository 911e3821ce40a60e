"""Classifier guidance: the base at scale 0, exact conditioning on the Gaussian-mixture oracle,
the guidance interval, a trained noise-aware classifier steering a sampler."""
import pytest
import torch

from difflab.core import VE, Denoiser, Flow, VPDiscrete, append_dims, grids
from difflab.guidance import ClassifierConfig, ClassifierGuidance, NoisyClassifier
from difflab.oracle import GaussianMixture, MixtureClassifier
from difflab.samplers import sample_ddim
from difflab.train import train_classifier

F64 = torch.float64


def mixture(dim=3, components=3, seed=0):
    return GaussianMixture.random(dim=dim, components=components, seed=seed)


def component(gm, k):
    """The mixture's k-th component alone: its exact denoiser is E[x0 | x, y = k]."""
    return GaussianMixture([1.0], gm.means[k:k + 1], gm.covs[k:k + 1])


def setup(B=6, dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(B, dim, generator=g, dtype=F64)
    sigma = torch.tensor([0.05, 0.3, 0.3, 1.0, 2.5, 8.0], dtype=F64)[:B]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])[:B]
    return x, sigma, labels


class Unconditional:
    """A denoiser that refuses class labels, recording its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, sigma, **cond):
        assert "class_labels" not in cond, "the label must not reach an unconditional denoiser"
        self.calls.append(cond)
        return self.inner(x, sigma)


def test_scale_zero_is_the_base_denoiser_and_the_label_reaches_only_the_classifier():
    gm = mixture()
    x, sigma, y = setup()
    D = Unconditional(gm.denoiser)
    assert torch.equal(ClassifierGuidance(D, MixtureClassifier(gm), 0.0)(x, sigma, class_labels=y), gm.denoiser(x, sigma))
    guided = ClassifierGuidance(D, MixtureClassifier(gm), 2.0)(x, sigma, class_labels=y, note="kept")
    assert D.calls[-1] == {"note": "kept"}
    assert (guided - gm.denoiser(x, sigma)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="class_labels"):
        ClassifierGuidance(D, MixtureClassifier(gm), 1.0)(x, sigma)


@pytest.mark.parametrize("frame,prediction", [(VPDiscrete.from_name("linear"), "eps"), (VE(time="sigma"), "x0"), (Flow(), "flow")])
def test_scale_one_on_the_mixture_is_the_exact_denoiser_of_the_asked_component(frame, prediction):
    """D + sigma^2 grad log p(y | x, sigma) = E[x0 | x, y] exactly (Bayes + Tweedie), whatever frame
    the unconditional model works in."""
    gm = mixture()
    x, sigma, y = setup()
    denoiser = Denoiser(gm.network(frame, prediction), frame, prediction)
    guided = ClassifierGuidance(denoiser, MixtureClassifier(gm), 1.0)(x, sigma, class_labels=y)
    exact = torch.cat([component(gm, int(k)).denoiser(x[i:i + 1], sigma[i:i + 1]) for i, k in enumerate(y)])
    torch.testing.assert_close(guided, exact, rtol=0, atol=1e-9)
    # and it is far from the unconditional denoiser, so the test can fail
    assert (exact - gm.denoiser(x, sigma)).abs().max() > 0.1


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_scale_s_moves_s_times_towards_the_component_denoiser(scale):
    """sigma^2 grad log p(y | x) = E[x0 | x, y] - E[x0 | x] on the oracle, so guidance is linear in s."""
    gm = mixture()
    x, sigma, y = setup()
    guided = ClassifierGuidance(gm.denoiser, MixtureClassifier(gm), scale)(x, sigma, class_labels=y)
    base = gm.denoiser(x, sigma)
    exact = torch.cat([component(gm, int(k)).denoiser(x[i:i + 1], sigma[i:i + 1]) for i, k in enumerate(y)])
    torch.testing.assert_close(guided, base + scale * (exact - base), rtol=0, atol=1e-10)


def test_sigma_max_guides_only_the_levels_below_it():
    gm = mixture()
    x, sigma, y = setup()
    guided = ClassifierGuidance(gm.denoiser, MixtureClassifier(gm), 1.0, sigma_max=1.0)(x, sigma, class_labels=y)
    full = ClassifierGuidance(gm.denoiser, MixtureClassifier(gm), 1.0)(x, sigma, class_labels=y)
    low = sigma <= 1.0
    torch.testing.assert_close(guided[low], full[low], rtol=0, atol=1e-12)
    assert torch.equal(guided[~low], gm.denoiser(x, sigma)[~low])
    assert (full[~low] - guided[~low]).abs().max() > 1e-3


def test_pass_label_hands_the_label_to_a_conditional_denoiser_too():
    gm = mixture()
    x, sigma, y = setup()
    seen = []

    def conditional(x, sigma, class_labels):
        seen.append(class_labels)
        return gm.denoiser(x, sigma)

    ClassifierGuidance(conditional, MixtureClassifier(gm), 1.0, pass_label=True)(x, sigma, class_labels=y)
    assert torch.equal(seen[-1], y)


def two_prototypes():
    """Two 8x8 images: bright top half (class 0) or bright bottom half (class 1)."""
    top = -torch.ones(1, 8, 8, dtype=torch.float32)
    top[:, :4] = 1.0
    return torch.stack([top, top.flip(1)])


def test_a_trained_noisy_classifier_steers_an_unconditional_sampler(tmp_path):
    # 1. Data: the two prototypes plus a little noise; a classifier trained on the VP training noise levels.
    protos = two_prototypes()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat(64)
    images = protos[labels] + 0.1 * torch.randn(128, 1, 8, 8, generator=g)
    frame = VPDiscrete.from_name("cosine", 1000)
    torch.manual_seed(0)
    clf = NoisyClassifier(ClassifierConfig(in_channels=1, num_classes=2, model_channels=8, channel_mult=(1, 2), groups=4))
    train_classifier(clf, images, labels, frame, steps=150, batch_size=64, lr=3e-3, seed=0)

    # 2. It is right at low noise, near chance at high noise, and survives a save/load.
    def accuracy(sigma):
        x = images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return float((clf(x, torch.full((len(x),), sigma)).argmax(1) == labels).float().mean())

    assert accuracy(0.1) > 0.97
    assert 0.25 < accuracy(1e3) < 0.75
    clf.save(tmp_path / "clf.safetensors")
    loaded = NoisyClassifier.load(tmp_path / "clf.safetensors")
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x, torch.full((4,), 0.7)), clf(x, torch.full((4,), 0.7)).detach())

    # 3. Guiding the exact denoiser of the two-prototype mixture towards class 1 inside a no-grad sampler.
    gm = GaussianMixture([0.5, 0.5], protos.reshape(2, -1).double(), torch.full((2,), 0.05**2, dtype=F64))
    dtype_cast = lambda x, sigma, **c: gm.denoiser(x.double(), sigma).float()  # noqa: E731
    sigmas = grids.karras_sigmas(20, 0.01, 40.0).float()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 40.0
    asked = torch.ones(64, dtype=torch.long)

    def share_of_class_1(model, extra):
        out = sample_ddim(model, x, sigmas, extra_args=extra).reshape(64, -1)
        d = torch.cdist(out, protos.reshape(2, -1))
        return float((d.argmin(1) == 1).float().mean())

    unguided = share_of_class_1(dtype_cast, {})
    guided = share_of_class_1(ClassifierGuidance(dtype_cast, clf, 2.0), {"class_labels": asked})
    assert 0.25 < unguided < 0.75
    assert guided > 0.95
    assert all(p.grad is None for p in clf.parameters())  # guidance accumulates no parameter gradients


def test_noisy_classifier_sees_the_canonical_input_scaled_like_a_vp_network():
    """c_in = 1 / sqrt(sigma^2 + sigma_data^2): scaling x and sigma_data together changes nothing."""
    torch.manual_seed(0)
    clf = NoisyClassifier(ClassifierConfig(model_channels=8, groups=4))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    expected = clf(x, sigma)
    c_in = append_dims(1 / (sigma**2 + 1).sqrt(), 4)
    seen = []
    handle = clf.input_conv.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    clf(x, sigma)
    handle.remove()
    torch.testing.assert_close(seen[0], c_in * x)
    assert expected.shape == (3, 10)
