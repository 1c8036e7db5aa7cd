"""
Fast samplers for a trained diffusion: one plain function per sampler, each called as
`sampler(denoiser, x, times, noise_fn=None, progress=False, **options)` and returning
the final x_0 estimate (ancestral sampling: the last step's mean, as p_sample_loop).

- `denoiser`: a Denoiser, the network with its schedule in continuous time
  (solver_schedule.py), model_kwargs, classifier guidance and clipping;
- `x`: x at times[0] (x_T, standard normal noise);
- `times`: the decreasing times where the model is evaluated (solver_schedule.time_grid),
  first the last timestep T-1, last the first timestep 0, after which the sampler
  returns its x_0 estimate;
- `noise_fn`: noise of x's shape for the stochastic samplers (default torch.randn_like;
  work_split.PerSampleNoise for seeded samples).

Every sampler uses one model evaluation per time, except heun (two per step but the last).
"""

import inspect
import math

import numpy as np
import torch as th
from tqdm.auto import tqdm

from .solver_schedule import DEFAULT_GRIDS, ContinuousSchedule, check_grid, time_grid

# The diffusion's ModelMeanType and ModelVarType by name (gaussian_diffusion imports this
# module for sample_loop).
LEARNED_VARIANCES = ("LEARNED", "LEARNED_RANGE")


class Denoiser:
    """
    The network as the samplers call it: x_0 and eps predictions at a real time t. The
    released networks were trained on integer timesteps; between them the model is given
    the fractional timestep and the schedule interpolates log alpha_bar linearly in t.

    Order, as the original's DDIM with guidance (p_mean_variance, then condition_score):
    x_0 is clipped to [-1, 1] (clip_denoised), eps is recomputed from it, classifier
    guidance gives eps~ = eps - sigma_t * cond_fn(x_t, t), and x_0 follows from eps~. With
    clip_denoised and clip_guided the guided x_0 is clipped again (and eps~ recomputed):
    at the first, noisiest times guidance is amplified by sigma_t^2 / alpha_t, and a
    sampler taking large steps from T-1 carries that far outside [-1, 1] (on the digits at
    classifier scale 3, DDIM-25 from T-1 scores a Frechet distance of 62.9 without this,
    3.1 with it). clip_guided=False is the original's arithmetic. With dynamic_threshold p
    (Saharia et al. 2022) the guided x_0 is then clamped to the p-quantile s >= 1 of its
    absolute values and divided by s. Learned-variance channels are only read by ddpm.

    :param model: the network, called as model(x, timesteps, **model_kwargs).
    :param diffusion: its GaussianDiffusion or SpacedDiffusion (schedule, mean and
        variance types, timestep scaling).
    :param model_kwargs: e.g. {"y": labels} or {"low_res": images}.
    :param cond_fn: the classifier guidance gradient, cond_fn(x, t, **model_kwargs).
    :param clip_denoised: clamp x_0 predictions to [-1, 1].
    :param dynamic_threshold: None, or the percentile (e.g. 0.995) of dynamic thresholding.
    :param clip_guided: with clip_denoised, clip the guided x_0 too.
    """

    def __init__(self, model, diffusion, model_kwargs=None, cond_fn=None, clip_denoised=True,
                 dynamic_threshold=None, clip_guided=True):
        if diffusion.model_mean_type.name == "PREVIOUS_X":
            raise ValueError("the fast samplers need a model that predicts eps or x_0, not x_{t-1}")
        if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
            raise ValueError(f"dynamic_threshold={dynamic_threshold}: expected a percentile in (0, 1]")
        self.model, self.model_kwargs, self.cond_fn = model, model_kwargs or {}, cond_fn
        self.schedule = ContinuousSchedule(diffusion)
        self.predicts_x0 = diffusion.model_mean_type.name == "START_X"
        self.var_type = diffusion.model_var_type.name
        self.clip_denoised, self.dynamic_threshold = clip_denoised, dynamic_threshold
        self.clip_guided = clip_guided
        self.evaluations = 0  # network calls so far (per sample: each call takes the batch)

    def coefficients(self, t):
        """
        :return: (alpha_t, sigma_t) as Python floats.
        """
        alpha_bar = float(self.schedule.alpha_bar(t))
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)

    def timesteps(self, x, t):
        """
        :return: the [N] float timesteps the network and classifier get at time t.
        """
        return th.full((x.shape[0],), float(self.schedule.model_time(t)), dtype=x.dtype, device=x.device)

    def __call__(self, x, t, guided=True):
        """
        :param x: x_t [N x C x ...].
        :param t: a real time in [0, T-1].
        :param guided: apply classifier guidance (ddpm guides the mean instead).
        :return: dict with "x0", "eps" and "variance_values" (the learned-variance channels,
            or None).
        """
        alpha, sigma = self.coefficients(t)
        output = self.model(x, self.timesteps(x, t), **self.model_kwargs)
        self.evaluations += 1
        variance_values = None
        if self.var_type in LEARNED_VARIANCES:
            if output.shape[1] != 2 * x.shape[1]:
                raise ValueError(f"model output of {output.shape[1]} channels: a learned variance "
                                 f"needs {2 * x.shape[1]} (mean channels, then variance channels)")
            output, variance_values = th.split(output, x.shape[1], dim=1)
        x0 = output if self.predicts_x0 else (x - sigma * output) / alpha
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        eps = (x - alpha * x0) / sigma
        if guided and self.cond_fn is not None:
            gradient = self.gradient(x, t)
            eps = eps - sigma * gradient
            x0 = x0 + (sigma**2 / alpha) * gradient  # (x - sigma * eps) / alpha, without its rounding
            if self.clip_denoised and self.clip_guided:
                x0 = x0.clamp(-1, 1)
                eps = (x - alpha * x0) / sigma
        if self.dynamic_threshold is not None:
            x0 = _dynamic_threshold(x0, self.dynamic_threshold)
            eps = (x - alpha * x0) / sigma
        return {"x0": x0, "eps": eps, "variance_values": variance_values}

    def gradient(self, x, t):
        """
        :return: cond_fn at x_t and time t (the scaled grad log p(y | x_t)).
        """
        return self.cond_fn(x, self.timesteps(x, t), **self.model_kwargs)


def _dynamic_threshold(x0, percentile):
    """
    :return: x0 clamped to [-s, s] and divided by s, per sample, where s >= 1 is the
        percentile of |x0|.
    """
    s = th.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


def _noise(noise_fn, x):
    return th.randn_like(x) if noise_fn is None else noise_fn(x)


def _step_order(step, transitions, order, lower_order_final):
    """
    The order of multistep step `step` (0-based) of `transitions`: first order at the
    first step, then up to `order`; with lower_order_final, falling at the last steps.
    """
    step_order = min(order, step + 1)
    return min(step_order, transitions - step) if lower_order_final else step_order


def ddim(denoiser, x, times, noise_fn=None, progress=False, eta=0.0):
    """
    DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), deterministic with
    eta = 0, with DDIM's sigma_eta noise for eta > 0.
    """
    schedule = denoiser.schedule
    with th.no_grad():
        for i in tqdm(range(len(times)), disable=not progress):
            out = denoiser(x, times[i])
            if i == len(times) - 1:
                return out["x0"]
            alpha_bar, alpha_bar_next = schedule.alpha_bar(times[i]), schedule.alpha_bar(times[i + 1])
            sigma = eta * math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * math.sqrt(
                1 - alpha_bar / alpha_bar_next)
            x = math.sqrt(alpha_bar_next) * out["x0"] + math.sqrt(1 - alpha_bar_next - sigma**2) * out["eps"]
            if eta > 0:
                x = x + sigma * _noise(noise_fn, x)
    return x


def ddpm(denoiser, x, times, noise_fn=None, progress=False):
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
            mean = (math.sqrt(alpha_bar_next) * beta / (1 - alpha_bar)) * out["x0"] + (
                math.sqrt(1 - beta) * (1 - alpha_bar_next) / (1 - alpha_bar)) * x
            log_variance = _log_variance(denoiser.var_type, out["variance_values"], beta,
                                         posterior_variance, x)
            if denoiser.cond_fn is not None:
                mean = mean + th.exp(log_variance) * denoiser.gradient(x, times[i])
            noise = _noise(noise_fn, x)  # drawn at every step, as p_sample does
            x = mean if last else mean + th.exp(0.5 * log_variance) * noise
    return x


def _log_variance(var_type, variance_values, beta, posterior_variance, x):
    """
    :return: the step's log variance as a tensor broadcastable to x.
    """
    if var_type == "LEARNED":
        return variance_values
    if var_type == "LEARNED_RANGE":
        frac = (variance_values + 1) / 2
        return frac * math.log(beta) + (1 - frac) * math.log(posterior_variance)
    value = beta if var_type == "FIXED_LARGE" else posterior_variance
    return th.full((1,) * x.dim(), math.log(value), device=x.device)


def dpmpp_2m(denoiser, x, times, noise_fn=None, progress=False, lower_order_final=True):
    """
    DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"): multistep second order in data
    prediction; first order at the first step and, with lower_order_final, the last.
    """
    return _dpmpp_2m(denoiser, x, times, noise_fn, progress, lower_order_final, stochastic=False)


def dpmpp_2m_sde(denoiser, x, times, noise_fn=None, progress=False, lower_order_final=True):
    """
    SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"): the stochastic second-order
    multistep solver in data prediction (midpoint form), seeded like ancestral sampling.
    """
    return _dpmpp_2m(denoiser, x, times, noise_fn, progress, lower_order_final, stochastic=True)


def _dpmpp_2m(denoiser, x, times, noise_fn, progress, lower_order_final, stochastic):
    """
    The two DPM-Solver++(2M) samplers: x_{i+1} from x_i, x_0(x_i) and x_0(x_{i-1}).
    """
    half_log_snrs = denoiser.schedule.half_log_snr(np.asarray(times))
    previous_x0 = None
    with th.no_grad():
        for i in tqdm(range(len(times)), disable=not progress):
            x0 = denoiser(x, times[i])["x0"]
            if i == len(times) - 1:
                return x0
            sigma = denoiser.coefficients(times[i])[1]
            alpha_next, sigma_next = denoiser.coefficients(times[i + 1])
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


def unipc(denoiser, x, times, noise_fn=None, progress=False, order=2, lower_order_final=True,
          corrector=True):
    """
    UniPC (Zhao et al. 2023, "UniPC"): the multistep predictor UniP with the corrector
    UniC, B(h) = e^h - 1, data prediction, order 2 (or 3).
    """
    half_log_snrs = denoiser.schedule.half_log_snr(np.asarray(times))
    transitions = len(times) - 1
    with th.no_grad():
        history = [(float(half_log_snrs[0]), denoiser(x, times[0])["x0"])]
        for i in tqdm(range(transitions), disable=not progress):
            sigma = denoiser.coefficients(times[i])[1]
            alpha_next, sigma_next = denoiser.coefficients(times[i + 1])
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
            if i == transitions - 1:
                return x0_next
            if corrector:
                coefficients = [0.5] if step_order == 1 else np.linalg.solve(*weights)
                correction = sum(w * d for w, d in zip(coefficients[:-1], differences))
                x_next = x_linear - alpha_next * b_h * (correction + coefficients[-1] * (x0_next - x0))
            x = x_next
            history = (history + [(float(half_log_snrs[i + 1]), x0_next)])[-order:]
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


def heun(denoiser, x, times, noise_fn=None, progress=False, s_churn=0.0, s_tmin=0.0,
         s_tmax=float("inf"), s_noise=1.0):
    """
    EDM's second-order Heun sampler (Karras et al. 2022, "Elucidating the Design Space",
    algorithm 2), in sigma / alpha, with the optional S_churn stochasticity.
    """
    schedule = denoiser.schedule
    sigmas = np.exp(-schedule.half_log_snr(np.asarray(times)))  # of the scaled x / alpha
    steps = len(times) - 1
    with th.no_grad():
        scaled = x / denoiser.coefficients(times[0])[0]

        def slope(scaled, sigma):
            time = float(schedule.time_of_half_log_snr(-math.log(sigma)))
            x0 = denoiser(scaled * denoiser.coefficients(time)[0], time)["x0"]
            return (scaled - x0) / sigma, x0

        for i in tqdm(range(steps), disable=not progress):
            sigma = float(sigmas[i])
            gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
            sigma_hat = min(sigma * (1 + gamma), float(sigmas[0]))
            if sigma_hat > sigma:
                scaled = scaled + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * _noise(noise_fn, scaled)
            d, _ = slope(scaled, sigma_hat)
            euler = scaled + (float(sigmas[i + 1]) - sigma_hat) * d
            d_next, _ = slope(euler, float(sigmas[i + 1]))
            scaled = scaled + (float(sigmas[i + 1]) - sigma_hat) * (d + d_next) / 2
        return slope(scaled, float(sigmas[-1]))[1]  # the Euler step to sigma = 0: x_0


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


SAMPLER_ARGUMENTS = ("denoiser", "x", "times", "noise_fn", "progress")


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


def run_sampler(denoiser, x, sampler, steps, grid=None, noise_fn=None, progress=False, **options):
    """
    Run a sampler for `steps` model evaluations per sample on its default time grid (or
    `grid`).

    :return: the final x_0 estimate.
    """
    check_sampler(sampler, steps, grid, options)
    times = time_grid(denoiser.schedule, grid_points(sampler, steps), grid or DEFAULT_GRIDS[sampler])
    return SAMPLERS[sampler](denoiser, x, times, noise_fn=noise_fn, progress=progress, **options)
