"""Safety and reward guidance: exact removal of a mixture component, the negative form, the sampled
rate of the unwanted component, and reward gradients through the denoiser."""
import pytest
import torch

from difflab.core import grids
from difflab.guidance import RewardGuidance, SafetyGuidance
from difflab.guidance.safety import unwanted_log_probs
from difflab.oracle import GaussianMixture, MixtureClassifier
from difflab.samplers import sample_ddim

F64 = torch.float64


def mixture():
    return GaussianMixture.random(dim=3, components=4, seed=3, mean_scale=1.0)  # well-separated components


def without(gm, unwanted):
    """The mixture with the unwanted components removed and the weights renormalised."""
    keep = [k for k in range(len(gm.weights)) if k not in unwanted]
    w = gm.weights[keep]
    return GaussianMixture(w / w.sum(), gm.means[keep], gm.covs[keep])


def setup(B=6):
    g = torch.Generator().manual_seed(1)
    return 1.5 * torch.randn(B, 3, generator=g, dtype=F64), torch.tensor([0.05, 0.3, 0.3, 1.0, 2.5, 8.0], dtype=F64)


@pytest.mark.parametrize("unwanted", [[1], [0, 2]])
def test_complement_scale_one_is_the_exact_denoiser_of_the_data_without_the_unwanted_classes(unwanted):
    gm = mixture()
    x, sigma = setup()
    guided = SafetyGuidance(gm.denoiser, MixtureClassifier(gm), unwanted, 1.0)(x, sigma)
    torch.testing.assert_close(guided, without(gm, unwanted).denoiser(x, sigma), rtol=0, atol=1e-10)
    assert (guided - gm.denoiser(x, sigma)).abs().max() > 0.05


def test_negative_mode_pushes_away_from_the_unwanted_component_denoiser():
    """sigma^2 grad log p(c | x) = E[x0 | x, c] - E[x0 | x], so negative guidance is D - s (D_c - D)."""
    gm = mixture()
    x, sigma = setup()
    guided = SafetyGuidance(gm.denoiser, MixtureClassifier(gm), 2, 1.5, mode="negative")(x, sigma)
    base = gm.denoiser(x, sigma)
    d_c = GaussianMixture([1.0], gm.means[2:3], gm.covs[2:3]).denoiser(x, sigma)
    torch.testing.assert_close(guided, base - 1.5 * (d_c - base), rtol=0, atol=1e-10)
    assert torch.equal(SafetyGuidance(gm.denoiser, MixtureClassifier(gm), 2, 0.0)(x, sigma), base)


def test_safety_guidance_lowers_the_sampled_rate_of_the_unwanted_component_by_a_large_factor():
    """The complement form removes the component and leaves the rest of the data as it was; the
    negative form lowers the rate too, but throws samples off the data (the NLL under the mixture
    without the component explodes)."""
    gm = GaussianMixture([0.3, 0.4, 0.3], torch.tensor([[-2.0, 0.0], [0.0, 1.5], [2.0, 0.0]], dtype=F64),
                         torch.tensor([0.2, 0.2, 0.2], dtype=F64) ** 2)
    rest = without(gm, [1])
    sigmas = grids.karras_sigmas(30, 0.01, 40.0)
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 40.0

    def rate_and_nll(model):
        out = sample_ddim(model, x, sigmas)
        return float((MixtureClassifier(gm)(out, 1e-3).argmax(1) == 1).double().mean()), rest.mean_nll(out)

    truth_nll = rest.mean_nll(rest.sample(2000, torch.Generator().manual_seed(1)))
    unguided, _ = rate_and_nll(gm.denoiser)
    complement, complement_nll = rate_and_nll(SafetyGuidance(gm.denoiser, MixtureClassifier(gm), 1, 1.0))
    negative, negative_nll = rate_and_nll(SafetyGuidance(gm.denoiser, MixtureClassifier(gm), 1, 1.0, mode="negative"))
    assert abs(unguided - 0.4) < 0.05
    assert complement < unguided / 20 and abs(complement_nll - truth_nll) < 0.2
    assert negative < unguided / 2 and negative_nll > truth_nll + 10


def test_safety_guidance_checks_its_arguments():
    gm = mixture()
    x, sigma = setup()
    with pytest.raises(ValueError, match="mode"):
        SafetyGuidance(gm.denoiser, MixtureClassifier(gm), 1, 1.0, mode="other")
    with pytest.raises(ValueError, match="not among"):
        SafetyGuidance(gm.denoiser, MixtureClassifier(gm), 7, 1.0)(x, sigma)


def test_reward_guidance_moves_x0_along_the_reward_gradient():
    """r(x0) = <w, x0>: without the denoiser's Jacobian the shift is s sigma^2 w exactly; through the
    denoiser of N(mu, v I), whose Jacobian is v / (v + sigma^2) I, it is s sigma^2 v / (v + sigma^2) w."""
    v = 0.3
    gm = GaussianMixture([1.0], torch.tensor([[0.5, -1.0, 2.0]], dtype=F64), torch.tensor([v], dtype=F64))
    x, sigma = setup()
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    reward = lambda x0: x0 @ w  # noqa: E731
    base = gm.denoiser(x, sigma)
    s2 = sigma[:, None] ** 2
    direct = RewardGuidance(gm.denoiser, reward, 0.7, through_denoiser=False)(x, sigma)
    torch.testing.assert_close(direct, base + 0.7 * s2 * w, rtol=0, atol=1e-12)
    through = RewardGuidance(gm.denoiser, reward, 0.7)(x, sigma)
    torch.testing.assert_close(through, base + 0.7 * s2 * v / (v + s2) * w, rtol=0, atol=1e-12)
    assert torch.equal(RewardGuidance(gm.denoiser, reward, 0.0)(x, sigma), base)


def test_reward_guidance_with_a_log_probability_reward_raises_it():
    """A reward that is the clean classifier's log p(not c | x0) raises that probability of x0_hat."""
    gm = mixture()
    g = torch.Generator().manual_seed(2)
    x = gm.means[1] + 0.3 * torch.randn(8, 3, generator=g, dtype=F64)  # near the unwanted component
    sigma = torch.full((8,), 0.5, dtype=F64)
    clean, unwanted = MixtureClassifier(gm), torch.tensor([False, True, False, False])

    def reward(x0):
        return unwanted_log_probs(clean(x0, 1e-3), unwanted)[1]

    base = gm.denoiser(x, sigma)
    guided = RewardGuidance(gm.denoiser, reward, 0.05)(x, sigma)
    assert bool((reward(guided) > reward(base)).all())
    assert float((reward(guided) - reward(base)).mean()) > 0.1
