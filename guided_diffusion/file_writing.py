"""
Writing files: atomic writes (readers see the old file or the complete new one),
.npz arrays, PNG images and grids, and the sampling scripts' outputs in the layout
the evaluator reads. Used by training, sampling, bpd and `evaluations/`.
"""

import errno
import io
import math
import os
import shutil
import uuid

import blobfile as bf
import numpy as np
from PIL import Image

from .image_grid import make_image_grid

# What atomic_write inserts between a file's name and the random part of its temporary:
# model000010.pt.tmp-<32 hex digits>.
TEMPORARY_MARK = ".tmp-"
# Samples shown in the PNG grid next to a samples .npz.
GRID_SAMPLES = 64


def is_local(path):
    """
    :return: whether path is on the local file system (not a blobfile URL).
    """
    return "://" not in path


def atomic_write(path, write):
    """
    Write a file so that readers see either the old file or the complete new one:
    local files are written under a temporary name and renamed; blob stores already
    publish an object only when its upload completes.

    :param path: the destination path or URL.
    :param write: a function taking the open binary file.
    """
    if not is_local(path):
        with bf.BlobFile(path, "wb") as f:
            write(f)
        return
    temporary = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
    try:
        with open(temporary, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if _is_disk_full(error):
            raise OSError(
                errno.ENOSPC,
                f"No space left on device while writing {path}: the disk is full. Free space "
                "(or write to another folder); the previous file, if any, is unchanged",
                path,
            ) from error
        raise
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _is_disk_full(error):
    """
    :param error: an exception raised while writing (torch.save reports a failed write as
        a RuntimeError, "unexpected pos ...", whose context is the OSError).
    :return: whether it, or an exception it was raised from, is ENOSPC or EDQUOT.
    """
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_npz(path, *arrays, **named_arrays):
    """
    Write arrays to an .npz file, atomically: positional ones as arr_0, arr_1, ...,
    keyword ones under their names.

    :param path: the file's path or blobfile URL.
    :param arrays: numpy arrays.
    :param named_arrays: numpy arrays by name.
    """
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, **named_arrays)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def write_png(image, path):
    """
    Write one image as a PNG, atomically.

    :param image: a uint8 array [H x W x 3], [H x W x 1] or [H x W].
    :param path: the PNG's path or blobfile URL.
    """
    image = np.asarray(image)
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(
        buffer, format="PNG"
    )
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def save_image_grid(images_uint8_nhwc, path, nrow=None):
    """
    Write images as one PNG grid (image_grid.make_image_grid), atomically.

    :param images_uint8_nhwc: an [N x H x W x C] uint8 array or tensor.
    :param path: the PNG's path or blobfile URL.
    :param nrow: images per row (default: ceil(sqrt(N)), a square-ish grid).
    """
    if nrow is None:
        nrow = math.ceil(math.sqrt(len(images_uint8_nhwc)))
    write_png(make_image_grid(images_uint8_nhwc, nrow), path)


def write_png_folder(images, folder):
    """
    Write one PNG per image (NNNNNN.png) into a local folder as a whole: into
    `folder.partial` first (removing one an interrupted run left), renamed to `folder`
    once complete, so that a folder of that name always holds every image. Blob-store
    URLs are written in place.

    :param images: uint8 numpy array [N x H x W x 3].
    :param folder: the destination folder, replaced if it exists.
    """
    local = is_local(folder)
    target = folder + ".partial" if local else folder
    if local and os.path.isdir(target):
        shutil.rmtree(target)
    bf.makedirs(target)
    for index, image in enumerate(images):
        write_png(image, bf.join(target, f"{index:06d}.png"))
    if local:
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(target, folder)


def samples_name(images):
    """
    :param images: the [N x H x W x C] samples.
    :return: the original's file stem, e.g. "samples_100x256x256x3".
    """
    return "samples_" + "x".join(str(side) for side in images.shape)


def save_samples(images, labels, out_dir, save_png=False):
    """
    Write samples as the evaluator reads them: `samples_NxHxWx3.npz` with arr_0
    the uint8 images and arr_1 the labels (when there are labels), atomically;
    next to it `samples_NxHxWx3.png`, a grid of the first GRID_SAMPLES, and with
    save_png every sample as `samples_NxHxWx3/NNNNNN.png`.

    :param images: uint8 numpy array [N x H x W x 3].
    :param labels: int numpy array [N], or None.
    :param out_dir: the folder (local or blobfile URL).
    :param save_png: also write one PNG per sample.
    :return: the .npz path.
    """
    stem = bf.join(out_dir, samples_name(images))
    write_npz(stem + ".npz", *([images] if labels is None else [images, labels]))
    save_image_grid(images[:GRID_SAMPLES], stem + ".png")
    if save_png:
        write_png_folder(images, stem)
    return stem + ".npz"
