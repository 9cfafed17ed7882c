"""The exact toy prior: closed form, brute-force posterior mean, numerical stability."""
import math

import torch

from cores.models.toy import GaussianMixtureLatentPrior


def _prior(means, std=0.3):
    return GaussianMixtureLatentPrior(torch.as_tensor(means, dtype=torch.float32), std=std)


def test_single_component_is_gaussian_posterior_mean():
    mu = torch.randn(1, 3, 4, 4)
    m = _prior(mu, std=0.5)
    z = torch.randn(5, 3, 4, 4) * 3
    for sigma in (0.01, 0.7, 10.0):
        expected = (0.25 * z + sigma ** 2 * mu) / (0.25 + sigma ** 2)
        torch.testing.assert_close(m.tweedie(z, sigma), expected, atol=1e-5, rtol=1e-5)


def test_two_components_match_brute_force_posterior_mean():
    """E[z0 | z] by numerical integration over a 2-D grid equals the closed form."""
    means = [[[[-1.0, 0.5]]], [[[1.2, -0.3]]]]  # (K=2, C=1, H=1, W=2): a 2-D latent
    std = 0.4
    m = _prior(means, std=std)
    g = torch.linspace(-4, 4, 801, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)  # (G, 2)
    mu = torch.tensor(means, dtype=torch.float64).view(2, 2)
    log_prior = torch.logsumexp(-((pts[:, None] - mu[None]) ** 2).sum(-1) / (2 * std ** 2), dim=1)
    for sigma in (0.2, 1.0, 3.0):
        z = torch.tensor([[0.3, 0.1], [-2.0, 1.5]], dtype=torch.float64)
        for row in z:
            logw = log_prior - ((pts - row) ** 2).sum(-1) / (2 * sigma ** 2)
            w = torch.softmax(logw, 0)
            brute = (w[:, None] * pts).sum(0)
            got = m.tweedie(row.float().view(1, 1, 1, 2), sigma).double().flatten()
            torch.testing.assert_close(got, brute, atol=2e-3, rtol=0)


def test_denoiser_is_stable_far_from_the_data_and_per_row():
    m = _prior(torch.randn(6, 3, 16, 16), std=0.05)
    z = torch.randn(4, 3, 16, 16)
    z[1] *= 1e4  # astronomically unlikely under every component: exp() would underflow without log space
    out = m.tweedie(z, 0.1)
    assert torch.isfinite(out).all()
    # rows are independent: a row's result does not depend on the others
    torch.testing.assert_close(m.tweedie(z[2:3], 0.1), out[2:3], atol=0, rtol=0)
    # σ → 0: the denoiser returns (almost) the input; σ → ∞: a mixture mean
    torch.testing.assert_close(m.tweedie(z, 1e-6), z, atol=1e-4, rtol=1e-5)
    far = m.tweedie(torch.zeros(1, 3, 16, 16), 1e4)
    torch.testing.assert_close(far[0], m.means.mean(0), atol=1e-3, rtol=0)


def test_score_is_gradient_of_log_density():
    m = _prior(torch.randn(3, 1, 2, 2), std=0.5)
    sigma = 0.8
    z = torch.randn(2, 1, 2, 2, dtype=torch.float32, requires_grad=True)
    var = 0.25 + sigma ** 2
    logp = torch.logsumexp(-((z[:, None] - m.means[None]) ** 2).flatten(2).sum(-1) / (2 * var), dim=1)
    (grad,) = torch.autograd.grad(logp.sum(), z)
    torch.testing.assert_close(m.score(z.detach(), sigma), grad, atol=1e-4, rtol=1e-4)


def test_decoder_commutes_with_rot180():
    """Bilinear ×4 (align_corners=False) commutes with flipping: the twin of decode(μ) is decode(flip μ)."""
    m = _prior(torch.randn(1, 3, 16, 16))
    z = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m.decode(z.flip(-2, -1)), m.decode(z).flip(-2, -1), atol=1e-6, rtol=0)
    assert m.decode(z).shape == (2, 3, 64, 64) and m.encode(m.decode(z)).shape == z.shape
    assert math.isclose(float(m.decode(torch.ones(1, 3, 16, 16)).mean()), 1.0, rel_tol=1e-6)
