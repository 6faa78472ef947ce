import itertools
import math

import pytest
import torch
from conftest import tiny_config

from outlier_jebm.model import JointEBM

KINDS = list(itertools.product(["chain", "ladder"], ["gaussian", "layerwise", "joint"]))


def double_model(generator, prior):
    model = JointEBM(tiny_config(generator=generator, prior=prior).model).double().eval()
    return model


@pytest.mark.parametrize("generator,prior", KINDS)
def test_log_joint_gradients_match_finite_differences(generator, prior):
    model = double_model(generator, prior)
    x = torch.rand(3, 64, dtype=torch.float64) * 2 - 1
    z = torch.randn(3, model.z_dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda zz: model.log_joint(x, zz), (z,), eps=1e-6, atol=1e-5)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda xx: model.log_joint(xx, z.detach()), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("generator,prior", KINDS)
def test_log_joint_is_log_likelihood_plus_log_prior(generator, prior):
    model = double_model(generator, prior)
    x = torch.rand(4, 64, dtype=torch.float64) * 2 - 1
    z = torch.randn(4, model.z_dim, dtype=torch.float64)
    s = model.obs_sigma
    expected_px = torch.distributions.Normal(model.generator.mean_x(z), s).log_prob(x).sum(-1)
    assert torch.allclose(model.log_px_given_z(x, z), expected_px)
    assert torch.allclose(model.log_joint(x, z), expected_px + model.ebm(z) + model.generator.log_p_gauss(z).sum(-1))


@pytest.mark.parametrize("prior", ["gaussian", "joint"])
def test_reference_coordinates_change_the_density_by_the_jacobian_only(prior):
    # log p(eps) = log p(z = T(eps)) + log |det dT/deps|, and T^{-1}(T(eps)) = eps
    model = double_model("chain", prior)
    eps = torch.randn(1, model.z_dim, dtype=torch.float64)
    z = model.generator.from_eps(eps)
    assert torch.allclose(model.generator.to_eps(z), eps)
    jac = torch.autograd.functional.jacobian(lambda e: model.generator.from_eps(e)[0], eps)[:, 0, :]
    log_det = torch.linalg.slogdet(jac).logabsdet
    assert torch.allclose(model.log_prior_eps(eps), model.log_prior(z) + log_det)


def test_gaussian_hierarchy_density_integrates_like_a_normalised_density():
    # for f = 0, E_{p_gauss}[grad_beta log p_gauss(z)] = 0 (score identity): the negative phase vanishes
    model = double_model("chain", "gaussian")
    torch.manual_seed(0)
    z = model.generator.from_eps(torch.randn(20000, model.z_dim, dtype=torch.float64)).detach()
    model.zero_grad()
    model.generator.log_p_gauss(z).sum(-1).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.generator.cond.parameters()])
    assert grads.abs().max() < 0.1


def test_prior_kinds_have_the_expected_energy_terms():
    for prior, n in [("gaussian", 0), ("layerwise", 2), ("joint", 1)]:
        model = JointEBM(tiny_config(prior=prior).model)
        assert model.ebm.terms(torch.randn(5, model.z_dim)).shape == (5, n)


def test_fast_tanh_is_tanh_with_and_without_autograd():
    from outlier_jebm.model import fast_tanh

    y = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([0.0, 1e-8, -1e-8, float("inf"), -float("inf")])])
    with torch.no_grad():
        torch.testing.assert_close(fast_tanh(y.clone()), torch.tanh(y), rtol=0, atol=3e-7)
    leaf = y[:2001].clone().requires_grad_()
    out = fast_tanh(leaf)
    torch.testing.assert_close(out, torch.tanh(leaf.detach()), rtol=0, atol=3e-7)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, 1 - torch.tanh(leaf.detach()) ** 2, rtol=0, atol=1e-6)


def test_posterior_is_the_mean_path_of_q_and_its_density_at_the_mean_is_the_widths_alone():
    # known answer: at z = mu, log N(z; mu, sigma) = -sum(log sigma) - d/2 log(2 pi), layer by layer
    model = double_model("chain", "joint")
    x = torch.rand(5, 64, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        mu, sigma = model.encoder.posterior(x)
        z, log_q = model.encoder(x, sample=False)
        per_layer = model.encoder.log_q_layers(x, mu)
    torch.testing.assert_close(mu, z)
    assert bool((sigma > 0).all())
    want = -sigma.log().sum(-1) - 0.5 * mu.shape[1] * math.log(2 * math.pi)
    torch.testing.assert_close(log_q, want)
    torch.testing.assert_close(per_layer.sum(-1), want)
    # a draw from q moves each layer by its own sigma: the bottom layer's draw is mu_1 + sigma_1 * eps
    d1 = model.encoder.z_dims[0]
    torch.manual_seed(3)
    drawn, _ = model.encoder(x, sample=True)
    torch.manual_seed(3)
    eps = torch.randn(5, d1, dtype=torch.float64)
    torch.testing.assert_close(drawn[:, :d1], mu[:, :d1] + sigma[:, :d1] * eps)
