"""
A cache of a batch's pool features and statistics in a file next to the batch, keyed by
the batch's content and the network's weights, so that a batch is run through Inception once.

The content key hashes the npz's zip directory: each member's name, size and CRC-32 of its
bytes, which zip stores, so a batch of any size is keyed without reading it.
"""

import hashlib
import warnings
import zipfile

import blobfile as bf
import numpy as np

from evaluations.npz_batches import open_npz_zip
from evaluations.scores import describe_non_finite
from guided_diffusion.file_writing import write_npz

CACHE_VERSION = "guided_diffusion.evaluations features v1"
CACHE_KEYS = ("pool", "mu", "sigma", "mu_s", "sigma_s")


def batch_content_key(npz_path, weights_key):
    """
    :param npz_path: an .npz batch.
    :param weights_key: a fingerprint of the network's weights.
    :return: a hex digest naming this batch's features under these weights.
    """
    digest = hashlib.sha256(f"{CACHE_VERSION}\n{weights_key}\n".encode("utf-8"))
    with bf.BlobFile(npz_path, "rb") as f, open_npz_zip(f, npz_path) as archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            digest.update(f"{info.filename}\t{info.file_size}\t{info.CRC:08x}\n".encode("utf-8"))
    return digest.hexdigest()


def cache_path(npz_path, key):
    """
    :param npz_path: an .npz batch.
    :param key: its batch_content_key.
    :return: the cache file next to it.
    """
    return f"{npz_path}.features-{key[:16]}.npz"


def load_cached(path):
    """
    :param path: a cache file.
    :return: {name: array} for CACHE_KEYS, or None when the file is absent, unreadable
        or holds values that are not finite (it is then computed again).
    """
    if not bf.exists(path):
        return None
    try:
        with bf.BlobFile(path, "rb") as f, np.load(f) as data:
            arrays = {name: data[name] for name in CACHE_KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        warnings.warn(f"ignoring unreadable feature cache {path}: {error}")
        return None
    for name, array in arrays.items():
        problem = describe_non_finite(array)
        if problem:
            warnings.warn(f"ignoring feature cache {path}: {name} holds {problem}")
            return None
    return arrays


def save_cached(path, arrays):
    """
    Store a batch's features; warn and carry on when the folder is not writable.

    :param path: the cache file.
    :param arrays: {name: array} for CACHE_KEYS.
    """
    try:
        write_npz(path, **{name: arrays[name] for name in CACHE_KEYS})
    except OSError as error:
        warnings.warn(f"could not write feature cache {path}: {error}")
