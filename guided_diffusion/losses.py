"""
Likelihood terms for Gaussian diffusion: the KL divergence between two diagonal
Gaussians and the discretized Gaussian log-likelihood of 8-bit images used for
the decoder term L_0 (Ho et al. 2020, section 3.3).
"""

import numpy as np
import torch as th

# Half the width of one 8-bit intensity bin, with images scaled to [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Values are at the ends of the range when they fall past these thresholds.
_EDGE = 0.999
# Floor inside the logarithms, so that empty bins give a finite log-likelihood.
_LOG_FLOOR = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast against each other; any of them may be a Python float as
    long as at least one is a tensor (the floats take that tensor's dtype and
    device).

    :param mean1: mean of the first Gaussian.
    :param logvar1: log-variance of the first Gaussian.
    :param mean2: mean of the second Gaussian.
    :param logvar2: log-variance of the second Gaussian.
    :return: a tensor of the broadcast shape.
    """
    reference = next(
        (arg for arg in (mean1, logvar1, mean2, logvar2) if isinstance(arg, th.Tensor)),
        None,
    )
    if reference is None:
        raise ValueError("normal_kl: at least one argument must be a torch.Tensor")
    logvar1, logvar2 = (
        value if isinstance(value, th.Tensor) else th.tensor(value).to(reference)
        for value in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """
    The standard normal CDF through the tanh approximation
    0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))).

    :param x: a tensor.
    :return: a tensor of the same shape with values in [0, 1].
    """
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-probability of 8-bit data under a Gaussian discretized into 256 bins.

    Each value of x in [-1, 1] owns the bin [x - 1/255, x + 1/255]; the lowest
    bin extends to -inf and the highest to +inf.

    :param x: targets, uint8 images rescaled to [-1, 1].
    :param means: the Gaussian means, x's shape.
    :param log_scales: the Gaussian log standard deviations, x's shape.
    :return: a tensor of log-probabilities in nats, x's shape.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            "discretized_gaussian_log_likelihood: x, means and log_scales must have one "
            f"shape, got {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _HALF_BIN))
    log_cdf_plus = th.log(cdf_plus.clamp(min=_LOG_FLOOR))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=_LOG_FLOOR))
    log_cdf_delta = th.log((cdf_plus - cdf_min).clamp(min=_LOG_FLOOR))
    return th.where(
        x < -_EDGE,
        log_cdf_plus,
        th.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta),
    )
