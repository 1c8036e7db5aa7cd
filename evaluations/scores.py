"""
Gaussian feature statistics with the Frechet distance (FID, sFID), and the Inception Score.
"""

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy


class FIDStatistics:
    """The mean and covariance of a set of feature vectors."""

    def __init__(self, mu, sigma):
        """
        :param mu: the [D] mean.
        :param sigma: the [D x D] covariance.
        """
        self.mu = mu
        self.sigma = sigma

    def frechet_distance(self, other, eps=1e-6):
        """
        The Frechet distance between two Gaussians,
        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)).

        For covariances (symmetric, positive semi-definite) the trace of the square root
        comes from symmetric eigensolvers (trace_sqrt_product), the same number as the
        original's within 1e-8 relative, about six times faster at 2048 features. Other
        matrices take the original evaluator's path (after TTUR's fid.py): scipy's sqrtm of
        the product; when it is not finite, eps is added to both diagonals; an imaginary
        part is dropped when its diagonal is within 1e-3 of zero, else this raises.
        Non-finite statistics (on which sqrtm can spin without end) and a non-finite
        distance raise a ValueError.

        :param other: another FIDStatistics.
        :param eps: the diagonal offset for a singular product.
        :return: the distance, a float.
        """
        mu1, mu2 = np.atleast_1d(self.mu), np.atleast_1d(other.mu)
        sigma1, sigma2 = np.atleast_2d(self.sigma), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape:
            raise ValueError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
        if sigma1.shape != sigma2.shape:
            raise ValueError(f"covariances have different shapes: {sigma1.shape}, {sigma2.shape}")
        for which, mu, sigma in (("first", mu1, sigma1), ("second", mu2, sigma2)):
            for name, array in (("mu", mu), ("sigma", sigma)):
                where = f"frechet_distance, {which} statistics"
                check_finite(array, name, where, FINITE_FEATURES_FIX)
        with np.errstate(over="ignore", invalid="ignore"):  # checked at once
            product = sigma1.dot(sigma2)
        check_finite(product, "sigma1 sigma2", "frechet_distance", FINITE_FEATURES_FIX)
        trace_sqrt = trace_sqrt_product(sigma1, sigma2)
        if trace_sqrt is None:
            trace_sqrt = _trace_sqrtm(sigma1, sigma2, product, eps)
        diff = mu1 - mu2
        distance = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
        if not np.isfinite(distance):
            raise ValueError(
                f"frechet_distance: the distance is {distance} (the square root of sigma1 sigma2 "
                f"is not finite even with eps={eps} on the diagonals); the covariances are "
                "degenerate: use more samples, or check the features for constant or huge values"
            )
        return distance


# How far below zero an eigenvalue of a covariance may lie, relative to the largest, and
# still count as a rounding error of a positive semi-definite matrix.
_PSD_TOLERANCE = 1e-6


def trace_sqrt_product(sigma1, sigma2):
    """
    tr(sqrtm(sigma1 sigma2)) for two covariances: the eigenvalues of sigma1 sigma2 are
    those of the symmetric R sigma2 R, R = sqrtm(sigma1), so the trace is the sum of
    their square roots, found with symmetric eigensolvers.

    :param sigma1: a [D x D] matrix.
    :param sigma2: a [D x D] matrix.
    :return: the trace, or None when either matrix is not symmetric positive
        semi-definite within rounding (sqrtm's path applies).
    """
    symmetric = []
    for sigma in (sigma1, sigma2):
        scale = np.abs(sigma).max() or 1.0
        if np.abs(sigma - sigma.T).max() > _PSD_TOLERANCE * scale:
            return None
        symmetric.append((sigma + sigma.T) / 2)
    values, vectors = np.linalg.eigh(symmetric[0])
    if values.min() < -_PSD_TOLERANCE * max(values.max(), 0.0):
        return None
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root1 @ symmetric[1] @ root1
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    if values.min() < -_PSD_TOLERANCE * max(values.max(), 0.0):
        return None
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def _trace_sqrtm(sigma1, sigma2, product, eps):
    """
    tr(sqrtm(sigma1 sigma2)) the original's way (see FIDStatistics.frechet_distance).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # the caller checks finiteness
        covmean = linalg.sqrtm(product)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; "
            f"adding {eps} to diagonal of cov estimates"
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return np.trace(covmean)


def describe_non_finite(array):
    """
    :param array: a numpy array.
    :return: how many NaN and inf values it holds ("3 inf values", "1 NaN and 2 inf
        values"), its dtype when it does not hold real numbers, or "" when all is well.
    """
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        return f"values of dtype {array.dtype}, not real numbers"
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    counts = [f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "inf")) if count]
    return f"{' and '.join(counts)} values" if counts else ""


def check_finite(array, name, where, fix):
    """
    Raise a ValueError, e.g. "REF.npz: sigma holds 3 inf values; FIX", unless an array
    holds finite real numbers only.

    :param array: a numpy array.
    :param name: the array's name, for the message.
    :param where: where it comes from (a file), for the message.
    :param fix: what would make it right, for the message.
    """
    problem = describe_non_finite(array)
    if problem:
        raise ValueError(f"{where}: {name} holds {problem}; {fix}")


# What to do about statistics that are not finite, for messages.
FINITE_FEATURES_FIX = "compute the statistics from finite features of moderate size"
STATISTICS_FIX = (
    "statistics must be finite, with a symmetric covariance: download the reference batch "
    "again, or recompute it with evaluations/make_reference.py"
)
# The largest |sigma - sigma.T| accepted, relative to the largest |sigma| entry.
SYMMETRY_TOLERANCE = 1e-4


def check_statistics(mu, sigma, dim, where, names=("mu", "sigma")):
    """
    Raise a ValueError unless mu is [dim] and sigma is [dim x dim], both hold finite real
    numbers and sigma is symmetric (within SYMMETRY_TOLERANCE).

    :param mu: a mean.
    :param sigma: a covariance.
    :param dim: the feature dimension.
    :param where: where the statistics come from (a file), for the message.
    :param names: the names of mu and sigma there, for the message.
    """
    mu_name, sigma_name = names
    if np.shape(mu) != (dim,) or np.shape(sigma) != (dim, dim):
        raise ValueError(
            f"{where}: {mu_name}/{sigma_name} have shapes {np.shape(mu)} and {np.shape(sigma)}, "
            f"expected ({dim},) and ({dim}, {dim})"
        )
    check_finite(mu, mu_name, where, STATISTICS_FIX)
    check_finite(sigma, sigma_name, where, STATISTICS_FIX)
    sigma = np.asarray(sigma, dtype=np.float64)
    asymmetry, largest = float(np.abs(sigma - sigma.T).max()), float(np.abs(sigma).max())
    if asymmetry > SYMMETRY_TOLERANCE * largest:
        raise ValueError(
            f"{where}: {sigma_name} is not symmetric: |{sigma_name} - {sigma_name}.T| reaches "
            f"{asymmetry:.3g} for entries up to {largest:.3g} (tolerance "
            f"{SYMMETRY_TOLERANCE:g} of the largest); it is not a covariance: {STATISTICS_FIX}"
        )


def _warn_if_singular(count, dim):
    """Warn that fewer samples than dimensions give a singular covariance; raise if under 2."""
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {count}")
    if count < dim:
        warnings.warn(
            f"{count} samples for {dim} features: the covariance has rank at most {count - 1} "
            f"and is singular, so FID/sFID are strongly biased and not comparable; use at "
            f"least {dim} samples (the paper uses 50,000)",
            stacklevel=3,
        )


def compute_statistics(activations):
    """
    The statistics of a set of features, computed as the original evaluator does
    (np.mean in the features' dtype, np.cov in float64).

    :param activations: an [N x D] array.
    :return: an FIDStatistics.
    """
    _warn_if_singular(*activations.shape)
    return FIDStatistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))


class RunningStatistics:
    """Mean and covariance accumulated over batches in float64 (Chan et al.'s pairwise update)."""

    def __init__(self, dim, device="cpu"):
        """
        :param dim: the feature dimension.
        :param device: the torch device to accumulate on.
        """
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features):
        """
        :param features: an [N x D] tensor or array of new feature vectors.
        """
        x = torch.as_tensor(features).to(self.mean.device, torch.float64)
        count = len(x)
        if count == 0:
            return
        batch_mean = x.mean(dim=0)
        centered = x - batch_mean
        delta = batch_mean - self.mean
        total = self.count + count
        between = torch.outer(delta, delta) * (self.count * count / total)
        self.scatter += centered.T @ centered + between
        self.mean += delta * (count / total)
        self.count = total

    def statistics(self):
        """
        :return: an FIDStatistics of everything seen (covariance with N - 1, like np.cov).
        """
        _warn_if_singular(self.count, len(self.mean))
        sigma = self.scatter / (self.count - 1)
        return FIDStatistics(self.mean.cpu().numpy(), sigma.cpu().numpy())


def inception_score(probabilities, split_size=5000):
    """
    The Inception Score: exp of the mean KL divergence between each row's class
    distribution and the split's marginal, averaged over splits of split_size rows.
    Zero probabilities contribute 0 (0 log 0 = 0).

    :param probabilities: an [N x C] array whose rows are distributions.
    :param split_size: rows per split (the last split may be smaller).
    :return: the score, a float.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    scores = []
    for start in range(0, len(probabilities), split_size):
        part = probabilities[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))
