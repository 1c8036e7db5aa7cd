"""
Tests for guided_diffusion/solvers.py and solver_schedule.py: convergence orders on an
analytic model with a closed-form answer, the existing loops' numbers for ddim and ddpm,
guidance, the continuous schedule, the Denoiser's pieces each replaced alone, the
per-step callback, and the errors.
"""

import inspect
import math

import numpy as np
import pytest
import torch as th

from test_sampling import NUM_CLASSES, tiny_classifier_flags, tiny_model
from guided_diffusion.guidance import classifier_cond_fn
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion
from guided_diffusion.solver_schedule import DEFAULT_GRIDS, ContinuousSchedule, time_grid
from guided_diffusion.diffusion_types import ModelMeanType, ModelVarType
from guided_diffusion.denoiser import (
    CallCounter, Denoiser, NetworkPrediction, classifier_guidance, clip_prediction,
)
from guided_diffusion.solvers import (
    OPTION_RANGES, SAMPLER_ARGUMENTS, SAMPLERS, evaluations, grid_points, run_sampler, sampler_steps,
)

DATA_STD = 0.5  # x_0 ~ N(0, DATA_STD^2 I)


@pytest.fixture(scope="module")
def gaussian():
    """A 1000-step linear-schedule diffusion, its exact eps model for Gaussian data, x_T
    and the exact x_0 estimate at timestep 0 along the probability-flow ODE."""
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=False, noise_schedule="linear")
    schedule = ContinuousSchedule(diffusion)

    def exact_eps(x, t):
        a = th.from_numpy(schedule.alpha_bar(t.numpy())).view(-1, 1, 1, 1)
        return th.sqrt(1 - a) * x / (a * DATA_STD**2 + 1 - a)

    x_T = th.randn(64, 1, 4, 4, generator=th.Generator().manual_seed(0), dtype=th.float64)
    first, last = schedule.alpha_bar(schedule.t_max), schedule.alpha_bar(schedule.t_min)
    # x_t / sqrt(a_t s^2 + 1 - a_t) is constant along the ODE; then E[x_0 | x_t].
    x_0 = x_T * math.sqrt(last * DATA_STD**2 + 1 - last) / math.sqrt(first * DATA_STD**2 + 1 - first)
    expected = math.sqrt(last) * DATA_STD**2 * x_0 / (last * DATA_STD**2 + 1 - last)
    return diffusion, exact_eps, x_T, expected


def error(gaussian, sampler, steps, grid=None, **options):
    diffusion, exact_eps, x_T, expected = gaussian
    denoiser = Denoiser(exact_eps, diffusion, clip_denoised=False)
    out = run_sampler(denoiser, x_T.clone(), sampler, steps, grid=grid, **options)
    assert denoiser.evaluations == (2 * grid_points(sampler, steps) - 1 if sampler == "heun" else steps)
    return float((out - expected).abs().max())


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpmpp_2m", 2), ("unipc", 3), ("heun", 2)])
def test_each_ode_sampler_converges_at_its_order(gaussian, sampler, order):
    errors = [error(gaussian, sampler, steps, grid="logSNR") for steps in (20, 40, 80, 160)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(rate - order) < 0.35 for rate in rates[1:]), (errors, rates)
    assert errors[-1] < 0.05


def test_at_ten_evaluations_the_multistep_solvers_beat_ddim_many_times(gaussian):
    ddim = error(gaussian, "ddim", 10)
    assert error(gaussian, "dpmpp_2m", 10) < ddim / 10
    assert error(gaussian, "unipc", 10) < ddim / 5
    assert error(gaussian, "unipc", 40) < error(gaussian, "unipc", 40, corrector=False) / 2


def test_the_continuous_schedule_interpolates_log_alpha_bar_and_inverts_lambda():
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine")
    schedule = ContinuousSchedule(diffusion)
    assert np.allclose(schedule.alpha_bar(np.arange(100.0)), diffusion.alphas_cumprod, rtol=1e-12)
    middle = schedule.alpha_bar(10.25)
    expected = np.exp(0.75 * np.log(diffusion.alphas_cumprod[10]) + 0.25 * np.log(diffusion.alphas_cumprod[11]))
    assert middle == pytest.approx(expected, rel=1e-12)
    times = np.array([99.0, 50.5, 3.2, 0.0])
    assert np.allclose(schedule.time_of_half_log_snr(schedule.half_log_snr(times)), times, atol=1e-9)
    for kind in ("time_uniform", "logSNR", "karras"):
        grid = time_grid(schedule, 7, kind)
        assert grid[0] == 99.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
    lambdas = schedule.half_log_snr(time_grid(schedule, 7, "logSNR"))
    assert np.allclose(np.diff(lambdas), np.diff(lambdas)[0])
    spaced = SpacedDiffusion(space_timesteps(100, "ddim10"), **_diffusion_kwargs(diffusion))
    knots = ContinuousSchedule(spaced)
    assert knots.t_max == 90.0 and knots.alpha_bar(40.0) == pytest.approx(diffusion.alphas_cumprod[40])


def _diffusion_kwargs(diffusion):
    return dict(betas=diffusion.betas, model_mean_type=diffusion.model_mean_type,
                model_var_type=diffusion.model_var_type, loss_type=diffusion.loss_type)


@pytest.fixture(scope="module")
def guided():
    """A tiny learned-sigma model on a 40-step diffusion respaced to 6, and a classifier."""
    model, diffusion = tiny_model(class_cond=True)
    th.manual_seed(1)
    classifier = create_classifier(**tiny_classifier_flags())
    labels = th.arange(3) % NUM_CLASSES
    return model, diffusion, classifier_cond_fn(classifier, 2.0), labels


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_ddim_and_ddpm_give_the_existing_loops_numbers_on_their_grid(guided, sampler, guidance):
    model, diffusion, cond_fn, labels = guided
    options = dict(model_kwargs={"y": labels}, cond_fn=cond_fn if guidance else None)
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    th.manual_seed(3)
    expected = loop(model, (3, 3, 8, 8), **options)
    th.manual_seed(3)
    x_T = th.randn(3, 3, 8, 8)
    times = np.array(diffusion.timestep_map[::-1], np.float64)
    got = SAMPLERS[sampler](Denoiser(model, diffusion, clip_guided=False, **options), x_T, times)
    # float32 rounding of two forms of the same step, amplified by 1 / alpha at high noise
    # (up to 1.0e-4 measured, depending on the number of torch threads)
    assert th.allclose(got, expected, atol=2e-4), (got - expected).abs().max()


def test_the_guided_prediction_is_condition_scores(guided):
    model, diffusion, cond_fn, labels = guided
    x, t = th.randn(3, 3, 8, 8), th.full((3,), 4)
    kwargs = {"y": labels}
    out = diffusion.condition_score(cond_fn, diffusion.p_mean_variance(model, x, t, model_kwargs=kwargs),
                                    x, t, model_kwargs=kwargs)
    denoiser = Denoiser(model, diffusion, model_kwargs=kwargs, cond_fn=cond_fn, clip_guided=False)
    x0 = denoiser(x, float(diffusion.timestep_map[4]))["x0"]
    assert th.allclose(x0, out["pred_xstart"], atol=1e-5)
    clipped = Denoiser(model, diffusion, model_kwargs=kwargs, cond_fn=cond_fn)(x, float(diffusion.timestep_map[4]))
    assert th.equal(clipped["x0"], x0.clamp(-1, 1)) and x0.abs().max() > 1
    unguided = Denoiser(model, diffusion, model_kwargs=kwargs)(x, float(diffusion.timestep_map[4]))["x0"]
    assert not th.allclose(x0, unguided, atol=1e-3)  # the guidance does something


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_guidance_at_scale_zero_is_the_unguided_run(guided, sampler):
    model, diffusion, _, labels = guided
    th.manual_seed(1)
    classifier = create_classifier(**tiny_classifier_flags())
    runs = []
    for cond_fn in (None, classifier_cond_fn(classifier, 0.0)):
        th.manual_seed(4)
        runs.append(diffusion.sample_loop(model, (3, 3, 8, 8), sampler=sampler, steps=5,
                                          model_kwargs={"y": labels}, cond_fn=cond_fn))
    assert th.allclose(*runs, atol=1e-5)
    assert runs[0].abs().max() <= 1.0 + 1e-5  # clipped x_0


def test_dynamic_thresholding_keeps_the_samples_in_range(guided):
    model, diffusion, cond_fn, labels = guided
    th.manual_seed(4)
    out = diffusion.sample_loop(model, (3, 3, 8, 8), sampler="dpmpp_2m", steps=4, clip_denoised=False,
                                model_kwargs={"y": labels}, cond_fn=classifier_cond_fn(
                                    create_classifier(**tiny_classifier_flags()), 50.0),
                                dynamic_threshold=0.995)
    assert out.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("arguments, message", [
    (dict(sampler="euler"), "sampler='euler': expected one of ddim, ddpm, dpmpp_2m"),
    (dict(steps=0), "steps=0: expected a positive number of model evaluations"),
    (dict(sampler="dpmpp_2m", eta=0.5), r"eta is not an option of sampler='dpmpp_2m' .*option of ddim"),
    (dict(sampler="unipc", s_churn=1.0), r"s_churn is not an option of sampler='unipc'.*of heun"),
    (dict(time_grid="cosine"), "time_grid='cosine': expected one of time_uniform, logSNR, karras"),
    (dict(dynamic_threshold=1.5), r"dynamic_threshold=1.5: expected a percentile in \(0, 1\]"),
])
def test_bad_sampler_arguments_are_named(guided, arguments, message):
    model, diffusion, _, labels = guided
    options = dict(dict(sampler="ddim", steps=3), **arguments)
    with pytest.raises(ValueError, match=message):
        diffusion.sample_loop(model, (3, 3, 8, 8), model_kwargs={"y": labels}, **options)


@pytest.mark.parametrize("sampler, options, message", [
    ("heun", dict(s_churn=-0.5), r"s_churn=-0.5: heun expects a number >= 0"),
    ("heun", dict(s_churn=-5.0), r"s_churn=-5.0: heun expects"),  # was a math domain error
    ("heun", dict(s_churn=float("nan")), r"s_churn=nan: heun expects a number >= 0"),
    ("heun", dict(s_tmin=-0.1), r"s_tmin=-0.1: heun expects a noise level >= 0"),
    ("heun", dict(s_tmax=-1), r"s_tmax=-1: heun expects a noise level >= 0"),
    ("heun", dict(s_tmin=2.0, s_tmax=1.0), r"s_tmin=2.0 and s_tmax=1.0: .*need s_tmin <= s_tmax"),
    ("heun", dict(s_noise=0.0), r"s_noise=0.0: heun expects a finite number > 0"),
    ("heun", dict(s_noise=float("inf")), r"s_noise=inf: heun expects a finite number > 0"),
    ("heun", dict(s_noise="1.0"), r"s_noise=1.0: heun expects a finite number > 0"),
    ("ddim", dict(eta=-0.1), r"eta=-0.1: ddim expects a number in \[0, 1\]"),
    ("ddim", dict(eta=1.5), r"eta=1.5: ddim expects a number in \[0, 1\]"),
    ("ddim", dict(eta=float("nan")), r"eta=nan: ddim expects a number in \[0, 1\]"),
    ("ddim", dict(eta=True), r"eta=True: ddim expects a number"),
    ("unipc", dict(order=4), r"order=4: unipc expects 1, 2 or 3"),
    ("unipc", dict(order=2.0), r"order=2.0: unipc expects 1, 2 or 3"),
    ("unipc", dict(corrector=1), r"corrector=1: unipc expects True or False"),
    ("dpmpp_2m", dict(lower_order_final="no"), r"lower_order_final=no: dpmpp_2m expects True or False"),
    ("dpmpp_2m_sde", dict(lower_order_final=None), r"lower_order_final=None: dpmpp_2m_sde expects"),
])
def test_sampler_options_out_of_range_are_named_with_their_range(guided, sampler, options, message):
    model, diffusion, _, labels = guided
    with pytest.raises(ValueError, match=message):
        diffusion.sample_loop(model, (3, 3, 8, 8), sampler=sampler, steps=3, model_kwargs={"y": labels},
                              **options)


def test_every_sampler_option_has_a_checked_range():
    options = {name for sampler in SAMPLERS.values() for name in inspect.signature(sampler).parameters}
    assert set(SAMPLER_ARGUMENTS) == {"denoiser", "x", "times", "noise_fn", "progress", "callback"}
    assert options - set(SAMPLER_ARGUMENTS) == set(OPTION_RANGES)


@pytest.mark.parametrize("sampler, options", [
    ("ddim", dict(eta=1.0)), ("ddim", dict(eta=0)), ("heun", dict(s_churn=80.0, s_tmin=0.0, s_tmax=0.0)),
    ("heun", dict(s_churn=float("inf"), s_noise=1.007, s_tmin=3.0)),  # s_tmax: inf ("unipc", dict(order=np.int64(3), corrector=False)),
    ("dpmpp_2m", dict(lower_order_final=np.bool_(False))),
])
def test_sampler_options_at_the_ends_of_their_ranges_give_finite_samples(gaussian, sampler, options):
    assert math.isfinite(error(gaussian, sampler, 6, **options))


def test_every_sampler_has_a_default_grid_and_a_docstring_naming_its_paper():
    assert set(DEFAULT_GRIDS) == set(SAMPLERS)
    for sampler in SAMPLERS.values():
        assert "(" in sampler.__doc__.strip().splitlines()[0] or "et al." in sampler.__doc__


# ----------------------------------------------------------------------------- the Denoiser's pieces


def test_the_network_prediction_splits_the_variance_at_the_fractional_timestep():
    diffusion = create_gaussian_diffusion(steps=100, learn_sigma=True, rescale_timesteps=True)
    schedule, seen = ContinuousSchedule(diffusion), []

    def network(x, timesteps):
        seen.append(timesteps)
        return th.cat([0.5 * x, th.full_like(x, 0.3)], dim=1)

    x = th.randn(2, 3, 4, 4)
    out = NetworkPrediction(network, schedule, ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)(x, 10.25)
    alpha, sigma = schedule.coefficients(10.25)
    assert alpha**2 == pytest.approx(schedule.alpha_bar(10.25)) and alpha**2 + sigma**2 == pytest.approx(1)
    assert th.equal(seen[0], th.full((2,), 102.5))  # scaled to [0, 1000) like the trained timesteps
    assert th.equal(out["variance_values"], th.full_like(x, 0.3))
    assert th.equal(out["x0"], (x - sigma * (0.5 * x)) / alpha)
    assert th.equal(out["eps"], (x - alpha * out["x0"]) / sigma)
    start_x = NetworkPrediction(lambda x, t: x.repeat(1, 2, 1, 1), schedule, ModelMeanType.START_X,
                                ModelVarType.LEARNED)(x, 3.0)
    assert th.equal(start_x["x0"], x) and th.equal(start_x["variance_values"], x)
    with pytest.raises(ValueError, match="not x_{t-1}"):
        NetworkPrediction(network, schedule, ModelMeanType.PREVIOUS_X, ModelVarType.FIXED_SMALL)


def test_classifier_guidance_and_clipping_in_closed_form():
    x0, eps, gradient = th.tensor([[0.5, -2.0]]), th.tensor([[1.0, 3.0]]), th.tensor([[2.0, -1.0]])
    guided_x0, guided_eps = classifier_guidance(x0, eps, gradient, alpha=0.5, sigma=0.25)
    assert th.equal(guided_x0, x0 + 0.125 * gradient) and th.equal(guided_eps, eps - 0.25 * gradient)
    wide = th.tensor([[4.0, -3.0, 0.5, 0.0], [0.5, -0.25, 0.0, 0.0]])
    assert th.equal(clip_prediction(wide), wide.clamp(-1, 1))
    assert th.equal(clip_prediction(wide, clip_denoised=False, dynamic_threshold=1.0),
                    th.stack([wide[0] / 4, wide[1]]))  # s = max |x0|, at least 1
    assert th.equal(clip_prediction(wide, clip_denoised=False), wide)


def test_the_call_counter_counts_returned_calls():
    def network(*args, **kwargs):
        if kwargs.get("fail"):
            raise RuntimeError("failed")
        return args, kwargs

    counter = CallCounter(network)
    assert counter(1, y=2) == ((1,), {"y": 2}) and counter.calls == 1
    with pytest.raises(RuntimeError):
        counter(fail=True)
    assert counter.calls == 1


@pytest.fixture(scope="module")
def constant_gradient(guided):
    """The guided fixture's model with a constant classifier gradient, unclipped."""
    model, diffusion, _, labels = guided
    return model, diffusion, lambda x, t, **kwargs: th.full_like(x, 0.1), {"y": labels}


def test_a_replaced_guidance_alone_changes_the_prediction(constant_gradient):
    model, diffusion, cond_fn, kwargs = constant_gradient
    x, t = th.randn(3, 3, 8, 8), 20.5
    unguided = Denoiser(model, diffusion, model_kwargs=kwargs, clip_denoised=False)(x, t)
    denoiser = Denoiser(model, diffusion, model_kwargs=kwargs, cond_fn=cond_fn, clip_denoised=False)
    denoiser.guidance = lambda x0, eps, gradient, alpha, sigma: (x0 + gradient, eps - 2 * gradient)
    out = denoiser(x, t)
    assert th.equal(out["x0"], unguided["x0"] + 0.1) and th.equal(out["eps"], unguided["eps"] - 0.2)
    assert denoiser.evaluations == 1


def test_a_replaced_clipping_alone_changes_the_prediction(constant_gradient):
    model, diffusion, cond_fn, kwargs = constant_gradient
    x, t = th.randn(3, 3, 8, 8), 20.5
    alpha, sigma = ContinuousSchedule(diffusion).coefficients(t)
    raw = Denoiser(model, diffusion, model_kwargs=kwargs, clip_denoised=False)(x, t)
    denoiser = Denoiser(model, diffusion, model_kwargs=kwargs)
    denoiser.clip_before_guidance = lambda x0: x0.clamp(-0.5, 0.5)
    out = denoiser(x, t)
    assert th.equal(out["x0"], raw["x0"].clamp(-0.5, 0.5)) and raw["x0"].abs().max() > 0.5
    assert th.equal(out["eps"], (x - alpha * out["x0"]) / sigma)
    guided = Denoiser(model, diffusion, model_kwargs=kwargs, cond_fn=cond_fn)
    guided.clip_after_guidance = lambda x0: th.zeros_like(x0)
    out = guided(x, t)
    assert th.equal(out["x0"], th.zeros_like(x)) and th.equal(out["eps"], x / sigma)


def test_a_replaced_network_alone_drives_the_sampler(guided):
    model, diffusion, _, labels = guided
    denoiser = Denoiser(model, diffusion, model_kwargs={"y": labels})
    denoiser.network = lambda x, t: {"x0": th.full_like(x, 0.25), "eps": th.zeros_like(x),
                                     "variance_values": None}
    reports = []
    out = run_sampler(denoiser, th.randn(3, 3, 8, 8), "dpmpp_2m", 4, callback=reports.append)
    assert th.equal(out, th.full_like(out, 0.25)) and len(reports) == 4
    assert all(th.equal(report["denoised"], out) for report in reports) and denoiser.evaluations == 0


# ----------------------------------------------------------------------------- the callback

STOCHASTIC_OPTIONS = {"ddim": dict(eta=0.5), "heun": dict(s_churn=2.0)}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("steps", [5, 6])
def test_each_sampler_reports_its_steps_and_changes_no_number(guided, sampler, steps):
    model, diffusion, cond_fn, labels = guided
    options = dict(sampler=sampler, steps=steps, model_kwargs={"y": labels}, cond_fn=cond_fn,
                   **STOCHASTIC_OPTIONS.get(sampler, {}))
    x_T = th.randn(3, 3, 8, 8)
    th.manual_seed(4)
    plain = diffusion.sample_loop(model, x_T.shape, noise=x_T, **options)
    reports = []
    th.manual_seed(4)
    reported = diffusion.sample_loop(model, x_T.shape, noise=x_T, callback=reports.append, **options)
    assert th.equal(reported, plain)
    assert [report["i"] for report in reports] == list(range(sampler_steps(sampler, steps)))
    times = [report["t"] for report in reports]
    assert all(type(t) is float for t in times) and times == sorted(times, reverse=True)
    assert times[0] == diffusion.timestep_map[-1] and times[-1] == 0.0 and len(set(times)) == len(times)
    assert th.equal(reports[0]["x"], x_T) and all(report["x"].shape == x_T.shape for report in reports)
    if sampler != "ddpm":  # ddpm returns the last step's guided mean
        assert th.equal(reports[-1]["denoised"], reported)


@pytest.mark.parametrize("sampler, options", [("ddim", {}), ("ddpm", {}), ("dpmpp_2m", {}),
                                               ("unipc", dict(corrector=False))])
def test_the_reported_prediction_is_the_denoisers_at_the_reported_sample(guided, sampler, options):
    model, diffusion, _, labels = guided
    denoiser = Denoiser(model, diffusion, model_kwargs={"y": labels})
    reports = []
    run_sampler(denoiser, th.randn(3, 3, 8, 8), sampler, 4, callback=reports.append, **options)
    assert len(reports) == 4
    for report in reports:
        assert th.equal(denoiser(report["x"], report["t"])["x0"], report["denoised"])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_steps_counts_the_callbacks(gaussian, sampler):
    diffusion, exact_eps, x_T, _ = gaussian
    for steps in (1, 2, 3, 6, 7):
        denoiser, reports = Denoiser(exact_eps, diffusion, clip_denoised=False), []
        run_sampler(denoiser, x_T[:2].clone(), sampler, steps, callback=reports.append)
        assert len(reports) == sampler_steps(sampler, steps), steps
        assert denoiser.evaluations == evaluations(sampler, steps)
    assert sampler_steps(sampler, 7) == (4 if sampler == "heun" else 7)
    with pytest.raises(ValueError, match="steps=0"):
        sampler_steps(sampler, 0)
