"""
Writing files: atomic writes (readers see the old file or the complete new one),
.npz arrays, PNG images and grids, and the sampling scripts' outputs in the layout
the evaluator reads. Used by training, sampling, bpd and `evaluations/`.
"""

import contextlib
import errno
import io
import math
import os
import shutil
import uuid
import zipfile

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


@contextlib.contextmanager
def atomic_open(path):
    """
    Open a file for writing so that readers see either the old file or the complete new
    one: a local file is written under a temporary name and renamed when the block ends
    without an exception (else removed); blob stores already publish an object only when
    its upload completes.

    :param path: the destination path or URL.
    :return: a context manager giving the open binary file.
    """
    if not is_local(path):
        with bf.BlobFile(path, "wb") as f:
            yield f
        return
    temporary = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
    try:
        with open(temporary, "wb") as f:
            yield f
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


def atomic_write(path, write):
    """
    Write a file atomically (see atomic_open).

    :param path: the destination path or URL.
    :param write: a function taking the open binary file.
    """
    with atomic_open(path) as f:
        write(f)


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
    atomic_write(path, lambda f: np.savez(f, *arrays, **named_arrays))


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
    :return: the grid, a uint8 array [H x W x C].
    """
    if nrow is None:
        nrow = math.ceil(math.sqrt(len(images_uint8_nhwc)))
    grid = make_image_grid(images_uint8_nhwc, nrow)
    write_png(grid, path)
    return grid


class PngFolder:
    """
    A local folder of one PNG per image (NNNNNN.png) written as a whole: into
    `folder.partial` first (removing one an interrupted run left), renamed to `folder`
    by finish(), so that a folder of that name always holds every image. Blob-store
    URLs are written in place.

    :param folder: the destination folder, replaced by finish() if it exists.
    """

    def __init__(self, folder):
        self.folder = folder
        self.local = is_local(folder)
        self.target = folder + ".partial" if self.local else folder
        if self.local and os.path.isdir(self.target):
            shutil.rmtree(self.target)
        bf.makedirs(self.target)

    def add(self, images, first_index):
        """
        :param images: uint8 [n x H x W x 3] images.
        :param first_index: the number of the first one.
        """
        for index, image in enumerate(images, first_index):
            write_png(image, bf.join(self.target, f"{index:06d}.png"))

    def finish(self):
        """Publish the folder under its name."""
        if self.local:
            if os.path.isdir(self.folder):
                shutil.rmtree(self.folder)
            os.replace(self.target, self.folder)


def samples_name(num_samples, image_shape):
    """
    :param num_samples: N.
    :param image_shape: (H, W, C).
    :return: the original's file stem, e.g. "samples_100x256x256x3".
    """
    return "samples_" + "x".join(str(side) for side in (num_samples, *image_shape))


def samples_outputs(out_dir, num_samples, image_shape):
    """
    :param out_dir: the folder (local or blobfile URL).
    :param num_samples: N.
    :param image_shape: (H, W, C).
    :return: the paths SamplesWriter writes there: samples_NxHxWx3.npz, its .png grid
        and its PNG folder.
    """
    stem = bf.join(out_dir, samples_name(num_samples, image_shape))
    return [stem + ".npz", stem + ".png", stem]


class SamplesWriter:
    """
    Write samples as the evaluator reads them, round by round, so that only one round is
    held in memory: `samples_NxHxWx3.npz` with arr_0 the uint8 images and arr_1 the labels
    (when there are labels), published atomically once all N are added; next to it
    `samples_NxHxWx3.png`, a grid of the first GRID_SAMPLES, and with save_png every sample
    as `samples_NxHxWx3/NNNNNN.png`, written as its round arrives. Use it as a context
    manager: leaving the block with an exception, or before all N were added, publishes
    nothing (an error in the second case).

    :param out_dir: the folder (local or blobfile URL).
    :param num_samples: N, how many samples will be added.
    :param image_shape: (H, W, 3).
    :param labelled: whether every round comes with labels.
    :param save_png: also write one PNG per sample.
    """

    def __init__(self, out_dir, num_samples, image_shape, labelled, save_png=False):
        self.stem = bf.join(out_dir, samples_name(num_samples, image_shape))
        self.path = self.stem + ".npz"
        self.num_samples = num_samples
        self.image_shape = tuple(image_shape)
        self.labelled = labelled
        self.save_png = save_png
        self.added = 0
        self.labels = []
        self.grid_images = []

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._file = self._stack.enter_context(atomic_open(self.path))
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._images_entry = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = dict(descr=np.lib.format.dtype_to_descr(np.dtype(np.uint8)), fortran_order=False,
                      shape=(self.num_samples, *self.image_shape))
        np.lib.format.write_array_header_1_0(self._images_entry, header)
        self._pngs = PngFolder(self.stem) if self.save_png else None
        return self

    def add(self, images, labels=None):
        """
        Append the next round.

        :param images: uint8 numpy array [n x H x W x 3].
        :param labels: int numpy array [n] (when labelled), else None.
        """
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"samples of shape {images.shape} and dtype {images.dtype}: expected "
                             f"uint8 [n x {' x '.join(map(str, self.image_shape))}]")
        if self.added + len(images) > self.num_samples:
            raise ValueError(f"{self.added + len(images)} samples for a file of {self.num_samples}")
        if self.labelled != (labels is not None) or (labels is not None and len(labels) != len(images)):
            raise ValueError(f"{len(images)} samples with {'no' if labels is None else len(labels)} "
                             f"labels: expected {'one label per sample' if self.labelled else 'none'}")
        self._images_entry.write(memoryview(images).cast("B"))  # no copy of the round
        if labels is not None:
            self.labels.append(np.asarray(labels))
        if self._pngs is not None:
            self._pngs.add(images, self.added)
        self.grid_images.append(images[: max(0, GRID_SAMPLES - self.added)].copy())
        self.added += len(images)

    def __exit__(self, error_type, error, traceback):
        if error_type is None and self.added != self.num_samples:
            error = ValueError(f"{self.added} of {self.num_samples} samples were added to {self.path}")
        self._images_entry.close()
        if error_type is not None or error is not None:
            self._zip.close()
            self._stack.__exit__(type(error), error, error.__traceback__)  # removes the temporary
            if error_type is None:
                raise error
            return False
        if self.labelled:
            with self._zip.open("arr_1.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.concatenate(self.labels), allow_pickle=False)
        self._zip.close()
        self._stack.close()  # publishes the .npz
        save_image_grid(np.concatenate(self.grid_images), self.stem + ".png")
        if self._pngs is not None:
            self._pngs.finish()
        return False


def save_samples(images, labels, out_dir, save_png=False):
    """
    Write samples in one go (see SamplesWriter).

    :param images: uint8 numpy array [N x H x W x 3].
    :param labels: int numpy array [N], or None.
    :param out_dir: the folder (local or blobfile URL).
    :param save_png: also write one PNG per sample.
    :return: the .npz path.
    """
    with SamplesWriter(out_dir, len(images), images.shape[1:], labels is not None, save_png) as writer:
        writer.add(images, labels)
    return writer.path
