"""
Make a reference batch like the released ones: Inception statistics (mu, sigma, mu_s,
sigma_s) over every image, plus a random subset of the images (arr_0, 10,000 by default)
for precision and recall. Images from a folder are preprocessed as ADM's training data
(guided_diffusion.image_datasets.center_crop_arr to --image_size).

    python evaluations/make_reference.py IMAGE_DIR_OR_NPZ REF_BATCH.npz --image_size 256
"""

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):  # run as `python evaluations/make_reference.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import blobfile as bf
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from evaluations.evaluator import Evaluator, check_features
from evaluations.inception import POOL_FEATURES, SPATIAL_FEATURES
from evaluations.npz_batches import check_npz_images, open_npz_array
from evaluations.scores import RunningStatistics
from guided_diffusion.file_writing import write_npz
from guided_diffusion.image_datasets import center_crop_arr, list_image_files, read_image

logger = logging.getLogger(__name__)


def folder_batches(paths, image_size, batch_size, workers=8):
    """
    :param paths: image files.
    :param image_size: the output side.
    :param batch_size: images per batch.
    :param workers: decoding threads.
    :return: an iterator of uint8 [B x image_size x image_size x 3] batches, in order.
    """
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            images = pool.map(lambda path: center_crop_arr(read_image(path), image_size), chunk)
            yield np.stack(list(images))


def npz_batches(path, image_size, batch_size):
    """
    :param path: an .npz with uint8 arr_0 [N x H x W x 3].
    :param image_size: resize and crop to this side when the images differ; None keeps them.
    :param batch_size: images per batch.
    :return: an iterator of uint8 batches.
    """
    with open_npz_array(path, "arr_0") as reader:
        check_npz_images(reader, path)
        for batch in reader.read_batches(batch_size):
            if image_size is not None and batch.shape[1:3] != (image_size, image_size):
                batch = np.stack([center_crop_arr(Image.fromarray(x), image_size) for x in batch])
            yield batch


def npz_image_count(path):
    """The number of images in an npz's arr_0."""
    with open_npz_array(path, "arr_0") as reader:
        return reader.shape[0]


def make_reference(evaluator, batches, total, num_pr_images=10000, seed=0):
    """
    Statistics of every image and a random subset of the images; a ValueError naming the
    images whose features are not finite.

    :param evaluator: an Evaluator.
    :param batches: an iterable of uint8 NHWC batches holding `total` images.
    :param total: the number of images.
    :param num_pr_images: how many images to keep for precision and recall.
    :param seed: seed of the subset's numpy generator.
    :return: {'arr_0', 'mu', 'sigma', 'mu_s', 'sigma_s'} arrays.
    """
    keep = np.random.default_rng(seed).choice(total, min(num_pr_images, total), replace=False)
    keep = np.sort(keep)
    pool_stats = RunningStatistics(POOL_FEATURES, evaluator.device)
    spatial_stats = RunningStatistics(SPATIAL_FEATURES, evaluator.device)
    kept, seen = [], 0
    progress = tqdm(total=total, unit="image", desc="reference batch")
    for batch, (pool, spatial) in _with_activations(evaluator, batches):
        check_features((pool, spatial), f"input images {seen} to {seen + len(batch) - 1}")
        pool_stats.update(pool)
        spatial_stats.update(spatial)
        chosen = keep[(keep >= seen) & (keep < seen + len(batch))] - seen
        kept.append(batch[chosen])
        seen += len(batch)
        progress.update(len(batch))
    progress.close()
    if seen != total:
        raise ValueError(f"expected {total} images, got {seen}")
    stats, stats_spatial = pool_stats.statistics(), spatial_stats.statistics()
    return {
        "arr_0": np.concatenate(kept, axis=0),
        "mu": stats.mu,
        "sigma": stats.sigma,
        "mu_s": stats_spatial.mu,
        "sigma_s": stats_spatial.sigma,
    }


def _with_activations(evaluator, batches):
    """Pair each batch with its features, keeping the batches for the subset."""
    queue = []

    def remember():
        for batch in batches:
            queue.append(batch)
            yield batch

    for features in evaluator.iter_activations(remember()):
        yield queue.pop(0), features


def create_argparser():
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("input", help="image folder (searched recursively) or .npz with arr_0")
    parser.add_argument("output", help="reference batch .npz to write")
    parser.add_argument(
        "--image_size", type=int, default=None,
        help="center crop and resize to this side (required for a folder)",
    )
    parser.add_argument("--num_pr_images", type=int, default=10000, help="images kept in arr_0")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the kept images")
    parser.add_argument("--inception_path", default=None, help="Inception weights file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    return parser


def main(argv=None):
    """Write a reference batch from the command line."""
    args = create_argparser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if bf.isdir(args.input):
        if args.image_size is None:
            raise ValueError("--image_size is required when the input is an image folder")
        paths = [path for path, _ in list_image_files(args.input)]
        total, batches = len(paths), folder_batches(paths, args.image_size, args.batch_size)
    elif bf.exists(args.input):
        total = npz_image_count(args.input)
        batches = npz_batches(args.input, args.image_size, args.batch_size)
    else:
        raise FileNotFoundError(f"no such image folder or npz file: {args.input}")
    evaluator = Evaluator(args.inception_path, device=args.device, batch_size=args.batch_size)
    reference = make_reference(evaluator, batches, total, args.num_pr_images, args.seed)
    write_npz(args.output, **reference)
    logger.info("wrote %s: %d images for precision/recall, statistics over %d", args.output,
                len(reference["arr_0"]), total)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # the message says what to do
        sys.exit(f"{os.path.basename(__file__)}: {error}")
