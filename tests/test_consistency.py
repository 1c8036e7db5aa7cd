"""
Tests for guided_diffusion/consistency.py: consistency distillation on the closed form
of Gaussian data N(0, s^2 I), whose teacher (the exact eps) and exact consistency map
are known, the boundary condition, the student's start from a tiny UNet teacher,
guidance in the teacher's step, the grids and schedules, and multistep sampling.
"""

import copy
import math

import numpy as np
import pytest
import torch as th

from test_sampling import NUM_CLASSES, tiny_flags, tiny_model
from guided_diffusion.consistency import (
    ConsistencyFunction, consistency_distance, consistency_distillation_loss, consistency_sample,
    consistency_sigmas, ict_num_scales, init_student, karras_sigmas, predict_x0, sigmas_of_times,
    SIGMA_MAX, consistency_sigma_range, teacher_sigma_range, teacher_step, times_of_sigmas, update_target,
)
from guided_diffusion.diffusion_types import ModelMeanType
from guided_diffusion.guidance import classifier_free_model
from guided_diffusion.script_util import create_gaussian_diffusion, create_model_and_diffusion
from guided_diffusion.solver_schedule import ContinuousSchedule

DATA_STD = 0.5  # x_0 ~ N(0, DATA_STD^2 I)
EPSILON, START_X = ModelMeanType.EPSILON, ModelMeanType.START_X


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for these tiny tensors (two threads on two busy cores ran the
    tiny UNet 20 times slower), restored afterwards."""
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def seeded_noise(seed):
    """A noise_fn drawing float64 standard normal noise from its own seeded generator."""
    generator = th.Generator().manual_seed(seed)
    return lambda x: th.randn(x.shape, generator=generator, dtype=th.float64)


def per_sample(values):
    return th.as_tensor(values, dtype=th.float64).view(-1, 1, 1, 1)


class ExactMap:
    """The exact consistency function of N(0, s^2 I) data: along the probability-flow ODE
    x_t / (alpha_t sqrt(s^2 + sigma^2)) is constant, so x at sigma_min is
    alpha_min (x_t / alpha_t) sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2)."""

    def __init__(self, schedule, sigma_min):
        self.schedule, self.sigma_min, self.calls = schedule, sigma_min, 0
        self.alpha_min = math.sqrt(schedule.alpha_bar(times_of_sigmas(schedule, sigma_min)))

    def __call__(self, x, t, **model_kwargs):
        self.calls += 1
        times = t.numpy()
        alpha = per_sample(np.sqrt(self.schedule.alpha_bar(times)))
        sigma = per_sample(sigmas_of_times(self.schedule, times))
        spread_ratio = math.sqrt(DATA_STD**2 + self.sigma_min**2) / th.sqrt(DATA_STD**2 + sigma**2)
        return self.alpha_min * (x / alpha) * spread_ratio


@pytest.fixture(scope="module")
def gaussian():
    """ADM's 1000-step linear schedule, the exact eps of N(0, s^2 I) data as the teacher
    (timesteps are real times: no rescaling), the teacher's sigma range and the exact map."""
    schedule = ContinuousSchedule(create_gaussian_diffusion(steps=1000, noise_schedule="linear"))

    def exact_eps(x, timesteps):
        alpha_bar = per_sample(schedule.alpha_bar(timesteps.numpy()))
        return th.sqrt(1 - alpha_bar) * x / (alpha_bar * DATA_STD**2 + 1 - alpha_bar)

    sigma_min, sigma_max = teacher_sigma_range(schedule)
    return schedule, exact_eps, sigma_min, sigma_max, ExactMap(schedule, sigma_min)


def data(batch, seed=0, shape=(1, 1, 2)):
    return DATA_STD * th.randn(batch, *shape, generator=th.Generator().manual_seed(seed), dtype=th.float64)


# ------------------------------------------------------------------ (a) the loss of the exact map


def accumulated_error(gaussian, solver, num_scales):
    """The CD loss's local errors (root mean squared, l2) of the exact map summed over the
    grid: sum_n E[|f*(x_{n+1}) - f*(x_hat_n)|] bounds the distilled map's error (CM thm. 1)."""
    schedule, exact_eps, sigma_min, sigma_max, exact = gaussian
    sigmas = karras_sigmas(sigma_min, sigma_max, num_scales)
    out = consistency_distillation_loss(exact, exact, exact_eps, schedule, EPSILON, data(4096), sigmas,
                                        generator=th.Generator().manual_seed(1), solver=solver, distance="l2")
    index, local = out["grid_index"], out["loss"].sqrt()
    assert sorted(set(index.tolist())) == list(range(num_scales - 1))
    return sum(float(local[index == n].mean()) for n in range(num_scales - 1))


@pytest.mark.parametrize("solver, order", [("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_the_exact_map_has_a_loss_that_falls_at_the_solvers_order(gaussian, solver, order):
    errors = [accumulated_error(gaussian, solver, n) for n in (11, 21, 41, 81)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(rate - order) < 0.3 for rate in rates[1:]), (errors, rates)
    assert errors[-1] < (0.01 if order == 2 else 0.1), errors


def test_the_exact_map_has_a_pseudo_huber_loss_near_zero(gaussian):
    schedule, exact_eps, sigma_min, sigma_max, exact = gaussian
    losses = [consistency_distillation_loss(exact, exact, exact_eps, schedule, EPSILON, data(1024),
                                            karras_sigmas(sigma_min, sigma_max, num_scales),
                                            generator=th.Generator().manual_seed(2))["loss"]
              for num_scales in (41, 81)]
    # measured: 7.6e-5, then 1.6e-6 (below c = 0.00108 the distance is quadratic)
    assert losses[1].mean() < 5e-6 and losses[0].mean() > 10 * losses[1].mean() and losses[1].min() >= 0


# ------------------------------------------------------------------ (b) distillation of a student


class GridAffine(th.nn.Module):
    """An x_0-predicting "network" x_0 = a(t) x_t with one learnable a per grid time."""

    def __init__(self, times):
        super().__init__()
        self.register_buffer("times", th.from_numpy(times))
        self.values = th.nn.Parameter(th.zeros(len(times), dtype=th.float64))

    def forward(self, x, timesteps):
        index = (timesteps[:, None] - self.times[None]).abs().argmin(1)
        return self.values[index].view(-1, 1, 1, 1) * x


def test_distillation_drives_a_student_to_the_exact_map(gaussian):
    schedule, exact_eps, sigma_min, sigma_max, exact = gaussian
    sigmas = karras_sigmas(sigma_min, sigma_max, 18)
    student = GridAffine(times_of_sigmas(schedule, sigmas))
    target = copy.deepcopy(student).requires_grad_(False)
    student_fn = ConsistencyFunction(student, schedule, START_X, sigma_min)
    target_fn = ConsistencyFunction(target, schedule, START_X, sigma_min)
    x_T = th.randn(64, 1, 1, 2, generator=th.Generator().manual_seed(5), dtype=th.float64)
    t_max = th.full((64,), schedule.t_max, dtype=th.float64)

    def relative_error():
        with th.no_grad():
            expected = exact(x_T, t_max)
            return float((student_fn(x_T, t_max) - expected).norm() / expected.norm())

    before = relative_error()
    # plain SGD on the l2 distance (Adam's and the pseudo-Huber's unit-size steps keep the
    # upper levels, each chasing the one below, oscillating), written out: torch.optim's
    # first step imports for seconds
    generator = th.Generator().manual_seed(6)
    for step in range(300):
        out = consistency_distillation_loss(student_fn, target_fn, exact_eps, schedule, EPSILON,
                                            data(64, seed=100 + step), sigmas, generator=generator, distance="l2")
        out["loss"].mean().backward()
        assert target.values.grad is None
        with th.no_grad():
            student.values -= 3.0 * student.values.grad
        student.values.grad = None
        update_target(target.parameters(), student.parameters(), 0.5)
    after = relative_error()
    assert before > 0.99 and after < 0.02, (before, after)  # measured: 1.000, then 0.0023


# ------------------------------------------------------------------ (c) the boundary condition


@pytest.mark.parametrize("model_mean_type", [EPSILON, START_X])
def test_the_consistency_function_is_the_identity_at_the_boundary(tiny_model, model_mean_type):
    schedule = ContinuousSchedule(create_gaussian_diffusion(steps=40))
    sigma_min = teacher_sigma_range(schedule)[0]
    f = ConsistencyFunction(tiny_model(), schedule, model_mean_type, sigma_min)
    x = th.randn(4, 3, 2, 2) * 3
    t = th.tensor([schedule.t_min, 10.5, schedule.t_min, 39.0], dtype=th.float64)
    out = f(x, t)
    assert th.equal(out[[0, 2]], x[[0, 2]])
    assert not th.allclose(out[[1, 3]], x[[1, 3]], atol=1e-3)
    assert f.c_skip(sigma_min) == 1.0


def test_a_clamped_consistency_function_clamps_d_straight_through_and_keeps_the_boundary():
    schedule = ContinuousSchedule(create_gaussian_diffusion(steps=40))
    sigma_min = teacher_sigma_range(schedule)[0]
    gain = th.tensor(0.2, requires_grad=True)

    def network(x, timesteps):
        return gain * x  # eps = 0.2 x: D = (1 - 0.2 sqrt(1 - alpha_bar)) x / alpha far outside [-1, 1]

    x = th.randn(4, 3, 2, 2, generator=th.Generator().manual_seed(0)) * 3
    t = th.tensor([schedule.t_min, 10.5, 25.0, 39.0], dtype=th.float64)
    plain, clamped = (ConsistencyFunction(network, schedule, EPSILON, sigma_min, clip_denoised=clip)
                      for clip in (False, True))
    x0 = predict_x0(network, schedule, EPSILON, x, t)
    c_skip = per_sample(plain.c_skip(sigmas_of_times(schedule, t.numpy()))).float()
    out = clamped(x, t)
    assert th.equal(out[0], x[0])  # f(x, t_min) = x, even outside [-1, 1]
    assert th.allclose(out, c_skip * x + (1 - c_skip) * x0.clamp(-1, 1), atol=1e-6)
    assert (x0[1:].abs() > 1).any() and not th.allclose(out, plain(x, t))
    gradients = [th.autograd.grad(f(x, t).sum(), gain)[0] for f in (plain, clamped)]
    assert gradients[0] != 0 and th.equal(gradients[0], gradients[1])  # D's gradient, unclamped


# ------------------------------------------------------------------ (d) the student's start


@pytest.fixture(scope="module")
def teacher():
    model, diffusion = tiny_model(class_cond=False, timestep_respacing="")
    return model, ContinuousSchedule(diffusion)


def test_a_student_starts_as_the_teachers_x0_prediction_within_c_skip(teacher):
    model, schedule = teacher
    th.manual_seed(9)
    student = init_student(create_model_and_diffusion(**tiny_flags(class_cond=False, timestep_respacing=""))[0],
                           model.state_dict()).eval()
    sigma_min, sigma_max = teacher_sigma_range(schedule)
    f = ConsistencyFunction(student, schedule, EPSILON, sigma_min)
    x_T, t_max = th.randn(2, 3, 8, 8), th.full((2,), schedule.t_max, dtype=th.float64)
    with th.no_grad():
        x0 = predict_x0(model, schedule, EPSILON, x_T, t_max)
        gap = (f(x_T, t_max) - x0).abs()
    bound = f.c_skip(sigma_max)
    assert bound < 1e-5 and gap.max() > 0
    # |f - D| = c_skip |x_T - D|, up to float32 rounding (a few ulps of D, ~15 times less)
    assert th.all(gap <= bound * (x_T - x0).abs() + 4 * th.finfo(th.float32).eps * x0.abs())
    adm_linear = ContinuousSchedule(create_gaussian_diffusion(steps=1000, noise_schedule="linear"))
    low, high = teacher_sigma_range(adm_linear)
    assert 157 < high < 158 and 0.9e-5 < ConsistencyFunction(None, adm_linear, EPSILON, low).c_skip(high) < 1.1e-5


def test_the_consistency_range_stops_at_edms_sigma_max_below_adms_top_levels():
    for name, top in (("linear", 157.41), ("cosine", 20291.2)):
        schedule = ContinuousSchedule(create_gaussian_diffusion(steps=1000, noise_schedule=name))
        low, high = teacher_sigma_range(schedule)
        assert abs(high / top - 1) < 1e-3
        assert consistency_sigma_range(schedule) == (low, SIGMA_MAX) == (low, 80.0)
        assert consistency_sigma_range(schedule, sigma_max=1e9) == (low, high)  # never above the teacher's
        with pytest.raises(ValueError, match="sigma_max=0.001: expected a level above the teacher's lowest"):
            consistency_sigma_range(schedule, sigma_max=1e-3)


def test_a_class_conditional_student_of_an_unconditional_teacher_starts_as_the_teacher(teacher):
    model, schedule = teacher
    th.manual_seed(10)
    student = init_student(create_model_and_diffusion(**tiny_flags(class_cond=True, timestep_respacing=""))[0],
                           model.state_dict()).eval()
    assert not student.label_emb.weight.any()
    sigma_min = teacher_sigma_range(schedule)[0]
    x, t = th.randn(2, 3, 8, 8), th.tensor([30.0, 12.25], dtype=th.float64)
    with th.no_grad():
        conditional = ConsistencyFunction(student, schedule, EPSILON, sigma_min)(x, t, y=th.tensor([1, 3]))
        unconditional = ConsistencyFunction(model, schedule, EPSILON, sigma_min)(x, t)
    assert th.allclose(conditional, unconditional, atol=1e-6)


def test_init_student_names_the_keys_that_do_not_fit(teacher):
    model, _ = teacher
    wider = create_model_and_diffusion(**tiny_flags(class_cond=False, timestep_respacing="", num_channels=64))[0]
    with pytest.raises(ValueError, match="shapes differ: .*input_blocks.0.0.weight"):
        init_student(wider, model.state_dict())
    conditional = create_model_and_diffusion(**tiny_flags(class_cond=True, timestep_respacing=""))[0]
    with pytest.raises(ValueError, match=r"not in the student: \['label_emb.weight'\]"):
        init_student(copy.deepcopy(model), conditional.state_dict())
    state = dict(model.state_dict())
    del state["out.2.bias"]
    with pytest.raises(ValueError, match=r"missing from the teacher: \['out.2.bias'\]"):
        init_student(copy.deepcopy(model), state)
    assert conditional.num_classes == NUM_CLASSES


# ------------------------------------------------------------------ (e) the teacher's step and guidance


@pytest.fixture(scope="module")
def step_inputs(gaussian):
    x = th.randn(3, 1, 2, 2, generator=th.Generator().manual_seed(3), dtype=th.float64)
    t_from, t_to = th.tensor([500.0, 80.5, 999.0], dtype=th.float64), th.tensor([400.0, 60.0, 900.0], dtype=th.float64)
    return x, t_from, t_to, th.tensor([600.0, 80.5, 999.0], dtype=th.float64)


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp_2m"])
def test_guidance_at_scale_zero_is_the_unguided_step(gaussian, step_inputs, solver):
    schedule, exact_eps = gaussian[:2]
    x, t_from, t_to, t_previous = step_inputs
    history = {"t_previous": t_previous} if solver == "dpmpp_2m" else {}
    seen = []

    def zero_gradient(x, timesteps, **kwargs):
        seen.append(timesteps)
        return th.zeros_like(x)

    unguided = teacher_step(exact_eps, schedule, EPSILON, x, t_from, t_to, solver, **history)
    guided = teacher_step(exact_eps, schedule, EPSILON, x, t_from, t_to, solver, cond_fn=zero_gradient, **history)
    assert th.equal(guided, unguided) and th.equal(seen[0], t_from)


def test_a_gradient_moves_the_ddim_step_by_its_closed_form(gaussian, step_inputs):
    schedule, exact_eps = gaussian[:2]
    x, t_from, t_to, _ = step_inputs
    gradient = 0.3 * th.randn(x.shape, generator=th.Generator().manual_seed(4), dtype=th.float64)
    unguided = teacher_step(exact_eps, schedule, EPSILON, x, t_from, t_to, "ddim")
    guided = teacher_step(exact_eps, schedule, EPSILON, x, t_from, t_to, "ddim", cond_fn=lambda x, t: gradient)
    alpha_bar_from = per_sample(schedule.alpha_bar(t_from.numpy()))
    alpha_bar_to = per_sample(schedule.alpha_bar(t_to.numpy()))
    # x0~ = x0 + (1 - a) / sqrt(a) g and eps~ = eps - sqrt(1 - a) g at t_from
    shift = th.sqrt(alpha_bar_to) * (1 - alpha_bar_from) / th.sqrt(alpha_bar_from) - th.sqrt(
        (1 - alpha_bar_to) * (1 - alpha_bar_from))
    assert th.allclose(guided - unguided, shift * gradient, atol=1e-12, rtol=0)


def test_guided_distillation_at_scale_zero_is_the_unguided_one(gaussian):
    schedule, exact_eps, sigma_min, sigma_max, exact = gaussian
    losses = [consistency_distillation_loss(exact, exact, exact_eps, schedule, EPSILON, data(8),
                                            karras_sigmas(sigma_min, sigma_max, 11),
                                            generator=th.Generator().manual_seed(7), cond_fn=cond_fn)["loss"]
              for cond_fn in (None, lambda x, t: th.zeros_like(x))]
    assert th.equal(*losses)


def test_classifier_free_guidance_is_a_teacher_passed_in():
    model, diffusion = tiny_model(timestep_respacing="", class_cond=True, class_dropout_prob=0.1)
    schedule, labels = ContinuousSchedule(diffusion), {"y": th.tensor([0, 2])}
    x, t_from, t_to = th.randn(2, 3, 8, 8), th.tensor([30.0, 12.5]).double(), th.tensor([20.0, 3.0]).double()
    with th.no_grad():
        steps = [teacher_step(teacher, schedule, EPSILON, x, t_from, t_to, "heun", labels)
                 for teacher in (model, classifier_free_model(model, 1.0, NUM_CLASSES),
                                 classifier_free_model(model, 3.0, NUM_CLASSES))]
    assert th.allclose(steps[0], steps[1], rtol=1e-4, atol=1e-4)  # w = 1: the conditional model (float32)
    assert not th.allclose(steps[0], steps[2], atol=1e-3)


def test_dpmpp_2m_is_ddim_without_history_and_evaluates_twice_with_it(gaussian, step_inputs):
    schedule, exact_eps = gaussian[:2]
    x, t_from, t_to, t_previous = step_inputs
    calls = []

    def counted(x, timesteps):
        calls.append(timesteps)
        return exact_eps(x, timesteps)

    ddim = teacher_step(exact_eps, schedule, EPSILON, x, t_from, t_to, "ddim")
    first_order = teacher_step(counted, schedule, EPSILON, x, t_from, t_to, "dpmpp_2m")
    assert th.allclose(first_order, ddim, atol=1e-12, rtol=0) and len(calls) == 1
    second_order = teacher_step(counted, schedule, EPSILON, x, t_from, t_to, "dpmpp_2m", t_previous=t_previous)
    assert len(calls) == 3 and th.equal(calls[2], t_previous)
    assert th.allclose(second_order[1:], ddim[1:], atol=1e-12, rtol=0)  # t_previous = t_from: no history
    assert not th.allclose(second_order[:1], ddim[:1], atol=1e-6)
    with pytest.raises(ValueError, match="solver='euler': expected one of ddim, heun, dpmpp_2m"):
        teacher_step(exact_eps, schedule, EPSILON, x, t_from, t_to, "euler")
    with pytest.raises(ValueError, match="t_previous is dpmpp_2m's history time"):
        teacher_step(exact_eps, schedule, EPSILON, x, t_from, t_to, "heun", t_previous=t_previous)


# ------------------------------------------------------------------ (f) grids, schedules, the loss's pieces


def test_the_karras_grid_and_its_times(gaussian):
    schedule, _, sigma_min, sigma_max, _ = gaussian
    sigmas = karras_sigmas(sigma_min, sigma_max, 18)
    assert sigmas.dtype == np.float64 and sigmas[0] == sigma_min and sigmas[-1] == sigma_max
    assert np.all(np.diff(sigmas) > 0)
    # EDM's eq. 5, descending index i = 17 - n
    i = 17 - 5
    edm = (sigma_max ** (1 / 7) + i / 17 * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    assert sigmas[5] == pytest.approx(edm, rel=1e-12)
    times = times_of_sigmas(schedule, sigmas)
    assert np.allclose(sigmas_of_times(schedule, times), sigmas, rtol=1e-9)
    assert times[0] == pytest.approx(0.0, abs=1e-9) and times[-1] == pytest.approx(999.0)
    with pytest.raises(ValueError, match="outside the teacher's noise levels"):
        times_of_sigmas(schedule, [sigma_max * 1.01])
    with pytest.raises(ValueError, match="num_scales=1: expected at least 2"):
        karras_sigmas(0.01, 80.0, 1)
    with pytest.raises(ValueError, match="sigma_min=80.0, sigma_max=0.01"):
        karras_sigmas(80.0, 0.01, 10)
    with pytest.raises(ValueError, match="rho=0"):
        karras_sigmas(0.01, 80.0, 10, rho=0)


def test_the_ict_schedule_doubles_the_scales():
    assert [ict_num_scales(k, 1000) for k in (0, 124, 125, 250, 874, 875, 999)] == [11, 11, 21, 41, 641, 1281, 1281]
    assert ict_num_scales(0, 3) == 11 and ict_num_scales(2, 3) == 41  # K' >= 1 for short runs
    with pytest.raises(ValueError, match="total_steps=0: expected at least 1"):
        ict_num_scales(0, 0)


def test_update_target_averages_and_refuses_rates_outside_0_1():
    target, student = [th.ones(3)], [th.full((3,), 3.0)]
    update_target(target, student, 0.5)
    assert th.equal(target[0], th.full((3,), 2.0))
    update_target(target, student, 0.0)
    assert th.equal(target[0], student[0])
    for rate in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"target_ema={rate}: expected a rate in \[0, 1\)"):
            update_target(target, student, rate)


def test_the_loss_draws_n_then_z_and_weights_and_distances_as_documented(gaussian):
    schedule, exact_eps, sigma_min, sigma_max, _ = gaussian
    sigmas = karras_sigmas(sigma_min, sigma_max, 11)
    generator = th.Generator().manual_seed(8)
    expected_n = th.randint(0, 10, (16,), generator=generator)
    z = th.randn(16, 1, 1, 2, generator=generator, dtype=th.float64)
    seen = []

    def identity(x, t):  # the student: its loss is the distance of x_{n+1} to the target's 0
        seen.append(x)
        return x

    def zero(x, t):  # the target
        return th.zeros_like(x)

    runs = {weighting: consistency_distillation_loss(identity, zero, exact_eps, schedule, EPSILON, data(16), sigmas,
                                                     generator=th.Generator().manual_seed(8), distance="l2",
                                                     weighting=weighting)
            for weighting in ("uniform", "ict")}
    n = runs["ict"]["grid_index"]
    assert th.equal(n, expected_n) and th.equal(runs["ict"]["sigma"], th.from_numpy(sigmas[n.numpy() + 1]))
    alpha = per_sample(np.sqrt(schedule.alpha_bar(times_of_sigmas(schedule, sigmas[n.numpy() + 1]))))
    assert th.allclose(seen[0], alpha * (data(16) + per_sample(sigmas[n.numpy() + 1]) * z), atol=1e-12)
    assert th.allclose(runs["uniform"]["loss"], (seen[0] ** 2).flatten(1).mean(1))
    weights = th.from_numpy(1 / (sigmas[n.numpy() + 1] - sigmas[n.numpy()]))
    assert th.allclose(runs["ict"]["loss"], weights * runs["uniform"]["loss"])
    a, b = th.zeros(1, 4, 5, 5), th.full((1, 4, 5, 5), 0.01)
    c = 0.00054 * 10
    assert consistency_distance(a, b, "pseudo_huber").item() == pytest.approx(math.sqrt(100 * 1e-4 + c**2) - c)
    with pytest.raises(ValueError, match="distance='l1': expected one of l2, pseudo_huber"):
        consistency_distance(a, b, "l1")


# ------------------------------------------------------------------ (g) multistep sampling


def test_one_step_sampling_is_the_exact_map_of_x_T(gaussian):
    schedule, _, sigma_min, sigma_max, exact = gaussian
    steps = []
    sample = consistency_sample(exact, schedule, (8, 1, 2, 2), consistency_sigmas(sigma_min, sigma_max, 1),
                                noise_fn=seeded_noise(0), clip_denoised=False, callback=steps.append)
    z = seeded_noise(0)(th.empty(8, 1, 2, 2))
    x_T = z * math.sqrt(schedule.alpha_bar(schedule.t_max)) * sigma_max
    assert len(steps) == 1 and steps[0]["t"] == pytest.approx(999.0) and th.allclose(steps[0]["x"], x_T, atol=1e-14)
    assert th.allclose(sample, exact(x_T, th.full((8,), 999.0, dtype=th.float64)), atol=1e-12)


def test_multistep_sampling_gives_the_datas_spread_deterministically(gaussian):
    schedule, _, sigma_min, sigma_max, _ = gaussian
    exact = ExactMap(schedule, sigma_min)
    sigmas = consistency_sigmas(sigma_min, sigma_max, 3)
    assert sigmas[0] == sigma_max and np.all(np.diff(sigmas) < 0) and len(sigmas) == 3
    midpoint = consistency_sigmas(sigma_min, sigma_max, 2)[1]
    assert midpoint == pytest.approx(((sigma_min ** (1 / 7) + sigma_max ** (1 / 7)) / 2) ** 7)
    steps = []
    runs = [consistency_sample(exact, schedule, (4000, 1, 2, 2), sigmas, noise_fn=seeded_noise(1), clip_denoised=False,
                               callback=steps.append) for _ in range(2)]
    assert th.equal(*runs) and exact.calls == 6 and len(steps) == 6
    assert [step["t"] for step in steps[:3]] == pytest.approx(times_of_sigmas(schedule, sigmas).tolist())
    assert abs(float(runs[0].std()) - DATA_STD) < 0.01
    with pytest.raises(ValueError, match="sigmas_to_visit=.*expected decreasing noise levels above sigma_min"):
        consistency_sample(exact, schedule, (2, 1, 2, 2), sigmas[::-1])
