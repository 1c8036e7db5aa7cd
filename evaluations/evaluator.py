"""
FID, sFID, Inception Score and improved precision/recall of a sample batch against a
reference batch, with the numbers of openai/guided-diffusion's TensorFlow evaluator and
PyTorch alone:

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json]

The Python names are the original's; only the constructor differs (weights and a device
instead of a TensorFlow session).
"""

import argparse
import json
import logging
import os
import sys

if __package__ in (None, ""):  # run as `python evaluations/evaluator.py`: import from the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import blobfile as bf
import numpy as np
import torch
from tqdm.auto import tqdm

from evaluations.device_util import default_device, full_fp32_precision
from evaluations.feature_cache import batch_content_key, cache_path, load_cached, save_cached
from evaluations.inception import POOL_FEATURES, SPATIAL_FEATURES
from evaluations.inception_weights import load_inception, weights_fingerprint
from evaluations.manifold import DistanceBlock, ManifoldEstimator  # noqa: F401 (original names)
from evaluations.npz_batches import (
    check_image_batch, check_npz_images, open_npz_array, open_npz_zip,
)
from evaluations.scores import (
    FIDStatistics, check_finite, check_statistics, compute_statistics, inception_score,
)

logger = logging.getLogger(__name__)

# Statistics a reference batch may carry: (mean key, covariance key, feature dimension).
PRECOMPUTED_STATISTICS = (("mu", "sigma", POOL_FEATURES), ("mu_s", "sigma_s", SPATIAL_FEATURES))
# What to do about features that are not finite, for messages.
FEATURES_FIX = (
    "Inception gives finite features for any image, so its weights are damaged (pass "
    "another --inception_path file) or the device computed wrongly (try --device cpu)"
)


def check_features(features, where):
    """
    Raise a ValueError naming the images unless their Inception features are finite.

    :param features: (pool, spatial) feature arrays.
    :param where: the images they come from, for the message.
    """
    for name, array in zip(("Inception pool output", "Inception spatial output"), features):
        check_finite(array, name, where, FEATURES_FIX)


class Evaluator:
    """Inception features of image batches and the scores computed from them."""

    def __init__(
        self,
        inception_path=None,  # weights file (any supported format); None searches/downloads
        device=None,  # torch device; None picks CUDA when available, else CPU
        batch_size=64,  # images per Inception forward pass
        softmax_batch_size=512,  # feature rows per softmax for the Inception Score
    ):
        self.device = default_device(device)
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        self.model = load_inception(inception_path, self.device)
        self.manifold_estimator = ManifoldEstimator(device=self.device)
        self._weights_key = None

    def warmup(self):
        """Run one small batch through the network (the original's warm-up step)."""
        self.compute_activations([np.zeros([1, 64, 64, 3], dtype=np.uint8)])

    def read_activations(self, npz_path):
        """
        Features of the images in an npz's arr_0, streamed in batches.

        :param npz_path: an .npz with arr_0: uint8 [N x H x W x 3].
        :return: (pool, spatial): float32 arrays [N x 2048] and [N x 2023].
        """
        with open_npz_array(npz_path, "arr_0") as reader:
            check_npz_images(reader, npz_path)
            return self.compute_activations(reader.read_batches(self.batch_size), npz_path)

    def _forward(self, batch):
        """Start the network on one batch; returns device tensors (asynchronous on a GPU)."""
        images = torch.from_numpy(np.require(check_image_batch(batch), requirements=["C", "W"]))
        with torch.inference_mode(), full_fp32_precision():
            return self.model(images.to(self.device))

    def iter_activations(self, batches):
        """
        Features batch by batch; the next batch is read while the device runs this one.

        :param batches: an iterable of NHWC arrays in [0, 255] (uint8, or float without NaN).
        :return: an iterator of (pool, spatial) float32 arrays [B x 2048] and [B x 2023].
        """
        pending = None
        for batch in batches:
            outputs = self._forward(batch)
            if pending is not None:
                yield pending[0].cpu().numpy(), pending[1].cpu().numpy()
            pending = outputs
        if pending is not None:
            yield pending[0].cpu().numpy(), pending[1].cpu().numpy()

    def compute_activations(self, batches, where="batches"):
        """
        Features for downstream scores; a ValueError when they are not finite.

        :param batches: an iterable of NHWC arrays in [0, 255] (uint8, or float without NaN).
        :param where: what the batches are (a file), for messages.
        :return: (pool, spatial): float32 arrays [N x 2048] and [N x 2023].
        """
        progress = tqdm(batches, desc="Inception features", leave=False)
        features = list(self.iter_activations(progress))
        if not features:
            raise ValueError("compute_activations: no batches given")
        pools, spatials = zip(*features)
        activations = np.concatenate(pools, axis=0), np.concatenate(spatials, axis=0)
        check_features(activations, where)
        return activations

    def read_statistics(self, npz_path, activations):
        """
        The batch's pool and spatial statistics: precomputed ones from the npz (mu, sigma,
        mu_s, sigma_s) where present, else computed from the activations.

        :param npz_path: the batch's .npz.
        :param activations: its (pool, spatial) features; an entry may be None when the
                            npz has the matching statistics.
        :return: (FIDStatistics of pool features, FIDStatistics of spatial features).
        """
        precomputed = self.read_precomputed_statistics(npz_path)
        return self._complete_statistics(npz_path, precomputed, activations)

    def read_precomputed_statistics(self, npz_path):
        """
        The statistics an npz carries (a reference batch's mu, sigma, mu_s, sigma_s),
        checked: shapes, finite values, symmetric covariances (scores.check_statistics).

        :param npz_path: the batch's .npz.
        :return: (pool FIDStatistics, spatial FIDStatistics), None where the npz lacks a pair.
        """
        if not bf.exists(npz_path):
            raise FileNotFoundError(f"no such npz file: {npz_path}")
        result = []
        with bf.BlobFile(npz_path, "rb") as f, open_npz_zip(f, npz_path) as archive:
            keys = [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
            for mu_key, sigma_key, dim in PRECOMPUTED_STATISTICS:
                if (mu_key in keys) != (sigma_key in keys):
                    raise ValueError(f"{npz_path}: has only one of {mu_key!r} and {sigma_key!r}")
                if mu_key not in keys:
                    result.append(None)
                    continue
                mu = _read_npz_member(archive, mu_key, npz_path)
                sigma = _read_npz_member(archive, sigma_key, npz_path)
                check_statistics(mu, sigma, dim, npz_path, names=(mu_key, sigma_key))
                result.append(FIDStatistics(mu, sigma))
        return tuple(result)

    def _complete_statistics(self, npz_path, precomputed, activations):
        """
        :param npz_path: the batch's .npz, for messages.
        :param precomputed: read_precomputed_statistics(npz_path).
        :param activations: (pool, spatial) features, an entry None where not computed.
        :return: the precomputed statistics, each missing one computed from its features.
        """
        result = []
        pairs = zip(PRECOMPUTED_STATISTICS, precomputed, activations)
        for (mu_key, sigma_key, _), stats, features in pairs:
            if stats is None:
                if features is None:
                    message = f"{npz_path}: no {mu_key!r}/{sigma_key!r} and no features given"
                    raise ValueError(message)
                stats = self.compute_statistics(features)
            result.append(stats)
        return tuple(result)

    def compute_statistics(self, activations):
        """
        :param activations: [N x D] features.
        :return: their FIDStatistics (warns when N < D: the covariance is singular).
        """
        return compute_statistics(activations)

    def compute_inception_score(self, activations, split_size=5000):
        """
        The Inception Score from pool features: softmax of features times the graph's
        output weights (no bias, 1008 classes), over splits of split_size.

        :param activations: [N x 2048] pool features.
        :param split_size: samples per split.
        :return: the score, a float.
        """
        weight = self.model.output.weight
        probabilities = []
        with torch.inference_mode(), full_fp32_precision():
            for start in range(0, len(activations), self.softmax_batch_size):
                rows = torch.as_tensor(activations[start : start + self.softmax_batch_size])
                logits = rows.to(self.device, torch.float32) @ weight.T
                probabilities.append(torch.softmax(logits, dim=1).cpu().numpy())
        return inception_score(np.concatenate(probabilities, axis=0), split_size)

    def compute_prec_recall(self, activations_ref, activations_sample):
        """
        Improved precision and recall with k = 3.

        :param activations_ref: [N x 2048] reference pool features.
        :param activations_sample: [M x 2048] sample pool features.
        :return: (precision, recall), floats.
        """
        radii_ref = self.manifold_estimator.manifold_radii(activations_ref)
        radii_sample = self.manifold_estimator.manifold_radii(activations_sample)
        precision, recall = self.manifold_estimator.evaluate_pr(
            activations_ref, radii_ref, activations_sample, radii_sample
        )
        return float(precision[0]), float(recall[0])

    def read_batch_features(self, npz_path, use_cache=True):
        """
        A batch's pool features and both statistics, from a cache file next to the batch
        when one matches its content and these weights, else computed (and cached).

        :param npz_path: the batch's .npz.
        :param use_cache: whether to read and write the cache file.
        :return: (pool features [N x 2048], pool FIDStatistics, spatial FIDStatistics).
        """
        path = None
        if use_cache:
            if self._weights_key is None:
                self._weights_key = weights_fingerprint(self.model)
            path = cache_path(npz_path, batch_content_key(npz_path, self._weights_key))
            cached = load_cached(path)
            if cached is not None:
                logger.info("using cached features %s", path)
                return (
                    cached["pool"],
                    FIDStatistics(cached["mu"], cached["sigma"]),
                    FIDStatistics(cached["mu_s"], cached["sigma_s"]),
                )
        precomputed = self.read_precomputed_statistics(npz_path)  # checked before the features
        activations = self.read_activations(npz_path)
        stats, stats_spatial = self._complete_statistics(npz_path, precomputed, activations)
        if path is not None:
            arrays = dict(pool=activations[0], mu=stats.mu, sigma=stats.sigma)
            save_cached(path, dict(arrays, mu_s=stats_spatial.mu, sigma_s=stats_spatial.sigma))
        return activations[0], stats, stats_spatial


def _read_npz_member(archive, key, npz_path):
    """
    :param archive: an open .npz zipfile.ZipFile.
    :param key: the array's name.
    :param npz_path: the npz file, for messages.
    :return: the array (never unpickled).
    """
    with archive.open(f"{key}.npy") as member:
        try:
            return np.lib.format.read_array(member, allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{npz_path} {key}: {error}") from None


def evaluate(evaluator, ref_batch, sample_batch, use_cache=True):
    """
    All five scores of a sample batch against a reference batch.

    :param evaluator: an Evaluator.
    :param ref_batch: the reference .npz.
    :param sample_batch: the sample .npz.
    :param use_cache: whether to reuse and write feature caches next to the batches.
    :return: a dict with inception_score, fid, sfid, precision, recall.
    """
    logger.info("computing reference batch features...")
    ref_pool, ref_stats, ref_stats_spatial = evaluator.read_batch_features(ref_batch, use_cache)
    logger.info("computing sample batch features...")
    sample = evaluator.read_batch_features(sample_batch, use_cache)
    sample_pool, sample_stats, sample_stats_spatial = sample
    logger.info("computing evaluations...")
    precision, recall = evaluator.compute_prec_recall(ref_pool, sample_pool)
    return {
        "inception_score": evaluator.compute_inception_score(sample_pool),
        "fid": sample_stats.frechet_distance(ref_stats),
        "sfid": sample_stats_spatial.frechet_distance(ref_stats_spatial),
        "precision": precision,
        "recall": recall,
    }


def format_results(results):
    """
    :param results: the dict from evaluate().
    :return: the original evaluator's output lines.
    """
    names = [
        ("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
        ("Precision", "precision"), ("Recall", "recall"),
    ]
    return "\n".join(f"{label}: {results[key]}" for label, key in names)


def create_argparser():
    """The command line: the original's two positional arguments, plus options."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("ref_batch", help="path to reference batch npz file")
    parser.add_argument("sample_batch", help="path to sample batch npz file")
    parser.add_argument(
        "--inception_path", default=None,
        help="Inception weights: inception-2015-12-05.pt, pt_inception-2015-12-05-6726825d.pth "
        "or classify_image_graph_def.pb (default: $GUIDED_DIFFUSION_INCEPTION, the cache "
        "folder, else download)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    parser.add_argument(
        "--no_cache", action="store_true",
        help="do not read or write feature caches next to the batches",
    )
    return parser


def main(argv=None):
    """Run the evaluator from the command line."""
    args = create_argparser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    evaluator = Evaluator(args.inception_path, device=args.device, batch_size=args.batch_size)
    results = evaluate(evaluator, args.ref_batch, args.sample_batch, use_cache=not args.no_cache)
    print(json.dumps(results) if args.json else format_results(results))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # the message says what to do
        sys.exit(f"{os.path.basename(__file__)}: {error}")
