"""
The noise schedule of a trained discrete-time diffusion in continuous time, and the
time grids of the fast samplers (solvers.py).

A diffusion trained on integer timesteps 0 .. T-1 knows alpha_bar only there. As
DPM-Solver's discrete-time schedule does, log alpha_bar is interpolated piecewise-
linearly in t between those timesteps, so that every t in [0, T-1] has an alpha_bar,
and the model is given the fractional timestep t. For a respaced diffusion
(SpacedDiffusion) the knots are its kept timesteps, in the base process's time.

With alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), x_t = alpha_t x_0
+ sigma_t eps and lambda_t = log(alpha_t / sigma_t) is the half log-SNR.
"""

import math

import numpy as np

TIME_GRIDS = ("time_uniform", "logSNR", "karras")
# Each sampler's grid (solvers.py): DDIM's and DDPM's uniform steps, DPM-Solver's and
# UniPC's uniform log-SNR for pixel models, EDM's spacing for Heun.
DEFAULT_GRIDS = {"ddim": "time_uniform", "ddpm": "time_uniform", "dpmpp_2m": "logSNR",
                 "dpmpp_2m_sde": "logSNR", "unipc": "logSNR", "heun": "karras"}
KARRAS_RHO = 7.0


class ContinuousSchedule:
    """
    alpha_bar(t) for real t in [0, T-1] of a GaussianDiffusion (see the module docstring).

    :param diffusion: a GaussianDiffusion or SpacedDiffusion.
    """

    def __init__(self, diffusion):
        knots = getattr(diffusion, "timestep_map", None)
        self.knots = np.asarray(range(diffusion.num_timesteps) if knots is None else knots, np.float64)
        self.log_alpha_bars = np.log(np.asarray(diffusion.alphas_cumprod, np.float64))
        self.num_timesteps = int(getattr(diffusion, "original_num_steps", diffusion.num_timesteps))
        self.rescale_timesteps = bool(getattr(diffusion, "rescale_timesteps", False))
        self.t_max = float(self.knots[-1])
        self.t_min = float(self.knots[0])

    def alpha_bar(self, t):
        """
        :param t: real times in [t_min, t_max] (floats or an array).
        :return: alpha_bar at t, float64.
        """
        return np.exp(np.interp(t, self.knots, self.log_alpha_bars))

    def coefficients(self, t):
        """
        :param t: a real time in [t_min, t_max].
        :return: (alpha_t, sigma_t) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) as Python floats.
        """
        alpha_bar = float(self.alpha_bar(t))
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)

    def half_log_snr(self, t):
        """
        :return: lambda_t = 0.5 * log(alpha_bar / (1 - alpha_bar)) at t.
        """
        log_alpha_bar = np.interp(t, self.knots, self.log_alpha_bars)
        return 0.5 * (log_alpha_bar - np.log(-np.expm1(log_alpha_bar)))

    def time_of_half_log_snr(self, half_log_snr):
        """
        The inverse of half_log_snr (exact on each linear piece of log alpha_bar).

        :param half_log_snr: lambda values within the schedule's range.
        :return: the times t, float64.
        """
        log_alpha_bar = -np.logaddexp(0.0, -2.0 * np.asarray(half_log_snr, np.float64))
        # np.interp needs increasing x: log alpha_bar decreases with t.
        return np.interp(log_alpha_bar, self.log_alpha_bars[::-1], self.knots[::-1])

    def model_time(self, t):
        """
        :return: the timestep value the network is given at time t (scaled to [0, 1000)
                 like GaussianDiffusion._scale_timesteps when the diffusion rescales them).
        """
        return t * (1000.0 / self.num_timesteps) if self.rescale_timesteps else t


def check_grid(kind):
    """
    Raise a ValueError unless kind is a name in TIME_GRIDS.
    """
    if kind not in TIME_GRIDS:
        raise ValueError(f"time_grid={kind!r}: expected one of {', '.join(TIME_GRIDS)}")


def time_grid(schedule, points, kind):
    """
    Times from the last timestep down to the first, where a sampler evaluates the model.

    :param schedule: a ContinuousSchedule.
    :param points: how many times (at least 1).
    :param kind: "time_uniform" (uniform in t), "logSNR" (uniform in lambda, DPM-Solver's
        choice for pixel models) or "karras" (Karras et al. 2022's rho = 7 spacing of
        sigma / alpha).
    :return: a float64 array of `points` decreasing times, first t_max, last t_min.
    """
    check_grid(kind)
    if points < 2:
        return np.array([schedule.t_max] if points == 1 else [], np.float64)
    fractions = np.linspace(0.0, 1.0, points)
    if kind == "time_uniform":
        times = schedule.t_max + fractions * (schedule.t_min - schedule.t_max)
    else:
        start, end = schedule.half_log_snr(schedule.t_max), schedule.half_log_snr(schedule.t_min)
        if kind == "logSNR":
            half_log_snrs = start + fractions * (end - start)
        else:  # sigma / alpha = exp(-lambda), spaced by its 1 / rho-th power
            high, low = np.exp(-start) ** (1 / KARRAS_RHO), np.exp(-end) ** (1 / KARRAS_RHO)
            half_log_snrs = -KARRAS_RHO * np.log(high + fractions * (low - high))
        times = schedule.time_of_half_log_snr(half_log_snrs)
    times[0], times[-1] = schedule.t_max, schedule.t_min  # exact ends despite rounding
    return times
