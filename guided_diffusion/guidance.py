"""
Guidance for sampling: classifier guidance (ADM-G, Dhariwal & Nichol 2021) and
classifier-free guidance (Ho & Salimans 2022).

Both produce plain callables that the diffusion's sampling loops take: a
`cond_fn(x, t, y=None, **kwargs)` returning the scaled gradient of
log p(y | x_t), and a model function `(x, t, y=None, **kwargs)` that mixes the
conditional and unconditional predictions.
"""

import torch as th
import torch.nn.functional as F


def classifier_cond_fn(classifier, classifier_scale):
    """
    Classifier guidance (Dhariwal & Nichol 2021, algorithms 1 and 2): the gradient
    of log p(y | x_t) under a noised-image classifier, times a scale.

    The gradient is taken at x_t itself (as the original code and the published
    numbers do), through the classifier only: x_t is detached first, so no graph
    of the diffusion model is kept.

    :param classifier: a callable (x, timesteps) -> [N x K] logits, e.g. an
                       EncoderUNetModel.
    :param classifier_scale: the guidance scale s; 0 gives zero gradients.
    :return: cond_fn(x, t, y=None, **kwargs) -> a tensor of x's shape, for the
             `cond_fn` argument of the sampling loops.
    """

    def cond_fn(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier guidance needs target labels: model_kwargs={'y': labels}")
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[th.arange(len(y), device=y.device), y.view(-1)]
            gradient = th.autograd.grad(selected.sum(), x_in)[0]
        return gradient * classifier_scale

    return cond_fn


def classifier_free_model(model, cfg_scale, null_label):
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
    :return: a model function (x, t, y=None, **kwargs) for the sampling loops;
             other keyword tensors (e.g. low_res) are duplicated along with x.
    """

    def guided_model(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs labels: model_kwargs={'y': labels}")
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

    return guided_model


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
