"""
Fast samplers for a trained diffusion: one plain function per sampler, each called as
`sampler(denoiser, x, times, noise_fn=None, progress=False, callback=None, **options)`
and returning the final x_0 estimate (ancestral sampling: the last step's mean, as
p_sample_loop).

- `denoiser`: a Denoiser, the network with its schedule in continuous time
  (solver_schedule.py), model_kwargs, classifier guidance and clipping; each of these
  is a piece of its own (NetworkPrediction, classifier_guidance, clip_prediction,
  CallCounter), replaceable on a Denoiser;
- `x`: x at times[0] (x_T, standard normal noise);
- `times`: the decreasing times where the model is evaluated (solver_schedule.time_grid),
  first the last timestep T-1, last the first timestep 0, after which the sampler
  returns its x_0 estimate;
- `noise_fn`: noise of x's shape for the stochastic samplers (default torch.randn_like;
  work_split.PerSampleNoise for seeded samples);
- `callback`: None, or called once per step through report_step, after the step's model
  evaluation(s). A sampler's steps are its times: step i starts at times[i] (t, a
  Python float), from the sample x there, where the sampler's x_0 prediction is
  `denoised`; sampler_steps gives their number for run_sampler.

Every sampler uses one model evaluation per time, except heun (two per step but the last).
"""

import inspect
import math

import numpy as np
import torch as th
from tqdm.auto import tqdm

from .diffusion_types import ModelVarType
from .solver_schedule import DEFAULT_GRIDS, check_grid, time_grid


def report_step(callback, i, t, x, denoised):
    """
    Call a sampling loop's per-step callback, unless it is None, as
    callback({"i": i, "t": t, "x": x, "denoised": denoised}); its return value is ignored.

    :param callback: None, or a function of one dict.
    :param i: the 0-based index of the step within the loop.
    :param t: the step's time (a fast sampler's real time, a loop's timestep tensor).
    :param x: the sample at the start of the step.
    :param denoised: the x_0 prediction made at that step.
    """
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "denoised": denoised})


def _noise(noise_fn, x):
    return th.randn_like(x) if noise_fn is None else noise_fn(x)


def _step_order(step, transitions, order, lower_order_final):
    """
    The order of multistep step `step` (0-based) of `transitions`: first order at the
    first step, then up to `order`; with lower_order_final, falling at the last steps.
    """
    step_order = min(order, step + 1)
    return min(step_order, transitions - step) if lower_order_final else step_order


def ddim(denoiser, x, times, noise_fn=None, progress=False, callback=None, eta=0.0):
    """
    DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), deterministic with
    eta = 0, with DDIM's sigma_eta noise for eta > 0.
    """
    schedule = denoiser.schedule
    with th.no_grad():
        for i in tqdm(range(len(times)), disable=not progress):
            out = denoiser(x, times[i])
            report_step(callback, i, float(times[i]), x, out["x0"])
            if i == len(times) - 1:
                return out["x0"]
            alpha_bar, alpha_bar_next = schedule.alpha_bar(times[i]), schedule.alpha_bar(times[i + 1])
            sigma = eta * math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * math.sqrt(
                1 - alpha_bar / alpha_bar_next)
            x = math.sqrt(alpha_bar_next) * out["x0"] + math.sqrt(1 - alpha_bar_next - sigma**2) * out["eps"]
            if eta > 0:
                x = x + sigma * _noise(noise_fn, x)
    return x


def ddpm(denoiser, x, times, noise_fn=None, progress=False, callback=None):
    """
    Ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") with
    the model's learned variances (Nichol & Dhariwal 2021) and ADM's guided mean.
    """
    schedule, posterior_variance = denoiser.schedule, None
    with th.no_grad():
        for i in tqdm(range(len(times)), disable=not progress):
            last = i == len(times) - 1
            alpha_bar = schedule.alpha_bar(times[i])
            alpha_bar_next = 1.0 if last else schedule.alpha_bar(times[i + 1])
            beta = 1 - alpha_bar / alpha_bar_next
            # At the last step the posterior variance is 0: the previous step's stands in
            # (the original's posterior_log_variance_clipped).
            posterior_variance = (beta if posterior_variance is None else posterior_variance) if last \
                else beta * (1 - alpha_bar_next) / (1 - alpha_bar)
            out = denoiser(x, times[i], guided=False)
            report_step(callback, i, float(times[i]), x, out["x0"])
            mean = (math.sqrt(alpha_bar_next) * beta / (1 - alpha_bar)) * out["x0"] + (
                math.sqrt(1 - beta) * (1 - alpha_bar_next) / (1 - alpha_bar)) * x
            log_variance = _log_variance(denoiser.model_var_type, out["variance_values"], beta,
                                         posterior_variance, x)
            if denoiser.cond_fn is not None:
                mean = mean + th.exp(log_variance) * denoiser.gradient(x, times[i])
            noise = _noise(noise_fn, x)  # drawn at every step, as p_sample does
            x = mean if last else mean + th.exp(0.5 * log_variance) * noise
    return x


def _log_variance(model_var_type, variance_values, beta, posterior_variance, x):
    """
    :return: the step's log variance as a tensor broadcastable to x.
    """
    if model_var_type == ModelVarType.LEARNED:
        return variance_values
    if model_var_type == ModelVarType.LEARNED_RANGE:
        frac = (variance_values + 1) / 2
        return frac * math.log(beta) + (1 - frac) * math.log(posterior_variance)
    value = beta if model_var_type == ModelVarType.FIXED_LARGE else posterior_variance
    return th.full((1,) * x.dim(), math.log(value), device=x.device)


def dpmpp_2m(denoiser, x, times, noise_fn=None, progress=False, callback=None, lower_order_final=True):
    """
    DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"): multistep second order in data
    prediction; first order at the first step and, with lower_order_final, the last.
    """
    return _dpmpp_2m(denoiser, x, times, noise_fn, progress, callback, lower_order_final, stochastic=False)


def dpmpp_2m_sde(denoiser, x, times, noise_fn=None, progress=False, callback=None,
                 lower_order_final=True):
    """
    SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"): the stochastic second-order
    multistep solver in data prediction (midpoint form), seeded like ancestral sampling.
    """
    return _dpmpp_2m(denoiser, x, times, noise_fn, progress, callback, lower_order_final, stochastic=True)


def _dpmpp_2m(denoiser, x, times, noise_fn, progress, callback, lower_order_final, stochastic):
    """
    The two DPM-Solver++(2M) samplers: x_{i+1} from x_i, x_0(x_i) and x_0(x_{i-1}).
    """
    schedule = denoiser.schedule
    half_log_snrs = schedule.half_log_snr(np.asarray(times))
    previous_x0 = None
    with th.no_grad():
        for i in tqdm(range(len(times)), disable=not progress):
            x0 = denoiser(x, times[i])["x0"]
            report_step(callback, i, float(times[i]), x, x0)
            if i == len(times) - 1:
                return x0
            sigma = schedule.coefficients(times[i])[1]
            alpha_next, sigma_next = schedule.coefficients(times[i + 1])
            h = float(half_log_snrs[i + 1] - half_log_snrs[i])
            data = x0
            if _step_order(i, len(times) - 1, 2, lower_order_final) == 2:
                r = float(half_log_snrs[i] - half_log_snrs[i - 1]) / h
                data = x0 + (x0 - previous_x0) / (2 * r)
            if stochastic:
                x = (sigma_next / sigma * math.exp(-h)) * x - (alpha_next * math.expm1(-2 * h)) * data
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * h)) * _noise(noise_fn, x)
            else:
                x = (sigma_next / sigma) * x - (alpha_next * math.expm1(-h)) * data
            previous_x0 = x0
    return x


def unipc(denoiser, x, times, noise_fn=None, progress=False, callback=None, order=2,
          lower_order_final=True, corrector=True):
    """
    UniPC (Zhao et al. 2023, "UniPC"): the multistep predictor UniP with the corrector
    UniC, B(h) = e^h - 1, data prediction, order 2 (or 3).

    Step i + 1's x_0 prediction is the model's at the predictor's x_{i+1}, which the
    corrector then moves: its callback gets the corrected x with that prediction.
    """
    schedule = denoiser.schedule
    half_log_snrs = schedule.half_log_snr(np.asarray(times))
    transitions = len(times) - 1
    with th.no_grad():
        history = [(float(half_log_snrs[0]), denoiser(x, times[0])["x0"])]
        report_step(callback, 0, float(times[0]), x, history[0][1])
        for i in tqdm(range(transitions), disable=not progress):
            sigma = schedule.coefficients(times[i])[1]
            alpha_next, sigma_next = schedule.coefficients(times[i + 1])
            h = float(half_log_snrs[i + 1] - half_log_snrs[i])
            step_order = _step_order(i, transitions, order, lower_order_final)
            x0 = history[-1][1]
            ratios = [(history[-1 - k][0] - history[-1][0]) / h for k in range(1, step_order)]
            differences = [(history[-1 - k][1] - x0) / ratio for k, ratio in enumerate(ratios, 1)]
            weights, b_h = _unipc_weights(ratios + [1.0], -h)
            x_linear = (sigma_next / sigma) * x - (alpha_next * math.expm1(-h)) * x0
            x_next = x_linear
            if differences:
                predictor = [0.5] if step_order == 2 else np.linalg.solve(weights[0][:-1, :-1], weights[1][:-1])
                x_next = x_linear - alpha_next * b_h * sum(w * d for w, d in zip(predictor, differences))
            x0_next = denoiser(x_next, times[i + 1])["x0"]
            if corrector and i < transitions - 1:  # the last x_0 prediction is the result
                coefficients = [0.5] if step_order == 1 else np.linalg.solve(*weights)
                correction = sum(w * d for w, d in zip(coefficients[:-1], differences))
                x_next = x_linear - alpha_next * b_h * (correction + coefficients[-1] * (x0_next - x0))
            x = x_next
            history = (history + [(float(half_log_snrs[i + 1]), x0_next)])[-order:]
            report_step(callback, i + 1, float(times[i + 1]), x, x0_next)
    return history[-1][1]


def _unipc_weights(ratios, hh):
    """
    UniPC's linear system for the B(h) = e^h - 1 variant.

    :param ratios: r_k = (lambda_k - lambda_i) / h of the earlier points, then 1.
    :param hh: -h (data prediction).
    :return: ((R, b), B(h)): R rows ratios^(k-1), b_k = phi_k(hh) k! / B(h), k = 1 .. p.
    """
    b_h = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1
    factorial, rows, rhs = 1, [], []
    for k in range(1, len(ratios) + 1):
        rows.append(np.power(ratios, k - 1))
        rhs.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    return (np.array(rows), np.array(rhs)), b_h


def heun(denoiser, x, times, noise_fn=None, progress=False, callback=None, s_churn=0.0, s_tmin=0.0,
         s_tmax=float("inf"), s_noise=1.0):
    """
    EDM's second-order Heun sampler (Karras et al. 2022, "Elucidating the Design Space",
    algorithm 2), in sigma / alpha, with the optional S_churn stochasticity.

    Step i's callback gets x at times[i] (before the churn's noise) and the x_0
    prediction of the step's first evaluation; the last step is the final evaluation.
    """
    schedule = denoiser.schedule
    sigmas = np.exp(-schedule.half_log_snr(np.asarray(times)))  # of the scaled x / alpha
    steps = len(times) - 1
    with th.no_grad():
        scaled = x / schedule.coefficients(times[0])[0]

        def slope(scaled, sigma):
            time = float(schedule.time_of_half_log_snr(-math.log(sigma)))
            x0 = denoiser(scaled * schedule.coefficients(time)[0], time)["x0"]
            return (scaled - x0) / sigma, x0

        def report(i, start, x0):
            if callback is not None:
                sample = x if i == 0 else start * schedule.coefficients(times[i])[0]
                report_step(callback, i, float(times[i]), sample, x0)

        for i in tqdm(range(steps), disable=not progress):
            start, sigma = scaled, float(sigmas[i])
            gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
            sigma_hat = min(sigma * (1 + gamma), float(sigmas[0]))
            if sigma_hat > sigma:
                scaled = scaled + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * _noise(noise_fn, scaled)
            d, x0 = slope(scaled, sigma_hat)
            report(i, start, x0)
            euler = scaled + (float(sigmas[i + 1]) - sigma_hat) * d
            d_next, _ = slope(euler, float(sigmas[i + 1]))
            scaled = scaled + (float(sigmas[i + 1]) - sigma_hat) * (d + d_next) / 2
        x0 = slope(scaled, float(sigmas[-1]))[1]  # the Euler step to sigma = 0: x_0
        report(steps, scaled, x0)
        return x0


SAMPLERS = {"ddim": ddim, "ddpm": ddpm, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde,
            "unipc": unipc, "heun": heun}
STOCHASTIC = ("ddpm", "dpmpp_2m_sde")  # heun too with s_churn > 0, ddim with eta > 0


def grid_points(sampler, steps):
    """
    :return: how many times a sampler's grid has for `steps` model evaluations per sample
        (heun evaluates twice per step but the last: 2 * points - 1 <= steps).
    """
    return (steps + 1) // 2 if sampler == "heun" else steps


def evaluations(sampler, steps):
    """
    :return: the model evaluations per sample a sampler makes when given `steps`
        (heun: 2 * grid_points - 1, one fewer than steps when steps is even).
    """
    points = grid_points(sampler, steps)
    return 2 * points - 1 if sampler == "heun" else points


def sampler_steps(sampler, steps):
    """
    The size of a progress bar: run_sampler's callback calls per sample, one per time of
    its grid (heun's steps take two model evaluations each, but the last takes one).

    :param sampler: a name in SAMPLERS.
    :param steps: model evaluations per sample, as run_sampler takes them.
    :return: how many steps run_sampler reports to its callback.
    """
    check_sampler(sampler, steps)
    return grid_points(sampler, steps)


def check_sampler(sampler, steps, grid=None, options=None):
    """
    Raise a ValueError naming the argument unless the sampler exists, steps is a positive
    integer, the grid is known, and the sampler takes every option, each in its range
    (check_options).

    :param sampler: a name in SAMPLERS.
    :param steps: model evaluations per sample.
    :param grid: None (the sampler's default) or a solver_schedule.TIME_GRIDS name.
    :param options: the sampler's keyword options (e.g. {"eta": 0.5} for ddim).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps}: expected a positive number of model evaluations")
    if grid is not None:
        check_grid(grid)
    check_options(sampler, options or {})


SAMPLER_ARGUMENTS = ("denoiser", "x", "times", "noise_fn", "progress", "callback")


def _is_number(value):
    """:return: whether value is a real number (not a bool)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# Each sampler option: (whether a value is allowed, the allowed values as errors name them).
OPTION_RANGES = {
    "eta": (lambda v: _is_number(v) and 0 <= v <= 1,
            "a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance)"),
    "s_churn": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: no churn)"),
    "s_tmin": (lambda v: _is_number(v) and v >= 0, "a noise level >= 0"),
    "s_tmax": (lambda v: _is_number(v) and v >= 0, "a noise level >= 0 (inf: no upper bound)"),
    "s_noise": (lambda v: _is_number(v) and 0 < v < math.inf, "a finite number > 0"),
    "order": (lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v in (1, 2, 3),
              "1, 2 or 3"),
    "lower_order_final": (lambda v: isinstance(v, (bool, np.bool_)), "True or False"),
    "corrector": (lambda v: isinstance(v, (bool, np.bool_)), "True or False"),
}


def check_options(sampler, options):
    """
    Raise a ValueError naming the option unless the sampler takes every option and each
    value is in its range (OPTION_RANGES; heun also needs s_tmin <= s_tmax).

    :param sampler: a name in SAMPLERS.
    :param options: the sampler's keyword options (e.g. {"eta": 0.5} for ddim).
    """
    parameters = inspect.signature(SAMPLERS[sampler]).parameters
    accepted = set(parameters) - set(SAMPLER_ARGUMENTS)
    for name, value in options.items():
        if name not in accepted:
            takers = [other for other, fn in SAMPLERS.items() if name in inspect.signature(fn).parameters]
            raise ValueError(
                f"{name} is not an option of sampler={sampler!r} (it takes "
                f"{', '.join(sorted(accepted)) or 'none'}); {name} is an option of "
                f"{', '.join(takers) or 'no sampler'}"
            )
        allowed, described = OPTION_RANGES[name]
        if not allowed(value):
            raise ValueError(f"{name}={value}: {sampler} expects {described}")
    if "s_tmin" in accepted:
        s_tmin = options.get("s_tmin", parameters["s_tmin"].default)
        s_tmax = options.get("s_tmax", parameters["s_tmax"].default)
        if s_tmin > s_tmax:
            raise ValueError(f"s_tmin={s_tmin} and s_tmax={s_tmax}: the churn's noise levels need "
                             "s_tmin <= s_tmax")


def run_sampler(denoiser, x, sampler, steps, grid=None, noise_fn=None, progress=False, callback=None,
                **options):
    """
    Run a sampler for `steps` model evaluations per sample on its default time grid (or
    `grid`), reporting sampler_steps(sampler, steps) steps to `callback`.

    :return: the final x_0 estimate.
    """
    check_sampler(sampler, steps, grid, options)
    times = time_grid(denoiser.schedule, grid_points(sampler, steps), grid or DEFAULT_GRIDS[sampler])
    return SAMPLERS[sampler](denoiser, x, times, noise_fn=noise_fn, progress=progress, callback=callback,
                             **options)
