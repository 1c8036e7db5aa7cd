"""
The network as the samplers of solvers.py call it, in pieces that can each be replaced
alone: the model call on the continuous schedule (NetworkPrediction, model_timesteps),
classifier guidance (classifier_guidance), clipping and dynamic thresholding
(clip_prediction), the count of network calls (CallCounter), and Denoiser, their
composition in the original's order.
"""

import functools

import torch as th

from .diffusion_types import ModelMeanType
from .solver_schedule import ContinuousSchedule


class CallCounter:
    """
    A callable that counts its calls (the network's, for a Denoiser's evaluations).

    :param function: the callable counted.
    """

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        """
        :return: function(*args, **kwargs); the call is counted once it returns.
        """
        output = self.function(*args, **kwargs)
        self.calls += 1
        return output


def model_timesteps(schedule, x, t):
    """
    :param schedule: a ContinuousSchedule.
    :param x: x_t [N x ...], for its batch size, dtype and device.
    :param t: a real time in [0, T-1].
    :return: the [N] float timesteps the network and the classifier get at time t.
    """
    return th.full((x.shape[0],), float(schedule.model_time(t)), dtype=x.dtype, device=x.device)


class NetworkPrediction:
    """
    The network's x_0 and eps predictions at a real time t. The released networks were
    trained on integer timesteps; between them the network is given the fractional
    timestep (model_timesteps) and the schedule interpolates log alpha_bar linearly in t.

    :param model: the network, called as model(x, timesteps, **model_kwargs).
    :param schedule: the ContinuousSchedule of its diffusion.
    :param model_mean_type: ModelMeanType.EPSILON or START_X, what the network predicts.
    :param model_var_type: a ModelVarType; a learned one adds the variance channels.
    :param model_kwargs: e.g. {"y": labels} or {"low_res": images}.
    """

    def __init__(self, model, schedule, model_mean_type, model_var_type, model_kwargs=None):
        if model_mean_type == ModelMeanType.PREVIOUS_X:
            raise ValueError("the fast samplers need a model that predicts eps or x_0, not x_{t-1}")
        self.model, self.schedule, self.model_kwargs = model, schedule, model_kwargs or {}
        self.predicts_x0 = model_mean_type == ModelMeanType.START_X
        self.learns_variance = model_var_type.is_learned()

    def __call__(self, x, t):
        """
        :param x: x_t [N x C x ...].
        :param t: a real time in [0, T-1].
        :return: dict with "x0", "eps" (from x0: (x - alpha_t x0) / sigma_t) and
            "variance_values" (the learned-variance channels, or None).
        """
        alpha, sigma = self.schedule.coefficients(t)
        output = self.model(x, model_timesteps(self.schedule, x, t), **self.model_kwargs)
        variance_values = None
        if self.learns_variance:
            if output.shape[1] != 2 * x.shape[1]:
                raise ValueError(f"model output of {output.shape[1]} channels: a learned variance "
                                 f"needs {2 * x.shape[1]} (mean channels, then variance channels)")
            output, variance_values = th.split(output, x.shape[1], dim=1)
        x0 = output if self.predicts_x0 else (x - sigma * output) / alpha
        return {"x0": x0, "eps": (x - alpha * x0) / sigma, "variance_values": variance_values}


def classifier_guidance(x0, eps, gradient, alpha, sigma):
    """
    Classifier guidance of a prediction at x_t (Dhariwal & Nichol 2021, algorithm 2):
    eps~ = eps - sigma_t * gradient, and x_0~ = x_0 + (sigma_t^2 / alpha_t) * gradient,
    which is (x_t - sigma_t * eps~) / alpha_t without its rounding.

    :param x0: the x_0 prediction.
    :param eps: the eps prediction.
    :param gradient: cond_fn at x_t, the scaled grad log p(y | x_t).
    :param alpha: alpha_t, a float.
    :param sigma: sigma_t, a float.
    :return: the guided (x0, eps).
    """
    return x0 + (sigma**2 / alpha) * gradient, eps - sigma * gradient


def clip_prediction(x0, clip_denoised=True, dynamic_threshold=None):
    """
    Keep an x_0 prediction in range: clamp it to [-1, 1] (clip_denoised), then, with
    dynamic_threshold p (Saharia et al. 2022), clamp it to [-s, s] and divide it by s,
    per sample, where s >= 1 is the p-quantile of its absolute values.

    :param x0: the [N x ...] x_0 prediction.
    :param clip_denoised: clamp to [-1, 1].
    :param dynamic_threshold: None, or the percentile p in (0, 1].
    :return: the clipped x0.
    """
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    if dynamic_threshold is not None:
        x0 = _dynamic_threshold(x0, dynamic_threshold)
    return x0


def _dynamic_threshold(x0, percentile):
    """
    :return: x0 clamped to [-s, s] and divided by s, per sample, where s >= 1 is the
        percentile of |x0|.
    """
    s = th.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


class Denoiser:
    """
    The network as the samplers call it: x_0 and eps predictions at a real time t, with
    guidance and clipping. It composes pieces that an instance may replace one by one:
    `schedule` (a ContinuousSchedule: alpha_t, sigma_t, the network's timesteps),
    `model` (a CallCounter of the network: `evaluations`), `network` (a
    NetworkPrediction: x0, eps and variance_values at t), `guidance`
    (classifier_guidance's signature), and `clip_before_guidance` and
    `clip_after_guidance` (functions of x0, or None for no clipping there).

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
        self.schedule = ContinuousSchedule(diffusion)
        self.model, self.model_kwargs, self.cond_fn = CallCounter(model), model_kwargs or {}, cond_fn
        self.model_var_type = diffusion.model_var_type
        self.network = NetworkPrediction(self.model, self.schedule, diffusion.model_mean_type,
                                         diffusion.model_var_type, self.model_kwargs)
        if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
            raise ValueError(f"dynamic_threshold={dynamic_threshold}: expected a percentile in (0, 1]")
        self.guidance = classifier_guidance
        self.clip_before_guidance = clip_prediction if clip_denoised else None
        # Clipping again matters after guidance only; on an unguided call (ddpm's) it
        # repeats the clamp, which changes nothing.
        clip_again = clip_denoised and clip_guided and cond_fn is not None
        self.clip_after_guidance = None
        if clip_again or dynamic_threshold is not None:
            self.clip_after_guidance = functools.partial(clip_prediction, clip_denoised=clip_again,
                                                         dynamic_threshold=dynamic_threshold)

    @property
    def evaluations(self):
        """
        :return: the network calls so far (per sample: each call takes the batch).
        """
        return self.model.calls

    def __call__(self, x, t, guided=True):
        """
        :param x: x_t [N x C x ...].
        :param t: a real time in [0, T-1].
        :param guided: apply classifier guidance (ddpm guides the mean instead).
        :return: dict with "x0", "eps" and "variance_values" (the learned-variance channels,
            or None).
        """
        alpha, sigma = self.schedule.coefficients(t)
        prediction = self.network(x, t)
        x0, eps = prediction["x0"], prediction["eps"]
        if self.clip_before_guidance is not None:
            x0 = self.clip_before_guidance(x0)
            eps = (x - alpha * x0) / sigma
        if guided and self.cond_fn is not None:
            x0, eps = self.guidance(x0, eps, self.gradient(x, t), alpha, sigma)
        if self.clip_after_guidance is not None:
            x0 = self.clip_after_guidance(x0)
            eps = (x - alpha * x0) / sigma
        return {"x0": x0, "eps": eps, "variance_values": prediction["variance_values"]}

    def gradient(self, x, t):
        """
        :return: cond_fn at x_t and time t (the scaled grad log p(y | x_t)).
        """
        return self.cond_fn(x, model_timesteps(self.schedule, x, t), **self.model_kwargs)
