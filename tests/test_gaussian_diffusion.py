import math

import numpy as np
import pytest
import torch as th

from guided_diffusion import diffusion_types
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.acceleration import set_fast_attention
from guided_diffusion.diffusion_sampling import progress_bar
from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _extract_into_tensor,
    betas_for_alpha_bar,
    get_named_beta_schedule,
)
from guided_diffusion.resample import UniformSampler
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.unet import UNetModel


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def make_diffusion(
    steps=100,
    schedule="linear",
    mean_type=ModelMeanType.EPSILON,
    var_type=ModelVarType.FIXED_SMALL,
    loss_type=LossType.MSE,
    rescale_timesteps=False,
):
    return GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def timesteps(*values):
    return th.tensor(values, dtype=th.long)


def pixel_images(batch, seed=0, shape=(3, 4, 4)):
    """Images on the 8-bit grid, scaled to [-1, 1], including both extremes."""
    generator = th.Generator().manual_seed(seed)
    levels = th.randint(0, 256, (batch, *shape), generator=generator)
    levels.view(-1)[:2] = th.tensor([0, 255])
    return levels.float() / 127.5 - 1


class ConstantOutput(th.nn.Module):
    """A model whose output is a fixed tensor, ignoring x and t."""

    def __init__(self, value):
        super().__init__()
        self.value = th.nn.Parameter(value.clone())

    def forward(self, x, timesteps, **kwargs):
        return self.value


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_endpoints_scale_with_steps():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    short = get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)
    assert np.allclose(np.diff(short), np.diff(short)[0])


def test_cosine_schedule_follows_alpha_bar_and_caps_betas():
    steps = 100

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = get_named_beta_schedule("cosine", steps)
    assert betas.dtype == np.float64
    assert betas[-1] == 0.999  # 1 - alpha_bar(1) / alpha_bar(0.99) is 1, capped
    alphas_cumprod = np.cumprod(1 - betas)
    expected = [alpha_bar((i + 1) / steps) / alpha_bar(0) for i in range(steps - 1)]
    assert np.allclose(alphas_cumprod[:-1], expected, rtol=1e-12)


def test_betas_for_alpha_bar_applies_max_beta():
    betas = betas_for_alpha_bar(4, lambda t: 1 - t, max_beta=0.6)
    # 1 - (1 - (i+1)/4) / (1 - i/4) = 1/4, 1/3, 1/2, 1 -> capped at 0.6
    assert betas.tolist() == pytest.approx([0.25, 1 / 3, 0.5, 0.6])


@pytest.mark.parametrize("steps", [2, 10, 20])
def test_linear_schedule_rejects_too_few_steps(steps):
    with pytest.raises(ValueError, match=r"at least 21 steps.*cosine"):
        get_named_beta_schedule("linear", steps)
    assert get_named_beta_schedule("cosine", steps).max() < 1


def test_schedule_rejects_unknown_name_and_bad_step_counts():
    with pytest.raises(ValueError, match='"quadratic": expected "linear" or "cosine"'):
        get_named_beta_schedule("quadratic", 100)
    with pytest.raises(ValueError, match="positive integer"):
        get_named_beta_schedule("cosine", 0)


def test_constructor_validates_betas_and_options():
    kwargs = dict(
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
    )
    for betas in ([0.1, 0.0, 0.2], [0.1, 1.5], [[0.1, 0.2]], [0.1]):
        with pytest.raises(ValueError, match="betas"):
            GaussianDiffusion(betas=betas, **kwargs)
    with pytest.raises(ValueError, match="ModelVarType"):
        GaussianDiffusion(betas=[0.1, 0.2], **{**kwargs, "model_var_type": "learned"})


def test_schedule_arrays_are_float64_and_consistent():
    diffusion = make_diffusion(50, "cosine")
    alphas_cumprod = np.cumprod(1 - diffusion.betas)
    assert diffusion.alphas_cumprod.dtype == np.float64
    assert np.allclose(diffusion.alphas_cumprod, alphas_cumprod, rtol=1e-14)
    assert diffusion.alphas_cumprod_prev[0] == 1.0 and diffusion.alphas_cumprod_next[-1] == 0.0
    assert np.allclose(diffusion.sqrt_recipm1_alphas_cumprod**2, 1 / alphas_cumprod - 1)


# ----------------------------------------------------------------------------- q(x_t | x_0)


def test_q_sample_and_q_mean_variance_match_closed_form():
    diffusion = make_diffusion(100)
    x_start, noise = th.randn(3, 2, 4, 4), th.randn(3, 2, 4, 4)
    t = timesteps(0, 42, 99)
    alpha_bar = th.tensor(np.cumprod(1 - diffusion.betas)[[0, 42, 99]], dtype=th.float32)
    alpha_bar = alpha_bar[:, None, None, None]
    expected = alpha_bar.sqrt() * x_start + (1 - alpha_bar).sqrt() * noise
    assert th.allclose(diffusion.q_sample(x_start, t, noise=noise), expected, rtol=1e-5, atol=1e-6)
    mean, variance, log_variance = diffusion.q_mean_variance(x_start, t)
    assert mean.dtype == th.float32 and variance.shape == x_start.shape
    assert th.allclose(mean, alpha_bar.sqrt() * x_start, rtol=1e-5)
    assert th.allclose(variance, (1 - alpha_bar).expand_as(x_start), rtol=1e-5)
    assert th.allclose(log_variance, variance.log(), rtol=1e-5)


def test_q_sample_moments_match_closed_form():
    diffusion = make_diffusion(1000)
    t = 300
    alpha_bar = np.prod(1 - get_named_beta_schedule("linear", 1000)[: t + 1])
    x_start = th.full((1, 1, 200, 200), 0.7)
    th.manual_seed(0)
    samples = diffusion.q_sample(x_start, timesteps(t))
    n = samples.numel()
    std = math.sqrt(1 - alpha_bar)
    assert abs(samples.mean().item() - math.sqrt(alpha_bar) * 0.7) < 4 * std / math.sqrt(n)
    assert samples.var().item() == pytest.approx(1 - alpha_bar, rel=4 * math.sqrt(2 / n))


# ----------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(schedule):
    diffusion = make_diffusion(1000, schedule)
    betas = get_named_beta_schedule(schedule, 1000)
    steps = [1, 10, 500, 999]
    x_start, x_t = th.randn(4, 3, 2, 2, dtype=th.float64), th.randn(4, 3, 2, 2, dtype=th.float64)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(
        x_start.float(), x_t.float(), th.tensor(steps)
    )
    for row, t in enumerate(steps):
        # q(x_{t-1} | x_0) = N(sqrt(ab_prev) x_0, 1 - ab_prev),
        # q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t).
        ab_prev = np.prod(1 - betas[:t])
        alpha = 1 - betas[t]
        precision = 1 / (1 - ab_prev) + alpha / betas[t]
        expected_mean = (
            math.sqrt(ab_prev) * x_start[row] / (1 - ab_prev)
            + math.sqrt(alpha) * x_t[row] / betas[t]
        ) / precision
        assert th.allclose(mean[row].double(), expected_mean, rtol=1e-5, atol=1e-6)
        assert th.allclose(variance[row].double(), th.full_like(x_t[row], 1 / precision), rtol=1e-5)
        assert th.allclose(
            log_variance[row].double(), th.full_like(x_t[row], -math.log(precision)), rtol=1e-5
        )


def test_posterior_at_first_step_is_x_start_with_clipped_log_variance():
    diffusion = make_diffusion(100)
    x_start, x_t = th.randn(2, 3, 2, 2), th.randn(2, 3, 2, 2)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(
        x_start, x_t, timesteps(0, 0)
    )
    assert th.allclose(mean, x_start, atol=1e-6)
    assert (variance == 0).all()
    assert th.allclose(
        log_variance, th.tensor(math.log(diffusion.posterior_variance[1])), rtol=1e-6
    )


# ----------------------------------------------------------------------------- p(x_{t-1} | x_t)


def test_fixed_and_learned_variances():
    x = th.randn(3, 2, 2, 2)
    t = timesteps(0, 1, 77)
    large = make_diffusion(100, var_type=ModelVarType.FIXED_LARGE)
    out = large.p_mean_variance(ConstantOutput(th.zeros_like(x)), x, t)
    expected = [large.posterior_variance[1], large.betas[1], large.betas[77]]
    assert out["variance"][:, 0, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)

    for v, expected_log in (
        (-1.0, large.posterior_log_variance_clipped),
        (1.0, np.log(large.betas)),
    ):
        ranged = make_diffusion(100, var_type=ModelVarType.LEARNED_RANGE)
        output = th.cat([th.zeros_like(x), th.full_like(x, v)], dim=1)
        out = ranged.p_mean_variance(ConstantOutput(output), x, t)
        assert out["log_variance"][:, 0, 0, 0].tolist() == pytest.approx(
            expected_log[[0, 1, 77]], rel=1e-6
        )

    learned = make_diffusion(100, var_type=ModelVarType.LEARNED)
    log_var = th.randn_like(x)
    out = learned.p_mean_variance(ConstantOutput(th.cat([th.zeros_like(x), log_var], dim=1)), x, t)
    assert th.equal(out["log_variance"], log_var) and th.allclose(out["variance"], log_var.exp())


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_mean_types_recover_the_same_posterior(mean_type):
    diffusion = make_diffusion(100, mean_type=mean_type)
    x_start, noise = th.rand(2, 3, 4, 4) * 1.6 - 0.8, th.randn(2, 3, 4, 4)
    t = timesteps(5, 60)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    posterior_mean = diffusion.q_posterior_mean_variance(x_start, x_t, t)[0]
    output = {
        ModelMeanType.EPSILON: noise,
        ModelMeanType.START_X: x_start,
        ModelMeanType.PREVIOUS_X: posterior_mean,
    }[mean_type]
    out = diffusion.p_mean_variance(ConstantOutput(output), x_t, t, clip_denoised=False)
    assert th.allclose(out["pred_xstart"], x_start, atol=1e-4)
    assert th.allclose(out["mean"], posterior_mean, atol=1e-5)


def test_clip_and_denoised_fn_apply_to_pred_xstart():
    diffusion = make_diffusion(100, mean_type=ModelMeanType.START_X)
    x = th.randn(1, 1, 2, 2)
    output = th.tensor([[[[3.0, -3.0], [0.5, -0.25]]]])
    out = diffusion.p_mean_variance(
        ConstantOutput(output), x, timesteps(10), denoised_fn=lambda p: p * 0.5
    )
    assert out["pred_xstart"].flatten().tolist() == [1.0, -1.0, 0.25, -0.125]


def test_rescale_timesteps_feeds_the_model_floats_in_0_to_1000(tiny_model):
    model = tiny_model()
    diffusion = make_diffusion(50, rescale_timesteps=True)
    diffusion.p_mean_variance(model, th.randn(2, 3, 2, 2), timesteps(0, 49))
    assert model.calls[-1].tolist() == [0.0, 980.0]


def test_timesteps_and_shapes_are_validated(tiny_model):
    diffusion = make_diffusion(100)
    x = th.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"expected integers in \[0, 99\]"):
        diffusion.q_sample(x, timesteps(0, 100))
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        diffusion.p_mean_variance(tiny_model(), x, timesteps(-1, 3))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        diffusion.q_mean_variance(x, timesteps(3))
    with pytest.raises(ValueError, match="learned variance needs"):
        make_diffusion(100, var_type=ModelVarType.LEARNED_RANGE).p_mean_variance(
            tiny_model(), x, timesteps(1, 2)
        )
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.p_sample_loop(tiny_model(), (2, 3, 2, 2), noise=th.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="eta=0"):
        diffusion.ddim_reverse_sample(tiny_model(), x, timesteps(1, 2), eta=0.5)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("var_type", [ModelVarType.FIXED_SMALL, ModelVarType.LEARNED_RANGE])
@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_kl_is_zero_when_the_model_returns_the_true_posterior(var_type, mean_type):
    diffusion = make_diffusion(1000, mean_type=mean_type, var_type=var_type, loss_type=LossType.KL)
    x_start, noise = pixel_images(3), th.randn(3, 3, 4, 4)
    t = timesteps(1, 300, 999)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    output = {
        ModelMeanType.EPSILON: noise,
        ModelMeanType.START_X: x_start,
        ModelMeanType.PREVIOUS_X: diffusion.q_posterior_mean_variance(x_start, x_t, t)[0],
    }[mean_type]
    if var_type == ModelVarType.LEARNED_RANGE:  # v = -1 selects the posterior variance
        output = th.cat([output, -th.ones_like(output)], dim=1)
    loss = diffusion.training_losses(ConstantOutput(output), x_start, t, noise=noise)["loss"]
    assert loss.abs().max().item() < 1e-5


def _approx_cdf(x):
    return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_decoder_term_is_the_discretized_gaussian_likelihood():
    diffusion = make_diffusion(1000, loss_type=LossType.KL)
    x_start, noise = pixel_images(2), th.randn(2, 3, 4, 4)
    offset = 0.5  # the model's eps is off by 0.5, so its mean misses x_0
    model = ConstantOutput(noise + offset)
    loss = diffusion.training_losses(model, x_start, timesteps(0, 0), noise=noise)["loss"]

    beta0, beta1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    x = x_start.double().numpy()
    mean = x - offset * math.sqrt(beta0 / (1 - beta0))  # x_0 prediction; posterior mean at t=0
    sigma = math.sqrt(beta1 * beta0 / (1 - (1 - beta0) * (1 - beta1)))  # posterior std of t=1
    upper = np.where(x > 0.999, 1.0, _approx_cdf((x + 1 / 255 - mean) / sigma))
    lower = np.where(x < -0.999, 0.0, _approx_cdf((x - 1 / 255 - mean) / sigma))
    nll_bits = -np.log(np.maximum(upper - lower, 1e-12)).reshape(2, -1).mean(axis=1) / math.log(2)
    assert loss.tolist() == pytest.approx(nll_bits.tolist(), rel=1e-4)


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_mse_targets_per_mean_type(mean_type):
    diffusion = make_diffusion(100, mean_type=mean_type)
    x_start, noise = th.randn(2, 3, 4, 4), th.randn(2, 3, 4, 4)
    t = timesteps(0, 70)
    prediction = th.randn(2, 3, 4, 4)
    terms = diffusion.training_losses(ConstantOutput(prediction), x_start, t, noise=noise)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    target = {
        ModelMeanType.EPSILON: noise,
        ModelMeanType.START_X: x_start,
        ModelMeanType.PREVIOUS_X: diffusion.q_posterior_mean_variance(x_start, x_t, t)[0],
    }[mean_type]
    assert set(terms) == {"loss", "mse"}
    assert th.allclose(terms["mse"], ((target - prediction) ** 2).mean(dim=(1, 2, 3)))
    assert th.equal(terms["loss"], terms["mse"])


def test_hybrid_loss_trains_the_variance_only_through_vb():
    diffusion = make_diffusion(100, var_type=ModelVarType.LEARNED_RANGE)
    x_start, noise = pixel_images(2), th.randn(2, 3, 4, 4)
    model = ConstantOutput(th.randn(2, 6, 4, 4) * 0.5)
    terms = diffusion.training_losses(model, x_start, timesteps(0, 40), noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert th.allclose(terms["loss"], terms["mse"] + terms["vb"])
    (vb_grad,) = th.autograd.grad(terms["vb"].sum(), model.value, retain_graph=True)
    assert (vb_grad[:, :3] == 0).all() and (vb_grad[:, 3:] != 0).any()
    (mse_grad,) = th.autograd.grad(terms["mse"].sum(), model.value)
    assert (mse_grad[:, 3:] == 0).all() and (mse_grad[:, :3] != 0).any()


def test_rescaled_losses_scale_the_variational_terms():
    x_start, noise, t = pixel_images(2), th.randn(2, 3, 4, 4), timesteps(0, 40)
    model = ConstantOutput(th.randn(2, 6, 4, 4) * 0.5)

    def losses(loss_type):
        diffusion = make_diffusion(100, var_type=ModelVarType.LEARNED_RANGE, loss_type=loss_type)
        return diffusion.training_losses(model, x_start, t, noise=noise)

    plain, rescaled = losses(LossType.MSE), losses(LossType.RESCALED_MSE)
    assert th.allclose(rescaled["vb"], plain["vb"] * 0.1) and th.equal(
        rescaled["mse"], plain["mse"]
    )
    kl, rescaled_kl = losses(LossType.KL), losses(LossType.RESCALED_KL)
    assert set(kl) == {"loss"}
    assert th.allclose(kl["loss"], plain["vb"]) and th.allclose(
        rescaled_kl["loss"], kl["loss"] * 100
    )


def test_training_losses_draws_noise_with_randn_like(tiny_model):
    diffusion = make_diffusion(100)
    x_start, t = th.randn(2, 3, 4, 4), timesteps(3, 80)
    th.manual_seed(7)
    drawn = diffusion.training_losses(tiny_model(), x_start, t)["loss"]
    th.manual_seed(7)
    given = diffusion.training_losses(tiny_model(), x_start, t, noise=th.randn_like(x_start))[
        "loss"
    ]
    assert th.equal(drawn, given)


def test_calc_bpd_loop_for_a_perfect_x_start_model():
    diffusion = make_diffusion(30, "cosine", mean_type=ModelMeanType.START_X)
    x_start = pixel_images(2)
    out = diffusion.calc_bpd_loop(ConstantOutput(x_start), x_start, clip_denoised=False)
    assert set(out) == {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, 30)
    assert out["xstart_mse"].abs().max() < 1e-10 and out["mse"].max() < 1e-6
    # Exact posterior: every KL is 0; only the last column (t = 0) holds the decoder NLL.
    assert out["vb"][:, :-1].abs().max() < 1e-5 and (out["vb"][:, -1] > 0.1).all()
    assert th.allclose(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    alpha_bar = diffusion.alphas_cumprod[-1]
    prior = 0.5 * (-1 - math.log(1 - alpha_bar) + (1 - alpha_bar) + alpha_bar * x_start**2)
    assert th.allclose(out["prior_bpd"], prior.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-4)


def test_training_loss_falls_on_a_toy_data_set():
    th.manual_seed(0)
    np.random.seed(0)
    diffusion = make_diffusion(100, "cosine")
    sampler = UniformSampler(diffusion)

    class MLP(th.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = th.nn.Sequential(th.nn.Linear(9, 64), th.nn.SiLU(), th.nn.Linear(64, 8))

        def forward(self, x, t):
            features = th.cat([x.flatten(1), t.float()[:, None] / 100], dim=1)
            return self.net(features).view_as(x)

    model = MLP()
    optimizer = th.optim.Adam(model.parameters(), lr=1e-2)
    prototypes = th.tensor([[-0.8, 0.8] * 4, [0.5, -0.5, 0.0, 1.0] * 2]).view(2, 2, 2, 2)
    losses = []
    for _ in range(300):
        x_start = prototypes[th.randint(0, 2, (64,))]
        t, weights = sampler.sample(64, "cpu")
        loss = (diffusion.training_losses(model, x_start, t)["loss"] * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])


# ----------------------------------------------------------------------------- sampling


def test_p_sample_loop_draws_in_the_original_order(tiny_model):
    diffusion = make_diffusion(25, "cosine", var_type=ModelVarType.FIXED_LARGE)
    model, shape = tiny_model(), (2, 3, 4, 4)
    th.manual_seed(3)
    sample = diffusion.p_sample_loop(model, shape)

    th.manual_seed(3)
    x = th.randn(*shape)
    for i in reversed(range(25)):
        t = th.full((2,), i)
        with th.no_grad():
            out = diffusion.p_mean_variance(model, x, t)
        noise = th.randn_like(x)
        x = out["mean"] + (0.0 if i == 0 else 1.0) * th.exp(0.5 * out["log_variance"]) * noise
    assert th.equal(sample, x)


def test_progressive_loop_yields_every_step_and_uses_given_noise(tiny_model):
    diffusion = make_diffusion(25, "cosine")
    noise = th.randn(2, 3, 4, 4)
    th.manual_seed(1)
    steps = list(diffusion.p_sample_loop_progressive(tiny_model(), (2, 3, 4, 4), noise=noise))
    th.manual_seed(1)  # with noise given, the first draw is the first step's noise
    first = diffusion.p_sample(tiny_model(), noise, th.full((2,), 24))
    assert len(steps) == 25 and th.equal(steps[0]["sample"], first["sample"])
    assert not steps[-1]["sample"].requires_grad


def generator_noise(seed):
    generator = th.Generator().manual_seed(seed)
    return lambda x: th.randn(x.shape, generator=generator).to(x)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_noise_fn_replaces_every_draw_of_the_global_generator(tiny_model, loop):
    diffusion = make_diffusion(20, "cosine")
    options = {"eta": 1.0} if loop == "ddim_sample_loop" else {}
    model = tiny_model()
    th.manual_seed(0)
    state = th.random.get_rng_state()
    own = getattr(diffusion, loop)(model, (2, 3, 4, 4), noise_fn=generator_noise(5), **options)
    assert th.equal(th.random.get_rng_state(), state)
    # The same numbers through the global generator give the same samples.
    th.manual_seed(5)
    standard = getattr(diffusion, loop)(model, (2, 3, 4, 4), **options)
    assert th.equal(own, standard)


def test_calc_bpd_loop_noise_fn_matches_the_global_generator(tiny_model):
    diffusion = make_diffusion(10, "cosine")
    model, x_start = tiny_model(), pixel_images(2)
    own = diffusion.calc_bpd_loop(model, x_start, noise_fn=generator_noise(2))
    th.manual_seed(2)
    standard = diffusion.calc_bpd_loop(model, x_start)
    for key in standard:
        assert th.equal(own[key], standard[key])


def test_ddim_with_eta_zero_is_deterministic(tiny_model):
    diffusion = make_diffusion(25, "cosine")
    noise = th.randn(2, 3, 4, 4)
    runs = []
    for seed in (0, 1):
        th.manual_seed(seed)
        runs.append(diffusion.ddim_sample_loop(tiny_model(), (2, 3, 4, 4), noise=noise))
    assert th.equal(runs[0], runs[1])
    th.manual_seed(0)
    stochastic = diffusion.ddim_sample_loop(tiny_model(), (2, 3, 4, 4), noise=noise, eta=1.0)
    assert not th.allclose(stochastic, runs[0])


def test_ddim_with_eta_one_uses_the_posterior_variance(tiny_model):
    diffusion = make_diffusion(100)
    model, x, t = tiny_model(), th.randn(2, 3, 4, 4), timesteps(40, 70)
    th.manual_seed(5)
    sample = diffusion.ddim_sample(model, x, t, eta=1.0)["sample"]
    deterministic = diffusion.ddim_sample(model, x, t, eta=0.0)["sample"]
    th.manual_seed(5)
    noise = th.randn_like(x)
    # With eta = 1, sigma^2 is the posterior variance and the mean is the DDPM mean.
    sigma = th.tensor(diffusion.posterior_variance[[40, 70]]).float().sqrt()[:, None, None, None]
    mean = diffusion.p_mean_variance(model, x, t)["mean"]
    assert th.allclose(sample, mean + sigma * noise, atol=1e-5)
    assert not th.allclose(sample, deterministic)


def test_ddim_reverse_sample_inverts_ddim_sample():
    diffusion = make_diffusion(1000, "cosine")
    eps = th.randn(2, 3, 4, 4)
    x_next = th.randn(2, 3, 4, 4)
    # A model with fixed eps follows the ODE exactly, so one step back and forth is exact.
    model = ConstantOutput(eps)
    for t in (1, 500, 998):
        x_t = diffusion.ddim_sample(model, x_next, th.full((2,), t + 1), clip_denoised=False)[
            "sample"
        ]
        back = diffusion.ddim_reverse_sample(model, x_t, th.full((2,), t), clip_denoised=False)[
            "sample"
        ]
        assert th.allclose(back, x_next, rtol=1e-4, atol=1e-4)


def test_ddim_reverse_sample_loop_reconstructs_through_the_sampler(tiny_model):
    # A short process (alpha_bar_T = 0.36), so that the untrained model's ODE is well conditioned.
    diffusion = GaussianDiffusion(
        betas=np.linspace(1e-4, 0.02, 100),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
    )
    model = tiny_model()
    x_start = th.rand(2, 3, 4, 4, generator=th.Generator().manual_seed(0)) * 1.6 - 0.8
    latent = diffusion.ddim_reverse_sample_loop(model, x_start, clip_denoised=False)
    assert len(model.calls) == 99 and model.calls[0].tolist() == [0, 0]
    assert model.calls[-1].tolist() == [98, 98]
    reconstruction = diffusion.ddim_sample_loop(
        model, x_start.shape, noise=latent, clip_denoised=False
    )
    assert (reconstruction - x_start).abs().max() < 0.015
    assert (latent - x_start).abs().mean() > 0.2


def test_zero_cond_fn_changes_nothing(tiny_model):
    diffusion = make_diffusion(20, "cosine", var_type=ModelVarType.FIXED_LARGE)
    shape = (2, 3, 4, 4)

    def zeros(x, t, y=None):
        return th.zeros_like(x)

    # DDIM round-trips eps -> x_0 -> eps, so it agrees to float32 rounding only.
    for loop, atol in ((diffusion.p_sample_loop, 0.0), (diffusion.ddim_sample_loop, 1e-5)):
        th.manual_seed(11)
        plain = loop(tiny_model(), shape, model_kwargs={"y": th.tensor([1, 2])})
        th.manual_seed(11)
        guided = loop(tiny_model(), shape, cond_fn=zeros, model_kwargs={"y": th.tensor([1, 2])})
        assert th.allclose(plain, guided, rtol=0, atol=atol)


def test_condition_mean_and_condition_score_closed_forms(tiny_model):
    diffusion = make_diffusion(100)
    model, x, t = tiny_model(), th.randn(2, 3, 4, 4), timesteps(10, 90)
    gradient = th.randn(2, 3, 4, 4)
    seen = {}

    def cond_fn(x_arg, t_arg, y):
        seen.update(x=x_arg, t=t_arg, y=y)
        return gradient

    out = diffusion.p_mean_variance(model, x, t)
    new_mean = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs={"y": 4})
    assert th.allclose(new_mean, out["mean"] + out["variance"] * gradient)
    assert seen["x"] is x and th.equal(seen["t"], t) and seen["y"] == 4  # gradient at x_t

    alpha_bar = th.tensor(diffusion.alphas_cumprod[[10, 90]]).float()[:, None, None, None]
    new = diffusion.condition_score(cond_fn, out, x, t, model_kwargs={"y": 4})
    # eps' = eps - sqrt(1 - ab) g  =>  x_0' = x_0 + (1 - ab) / sqrt(ab) g
    shifted = out["pred_xstart"] + (1 - alpha_bar) / alpha_bar.sqrt() * gradient
    assert th.allclose(new["pred_xstart"], shifted, rtol=1e-4, atol=1e-4)
    assert th.allclose(
        new["mean"], diffusion.q_posterior_mean_variance(new["pred_xstart"], x, t)[0]
    )
    assert new["variance"] is out["variance"]


# ----------------------------------------------------------------------------- golden values


class EpsFromInput(th.nn.Module):
    """
    A seeded tiny UNetModel plus x on the eps channels, so that untrained
    samples stay in range and depend on every part of the network.
    """

    def __init__(self):
        super().__init__()
        self.unet = UNetModel(
            image_size=8,
            in_channels=3,
            model_channels=32,
            out_channels=6,
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 2),
            num_heads=2,
            num_classes=3,
        )
        set_fast_attention(self.unet, False)
        generator = th.Generator().manual_seed(0)
        with th.no_grad():
            for parameter in self.unet.parameters():
                parameter.copy_(th.randn(parameter.shape, generator=generator) * 0.05)
        self.eval()

    def forward(self, x, timesteps, **kwargs):
        return self.unet(x, timesteps, **kwargs) + th.cat([x, th.zeros_like(x)], dim=1)


def adm_diffusion(respacing):
    """The released models' process: linear 1000 steps, eps, learned range, hybrid loss."""
    return SpacedDiffusion(
        space_timesteps(1000, respacing),
        betas=get_named_beta_schedule("linear", 1000),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE,
        loss_type=LossType.RESCALED_MSE,
    )


# Computed with this implementation and checked to be bit-identical to a line-by-line
# transcription of the original ADM code on the same seeds.
GOLDEN_LOSSES = {
    "vb": [2.6389918e00, 3.9085306e-05],
    "mse": [1.2341365, 0.002658191],
    "loss": [3.8731284, 2.6972766e-03],
}
GOLDEN_SAMPLES = {
    "10": (
        -16.972679138183594,
        146.86032104492188,
        [-0.441864, 0.017187735, -0.42348906, 0.5419375],
        [0.1250502, -0.46003243, -0.39499667, -0.3739746],
    ),
    "ddim10": (
        -7.886524200439453,
        134.022216796875,
        [-0.61010855, -0.6523992, -0.27174553, -0.3685724],
        [0.07552132, 0.3821564, 0.050175864, 0.02391986],
    ),
}


def test_golden_training_losses_of_a_tiny_unet():
    model = EpsFromInput()
    x_start = th.rand(2, 3, 8, 8, generator=th.Generator().manual_seed(1)) * 2 - 1
    th.manual_seed(0)
    terms = adm_diffusion("1000").training_losses(
        model, x_start, timesteps(0, 999), model_kwargs={"y": th.tensor([0, 2])}
    )
    for key, expected in GOLDEN_LOSSES.items():
        assert terms[key].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-8), key


@pytest.mark.parametrize(
    "respacing, loop", [("10", "p_sample_loop"), ("ddim10", "ddim_sample_loop")]
)
def test_golden_ten_step_samples_of_a_tiny_unet(respacing, loop):
    model = EpsFromInput()
    th.manual_seed(0)
    sample = getattr(adm_diffusion(respacing), loop)(
        model, (2, 3, 8, 8), model_kwargs={"y": th.tensor([0, 2])}
    )
    total, absolute, first_row, last_row = GOLDEN_SAMPLES[respacing]
    assert sample.sum().item() == pytest.approx(total, rel=1e-5)
    assert sample.abs().sum().item() == pytest.approx(absolute, rel=1e-5)
    assert sample[0, 0, 0, :4].tolist() == pytest.approx(first_row, rel=1e-5, abs=1e-6)
    assert sample[1, 2, 7, 4:].tolist() == pytest.approx(last_row, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- schedule caching


def test_schedules_are_copied_to_the_device_once_with_the_same_numbers(tiny_model, monkeypatch):
    def spaced():
        return SpacedDiffusion(
            use_timesteps=space_timesteps(100, "10"), betas=get_named_beta_schedule("linear", 100),
            model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.LEARNED_RANGE,
            loss_type=LossType.MSE,
        )

    model = tiny_model(out_channels=6)
    x, t = pixel_images(2), timesteps(9, 0)

    def outputs(diffusion):
        th.manual_seed(0)
        return (diffusion.p_sample(model, x, t)["sample"],
                diffusion.training_losses(model, x, t)["loss"])

    cached = spaced()
    cached_outputs = outputs(cached)
    count = len(cached._device_schedules)
    assert count > 0 and len(cached._map_tensors) == 1
    cached.p_sample(model, x, t)
    assert len(cached._device_schedules) == count  # nothing copied again
    # The original converted the numpy schedule at every gather: the same numbers.
    uncached = spaced()
    monkeypatch.setattr(uncached, "_extract", _extract_into_tensor)
    assert all(th.equal(a, b) for a, b in zip(cached_outputs, outputs(uncached)))
    assert uncached._device_schedules == {}


# ----------------------------------------------------------------------------- enums


def test_the_enums_are_diffusion_types_reexported():
    assert gd.ModelMeanType is diffusion_types.ModelMeanType
    assert gd.ModelVarType is diffusion_types.ModelVarType
    assert gd.LossType is diffusion_types.LossType
    assert [loss for loss in LossType if loss.is_vb()] == [LossType.KL, LossType.RESCALED_KL]
    learned = [var for var in ModelVarType if var.is_learned()]
    assert learned == [ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE]


# ----------------------------------------------------------------------------- callbacks


LOOPS = {"p_sample_loop": {}, "ddim_sample_loop": {"eta": 0.5}}  # both draw noise every step


@pytest.mark.parametrize("loop", list(LOOPS))
def test_the_loop_callback_reports_each_step_and_changes_no_number(tiny_model, loop):
    diffusion = make_diffusion(20, "cosine", var_type=ModelVarType.FIXED_LARGE)
    model, noise, shape = tiny_model(), th.randn(2, 3, 4, 4), (2, 3, 4, 4)
    th.manual_seed(4)
    plain = getattr(diffusion, loop)(model, shape, noise=noise, **LOOPS[loop])
    th.manual_seed(4)
    steps = list(getattr(diffusion, loop + "_progressive")(model, shape, noise=noise, **LOOPS[loop]))
    reports = []
    th.manual_seed(4)
    reported = getattr(diffusion, loop)(model, shape, noise=noise, callback=reports.append, **LOOPS[loop])
    assert th.equal(reported, plain) and th.equal(reported, steps[-1]["sample"])
    assert [report["i"] for report in reports] == list(range(20))
    assert [report["t"].tolist() for report in reports] == [[t, t] for t in range(19, -1, -1)]
    assert all(report["t"].dtype == th.int64 for report in reports)
    starts = [noise] + [step["sample"] for step in steps[:-1]]
    for report, start, step in zip(reports, starts, steps):
        assert th.equal(report["x"], start) and th.equal(report["denoised"], step["pred_xstart"])


def test_the_progressive_loop_reports_each_step_before_yielding_it(tiny_model):
    diffusion = make_diffusion(10, "cosine")
    reports = []
    for number, step in enumerate(diffusion.ddim_sample_loop_progressive(
            tiny_model(), (2, 3, 4, 4), callback=reports.append)):
        assert len(reports) == number + 1 and reports[-1]["denoised"] is step["pred_xstart"]
    assert len(reports) == 10


def test_a_respaced_loop_reports_its_own_timesteps(tiny_model):
    diffusion = SpacedDiffusion(space_timesteps(20, "4"), **_diffusion_kwargs(20))
    model, reports = tiny_model(), []
    diffusion.p_sample_loop(model, (2, 3, 4, 4), callback=reports.append)
    assert [report["t"][0].item() for report in reports] == [3, 2, 1, 0]
    assert [calls[0].item() for calls in model.calls] == sorted(diffusion.timestep_map, reverse=True)


def _diffusion_kwargs(steps):
    return dict(betas=get_named_beta_schedule("cosine", steps), model_mean_type=ModelMeanType.EPSILON,
                model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)


def test_progress_bar_wraps_the_timesteps_only_when_asked():
    timesteps_ = range(5, -1, -1)
    assert progress_bar(timesteps_, False) is timesteps_
    bar = progress_bar(timesteps_, True)
    assert list(bar) == list(timesteps_) and bar.total == 6
