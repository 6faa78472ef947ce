import torch
from conftest import tiny_config

from outlier_jebm.langevin import langevin, posterior_langevin, prior_langevin
from outlier_jebm.model import JointEBM

MEAN = torch.tensor([1.0, -2.0])
STD = torch.tensor([0.5, 1.5])


def gaussian_log_density(z):
    return -0.5 * (((z - MEAN) / STD) ** 2).sum(-1)


def test_langevin_on_a_gaussian_target_recovers_its_mean_and_variance():
    torch.manual_seed(0)
    z, _ = langevin(gaussian_log_density, torch.zeros(4000, 2), steps=1500, step_size=0.1)
    # the discretisation inflates the variance by 1 / (1 - d^2 / (4 v)): under 1 % here
    assert torch.allclose(z.mean(0), MEAN, atol=0.08)
    assert torch.allclose(z.std(0), STD, rtol=0.05)


def test_langevin_without_noise_climbs_to_the_mode():
    z, trace = langevin(
        gaussian_log_density, torch.full((5, 2), 6.0), steps=2000, step_size=0.3, noise=False, trace=True
    )
    assert torch.allclose(z, MEAN.expand(5, 2), atol=1e-3)
    assert (trace.log_density[1:] >= trace.log_density[:-1] - 1e-6).all()  # gradient ascent never goes down


def test_langevin_mask_freezes_coordinates():
    init = torch.zeros(10, 2)
    z, _ = langevin(gaussian_log_density, init, steps=20, step_size=0.1, mask=torch.tensor([1.0, 0.0]))
    assert (z[:, 1] == 0).all() and (z[:, 0] != 0).all()


def test_prior_langevin_follows_a_positive_f_towards_higher_values():
    # sign convention in sampling: p(z) is proportional to exp(+f(z)) N(z; 0, I). With f(z) = 3 z_0 the
    # first coordinate is N(3, 1): samples must move up, not down.
    model = JointEBM(tiny_config(generator="ladder", prior="joint").model)
    model.ebm.forward = lambda z: 3.0 * z[:, 0]
    torch.manual_seed(1)
    z, _ = prior_langevin(model, 3000, steps=800, step_size=0.15)
    assert abs(z[:, 0].mean().item() - 3.0) < 0.1
    assert abs(z[:, 0].std().item() - 1.0) < 0.06
    assert abs(z[:, 1:].mean().item()) < 0.05


def test_prior_langevin_in_reference_coordinates_keeps_the_gaussian_hierarchy_invariant():
    # with f = 0 the chain generator's prior is its Gaussian hierarchy; Langevin in eps must not distort it
    model = JointEBM(tiny_config(generator="chain", prior="joint").model).eval()
    model.ebm.forward = lambda z: z.new_zeros(z.shape[0])
    torch.manual_seed(2)
    eps = torch.randn(4000, model.z_dim)
    exact = model.generator.from_eps(eps).detach()
    z, _ = prior_langevin(model, 4000, steps=300, step_size=0.2)
    assert torch.allclose(z.mean(0), exact.mean(0), atol=0.1)
    assert torch.allclose(z.std(0), exact.std(0), rtol=0.1, atol=0.02)


def test_chains_reuse_the_spectral_norm_weights_without_changing_an_eval_model_s_samples():
    # prior_langevin and posterior_langevin compute the EBM's spectral-norm weights once per chain; in eval mode
    # the weights do not change between steps, so the chains must equal plain per-step ones to the last bit
    cfg = tiny_config().model
    assert cfg.ebm_spectral_norm
    model = JointEBM(cfg).eval()
    torch.manual_seed(3)
    eps0 = torch.randn(64, model.z_dim)
    x = torch.rand(64, model.cfg.data_dim) * 2 - 1

    torch.manual_seed(4)
    z_cached, _ = prior_langevin(model, 64, steps=15, step_size=0.1, init_eps=eps0)
    zp_cached, _ = posterior_langevin(model, x, z_cached, steps=5, step_size=0.05)
    torch.manual_seed(4)
    e, _ = langevin(model.log_prior_eps, eps0, steps=15, step_size=0.1)
    z_plain = model.generator.from_eps(e).detach()
    e, _ = langevin(
        lambda v: model.log_joint_eps(x, v), model.generator.to_eps(z_plain).detach(), steps=5, step_size=0.05
    )
    zp_plain = model.generator.from_eps(e).detach()
    assert torch.equal(z_cached, z_plain) and torch.equal(zp_cached, zp_plain)
    assert not torch.equal(z_cached, model.generator.from_eps(eps0))  # the chain moved


def test_a_training_chain_keeps_the_per_step_spectral_norm_weights():
    # training is left as benchmarked: one power iteration per EBM call, so a chain moves the power iteration's
    # vector once per step, as a plain chain does (caching is for eval mode only)
    import copy

    model = JointEBM(tiny_config().model).train()
    twin = copy.deepcopy(model)
    torch.manual_seed(5)
    z, _ = prior_langevin(model, 32, steps=15, step_size=0.1)
    torch.manual_seed(5)
    e, _ = langevin(twin.log_prior_eps, torch.randn(32, twin.z_dim), steps=15, step_size=0.1)
    assert torch.equal(z, twin.generator.from_eps(e).detach())
    u = model.ebm.nets[0][0].parametrizations.weight[0]._u
    assert torch.equal(u, twin.ebm.nets[0][0].parametrizations.weight[0]._u)
    once = copy.deepcopy(model)
    once.ebm(torch.zeros(1, once.z_dim))  # u is not at its fixed point yet, so equal u means as many iterations
    assert not torch.equal(u, once.ebm.nets[0][0].parametrizations.weight[0]._u)
