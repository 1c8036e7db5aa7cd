"""
Gaussian diffusion (Ho et al. 2020) with the improvements of Nichol & Dhariwal
2021 (cosine schedule, learned variances, hybrid loss) and the sampling and
guidance of Song et al. 2020 (DDIM) and Dhariwal & Nichol 2021 (classifier
guidance).

Schedules are float64 numpy arrays; they are gathered per timestep and cast to
float32 on the input's device. Timesteps are 0-based: t = 0 is the first step
of noising, t = num_timesteps - 1 the last.

Random draws, in order (this matches the original ADM code, so the same seed
gives the same numbers):
  - sampling loops: th.randn(*shape, device=device) for the initial image unless
    `noise` is given; then, for t = T-1 down to 0, one th.randn_like(x) per step,
    drawn after the model call (and, in DDIM, after cond_fn);
  - training_losses: th.randn_like(x_start) when `noise` is None;
  - calc_bpd_loop: one th.randn_like(x_start) per timestep, from T-1 down to 0.
The sampling loops and calc_bpd_loop take a `noise_fn` that replaces these draws
(e.g. per-sample generators whose images do not depend on the batch size).

The sampling steps and loops are in diffusion_sampling (SamplingMixin, which
GaussianDiffusion inherits) and the enums of its options in diffusion_types
(re-exported here); this module keeps the schedules, the forward and reverse
process, the losses and the likelihood.
"""

import math

import numpy as np
import torch as th

from .diffusion_sampling import SamplingMixin, progress_bar
from .diffusion_types import LossType, ModelMeanType, ModelVarType  # re-exported: the original's names
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat

# Cosine schedule (Nichol & Dhariwal 2021, eq. 17): offset s and beta cap.
_COSINE_OFFSET = 0.008
_MAX_BETA = 0.999


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    Build a named beta schedule; both names keep their shape as the number of
    steps changes.

    "linear" is Ho et al.'s 1e-4 .. 0.02 over 1000 steps, with both ends scaled
    by 1000 / num_diffusion_timesteps. "cosine" follows
    alpha_bar(t) = cos(((t + 0.008) / 1.008) * pi / 2) ** 2 with betas capped at 0.999.

    :param schedule_name: "linear" or "cosine".
    :param num_diffusion_timesteps: the number of betas, a positive integer.
    :return: a float64 numpy array of betas, shape [num_diffusion_timesteps].
    """
    if int(num_diffusion_timesteps) != num_diffusion_timesteps or num_diffusion_timesteps < 1:
        raise ValueError(
            f"num_diffusion_timesteps={num_diffusion_timesteps!r}: expected a positive integer"
        )
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        betas = np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
        if betas.max() >= 1.0:
            raise ValueError(
                f'noise schedule "linear" with {num_diffusion_timesteps} steps: the last beta '
                f"0.02 * 1000 / {num_diffusion_timesteps} = {betas.max():g} is not below 1; "
                'use at least 21 steps, or the "cosine" schedule for short processes'
            )
        return betas
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2,
        )
    raise ValueError(f'noise schedule "{schedule_name}": expected "linear" or "cosine"')


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=_MAX_BETA):
    """
    Discretize a continuous alpha_bar(t), t in [0, 1], into betas:
    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta).

    :param num_diffusion_timesteps: T, the number of betas.
    :param alpha_bar: a function from t in [0, 1] to the cumulative product of
        (1 - beta) up to t.
    :param max_beta: the largest beta allowed; below 1 to avoid singularities
        at the end of the process.
    :return: a float64 numpy array of betas, shape [T].
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t_start = i / num_diffusion_timesteps
        t_end = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t_end) / alpha_bar(t_start), max_beta))
    return np.array(betas, dtype=np.float64)


class GaussianDiffusion(SamplingMixin):
    """
    Noising, denoising, sampling and training losses of a Gaussian diffusion.
    The sampling steps and loops (p_sample_loop, ddim_sample_loop, ...) and
    classifier guidance come from diffusion_sampling.SamplingMixin.

    :param betas: 1-D array of betas, one per step, each in (0, 1]; at least 2.
    :param model_mean_type: a ModelMeanType, what the model predicts.
    :param model_var_type: a ModelVarType, how the output variance is chosen.
    :param loss_type: a LossType, the training objective.
    :param rescale_timesteps: if True, the model receives float timesteps
        scaled to the range [0, 1000) whatever the number of steps.
    """

    def __init__(
        self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False
    ):
        for value, enum_type in (
            (model_mean_type, ModelMeanType), (model_var_type, ModelVarType), (loss_type, LossType)
        ):
            if not isinstance(value, enum_type):
                raise ValueError(f"{value!r}: expected a member of {enum_type.__name__}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(
                f"betas: expected a 1-D array of at least 2 values, got shape {betas.shape}"
            )
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas: expected every value in (0, 1], "
                f"got min {betas.min():g}, max {betas.max():g}"
            )
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) and its inversions.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # The posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the
        # log-variance there borrows the value at t = 1.
        one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / one_minus_alphas_cumprod
        )
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_alphas_cumprod
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_alphas_cumprod
        )

        # FIXED_LARGE uses beta_t, except at t = 0 where the posterior variance
        # of t = 1 gives a better decoder likelihood.
        self._large_variance = np.append(self.posterior_variance[1], betas[1:])
        self._large_log_variance = np.log(self._large_variance)
        # Derived schedules the steps gather from, computed once.
        self._one_minus_alphas_cumprod = one_minus_alphas_cumprod
        self._log_betas = np.log(betas)
        self._recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self._posterior_mean_coef2_over_coef1 = (
            self.posterior_mean_coef2 / self.posterior_mean_coef1
        )
        # Schedules copied to each device once (the original converted them at every
        # gather; the numbers are the same).
        self._device_schedules = {}

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0).

        :param x_start: the [N x C x ...] tensor of clean data.
        :param t: [N] tensor of timesteps; 0 means one step of noise.
        :return: (mean, variance, log_variance), each of x_start's shape.
        """
        self._check_timesteps(t, x_start)
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = self._extract(self._one_minus_alphas_cumprod, t, x_start.shape)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """
        Sample x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        :param x_start: the [N x C x ...] tensor of clean data.
        :param t: [N] tensor of timesteps; 0 means one step of noise.
        :param noise: eps, x_start's shape; drawn with th.randn_like(x_start)
            if None.
        :return: x_t, x_start's shape.
        """
        self._check_timesteps(t, x_start)
        if noise is None:
            noise = th.randn_like(x_start)
        _check_same_shape(noise=noise, x_start=x_start)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The posterior q(x_{t-1} | x_t, x_0).

        :param x_start: the [N x C x ...] clean data x_0.
        :param x_t: the noisy data at step t, x_start's shape.
        :param t: [N] tensor of timesteps.
        :return: (mean, variance, clipped log-variance), each of x_t's shape.
        """
        _check_same_shape(x_start=x_start, x_t=x_t)
        self._check_timesteps(t, x_t)
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t.shape)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None
    ):
        """
        Run the model to get p(x_{t-1} | x_t) and the prediction of x_0.

        :param model: callable (x, timesteps, **model_kwargs) -> output with C
            channels, or 2C when the variance is learned.
        :param x: the [N x C x ...] tensor x_t.
        :param t: [N] tensor of timesteps.
        :param clip_denoised: if True, clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: if not None, applied to the x_0 prediction before
            clipping and before it is used for the mean.
        :param model_kwargs: extra keyword arguments for the model (e.g. y).
        :return: dict with 'mean', 'variance', 'log_variance' and 'pred_xstart',
            each of x's shape.
        """
        if model_kwargs is None:
            model_kwargs = {}
        self._check_timesteps(t, x)
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type.is_learned():
            model_output, model_var_values = _split_mean_and_variance(model_output, x)
            model_variance, model_log_variance = self._learned_variance(
                model_var_values, t, x.shape
            )
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                variance, log_variance = self._large_variance, self._large_log_variance
            else:
                variance = self.posterior_variance
                log_variance = self.posterior_log_variance_clipped
            model_variance = self._extract(variance, t, x.shape)
            model_log_variance = self._extract(log_variance, t, x.shape)

        def process_xstart(pred):
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(
                self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
            )
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(
                    self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
                )
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        _check_same_shape(model_mean=model_mean, x=x)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    def _learned_variance(self, model_var_values, t, shape):
        """
        Turn the model's variance channels into (variance, log_variance).
        """
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = model_var_values
        else:
            min_log = self._extract(self.posterior_log_variance_clipped, t, shape)
            max_log = self._extract(self._log_betas, t, shape)
            frac = (model_var_values + 1) / 2  # [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
        return th.exp(log_variance), log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        _check_same_shape(x_t=x_t, eps=eps)
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Solve mean = coef1 * x_0 + coef2 * x_t for x_0.
        _check_same_shape(x_t=x_t, xprev=xprev)
        return (
            self._extract(self._recip_posterior_mean_coef1, t, x_t.shape) * xprev
            - self._extract(self._posterior_mean_coef2_over_coef1, t, x_t.shape)
            * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _extract(self, arr, timesteps, broadcast_shape):
        """
        _extract_into_tensor with arr (one of this diffusion's schedules) copied to
        timesteps' device once, not at every call.
        """
        key = (id(arr), timesteps.device)
        if key not in self._device_schedules:  # the array is kept: its id stays its own
            self._device_schedules[key] = (arr, th.from_numpy(arr).to(timesteps.device))
        return _gather(self._device_schedules[key][1], timesteps, broadcast_shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def _check_timesteps(self, t, x):
        """
        Raise ValueError unless t is an [N] tensor of steps in [0, num_timesteps).
        The values are checked on the CPU only: on an accelerator the check
        would stall the host on every call.
        """
        if not isinstance(t, th.Tensor) or tuple(t.shape) != (x.shape[0],):
            shape = tuple(t.shape) if isinstance(t, th.Tensor) else type(t).__name__
            raise ValueError(f"timesteps: expected a tensor of shape ({x.shape[0]},), got {shape}")
        on_cpu = t.device.type == "cpu"
        if on_cpu and t.numel() and bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(
                f"timesteps {t.tolist()}: expected integers in [0, {self.num_timesteps - 1}]"
            )

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """
        The variational bound term for step t, in bits per dimension:
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the
        discretized decoder NLL -log p(x_0 | x_1) for t == 0.

        :return: dict with 'output' ([N] tensor) and 'pred_xstart'.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": th.where((t == 0), decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        Training losses for one batch at the given timesteps.

        With MSE losses and a learned variance this is the hybrid objective
        L_simple + L_vlb of Nichol & Dhariwal 2021: the VLB term sees the
        predicted mean with gradients stopped, so it trains only the variance,
        and is scaled by num_timesteps / 1000 for RESCALED_MSE.

        :param model: the model, see p_mean_variance.
        :param x_start: the [N x C x ...] clean data.
        :param t: [N] tensor of timesteps.
        :param model_kwargs: extra keyword arguments for the model.
        :param noise: the eps used to noise x_start; th.randn_like(x_start) if None.
        :return: dict of [N] tensors: 'loss', plus 'mse' and (when the variance
            is learned) 'vb' for MSE losses.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type.is_learned():
            model_output, model_var_values = _split_mean_and_variance(model_output, x_t)
            # Stop the VLB's gradient through the mean; it trains the variance only.
            frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t,
                clip_denoised=False,
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # The MSE term is a mean over steps, not a sum; rescale the VLB to match.
                terms["vb"] *= self.num_timesteps / 1000.0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        _check_same_shape(model_output=model_output, target=target)
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """
        KL(q(x_T | x_0) || N(0, I)) in bits per dimension, an [N] tensor. It does
        not depend on the model and is close to zero for a good schedule.
        """
        t = th.full(
            (x_start.shape[0],), self.num_timesteps - 1, dtype=th.long, device=x_start.device
        )
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(
        self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False, noise_fn=None
    ):
        """
        The full variational bound of x_start in bits per dimension, with
        per-step terms. Draws noise_fn(x_start) (th.randn_like(x_start) by
        default) once per step, t = T-1 .. 0.

        :param model: the model, see p_mean_variance.
        :param x_start: the [N x C x ...] data.
        :param clip_denoised: if True, clamp x_0 predictions to [-1, 1].
        :param model_kwargs: extra keyword arguments for the model.
        :param progress: if True, show a tqdm progress bar.
        :param noise_fn: if not None, replaces th.randn_like, see p_sample.
        :return: dict with 'total_bpd' [N] (prior plus every term), 'prior_bpd'
            [N], and [N x T] tensors 'vb' (the VLB terms), 'xstart_mse' and
            'mse' (of the implied eps); as in the original code, column j holds
            timestep T-1-j.
        """
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for step in progress_bar(self._descending(), progress):
            t = th.full((batch_size,), step, dtype=th.long, device=x_start.device)
            noise = (noise_fn or th.randn_like)(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb, xstart_mse, mse = (th.stack(terms, dim=1) for terms in (vb, xstart_mse, mse))
        prior_bpd = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """
    Gather arr[timesteps] as float32 on timesteps' device, broadcast to
    broadcast_shape (trailing singleton dimensions are added first).

    :param arr: a 1-D numpy array (float64 schedules).
    :param timesteps: an [N] integer tensor of indices into arr.
    :param broadcast_shape: a shape [N x ...].
    :return: a float32 tensor of broadcast_shape.
    """
    return _gather(th.from_numpy(arr).to(device=timesteps.device), timesteps, broadcast_shape)


def _gather(schedule, timesteps, broadcast_shape):
    """
    schedule[timesteps] as float32, broadcast to broadcast_shape.
    """
    res = schedule[timesteps].float()
    res = res.reshape(*res.shape, *([1] * (len(broadcast_shape) - res.dim())))
    return res.expand(broadcast_shape)


def _split_mean_and_variance(model_output, x):
    """
    Split a learned-variance model output [N x 2C x ...] into its mean and
    variance halves, each x's shape.
    """
    expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(
            f"model output shape {tuple(model_output.shape)}: a learned variance needs {expected} "
            "(mean channels, then variance channels)"
        )
    return th.split(model_output, x.shape[1], dim=1)


def _check_same_shape(**tensors):
    """
    Raise ValueError naming the tensors unless they all have one shape.
    """
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")
