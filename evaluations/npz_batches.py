"""
Image batches: stream one array of an .npz file in slices without loading the whole file
(50,000 images at 512 x 512 are 39 GB), and check that arrays are NHWC RGB in [0, 255].
"""

import zipfile
from contextlib import contextmanager

import blobfile as bf
import numpy as np

UINT8_HINT = "convert [-1, 1] samples with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"


def check_image_shape(shape, where):
    """
    Raise a ValueError unless shape is [N, H, W, 3] with N > 0.

    :param shape: the array's shape.
    :param where: what the array is, for the message (a path or 'batch').
    """
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"{where}: expected images as [N, H, W, 3] (NHWC), got shape {shape}")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise ValueError(
                f"{where}: shape {shape} looks like NCHW; expected NHWC [N, H, W, 3]: "
                f"use x.transpose(0, 2, 3, 1)"
            )
        raise ValueError(f"{where}: expected 3 (RGB) channels in the last axis, got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{where}: holds no images (shape {shape})")


def check_npz_images(reader, path):
    """
    Raise a ValueError unless an npz image array is uint8 [N, H, W, 3].

    :param reader: an NpzArrayReader.
    :param path: the npz file, for messages.
    """
    check_image_shape(reader.shape, f"{path} arr_0")
    if reader.dtype != np.uint8:
        raise ValueError(
            f"{path} arr_0: expected uint8 images in [0, 255], got {reader.dtype}; {UINT8_HINT}"
        )


def check_image_batch(batch, where="batch"):
    """
    Check a batch of images: NHWC with 3 channels, uint8, or floating point without NaN
    and within [0, 255] (the original evaluator's float input).

    :param batch: a numpy array.
    :param where: what the array is, for messages.
    :return: the batch as a numpy array.
    """
    batch = np.asarray(batch)
    check_image_shape(batch.shape, where)
    if batch.dtype == np.uint8:
        return batch
    if not np.issubdtype(batch.dtype, np.floating):
        raise ValueError(
            f"{where}: expected uint8 images in [0, 255], got dtype {batch.dtype}; {UINT8_HINT}"
        )
    if np.isnan(batch).any():
        raise ValueError(f"{where}: images contain NaN")
    low, high = float(batch.min()), float(batch.max())
    if low < 0 or high > 255:
        raise ValueError(f"{where}: values must lie in [0, 255], got [{low}, {high}]; {UINT8_HINT}")
    return batch


class NpzArrayReader:
    """Reads the rows of one array of an .npz file, a slice at a time."""

    def __init__(self, file, shape, dtype):
        """
        :param file: a file object positioned at the start of the array's data, or an
                     in-memory numpy array.
        :param shape: the array's shape.
        :param dtype: the array's numpy dtype.
        """
        self.file = file
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.index = 0

    def remaining(self):
        """The number of rows not read yet."""
        return self.shape[0] - self.index

    def read_batch(self, batch_size):
        """
        :param batch_size: the most rows to read.
        :return: the next rows as an array, or None when all rows were read.
        """
        count = min(batch_size, self.remaining())
        if count <= 0:
            return None
        if isinstance(self.file, np.ndarray):
            batch = self.file[self.index : self.index + count]
        else:
            size = count * int(np.prod(self.shape[1:])) * self.dtype.itemsize
            data = self.file.read(size)
            if len(data) != size:
                raise ValueError(f"npz array ends early: expected {size} bytes, read {len(data)}")
            batch = np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])
        self.index += count
        return batch

    def read_batches(self, batch_size):
        """
        :param batch_size: rows per batch.
        :return: an iterable over the remaining rows in batches, with a len().
        """
        return _Batches(self, batch_size)


class _Batches:
    """An iterable of an NpzArrayReader's batches that knows how many there are (for tqdm)."""

    def __init__(self, reader, batch_size):
        self.reader, self.batch_size = reader, batch_size

    def __len__(self):
        return -(-self.reader.remaining() // self.batch_size)

    def __iter__(self):
        while (batch := self.reader.read_batch(self.batch_size)) is not None:
            yield batch


@contextmanager
def open_npz_array(path, arr_name):
    """
    Open one array of an .npz file for reading in batches.

    :param path: an .npz file (local path or blobfile URL).
    :param arr_name: the array's name, e.g. 'arr_0'.
    :return: a context manager giving an NpzArrayReader.
    """
    if not bf.exists(path):
        raise FileNotFoundError(f"no such npz file: {path}")
    with bf.BlobFile(path, "rb") as f, open_npz_zip(f, path) as archive:
        member = f"{arr_name}.npy"
        if member not in archive.namelist():
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            raise ValueError(f"{path}: no array {arr_name!r} in the npz file (it holds {names})")
        with archive.open(member) as arr_f:
            version = np.lib.format.read_magic(arr_f)
            if version not in ((1, 0), (2, 0)):
                yield _in_memory(path, arr_name)
                return
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(arr_f)
            if dtype.hasobject:
                raise ValueError(
                    f"{path} {arr_name}: an object array (pickled Python objects, never "
                    "unpickled here); save the images as one uint8 [N, H, W, 3] array"
                )
            if fortran_order:
                yield _in_memory(path, arr_name)
                return
            yield NpzArrayReader(arr_f, shape, dtype)


def open_npz_zip(file, path):
    """
    :param file: the open .npz file.
    :param path: its path, for the message.
    :return: the zipfile.ZipFile of an .npz, or a ValueError naming a file that is not one.
    """
    try:
        return zipfile.ZipFile(file)
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"{path}: not an .npz file ({error}); expected an .npz whose arr_0 holds uint8 "
            "[N, H, W, 3] images, as the sampling scripts write"
        ) from None


def _in_memory(path, arr_name):
    """An NpzArrayReader over an array loaded whole (for layouts that cannot be streamed)."""
    with bf.BlobFile(path, "rb") as f:
        array = np.load(f)[arr_name]
    return NpzArrayReader(np.ascontiguousarray(array), array.shape, array.dtype)
