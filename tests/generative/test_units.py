"""Unit tests of the generative pieces that need no Ray: KL, Frechet distance, losses, grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.generative import metrics, models, sampling


def test_kl_is_analytic_and_matches_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mu = torch.randn(4, 6)
    logvar = torch.randn(4, 6).clamp(-2, 2)
    analytic = models.gaussian_kl(mu, logvar)
    # KL(q || p) = E_q[log q(z) - log p(z)], estimated with 200k draws per row.
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(analytic, monte_carlo, rtol=0.02, atol=0.02), (analytic, monte_carlo)
    # And it equals torch's own closed form, and is zero at the prior.
    exact = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(analytic, exact, atol=1e-5)
    assert models.gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0


def test_gaussian_reconstruction_is_the_exact_negative_log_likelihood():
    x = torch.rand(3, 1, 4, 4)
    logits = torch.randn(3, 1, 4, 4)
    nll = models.reconstruction_nll(logits, x, "gaussian", sigma=0.2)
    dist = torch.distributions.Normal(torch.sigmoid(logits), 0.2)
    assert torch.allclose(nll, -dist.log_prob(x).flatten(1).sum(1), atol=1e-4)
    bern = models.reconstruction_nll(logits, (x > 0.5).float(), "bernoulli")
    exact = -torch.distributions.Bernoulli(logits=logits).log_prob((x > 0.5).float())
    assert torch.allclose(bern, exact.flatten(1).sum(1), atol=1e-5)


def test_frechet_distance_of_known_gaussians():
    # Identical Gaussians: zero.
    cov = np.array([[2.0, 0.3], [0.3, 1.0]])
    assert metrics.frechet_distance(np.zeros(2), cov, np.zeros(2), cov) == pytest.approx(
        0, abs=1e-9
    )
    # Commuting (diagonal) covariances: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 3.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = (
        1 + 4 + 9 + sum((math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in zip(a, b, strict=True))
    )
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9)
    # A general pair against scipy's matrix square root.
    from scipy import linalg

    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    c1, c2 = m1 @ m1.T, m2 @ m2.T
    root = linalg.sqrtm(c1 @ c2).real
    reference = np.trace(c1) + np.trace(c2) - 2 * np.trace(root)
    assert metrics.frechet_distance(np.zeros(5), c1, np.zeros(5), c2) == pytest.approx(reference)


def test_frechet_distance_of_samples_is_small_for_one_distribution():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4000, 4)), rng.standard_normal((4000, 4))
    c = rng.standard_normal((4000, 4)) * 2 + 1
    assert metrics.frechet_distance_of(a, b) < 0.02
    assert metrics.frechet_distance_of(a, c) > 4  # 4 * 1^2 + 4 * (2 - 1)^2 = 8


def test_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    d = models.discriminator_loss(real, fake, "nonsaturating")
    expected = -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    assert torch.allclose(d, expected)
    g = models.generator_loss(fake, "nonsaturating")
    assert torch.allclose(g, -torch.log(torch.sigmoid(fake)).mean())
    assert models.discriminator_loss(real, fake, "hinge").item() == pytest.approx(
        (0 + 2) / 2 + (1.5 + 0) / 2
    )
    assert models.generator_loss(fake, "hinge").item() == pytest.approx(1.25)


def test_models_shapes_and_conditioning():
    labels = torch.arange(5)
    vae = models.VAE(1, (8, 8), latent_dim=4, width=8, depth=2, num_classes=10)
    logits, mu, logvar = vae(torch.rand(5, 1, 8, 8), labels)
    assert logits.shape == (5, 1, 8, 8) and mu.shape == logvar.shape == (5, 4)
    g = models.Generator(3, (32, 32), latent_dim=8, width=8, depth=3, num_classes=10)
    d = models.Discriminator(3, (32, 32), width=8, depth=3, num_classes=10, spectral_norm=True)
    images = g(torch.randn(5, 8), labels)
    assert images.shape == (5, 3, 32, 32) and images.abs().max() <= 1
    assert d(images, labels).shape == (5,)
    with pytest.raises(ValueError, match="needs labels"):
        g(torch.randn(5, 8))
    with pytest.raises(ValueError, match="divisible"):
        models.Generator(1, (8, 8), depth=4)


def test_grid_png_and_sample_grid(tmp_path):
    from PIL import Image

    from components.bundle import load_model
    from components.data.dataset import ImageSpec
    from components.generative import gan
    from components.generative.common import save
    from components.generative.gan import GANConfig

    pixels = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    out = sampling.save_grid(pixels, tmp_path / "g.png", scale=2)
    image = Image.open(out)
    assert image.size == (2 * (4 * 9 + 1), 2 * (3 * 9 + 1))  # 4 columns, 3 rows, 1 px padding

    g = models.Generator(1, (8, 8), latent_dim=4, width=8, depth=2, num_classes=10)
    spec = ImageSpec(
        (1, 8, 8),
        10,
        [str(i) for i in range(10)],
        {"method": "standard", "shift": [0.3], "divisor": [0.4]},
    )
    cfg = GANConfig(latent_dim=4, width=8, depth=2, conditional=True)
    save(tmp_path, gan.FAMILY, g.state_dict(), g.hparams, spec, cfg, {"x": 1.0})
    model = load_model(tmp_path)
    png = model.sample_grid(16, 3, tmp_path / "threes.png")
    assert Image.open(png).size == (4 * (4 * 9 + 1), 4 * (4 * 9 + 1))
    with pytest.raises(ValueError, match="outside"):
        model.sample_grid(4, 10, tmp_path / "x.png")
    # Same seed, same samples.
    assert model.bundle.kind == "model/gan" and model.bundle.metrics == {"x": 1.0}
    assert np.array_equal(model.sample(8, 2), model.sample(8, 2))
