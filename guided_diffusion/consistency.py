"""
Consistency distillation of an ADM teacher (Song et al. 2023, "Consistency Models": CD,
algorithm 2; multistep sampling, algorithm 1), with Song & Dhariwal 2023's pseudo-Huber
distance, 1 / (sigma_{n+1} - sigma_n) weighting and doubling schedule of the number of
noise levels (iCT), on the teacher's own VP schedule in continuous time
(solver_schedule.ContinuousSchedule).

Noise levels: time t has alpha_t = sqrt(alpha_bar_t) and sigma(t) = sqrt((1 - alpha_bar_t)
/ alpha_bar_t) = exp(-lambda_t), so x_t = alpha_t (x_0 + sigma z) and x_t / alpha_t is
EDM's variance-exploding variable. CD's grid is EDM's rho = 7 grid (karras_sigmas) from the
teacher's lowest level up to EDM's sigma_max = 80 (consistency_sigma_range), at real times
(times_of_sigmas). Times are per sample: an [N] tensor of real times, one per sample (this
module passes float64 tensors on the CPU); the network gets ContinuousSchedule.model_time
of each.

The consistency function (ConsistencyFunction) maps x_t to its probability-flow
trajectory's point at the boundary time (sigma = sigma_min), in the VP variable:
f(x_t, t) = c_skip(sigma) x_t + (1 - c_skip(sigma)) D(x_t, t), D the network's x_0
prediction in the teacher's parametrisation, c_skip(sigma) = sigma_data^2 /
((sigma - sigma_min)^2 + sigma_data^2). So f(x, t_min) = x exactly, and a student with
the teacher's weights starts as the teacher's x_0 prediction, within c_skip(sigma) |x_t - D|:
c_skip(80) = 3.9e-5.

Clamping (clip_denoised, the training default): the teacher's x_0 in its ODE steps and D
in the consistency functions are clamped to [-1, 1], as ADM's samplers clamp x_0. In the
eps parametrisation D = (x_t - sqrt(1 - alpha_bar) eps) / alpha_t multiplies eps errors by
sigma: on the quickstart's digits the teacher's D at sigma = 80 is 6.4 from the data (root
mean square), 87% of its values outside [-1, 1]. D's clamp is straight-through: its value
is clamped, its gradient is D's, so that the student still learns where D is out of range.

Random draws: consistency_distillation_loss draws n, then z, from its generator;
consistency_sample draws x_T, then one noise per later level, through noise_fn.
"""

import functools
import math

import numpy as np
import torch as th

from .denoiser import classifier_guidance, clip_prediction
from .diffusion_types import ModelMeanType
from .solvers import report_step

SIGMA_DATA = 0.5  # the standard deviation of images in [-1, 1], as in EDM and CM
SIGMA_MAX = 80.0  # EDM's and CM's highest noise level
DISTANCES = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "ict")
PSEUDO_HUBER_SCALE = 0.00054  # iCT's c = 0.00054 sqrt(d) for d values per sample


def _check_choice(name, value, choices):
    """Raise a ValueError naming the argument unless value is one of choices."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")


def _check_count(name, value, least):
    """Raise a ValueError naming the argument unless value is an integer >= least."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name}={value}: expected at least {least} (an integer)")


# ------------------------------------------------------------------ noise levels


def sigmas_of_times(schedule, times):
    """
    :param schedule: a ContinuousSchedule.
    :param times: real times (a float or an array).
    :return: sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) = exp(-lambda_t), float64.
    """
    return np.exp(-schedule.half_log_snr(times))


def teacher_sigma_range(schedule):
    """
    :param schedule: the teacher's ContinuousSchedule.
    :return: (sigma at t_min, sigma at t_max) as floats: the widest grid CD can use.
    """
    return float(sigmas_of_times(schedule, schedule.t_min)), float(sigmas_of_times(schedule, schedule.t_max))


def consistency_sigma_range(schedule, sigma_max=SIGMA_MAX):
    """
    The noise levels a consistency model covers: from the teacher's lowest up to sigma_max
    (EDM's and CM's 80), or the teacher's highest if lower. The teacher's own top level
    is far higher on ADM's schedules (157 linear, 20291 cosine at T = 1000), where x_t is
    noise to many digits and the eps parametrisation's x_0 multiplies eps errors by sigma:
    a grid up to there spends most of its levels, and the loss, on pure noise.

    :param schedule: the teacher's ContinuousSchedule.
    :param sigma_max: the highest level wanted.
    :return: (sigma_min, sigma_max) as floats.
    """
    low, high = teacher_sigma_range(schedule)
    if not sigma_max > low:
        raise ValueError(f"sigma_max={sigma_max}: expected a level above the teacher's lowest, {low}")
    return low, min(float(sigma_max), high)


def karras_sigmas(sigma_min, sigma_max, num_scales, rho=7.0):
    """
    EDM's and CM's noise levels (Karras et al. 2022, eq. 5), evenly spaced in sigma^(1/rho).

    :param sigma_min: the lowest level, > 0.
    :param sigma_max: the highest level.
    :param num_scales: N, the number of levels (at least 2).
    :param rho: the spacing's exponent (> 0; 7 in EDM and CM).
    :return: the ascending float64 array sigma_0 = sigma_min < ... < sigma_{N-1} = sigma_max.
    """
    _check_count("num_scales", num_scales, 2)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: expected 0 < sigma_min < sigma_max")
    if not rho > 0:
        raise ValueError(f"rho={rho}: expected a number > 0 (7 in EDM and CM)")
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (low + np.linspace(0.0, 1.0, num_scales) * (high - low)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max  # exact ends despite rounding
    return sigmas


def times_of_sigmas(schedule, sigmas):
    """
    :param schedule: the teacher's ContinuousSchedule.
    :param sigmas: noise levels within teacher_sigma_range(schedule).
    :return: the real times t with sigma(t) = sigmas, float64.
    """
    sigmas = np.asarray(sigmas, np.float64)
    low, high = teacher_sigma_range(schedule)
    outside = sigmas[~((sigmas >= low) & (sigmas <= high))]
    if outside.size:
        raise ValueError(f"sigmas {outside.tolist()}: outside the teacher's noise levels [{low}, {high}] "
                         "(teacher_sigma_range)")
    return schedule.time_of_half_log_snr(-np.log(sigmas))


def ict_num_scales(step, total_steps, start=10, end=1280):
    """
    iCT's doubling schedule of the number of noise levels (Song & Dhariwal 2023, sec. 3.4):
    N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = max(1, floor(K / (log2 floor(s1 / s0) + 1))).

    :param step: k, the training step (from 0).
    :param total_steps: K, the training steps in all.
    :param start: s0, the levels at the start, less one.
    :param end: s1, the most levels, less one.
    :return: N(k).
    """
    _check_count("total_steps", total_steps, 1)
    if not 1 <= start <= end:
        raise ValueError(f"start={start}, end={end}: expected 1 <= start <= end")
    steps_per_doubling = max(1, math.floor(total_steps / (math.log2(end // start) + 1)))
    return min(start * 2 ** (step // steps_per_doubling), end) + 1


# ------------------------------------------------------------------ the networks at per-sample times


def _times_array(t, x):
    """:return: the [N] tensor of real times t (one per sample of x) as a float64 array."""
    if tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"times of shape {tuple(t.shape)}: expected one per sample, ({x.shape[0]},)")
    return t.detach().to("cpu", th.float64).numpy()


def _per_sample(values, x):
    """:return: [N] float64 values as a tensor of x's dtype and device, shaped [N, 1, ...]."""
    return th.as_tensor(values, dtype=x.dtype, device=x.device).view(-1, *[1] * (x.dim() - 1))


def _scalings(schedule, x, t):
    """:return: (alpha_t, sqrt(1 - alpha_bar_t), sigma(t)) at the times t, each [N, 1, ...]."""
    times = _times_array(t, x)
    alpha, sigma = np.sqrt(schedule.alpha_bar(times)), sigmas_of_times(schedule, times)
    return _per_sample(alpha, x), _per_sample(alpha * sigma, x), _per_sample(sigma, x)


def per_sample_timesteps(schedule, x, t):
    """
    denoiser.model_timesteps with one time per sample.

    :param schedule: a ContinuousSchedule.
    :param x: x_t [N x ...], for its dtype and device.
    :param t: an [N] tensor of real times in [0, T-1].
    :return: the [N] timesteps the network and the classifier get.
    """
    return th.as_tensor(schedule.model_time(_times_array(t, x)), dtype=x.dtype, device=x.device)


def _check_mean_type(model_mean_type):
    """Raise a ValueError unless the network predicts eps or x_0."""
    if model_mean_type not in (ModelMeanType.EPSILON, ModelMeanType.START_X):
        raise ValueError(f"model_mean_type={model_mean_type}: consistency distillation needs a network "
                         "that predicts eps or x_0 (EPSILON or START_X)")


def predict_x0(model, schedule, model_mean_type, x, t, model_kwargs=None):
    """
    A network's x_0 prediction D(x_t, t) at per-sample times, as its diffusion parametrises
    it: the output (START_X) or (x_t - sqrt(1 - alpha_bar) eps) / alpha_t (EPSILON).
    Learned-variance channels (an output of twice x's channels) are ignored.

    :param model: the network, called as model(x, timesteps, **model_kwargs).
    :param schedule: the ContinuousSchedule of its diffusion.
    :param model_mean_type: ModelMeanType.EPSILON or START_X.
    :param x: x_t [N x C x ...].
    :param t: an [N] tensor of real times.
    :param model_kwargs: e.g. {"y": labels}.
    :return: the x_0 prediction.
    """
    _check_mean_type(model_mean_type)
    alpha, sigma_vp, _ = _scalings(schedule, x, t)
    output = model(x, per_sample_timesteps(schedule, x, t), **(model_kwargs or {}))
    if output.shape[1] == 2 * x.shape[1]:
        output = output[:, : x.shape[1]]
    elif output.shape[1] != x.shape[1]:
        raise ValueError(f"model output of {output.shape[1]} channels: expected {x.shape[1]} "
                         f"(or {2 * x.shape[1]} with a learned variance)")
    return output if model_mean_type == ModelMeanType.START_X else (x - sigma_vp * output) / alpha


class ConsistencyFunction:
    """
    A network's (student's or target's) consistency function, f(x_t, t) = c_skip(sigma) x_t
    + (1 - c_skip(sigma)) D(x_t, t) (the module docstring); f(x, t_min) = x.

    :param model: the network, called as model(x, timesteps, **model_kwargs).
    :param schedule: the teacher's ContinuousSchedule.
    :param model_mean_type: the teacher's ModelMeanType (EPSILON or START_X).
    :param sigma_min: the boundary's level, the CD grid's lowest.
    :param sigma_data: the data's standard deviation.
    :param clip_denoised: clamp D to [-1, 1], straight through (the module docstring).
    """

    def __init__(self, model, schedule, model_mean_type, sigma_min, sigma_data=SIGMA_DATA, clip_denoised=False):
        _check_mean_type(model_mean_type)
        self.model, self.schedule, self.model_mean_type = model, schedule, model_mean_type
        self.sigma_min, self.sigma_data = float(sigma_min), float(sigma_data)
        self.clip_denoised = clip_denoised

    def c_skip(self, sigma):
        """
        :param sigma: noise levels (an array or a float).
        :return: sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2), 1 at sigma_min.
        """
        return self.sigma_data**2 / ((sigma - self.sigma_min) ** 2 + self.sigma_data**2)

    def __call__(self, x_t, t, **model_kwargs):
        """
        :param x_t: [N x C x ...] samples at times t.
        :param t: an [N] tensor of real times, at least sigma_min's.
        :param model_kwargs: the network's, e.g. y=labels.
        :return: f(x_t, t).
        """
        c_skip = _per_sample(self.c_skip(sigmas_of_times(self.schedule, _times_array(t, x_t))), x_t)
        x0 = predict_x0(self.model, self.schedule, self.model_mean_type, x_t, t, model_kwargs)
        if self.clip_denoised:
            x0 = x0 + (x0.clamp(-1, 1) - x0).detach()  # the clamped value, D's gradient
        return c_skip * x_t + (1 - c_skip) * x0


def init_student(student, teacher_state_dict):
    """
    Load the teacher's weights into a student of its architecture; a class-conditional
    student of an unconditional teacher gets a zero label_emb, so that it starts as the
    teacher.

    :param student: the student network.
    :param teacher_state_dict: the teacher's state_dict.
    :return: the student.
    """
    student_state = student.state_dict()
    missing = sorted(set(student_state) - set(teacher_state_dict))
    mismatched = [f"{key} {tuple(student_state[key].shape)} (student) vs {tuple(value.shape)} (teacher)"
                  for key, value in sorted(teacher_state_dict.items())
                  if key in student_state and value.shape != student_state[key].shape]
    problems = {"missing from the teacher": [key for key in missing if not key.startswith("label_emb.")],
                "not in the student": sorted(set(teacher_state_dict) - set(student_state)),
                "shapes differ": mismatched}
    found = "; ".join(f"{what}: {keys}" for what, keys in problems.items() if keys)
    if found:
        raise ValueError("the teacher's weights do not fit the student, which needs the teacher's "
                         f"architecture (class-conditional or not): {found}")
    student.load_state_dict(dict(teacher_state_dict, **{key: th.zeros_like(student_state[key]) for key in missing}))
    return student


# ------------------------------------------------------------------ the teacher's ODE step


def _teacher_prediction(teacher, schedule, model_mean_type, x, t, model_kwargs, cond_fn, clip_denoised):
    """:return: the teacher's (x0, eps) at x_t, t: x_0 clipped, eps from it, then guided."""
    alpha, sigma_vp, _ = _scalings(schedule, x, t)
    x0 = clip_prediction(predict_x0(teacher, schedule, model_mean_type, x, t, model_kwargs), clip_denoised)
    eps = (x - alpha * x0) / sigma_vp
    if cond_fn is not None:
        gradient = cond_fn(x, per_sample_timesteps(schedule, x, t), **model_kwargs)
        x0, eps = classifier_guidance(x0, eps, gradient, alpha, sigma_vp)
    return x0, eps


def _ddim_step(denoise, schedule, x, t_from, t_to):
    """DDIM's deterministic step (Song et al. 2021), first order."""
    x0, eps = denoise(x, t_from)
    alpha_to, sigma_vp_to, _ = _scalings(schedule, x, t_to)
    return alpha_to * x0 + sigma_vp_to * eps


def _heun_step(denoise, schedule, x, t_from, t_to):
    """
    EDM's second-order step (Karras et al. 2022, algorithm 1; CM's heun_solver) in the
    VE variable y = x / alpha: Euler, then the trapezoid rule with the slope at t_to.
    """
    alpha_from, _, sigma_from = _scalings(schedule, x, t_from)
    alpha_to, _, sigma_to = _scalings(schedule, x, t_to)
    y = x / alpha_from
    slope = (y - denoise(x, t_from)[0]) / sigma_from
    y_euler = y + (sigma_to - sigma_from) * slope
    slope_euler = (y_euler - denoise(alpha_to * y_euler, t_to)[0]) / sigma_to
    return alpha_to * (y + (sigma_to - sigma_from) * (slope + slope_euler) / 2)


def _dpmpp_2m_step(denoise, schedule, x, t_from, t_to, t_previous=None):
    """
    DPM-Solver++(2M) (Lu et al. 2022), its history at t_previous: x there is one DDIM
    step back from x, where the teacher's x_0 is evaluated. First order (DDIM) without
    t_previous, and for the samples whose t_previous is not above t_from.
    """
    x0, eps = denoise(x, t_from)
    _, sigma_vp_from, _ = _scalings(schedule, x, t_from)
    alpha_to, sigma_vp_to, _ = _scalings(schedule, x, t_to)
    lambda_from = schedule.half_log_snr(_times_array(t_from, x))
    h = schedule.half_log_snr(_times_array(t_to, x)) - lambda_from
    data = x0
    if t_previous is not None:
        alpha_previous, sigma_vp_previous, _ = _scalings(schedule, x, t_previous)
        x0_previous = denoise(alpha_previous * x0 + sigma_vp_previous * eps, t_previous)[0]
        gap = lambda_from - schedule.half_log_snr(_times_array(t_previous, x))  # r h, 0 without history
        history_weight = np.divide(h, 2 * gap, out=np.zeros_like(h), where=gap > 0)  # 1 / (2 r)
        data = x0 + _per_sample(history_weight, x) * (x0 - x0_previous)
    return (sigma_vp_to / sigma_vp_from) * x - alpha_to * _per_sample(np.expm1(-h), x) * data


TEACHER_SOLVERS = {"ddim": _ddim_step, "heun": _heun_step, "dpmpp_2m": _dpmpp_2m_step}


def teacher_step(teacher, schedule, model_mean_type, x, t_from, t_to, solver="heun", model_kwargs=None,
                 cond_fn=None, t_previous=None, clip_denoised=False):
    """
    One step of the teacher's probability-flow ODE per sample, from t_from down to t_to,
    guided by cond_fn if given (eps~ = eps - sqrt(1 - alpha_bar) cond_fn, after clipping).
    Classifier-free guidance: pass guidance.classifier_free_model(...) as the teacher.

    :param teacher: the network, called as teacher(x, timesteps, **model_kwargs).
    :param schedule: its ContinuousSchedule.
    :param model_mean_type: ModelMeanType.EPSILON or START_X.
    :param x: x at t_from, [N x C x ...].
    :param t_from: an [N] tensor of real times.
    :param t_to: an [N] tensor of lower real times.
    :param solver: "ddim" (first order, one evaluation), "heun" (second order, two) or
        "dpmpp_2m" (second order with t_previous, two evaluations; else DDIM's step).
    :param model_kwargs: e.g. {"y": labels}, for the teacher and cond_fn.
    :param cond_fn: None, or the guidance gradient cond_fn(x, timesteps, **model_kwargs).
    :param t_previous: dpmpp_2m's history times (the next higher grid times), an [N]
        tensor; t_previous = t_from for samples without one.
    :param clip_denoised: clamp the teacher's x_0 predictions to [-1, 1].
    :return: x at t_to.
    """
    _check_choice("solver", solver, tuple(TEACHER_SOLVERS))
    step = TEACHER_SOLVERS[solver]
    if t_previous is not None:
        if solver != "dpmpp_2m":
            raise ValueError(f"t_previous is dpmpp_2m's history time: solver={solver!r} takes none")
        step = functools.partial(step, t_previous=t_previous)
    denoise = functools.partial(_teacher_prediction, teacher, schedule, model_mean_type,
                                model_kwargs=model_kwargs or {}, cond_fn=cond_fn, clip_denoised=clip_denoised)
    return step(denoise, schedule, x, t_from, t_to)


# ------------------------------------------------------------------ training


def consistency_distance(prediction, target, distance):
    """
    :param prediction: the student's [N x ...] outputs.
    :param target: the target's, the same shape.
    :param distance: "l2" (the mean squared difference) or "pseudo_huber" (iCT's
        sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d), d the values per sample).
    :return: the [N] distances.
    """
    _check_choice("distance", distance, DISTANCES)
    values_per_sample = prediction[0].numel()
    squared = ((prediction - target) ** 2).flatten(1).sum(1)
    if distance == "l2":
        return squared / values_per_sample
    c = PSEUDO_HUBER_SCALE * math.sqrt(values_per_sample)
    return th.sqrt(squared + c**2) - c


def consistency_distillation_loss(student_fn, target_fn, teacher, schedule, model_mean_type, x_start, sigmas,
                                  generator=None, solver="heun", distance="pseudo_huber", weighting="uniform",
                                  model_kwargs=None, cond_fn=None, clip_denoised=False):
    """
    The consistency distillation loss (CM algorithm 2), per sample: n ~ U{0, ..., N-2},
    then z ~ N(0, I) (from generator if given), x_{n+1} = alpha(t_{n+1}) (x_start +
    sigma_{n+1} z), the teacher's step to t_n without gradient (teacher_step: see it for
    teacher, model_kwargs, cond_fn, solver, clip_denoised), and weight(n) *
    distance(f_student(x_{n+1}, t_{n+1}), f_target(x_hat_n, t_n)), the target detached.

    :param student_fn: the student's ConsistencyFunction (any f(x_t, t, **model_kwargs)).
    :param target_fn: the target network's.
    :param schedule: the teacher's ContinuousSchedule.
    :param model_mean_type: the teacher's ModelMeanType.
    :param x_start: data [N x C x ...].
    :param sigmas: the ascending grid sigma_0 < ... < sigma_{N-1} (karras_sigmas).
    :param generator: None, or the torch.Generator of n and z.
    :param distance: "l2" or "pseudo_huber" (consistency_distance).
    :param weighting: "uniform" or "ict" (iCT's 1 / (sigma_{n+1} - sigma_n)).
    :return: dict with "loss" (the [N] weighted distances, with the student's graph),
        "grid_index" ([N] n, int64) and "sigma" ([N] sigma_{n+1}, float64).
    """
    _check_choice("solver", solver, tuple(TEACHER_SOLVERS))
    _check_choice("distance", distance, DISTANCES)
    _check_choice("weighting", weighting, WEIGHTINGS)
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or sigmas.size < 2 or np.any(np.diff(sigmas) <= 0):
        raise ValueError(f"sigmas={sigmas.tolist()}: expected at least 2 ascending noise levels (karras_sigmas)")
    times, model_kwargs = times_of_sigmas(schedule, sigmas), model_kwargs or {}
    draw_device = x_start.device if generator is None else generator.device
    n = th.randint(0, len(sigmas) - 1, (x_start.shape[0],), generator=generator, device=draw_device).cpu().numpy()
    z = th.randn(x_start.shape, generator=generator, dtype=x_start.dtype, device=draw_device).to(x_start.device)
    t_next, t_now = th.from_numpy(times[n + 1]), th.from_numpy(times[n])
    x_next = _scalings(schedule, x_start, t_next)[0] * (x_start + _per_sample(sigmas[n + 1], x_start) * z)
    t_previous = th.from_numpy(times[np.minimum(n + 2, len(sigmas) - 1)]) if solver == "dpmpp_2m" else None
    with th.no_grad():
        x_now = teacher_step(teacher, schedule, model_mean_type, x_next, t_next, t_now, solver, model_kwargs,
                             cond_fn, t_previous, clip_denoised)
        target = target_fn(x_now, t_now, **model_kwargs).detach()
    weights = 1 / (sigmas[n + 1] - sigmas[n]) if weighting == "ict" else np.ones(len(n))
    loss = th.as_tensor(weights, dtype=x_start.dtype, device=x_start.device) * consistency_distance(
        student_fn(x_next, t_next, **model_kwargs), target, distance)
    return {"loss": loss, "grid_index": th.from_numpy(n), "sigma": th.from_numpy(sigmas[n + 1])}


def update_target(target_parameters, student_parameters, rate):
    """
    CM's target update: target <- rate * target + (1 - rate) * student, without gradient.

    :param target_parameters: the target network's parameters.
    :param student_parameters: the student's, in the same order.
    :param rate: mu in [0, 1) (the target_ema; 0 copies the student, as iCT does).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"target_ema={rate}: expected a rate in [0, 1) (0 copies the student)")
    targets, students = list(target_parameters), list(student_parameters)
    if len(targets) != len(students):
        raise ValueError(f"{len(targets)} target parameters for {len(students)} student parameters: "
                         "expected networks of one architecture")
    with th.no_grad():
        for target, student in zip(targets, students):
            target.mul_(rate).add_(student.detach(), alpha=1 - rate)


# ------------------------------------------------------------------ sampling


def consistency_sigmas(sigma_min, sigma_max, steps):
    """
    The levels of `steps`-step consistency sampling: the rho = 7 grid of steps + 1 levels
    from sigma_max down, without sigma_min (re-noising to it adds nothing). Two steps:
    sigma_max and the midpoint in sigma^(1/7) (CM's ImageNet-64 ts = 0, 22 of 40: 0.56).

    :param sigma_min: the consistency function's boundary level.
    :param sigma_max: the highest level, where sampling starts.
    :param steps: the number of model evaluations, at least 1.
    :return: the descending float64 array of `steps` levels.
    """
    _check_count("steps", steps, 1)
    return karras_sigmas(sigma_min, sigma_max, steps + 1)[:0:-1].copy()


def consistency_sample(consistency_fn, schedule, shape, sigmas_to_visit, noise_fn=None, model_kwargs=None,
                       clip_denoised=True, callback=None, device=None):
    """
    Multistep consistency sampling (CM algorithm 1): x_T = alpha_T sigma_T z at the first
    level, denoised by f; at each later level f is re-noised, x_t = alpha_t (f / alpha_min
    + sqrt(sigma^2 - sigma_min^2) z) (f / alpha_min: f's VE value), and denoised again.

    :param consistency_fn: a ConsistencyFunction (any f(x_t, t, **model_kwargs) with sigma_min).
    :param schedule: the teacher's ContinuousSchedule.
    :param shape: the batch's shape (N, C, H, W).
    :param sigmas_to_visit: decreasing levels above sigma_min, one model evaluation each
        (consistency_sigmas).
    :param noise_fn: noise of a tensor's shape (default th.randn_like); x_T is
        noise_fn(th.empty(shape)), as in the library's sampling loops.
    :param model_kwargs: e.g. {"y": labels}.
    :param clip_denoised: clamp each f to [-1, 1].
    :param callback: None, or called through solvers.report_step once per level, with t
        the level's real time.
    :param device: where x_T is drawn (None: torch's default).
    :return: the last f.
    """
    sigmas, sigma_min = np.asarray(sigmas_to_visit, np.float64), consistency_fn.sigma_min
    if sigmas.ndim != 1 or not sigmas.size or np.any(np.diff(sigmas) >= 0) or not sigmas[-1] > sigma_min:
        raise ValueError(f"sigmas_to_visit={sigmas.tolist()}: expected decreasing noise levels above "
                         f"sigma_min={sigma_min}")
    times, noise = times_of_sigmas(schedule, sigmas), noise_fn or th.randn_like
    alpha_min = schedule.coefficients(float(times_of_sigmas(schedule, sigma_min)))[0]
    x = noise(th.empty(*shape, device=device)) * (schedule.coefficients(times[0])[0] * sigmas[0])
    with th.no_grad():
        for i, time in enumerate(times):
            denoised = consistency_fn(x, th.full((shape[0],), time, dtype=th.float64), **(model_kwargs or {}))
            denoised = clip_prediction(denoised, clip_denoised)
            report_step(callback, i, float(time), x, denoised)
            if i + 1 < len(times):
                x = schedule.coefficients(times[i + 1])[0] * (
                    denoised / alpha_min + math.sqrt(sigmas[i + 1] ** 2 - sigma_min**2) * noise(denoised))
    return denoised
