import math

import numpy as np
import pytest
import torch as th
from scipy.special import ndtr

from guided_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)


def test_normal_kl_matches_closed_form():
    mean1, logvar1, mean2, logvar2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    var1, var2 = 0.5, 2.0
    expected = 0.5 * (math.log(var2 / var1) + var1 / var2 + (mean1 - mean2) ** 2 / var2 - 1)
    got = normal_kl(th.tensor(mean1), th.tensor(logvar1), th.tensor(mean2), th.tensor(logvar2))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_normal_kl_is_zero_for_equal_gaussians_and_positive_otherwise():
    generator = th.Generator().manual_seed(0)
    mean = th.randn(4, 3, generator=generator)
    logvar = th.randn(4, 3, generator=generator)
    # exp(logvar - logvar) and the sums round: a few float32 ulps of 1 (seen: 1.2e-7).
    assert th.allclose(normal_kl(mean, logvar, mean, logvar), th.zeros(4, 3), atol=1e-6)
    assert (normal_kl(mean, logvar, mean + 0.1, logvar) > 0).all()


def test_normal_kl_accepts_floats_for_the_standard_normal():
    mean = th.tensor([0.0, 1.0], dtype=th.float64)
    got = normal_kl(mean, th.zeros(2, dtype=th.float64), 0.0, 0.0)
    assert got.dtype == th.float64
    assert got.tolist() == pytest.approx([0.0, 0.5])


def test_normal_kl_needs_a_tensor():
    with pytest.raises(ValueError, match="torch.Tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_cdf_is_close_to_the_exact_normal_cdf():
    x = th.linspace(-6, 6, 241, dtype=th.float64)
    exact = ndtr(x.numpy())
    assert np.abs(approx_standard_normal_cdf(x).numpy() - exact).max() < 3e-4
    assert approx_standard_normal_cdf(th.tensor(0.0)).item() == 0.5


def _bin_probabilities(mean, log_scale):
    """Probabilities of all 256 8-bit values under one discretized Gaussian."""
    x = th.linspace(-1, 1, 256, dtype=th.float64)
    log_probs = discretized_gaussian_log_likelihood(
        x, means=th.full_like(x, mean), log_scales=th.full_like(x, log_scale)
    )
    return log_probs.exp()


@pytest.mark.parametrize(
    "mean, log_scale", [(0.0, math.log(0.1)), (0.9, math.log(0.3)), (-1.2, -5.0)]
)
def test_discretized_likelihood_is_a_distribution_over_256_values(mean, log_scale):
    probs = _bin_probabilities(mean, log_scale)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_inner_and_edge_bins():
    mean, scale = 0.05, 0.2
    x = th.tensor([-1.0, 0.0, 1.0], dtype=th.float64)
    got = discretized_gaussian_log_likelihood(
        x, means=th.full_like(x, mean), log_scales=th.full_like(x, math.log(scale))
    )

    def cdf(value):
        return approx_standard_normal_cdf(
            th.tensor((value - mean) / scale, dtype=th.float64)
        ).item()

    expected = [
        math.log(cdf(-1 + 1 / 255)),  # lowest bin reaches -inf
        math.log(cdf(1 / 255) - cdf(-1 / 255)),
        math.log(1 - cdf(1 - 1 / 255)),  # highest bin reaches +inf
    ]
    assert got.tolist() == pytest.approx(expected, rel=1e-9)


def test_discretized_likelihood_floors_empty_bins():
    x = th.tensor([0.0])
    got = discretized_gaussian_log_likelihood(
        x, means=th.tensor([0.9]), log_scales=th.tensor([-8.0])
    )
    assert got.item() == pytest.approx(math.log(1e-12), rel=1e-6)


def test_discretized_likelihood_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(th.zeros(2), means=th.zeros(3), log_scales=th.zeros(2))
