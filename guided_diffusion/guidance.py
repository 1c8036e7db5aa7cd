"""
Guidance for sampling: classifier guidance (ADM-G, Dhariwal & Nichol 2021),
classifier-free guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024,
"Guiding a Diffusion Model with a Bad Version of Itself").

Each produces a plain callable that the diffusion's sampling loops (and the fast
samplers) take: a `cond_fn(x, t, y=None, **kwargs)` returning the scaled gradient of
log p(y | x_t), or a model function `(x, t, y=None, **kwargs)` that mixes two
predictions. Each takes the same `interval` (a GuidanceInterval, Kynkäänniemi et al.
2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution
Quality"): outside its noise levels the guidance is off and its second network (the
classifier, the unconditional pass, the guide) is not evaluated.
"""

import math

import numpy as np
import torch as th
import torch.nn.functional as F

from .solver_schedule import ContinuousSchedule


class GuidanceInterval:
    """
    The noise levels where guidance is on (Kynkäänniemi et al. 2024): sigma in
    (sigma_lo, sigma_hi], with sigma = sqrt((1 - alpha_bar) / alpha_bar) (EDM's sigma) at
    the timesteps the network receives. Those timesteps are mapped back through the
    diffusion's schedule: undone from rescale_timesteps' [0, 1000) scale, then
    alpha_bar interpolated as solver_schedule.ContinuousSchedule does (exact at the
    trained, or respaced, timesteps; the fast samplers' fractional timesteps get the
    alpha_bar they sample with).

    :param diffusion: the GaussianDiffusion or SpacedDiffusion being sampled.
    :param sigma_lo: guidance is off at sigma <= sigma_lo (>= 0).
    :param sigma_hi: guidance is off at sigma > sigma_hi (> sigma_lo; math.inf: no limit).
    """

    def __init__(self, diffusion, sigma_lo=0.0, sigma_hi=math.inf):
        self.sigma_lo, self.sigma_hi = check_interval(sigma_lo, sigma_hi)
        self.schedule = ContinuousSchedule(diffusion)

    def sigmas(self, timesteps):
        """
        :param timesteps: the [N] timesteps a network receives (integer or float).
        :return: their sigmas, a float64 numpy array [N].
        """
        times = timesteps.detach().double().cpu().numpy()
        if self.schedule.rescale_timesteps:
            times = times * (self.schedule.num_timesteps / 1000.0)
        alpha_bar = self.schedule.alpha_bar(times)
        return np.sqrt((1.0 - alpha_bar) / alpha_bar)

    def contains(self, timesteps):
        """
        :param timesteps: the [N] timesteps a network receives.
        :return: a bool tensor [N] on their device: which are inside the interval.
        """
        sigmas = self.sigmas(timesteps)
        inside = (sigmas > self.sigma_lo) & (sigmas <= self.sigma_hi)
        return th.from_numpy(inside).to(timesteps.device)


def check_interval(sigma_lo, sigma_hi):
    """
    Refuse a guidance interval that is not 0 <= sigma_lo < sigma_hi.

    :param sigma_lo: the lower end (excluded).
    :param sigma_hi: the upper end (included; math.inf allowed).
    :return: (sigma_lo, sigma_hi) as floats.
    """
    if math.isnan(sigma_lo) or math.isnan(sigma_hi) or not 0.0 <= sigma_lo < sigma_hi:
        raise ValueError(
            f"guidance_interval=({sigma_lo}, {sigma_hi}): expected noise levels "
            "0 <= sigma_lo < sigma_hi (sigma = sqrt((1 - alpha_bar) / alpha_bar); sigma_hi may "
            "be inf)"
        )
    return float(sigma_lo), float(sigma_hi)


def within_interval(interval, guided, unguided):
    """
    Apply guidance only inside a guidance interval: call `guided` on the samples whose
    timesteps are inside it and `unguided` on the others, each only when it has samples
    (a batch sampled together shares its timestep: one of them is called).

    :param interval: a GuidanceInterval, or None: `guided` everywhere.
    :param guided: a function (x, t, **kwargs) -> tensor [N x ...].
    :param unguided: a function of the same signature and output shape.
    :return: a function of that signature; keyword tensors (y, low_res) are split with x.
    """
    if interval is None:
        return guided

    def function(x, t, **kwargs):
        inside = interval.contains(t)
        if inside.all():
            return guided(x, t, **kwargs)
        if not inside.any():
            return unguided(x, t, **kwargs)
        parts = [(mask, branch(x[mask], t[mask], **_select(kwargs, mask)))
                 for mask, branch in ((inside, guided), (~inside, unguided))]
        output = parts[0][1].new_empty((len(x), *parts[0][1].shape[1:]))
        for mask, part in parts:
            output[mask] = part
        return output

    return function


def _select(kwargs, mask):
    """
    :return: kwargs with each tensor restricted to the samples of mask.
    """
    return {name: value[mask] if th.is_tensor(value) else value for name, value in kwargs.items()}


def classifier_cond_fn(classifier, classifier_scale, interval=None):
    """
    Classifier guidance (Dhariwal & Nichol 2021, algorithms 1 and 2): the gradient
    of log p(y | x_t) under a noised-image classifier, times a scale.

    The gradient is taken at x_t itself (as the original code and the published
    numbers do), through the classifier only: x_t is detached first, so no graph
    of the diffusion model is kept.

    :param classifier: a callable (x, timesteps) -> [N x K] logits, e.g. an
                       EncoderUNetModel.
    :param classifier_scale: the guidance scale s; 0 gives zero gradients.
    :param interval: a GuidanceInterval: outside it the gradient is zero and the
                     classifier is not evaluated (None: guidance at every step).
    :return: cond_fn(x, t, y=None, **kwargs) -> a tensor of x's shape, for the
             `cond_fn` argument of the sampling loops.
    """

    def guided(x, t, y=None, **kwargs):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[th.arange(len(y), device=y.device), y.view(-1)]
            gradient = th.autograd.grad(selected.sum(), x_in)[0]
        return gradient * classifier_scale

    def unguided(x, t, y=None, **kwargs):
        return th.zeros_like(x)

    gradient = within_interval(interval, guided, unguided)

    def cond_fn(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier guidance needs target labels: model_kwargs={'y': labels}")
        return gradient(x, t, y=y, **kwargs)

    return cond_fn


def classifier_free_model(model, cfg_scale, null_label, interval=None):
    """
    Classifier-free guidance (Ho & Salimans 2022): run the model once on a batch
    of 2N, the N inputs with their labels and again with the null label, and mix
    the first C output channels as
    eps = eps_cond + (w - 1) * (eps_cond - eps_uncond)
    (= eps_uncond + w * (eps_cond - eps_uncond), written so that w = 1 returns
    eps_cond exactly). Any further channels (a learned variance) come from the
    conditional half.

    :param model: a class-conditional model (x, timesteps, y=labels, **kwargs)
                  whose embedding has a row for `null_label`.
    :param cfg_scale: the guidance weight w; 1 is plain conditional sampling,
                      0 unconditional.
    :param null_label: the label id meaning "no class" (num_classes).
    :param interval: a GuidanceInterval: outside it the model runs once, conditionally
                     (None: guidance at every step).
    :return: a model function (x, t, y=None, **kwargs) for the sampling loops;
             other keyword tensors (e.g. low_res) are duplicated along with x.
    """

    def guided(x, t, y=None, **kwargs):
        null = th.full_like(y, null_label)
        doubled = {
            name: th.cat([value, value]) if th.is_tensor(value) else value
            for name, value in kwargs.items()
        }
        output = model(th.cat([x, x]), th.cat([t, t]), y=th.cat([y, null]), **doubled)
        conditional, unconditional = output.chunk(2)
        channels = x.shape[1]
        eps_cond, eps_uncond = conditional[:, :channels], unconditional[:, :channels]
        eps = eps_cond + (cfg_scale - 1) * (eps_cond - eps_uncond)
        return th.cat([eps, conditional[:, channels:]], dim=1)

    mixed = within_interval(interval, guided, model)

    def guided_model(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs labels: model_kwargs={'y': labels}")
        return mixed(x, t, y=y, **kwargs)

    return guided_model


def autoguided_model(model, guide, guide_scale, guide_conditional=True, interval=None):
    """
    Autoguidance (Karras et al. 2024): guide a model by a weaker version of itself (a
    smaller or less trained network, same conditioning and schedule), mixing the first C
    output channels as
    eps = eps_main + (w - 1) * (eps_main - eps_guide)
    (= eps_guide + w * (eps_main - eps_guide), written so that w = 1 returns eps_main
    exactly). Any further channels (a learned variance) come from the main model. Models
    that predict x_0 are mixed alike: x_0 and eps are affine in each other at a given x_t.

    :param model: the main model function (x, timesteps, y=None, **kwargs): it gets the
                  labels as given (None for unconditional sampling).
    :param guide: the guide network (x, timesteps, **kwargs), on the main model's
                  diffusion schedule, with the same input and output channels.
    :param guide_scale: the guidance weight w >= 0; 1 is the main model alone (the guide
                        is never evaluated), 0 the guide alone.
    :param guide_conditional: the guide is class-conditional: it gets the same labels y
                              (else none).
    :param interval: a GuidanceInterval: outside it only the main model runs (None:
                     guidance at every step).
    :return: a model function (x, t, y=None, **kwargs) for the sampling loops; other
             keyword tensors (e.g. low_res) go to both networks.
    """
    check_guide_scale(guide_scale)

    def main(x, t, y=None, **kwargs):
        return model(x, t, y=y, **kwargs)

    if guide_scale == 1.0:
        return main

    def guided(x, t, y=None, **kwargs):
        output = model(x, t, y=y, **kwargs)
        guide_kwargs = dict(kwargs, y=y) if guide_conditional and y is not None else kwargs
        eps_guide = guide(x, t, **guide_kwargs)[:, : x.shape[1]]
        eps_main = output[:, : x.shape[1]]
        eps = eps_main + (guide_scale - 1) * (eps_main - eps_guide)
        return th.cat([eps, output[:, x.shape[1]:]], dim=1)

    return within_interval(interval, guided, main)


def check_guide_scale(guide_scale):
    """
    Refuse an autoguidance weight that is not a finite number >= 0.

    :param guide_scale: the weight w.
    """
    if not (math.isfinite(guide_scale) and guide_scale >= 0):
        raise ValueError(f"guide_scale={guide_scale}: expected a finite weight >= 0 (1: no guidance)")


def check_guide(model, guide, num_classes):
    """
    Refuse a guide network that cannot guide the model: another image size, other input
    or output channels, or another set of classes.

    :param model: the main diffusion model (its `image_size`, `in_channels`,
                  `out_channels` and `num_classes` attributes are compared).
    :param guide: the guide network; an attribute it lacks is not compared, and without
                  `num_classes` it is taken to be unconditional.
    :param num_classes: the number of real classes sampled (None: no labels).
    :return: whether the guide is class-conditional (it is then given the labels).
    """
    for name in ("image_size", "in_channels", "out_channels"):
        expected = getattr(model, name, None)
        found = getattr(guide, name, expected)
        if expected != found:
            raise ValueError(f"the guide has {name} {found} but the model {expected}: a guide is a "
                             "weaker model of the same images (same size, channels and learn_sigma)")
    rows = getattr(guide, "num_classes", None)
    if rows is None:
        return False
    if getattr(model, "num_classes", None) is None:
        raise ValueError(f"the guide is class-conditional ({rows} classes) but the model is "
                         "unconditional: guide it with an unconditional model")
    if rows not in (num_classes, num_classes + 1):
        raise ValueError(f"the guide's class embedding has {rows} rows but labels are drawn from "
                         f"{num_classes} classes: the guide must be trained on the same classes")
    return True


def check_classifier_free(model, cfg_scale, num_classes):
    """
    Refuse classifier-free guidance on a model without a "null" label row.

    :param model: the diffusion model; its `num_classes` attribute is the number
                  of rows of its class embedding (None if unconditional).
    :param cfg_scale: the requested guidance weight.
    :param num_classes: the number of real classes; the null label is this id.
    :return: the null label id (num_classes).
    """
    rows = getattr(model, "num_classes", None)
    if rows is None:
        raise ValueError(
            f"cfg_scale={cfg_scale}: classifier-free guidance needs a class-conditional model "
            "trained with class_dropout_prob > 0, but this model is unconditional"
        )
    if rows != num_classes + 1:
        raise ValueError(
            f"cfg_scale={cfg_scale}: the model's class embedding has {rows} rows for "
            f"num_classes={num_classes}; classifier-free guidance needs {num_classes + 1} "
            "(the extra null label), i.e. a model trained with class_dropout_prob > 0 "
            "(pass the same class_dropout_prob and num_classes as in training)"
        )
    return num_classes


def check_classifier(classifier, image_size, num_classes):
    """
    Refuse a classifier that cannot guide the model: another image size or
    another number of classes.

    :param classifier: the noised-image classifier (an EncoderUNetModel).
    :param image_size: the side of the images being sampled.
    :param num_classes: the number of classes of the labels being sampled.
    """
    classifier_size = getattr(classifier, "image_size", image_size)
    if classifier_size != image_size:
        raise ValueError(
            f"the classifier was built for {classifier_size}x{classifier_size} images but the "
            f"model samples {image_size}x{image_size}; use the classifier of the model's "
            "resolution (e.g. 256x256_classifier.pt for 256x256_diffusion.pt)"
        )
    classifier_classes = getattr(classifier, "out_channels", num_classes)
    if classifier_classes != num_classes:
        raise ValueError(
            f"the classifier predicts {classifier_classes} classes but labels are drawn from "
            f"{num_classes}; pass the same num_classes for the model and the classifier"
        )
