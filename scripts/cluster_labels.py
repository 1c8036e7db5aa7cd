"""
Label a folder of images by k-means clusters, for guidance without labels: writes a
labels file (path,class rows, classes cluster_00, cluster_01, ...) for --labels_file.

python scripts/cluster_labels.py --data_dir DIR --num_clusters 10 --features unet --model_path runs/x/ema_0.9999_100000.pt --out labels.csv
python scripts/cluster_labels.py --data_dir DIR --num_clusters 10 --features npz --features_npz features.npz --out labels.csv

Features: `unet`, the mean-pooled middle block output of the unconditional diffusion
model of --model_path (built from its recorded flags) at --feature_timestep, on the
images noised with noise drawn batch after batch in file order from one generator
seeded with --seed; `inception`, the evaluator's Inception-v3 pool features; `npz`, the
N x D array arr_0 of --features_npz, one row per image in the sorted order of the images
(that of the written file). Images are read batch by batch; only features are kept.
"""

import argparse
import io

import blobfile as bf
import numpy as np
import torch as th
from torch.utils.data import DataLoader
from tqdm import tqdm

from guided_diffusion import dist_util, logger, script_util
from guided_diffusion.checkpoint import load_for_inference, read_sidecar, sidecar_path
from guided_diffusion.clustering import (
    kmeans_labels, middle_block_features, normalized_mutual_information, purity,
)
from guided_diffusion.command_line import run_script
from guided_diffusion.image_datasets import ImageDataset, class_labels, list_image_files
from guided_diffusion.labels_file import class_names_from_file, relative_path, write_labels_file


def main(argv=None):
    args = create_argparser().parse_args(argv)
    entries = list_image_files(args.data_dir)
    if not 2 <= args.num_clusters <= len(entries):
        raise ValueError(f"--num_clusters {args.num_clusters}: expected 2 to {len(entries)}, the "
                         f"number of images in --data_dir {args.data_dir}")
    paths = [path for path, _ in entries]
    features = FEATURES[args.features](args, paths)
    logger.log(f"clustering {features.shape[0]} feature vectors of length {features.shape[1]}...")
    clusters = kmeans_labels(features, args.num_clusters, seed=args.seed)
    width = max(2, len(str(args.num_clusters - 1)))
    write_labels_file(args.out, [relative_path(path, folders) for path, folders in entries],
                      [f"cluster_{cluster:0{width}d}" for cluster in clusters])
    sizes = np.bincount(clusters, minlength=args.num_clusters)
    logger.log(f"wrote {args.out}: {len(entries)} images in clusters of sizes {sizes.tolist()}")
    if (sizes == 0).any():
        logger.warn(f"{int((sizes == 0).sum())} clusters are empty: the file has "
                    f"{int((sizes > 0).sum())} classes")
    if args.report_against:
        agreement = report_agreement(entries, args.out, args.report_against)
        logger.log(f"against the true classes (--report_against {args.report_against}): "
                   f"purity {agreement['purity']:.4f}, NMI {agreement['nmi']:.4f}")


def report_agreement(entries, labels_file, class_from):
    """
    :param entries: (path, folders) pairs from image_datasets.list_image_files.
    :param labels_file: a labels file of these images.
    :param class_from: where the true classes come from: "prefix" or "folder".
    :return: {"purity", "nmi"} of the file's classes against the true ones.
    """
    clusters = class_names_from_file(entries, labels_file)
    true_labels, _ = class_labels(entries, class_from)
    return dict(purity=purity(true_labels, clusters),
                nmi=normalized_mutual_information(true_labels, clusters))


def image_batches(paths, image_size, batch_size):
    """
    :return: an iterator over the images in order, center-cropped to image_size, as
        float32 [N x 3 x image_size x image_size] batches in [-1, 1].
    """
    dataset = ImageDataset(image_size, paths, random_flip=False)
    loader = DataLoader(dataset, batch_size=batch_size)
    return tqdm((images for images, _ in loader), total=len(loader), desc="features")


def unet_features(args, paths):
    """
    :return: the [N x channels] middle block features of the images (see the docstring).
    """
    model, diffusion, image_size = load_unconditional_model(args.model_path)
    if not 0 <= args.feature_timestep < diffusion.num_timesteps:
        raise ValueError(f"--feature_timestep {args.feature_timestep}: expected 0 to "
                         f"{diffusion.num_timesteps - 1}, a timestep of --model_path's diffusion")
    generator = th.Generator().manual_seed(args.seed)
    features = []
    for images in image_batches(paths, image_size, args.batch_size):
        timesteps = th.full((len(images),), args.feature_timestep, dtype=th.long)
        x_t = diffusion.q_sample(images, timesteps, noise=th.randn(images.shape, generator=generator))
        batch = middle_block_features(model, x_t.to(dist_util.dev()), timesteps.to(dist_util.dev()))
        features.append(batch.cpu().numpy())
    return np.concatenate(features)


def load_unconditional_model(path):
    """
    Build the diffusion model of a checkpoint from the flags its record holds, and load it.

    :param path: the --model_path checkpoint.
    :return: (model on this process's device, its diffusion, its image size).
    """
    if not path or not bf.exists(path):
        raise FileNotFoundError(f"--model_path {path!r} does not exist: --features unet needs the "
                                "checkpoint of an unconditional diffusion model")
    recorded = (read_sidecar(path) or {}).get("flags")
    if not isinstance(recorded, dict):
        raise ValueError(f"--model_path {path}: no record of the flags it was trained with "
                         f"({sidecar_path(path)}): expected a checkpoint of scripts/image_train.py")
    defaults = script_util.model_and_diffusion_defaults()
    flags = dict(defaults, **{name: value for name, value in recorded.items() if name in defaults})
    flags.update(use_fp16=False, timestep_respacing="")
    if flags["class_cond"]:
        raise ValueError(f"--model_path {path} is class-conditional: its features need labels; "
                         "use the unconditional model that the clusters are to guide")
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    load_for_inference(model, path, flags=script_util.architecture_flags(flags), device=dist_util.dev())
    return model, diffusion, flags["image_size"]


def inception_features(args, paths):
    """
    :return: the [N x 2048] Inception-v3 pool features of the images (uint8 values in
        [0, 255], as the evaluator gives them).
    """
    from evaluations.inception_weights import load_inception

    network = load_inception(args.inception_path or None, device=dist_util.dev())
    features = []
    with th.no_grad():
        for images in image_batches(paths, args.image_size, args.batch_size):
            pixels = ((images + 1) * 127.5).round().permute(0, 2, 3, 1)
            features.append(network(pixels.to(dist_util.dev()))[0].cpu().numpy())
    return np.concatenate(features)


def npz_features(args, paths):
    """
    :return: the arr_0 of --features_npz, checked to hold one row per image.
    """
    path = args.features_npz
    if not path or not bf.exists(path):
        raise FileNotFoundError(f"--features_npz {path!r} does not exist: --features npz needs an "
                                ".npz whose arr_0 is N x D, one row per image in sorted file order")
    with bf.BlobFile(path, "rb") as f:
        arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if "arr_0" not in arrays.files:
        raise ValueError(f"--features_npz {path} has arrays {sorted(arrays.files)}: expected arr_0")
    features = arrays["arr_0"]
    if features.ndim != 2 or len(features) != len(paths):
        raise ValueError(f"--features_npz {path}: arr_0 has shape {features.shape} but --data_dir "
                         f"{args.data_dir} has {len(paths)} images: expected [{len(paths)} x D]")
    return features


FEATURES = dict(unet=unet_features, inception=inception_features, npz=npz_features)


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="the images (searched recursively)")
    parser.add_argument("--num_clusters", type=int, required=True, help="classes to make (2 or more)")
    parser.add_argument("--features", choices=sorted(FEATURES), default="unet",
                        help="what is clustered (see the script's docstring)")
    parser.add_argument("--model_path", default="", help="unet: the unconditional diffusion model")
    parser.add_argument("--feature_timestep", type=int, default=100,
                        help="unet: the timestep of the noised images (small: little noise)")
    parser.add_argument("--inception_path", default="",
                        help="inception: the weights (default: the evaluator's search)")
    parser.add_argument("--image_size", type=int, default=299,
                        help="inception: the side images are center-cropped to")
    parser.add_argument("--features_npz", default="", help="npz: arr_0, N x D features")
    parser.add_argument("--batch_size", type=int, default=64, help="images per feature batch")
    parser.add_argument("--out", required=True, help="the labels file to write (CSV)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of k-means")
    parser.add_argument("--report_against", choices=["", "prefix", "folder"], default="",
                        help="log purity and NMI against the classes of the file-name prefixes "
                        "or sub-folders")
    return parser


if __name__ == "__main__":
    run_script(main, create_argparser())
