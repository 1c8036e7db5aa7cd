"""
The sampling half of GaussianDiffusion: classifier guidance (condition_mean,
condition_score), ancestral steps and loops (p_sample, p_sample_loop,
p_sample_loop_progressive), DDIM steps and loops (ddim_sample,
ddim_reverse_sample and their loops), and the fast samplers' loop (sample_loop,
solvers.py).

SamplingMixin holds these methods; gaussian_diffusion.GaussianDiffusion
inherits it, so they are called as diffusion.p_sample_loop(...) as in the
original code. The mixin owns no state: it uses the host's schedules
(alphas_cumprod, alphas_cumprod_prev, alphas_cumprod_next, num_timesteps) and
methods (p_mean_variance, q_posterior_mean_variance, _predict_xstart_from_eps,
_predict_eps_from_xstart, _extract, _scale_timesteps).

The order of random draws is documented in gaussian_diffusion's module
docstring and on each step below.

Every sampling loop takes a per-step callback (solvers.report_step): once per
step, after its model evaluation, callback({"i": i, "t": t, "x": x,
"denoised": pred_xstart}) with i the step's 0-based index in the loop, t the [N]
int64 timesteps given to the step (p_sample, ddim_sample), x the sample the
step starts from and pred_xstart the step's. Its return value is ignored.
"""

import functools

import torch as th
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .solvers import check_options, check_sampler, report_step, run_sampler


class SamplingMixin:
    """
    Guidance, ancestral and DDIM sampling for a Gaussian diffusion; mixed into
    GaussianDiffusion, which supplies the schedules and the model's
    p(x_{t-1} | x_t).
    """

    # ------------------------------------------------------------------ guidance

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Classifier guidance for ancestral sampling (Sohl-Dickstein et al. 2015;
        Dhariwal & Nichol 2021, algorithm 1): mean + variance * grad log p(y | x_t).

        :param cond_fn: callable (x, timesteps, **model_kwargs) returning the
            gradient of log p(y | x) at x_t, already multiplied by the guidance
            scale.
        :param p_mean_var: the output of p_mean_variance.
        :param x: the [N x C x ...] tensor x_t (the gradient is taken there).
        :param t: [N] tensor of timesteps.
        :param model_kwargs: extra keyword arguments for cond_fn.
        :return: the guided mean, float32, x's shape.
        """
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Classifier guidance for DDIM (Song et al. 2020; Dhariwal & Nichol 2021,
        algorithm 2): eps <- eps - sqrt(1 - alpha_bar_t) * grad log p(y | x_t),
        then x_0 and the mean are recomputed from the new eps.

        :param cond_fn: as in condition_mean.
        :param p_mean_var: the output of p_mean_variance.
        :param x: the [N x C x ...] tensor x_t.
        :param t: [N] tensor of timesteps.
        :param model_kwargs: extra keyword arguments for cond_fn.
        :return: a copy of p_mean_var with 'pred_xstart' and 'mean' replaced.
        """
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        eps = eps - (1 - alpha_bar).sqrt() * gradient
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------------ sampling

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        noise_fn=None,
    ):
        """
        One ancestral step x_t -> x_{t-1} (Ho et al. 2020, algorithm 2).

        Draws noise_fn(x) (th.randn_like(x) by default) once, after the model
        call and before cond_fn; no noise is added where t == 0.

        :param model: the model, see p_mean_variance.
        :param x: the [N x C x ...] tensor x_t.
        :param t: [N] tensor of timesteps.
        :param clip_denoised: if True, clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: if not None, applied to the x_0 prediction.
        :param cond_fn: if not None, a guidance gradient, see condition_mean.
        :param model_kwargs: extra keyword arguments for model and cond_fn.
        :param noise_fn: if not None, replaces th.randn_like: a callable from a
            tensor to standard normal noise of its shape, dtype and device.
        :return: dict with 'sample' (x_{t-1}) and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        noise = (noise_fn or th.randn_like)(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + _nonzero_mask(t, x) * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, noise_fn=None, callback=None,
    ):
        """
        Ancestral sampling from pure noise (Ho et al. 2020, algorithm 2).

        Random draws: x_T = th.randn(*shape, device=device) unless `noise` is
        given, then one draw per step (see p_sample), t = T-1 .. 0.

        :param model: the model, see p_mean_variance.
        :param shape: the sample shape (N, C, H, W) as a tuple or list.
        :param noise: if given, the initial x_T, of `shape`.
        :param clip_denoised: if True, clamp x_0 predictions to [-1, 1].
        :param denoised_fn: if not None, applied to x_0 predictions.
        :param cond_fn: if not None, a guidance gradient, see condition_mean.
        :param model_kwargs: extra keyword arguments for model and cond_fn.
        :param device: where to create tensors; defaults to noise's device, or
            else the device of the model's first parameter.
        :param progress: if True, show a tqdm progress bar.
        :param noise_fn: if not None, draws every step's noise and, when
            `noise` is None, x_T (as noise_fn(th.empty(shape))); see p_sample.
        :param callback: if not None, called after every step's model call as
            callback({"i", "t", "x", "denoised"}) (see the module docstring).
        :return: the final samples, computed without gradients.
        """
        return _last_sample(self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
            noise_fn=noise_fn, callback=callback,
        ))

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, noise_fn=None, callback=None,
    ):
        """
        As p_sample_loop, but yield p_sample's dict at every step, t = T-1 .. 0.
        """
        step = functools.partial(
            self.p_sample, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, noise_fn=noise_fn,
        )
        img = self._initial_image(model, shape, noise, device, noise_fn)
        yield from _loop(step, img, self._descending(), progress, callback)

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        eta=0.0, noise_fn=None,
    ):
        """
        One DDIM step x_t -> x_{t-1} (Song et al. 2020, eq. 12).

        Draws noise_fn(x) (th.randn_like(x) by default) once, after the model
        call and cond_fn; with eta = 0 the draw is multiplied by zero.

        :param eta: the stochasticity; 0 is DDIM, 1 matches DDPM's variance.
        :return: dict with 'sample' (x_{t-1}) and 'pred_xstart'.

        Other arguments as p_sample.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x_0, whatever the model predicts.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = (noise_fn or th.randn_like)(x)
        mean_pred = (
            out["pred_xstart"] * th.sqrt(alpha_bar_prev)
            + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
    ):
        """
        One step of the deterministic DDIM ODE run forwards, x_t -> x_{t+1}
        (Song et al. 2020, eq. 12 reversed). Draws no random numbers.

        :param eta: must be 0; the reverse ODE is deterministic.
        :return: dict with 'sample' (x_{t+1}) and 'pred_xstart'.

        Other arguments as p_sample.
        """
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample: eta={eta}, the reverse ODE needs eta=0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, eta=0.0, noise_fn=None, callback=None,
    ):
        """
        DDIM sampling from pure noise (Song et al. 2020). Random draws as
        p_sample_loop (with eta = 0 the per-step draws are multiplied by zero).

        :param eta: the stochasticity of each step, see ddim_sample.
        :return: the final samples, computed without gradients.

        Other arguments as p_sample_loop.
        """
        return _last_sample(self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
            noise_fn=noise_fn, callback=callback,
        ))

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, eta=0.0, noise_fn=None, callback=None,
    ):
        """
        As ddim_sample_loop, but yield ddim_sample's dict at every step, t = T-1 .. 0.
        """
        check_options("ddim", {"eta": eta})
        step = functools.partial(
            self.ddim_sample, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, noise_fn=noise_fn,
        )
        img = self._initial_image(model, shape, noise, device, noise_fn)
        yield from _loop(step, img, self._descending(), progress, callback)

    def sample_loop(
        self, model, shape, sampler="dpmpp_2m", steps=10, noise=None, clip_denoised=True,
        model_kwargs=None, cond_fn=None, device=None, progress=False, noise_fn=None,
        time_grid=None, dynamic_threshold=None, callback=None, **options,
    ):
        """
        Sample with one of the fast samplers of solvers.py (ddim, ddpm, dpmpp_2m,
        dpmpp_2m_sde, unipc, heun) in `steps` model evaluations per sample.

        The model is evaluated between the trained timesteps too, given fractional
        timesteps, with log alpha_bar interpolated linearly in t (solver_schedule.py). On a
        respaced diffusion the kept timesteps are the schedule's knots, so for the new
        samplers respacing only coarsens the schedule: build the diffusion without
        timestep_respacing and choose `steps` instead.

        :param sampler: the sampler's name.
        :param steps: model evaluations per sample (heun: 2 * points - 1 of them).
        :param noise: x_T, else drawn (with noise_fn if given).
        :param noise_fn: the noise of x_T and of the stochastic samplers' steps.
        :param time_grid: None (the sampler's default) or "time_uniform", "logSNR", "karras".
        :param dynamic_threshold: None or a percentile such as 0.995 (Saharia et al. 2022).
        :param callback: if not None, called at each of the sampler's
            solvers.sampler_steps(sampler, steps) steps (the solvers module docstring).
        :param options: the sampler's own options (ddim: eta; heun: s_churn, s_tmin, s_tmax,
            s_noise; dpmpp_2m, dpmpp_2m_sde, unipc: lower_order_final; unipc: order, corrector).
        :return: the final samples (the x_0 estimate at timestep 0), without gradients.

        Other arguments as p_sample_loop.
        """
        check_sampler(sampler, steps, time_grid, options)  # before any draw
        denoiser = Denoiser(model, self, model_kwargs=model_kwargs, cond_fn=cond_fn,
                            clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)
        x = self._initial_image(model, shape, noise, device, noise_fn)
        return run_sampler(denoiser, x, sampler, steps, grid=time_grid, noise_fn=noise_fn,
                           progress=progress, callback=callback, **options)

    def ddim_reverse_sample_loop(
        self, model, x, clip_denoised=True, denoised_fn=None, model_kwargs=None, progress=False,
        callback=None,
    ):
        """
        Encode data into a DDIM latent by running the DDIM ODE forwards (Song et
        al. 2020, section 5.4) with ddim_reverse_sample at t = 0 .. T-2. Draws no
        random numbers.

        The latent sits at the noise level of step T-1, where ddim_sample_loop
        starts, so ddim_sample_loop(noise=latent) approximately reconstructs x
        (the explicit ODE steps and treating x as step 0 cost a little accuracy).

        :param x: the [N x C x ...] data to encode.
        :param callback: as in p_sample_loop, at t = 0 .. T-2.
        :return: the latents, x's shape, computed without gradients.

        Other arguments as p_sample_loop.
        """
        step = functools.partial(
            self.ddim_reverse_sample, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        return _last_sample(_loop(step, x, range(self.num_timesteps - 1), progress, callback))

    def _initial_image(self, model, shape, noise, device, noise_fn):
        """
        x_T for a sampling loop: `noise` if given, else a fresh standard normal draw.
        """
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape {shape!r}: expected a tuple or list like (N, C, H, W)")
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(
                    f"noise shape {tuple(noise.shape)} differs from shape {tuple(shape)}"
                )
            return noise if device is None else noise.to(device)
        if device is None:
            device = next(model.parameters()).device
        if noise_fn is not None:
            return noise_fn(th.empty(*shape, device=device))
        return th.randn(*shape, device=device)

    def _descending(self):
        # The timesteps T-1 .. 0, the order of sampling (and of the original's bpd loop).
        return range(self.num_timesteps - 1, -1, -1)


def _nonzero_mask(t, x):
    """
    A float mask of x's rank, 0 where t == 0 and 1 elsewhere (no noise on the last step).
    """
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


def progress_bar(indices, progress):
    """
    The indices of a loop over timesteps, shown as a tqdm progress bar when asked.

    :param indices: an iterable with a length (e.g. a range of timesteps).
    :param progress: show the bar.
    :return: tqdm(indices) if progress, else indices.
    """
    return tqdm(indices) if progress else indices


def _loop(step, img, indices, progress, callback):
    """
    Apply `img = step(img, t)["sample"]` for each timestep in `indices`,
    without gradients, reporting each step to callback and yielding its
    output dict.
    """
    for i, timestep in enumerate(progress_bar(indices, progress)):
        t = th.full((img.shape[0],), timestep, dtype=th.long, device=img.device)  # no host copy
        with th.no_grad():
            out = step(img, t)
        report_step(callback, i, t, img, out["pred_xstart"])
        yield out
        img = out["sample"]


def _last_sample(progressive):
    """
    Exhaust a progressive sampling generator and return its last 'sample'.
    """
    final = None
    for final in progressive:
        pass
    return final["sample"]
