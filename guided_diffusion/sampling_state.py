"""
The finished rounds of a seeded sampling run, kept on disk so that an interrupted
run continues where it stopped (sampling.sample's `partial`).
"""

import datetime
import json
import re

import blobfile as bf
import numpy as np
import torch as th

from .file_writing import atomic_write, write_npz

ROUND_FILE = re.compile(r"(\d{9})-(\d{9})\.npz")


class PartialSamples:
    """
    The finished rounds of a seeded sampling run, kept on disk so that a rerun with the
    same flags continues where it stopped: a folder with `record.json` (the run's
    flags) and one `SSSSSSSSS-EEEEEEEEE.npz` per round (arr_0 images, arr_1 labels if
    any), named by its first sample index and the one after its last, each written
    atomically.

    :param folder: the folder (e.g. partial_samples in the log directory).
    :param record: a JSON-serialisable dict of the flags that decide the images.
    """

    def __init__(self, folder, record):
        self.folder = folder
        self.record = record

    def _check_record(self):
        """
        Raise a ValueError when the folder belongs to a run with other flags.
        """
        record_path = bf.join(self.folder, "record.json")
        if not bf.exists(record_path):
            return
        with bf.BlobFile(record_path, "r") as f:
            recorded = json.load(f)
        differing = sorted(k for k in set(recorded) | set(self.record) if recorded.get(k) != self.record.get(k))
        if differing:
            details = "; ".join(f"{k}: partial {recorded.get(k)!r}, now {self.record.get(k)!r}" for k in differing)
            raise ValueError(
                f"{self.folder} holds the finished samples of a run with other flags or checkpoint "
                f"files ({details}); rerun with the same flags and files to continue it, or delete "
                "the folder to start afresh"
            )

    def _round_files(self):
        """
        :return: [(start, stop, name)] of the finished rounds that follow each other from
                 sample 0 (anything after a gap is not used), after checking the record.
        """
        self._check_record()
        if not bf.exists(self.folder):
            return []
        spans = sorted(
            (int(match[1]), int(match[2]), name)
            for name in bf.listdir(self.folder)
            if (match := ROUND_FILE.fullmatch(name))
        )
        contiguous = []
        for start, stop, name in spans:
            if start != (contiguous[-1][1] if contiguous else 0):
                break
            contiguous.append((start, stop, name))
        return contiguous

    def finished(self):
        """
        :return: how many samples, from sample 0 on, are finished (read from the file names).
        """
        files = self._round_files()
        return files[-1][1] if files else 0

    def rounds(self):
        """
        Read the finished rounds one at a time (only one is held in memory).

        :return: a generator of (images, labels): a uint8 [n x H x W x 3] tensor and an int64
                 [n] tensor, or None without labels, in sample order.
        """
        for _, _, name in self._round_files():
            with bf.BlobFile(bf.join(self.folder, name), "rb") as f, np.load(f) as arrays:
                images = th.from_numpy(arrays["arr_0"])
                labels = th.from_numpy(arrays["arr_1"]) if "arr_1" in arrays.files else None
            yield images, labels

    def save(self, start, images, labels):
        """
        Add one finished round.

        :param start: the round's first sample index.
        :param images: its uint8 [n x H x W x 3] tensor.
        :param labels: its int64 [n] tensor, or None.
        """
        record_path = bf.join(self.folder, "record.json")
        if not bf.exists(record_path):
            bf.makedirs(self.folder)
            text = json.dumps(self.record, sort_keys=True).encode("utf-8")
            atomic_write(record_path, lambda f: f.write(text))
        arrays = [images.numpy()] + ([] if labels is None else [labels.numpy()])
        write_npz(bf.join(self.folder, f"{start:09d}-{start + len(images):09d}.npz"), *arrays)

    def remove(self):
        """Delete the folder (once the final samples are written)."""
        if bf.exists(self.folder):
            bf.rmtree(self.folder)



def file_identity(path):
    """
    What tells a checkpoint file apart from another one at the same path, for the record
    of partial samples: its size and modification time (reading a whole checkpoint for a
    hash would cost seconds on every start).

    :param path: a local path or blobfile URL.
    :return: e.g. "2214578560 bytes, modified 2026-12-07T13:00:01.123456", or "missing".
    """
    if not bf.exists(path):
        return "missing"
    stat = bf.stat(path)
    modified = datetime.datetime.fromtimestamp(stat.mtime).isoformat()
    return f"{stat.size} bytes, modified {modified}"
