"""The GAN baseline (difflab.nn.gan): shapes, per-sample determinism, the same run from the same seed,
the losses on closed-form scores, and a short run that measurably improves the generator."""
import pytest
import torch

from difflab.data import load_digits
from difflab.nn.gan import GANConfig, build_gan, gan_losses, sample_gan, train_gan

SMALL = GANConfig(latent_dim=8, channels=16)
IMAGES, LABELS = load_digits(split="train")


def test_shapes_and_range():
    gen, disc = build_gan(SMALL, seed=0)
    x = sample_gan(gen, torch.arange(10), seed=0)
    assert x.shape == (10, 1, 8, 8) and x.abs().max() <= 1
    assert disc(x, torch.arange(10)).shape == (10,)


def test_a_sample_depends_on_its_seed_and_index_not_the_batch():
    gen, _ = build_gan(SMALL, seed=0)
    labels = torch.arange(12) % 10
    whole = sample_gan(gen, labels, seed=3)
    assert torch.allclose(whole, sample_gan(gen, labels, seed=3, batch_size=5), atol=1e-6)
    assert not torch.allclose(whole, sample_gan(gen, labels, seed=4))


def test_the_losses_on_known_scores():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    d, g = gan_losses(real, fake, "hinge")
    assert d.item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2) and g.item() == pytest.approx(1.0)
    d, g = gan_losses(real, fake, "non_saturating")
    sp = torch.nn.functional.softplus
    assert d.item() == pytest.approx((sp(-real).mean() + sp(fake).mean()).item())
    assert g.item() == pytest.approx(sp(-fake).mean().item())


def test_the_same_seed_gives_the_same_run():
    a, _, ha = train_gan(IMAGES, LABELS, SMALL, steps=3, batch_size=8, seed=1, log_every=1)
    b, _, hb = train_gan(IMAGES, LABELS, SMALL, steps=3, batch_size=8, seed=1, log_every=1)
    assert [h["d_loss"] for h in ha] == [h["d_loss"] for h in hb]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_short_run_makes_samples_nearer_the_digits():
    """After 60 updates the generated digits' mean pixel statistics are far nearer the data's than at init."""
    def gap(gen):
        x = sample_gan(gen, LABELS[:400], seed=0)
        return ((x.mean(0) - IMAGES.mean(0)).abs().mean() + (x.std(0) - IMAGES.std(0)).abs().mean()).item()

    before = gap(build_gan(SMALL, seed=0)[0])
    gen, _, history = train_gan(IMAGES, LABELS, SMALL, steps=60, batch_size=16, seed=0, ema_decay=None, log_every=20,
                                lr_g=1e-3, lr_d=2e-3)
    after = gap(gen)
    assert after < 0.5 * before, (before, after)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["d_loss"])) for h in history)
