"""
The finished rounds of a seeded sampling run, kept on disk so that an interrupted
run continues where it stopped (sampling.sample's `partial`).
"""

import json

import blobfile as bf
import numpy as np
import torch as th

from .file_writing import atomic_write, write_npz


class PartialSamples:
    """
    The finished rounds of a seeded sampling run, kept on disk so that a rerun with the
    same flags continues where it stopped: a folder with `record.json` (the run's
    flags) and one `NNNNNNNNN.npz` per round (arr_0 images, arr_1 labels if any),
    named by its first sample index, each written atomically.

    :param folder: the folder (e.g. partial_samples in the log directory).
    :param record: a JSON-serialisable dict of the flags that decide the images.
    """

    def __init__(self, folder, record):
        self.folder = folder
        self.record = record

    def load(self):
        """
        :return: (images, labels): lists of uint8 and int64 tensors of the finished rounds
                 in order (labels empty without labels); empty lists when there are none.
        """
        record_path = bf.join(self.folder, "record.json")
        if not bf.exists(record_path):
            return [], []
        with bf.BlobFile(record_path, "r") as f:
            recorded = json.load(f)
        differing = sorted(k for k in set(recorded) | set(self.record) if recorded.get(k) != self.record.get(k))
        if differing:
            details = "; ".join(f"{k}: partial {recorded.get(k)!r}, now {self.record.get(k)!r}" for k in differing)
            raise ValueError(
                f"{self.folder} holds the finished samples of a run with other flags ({details}); "
                "rerun with the same flags to continue it, or delete the folder to start afresh"
            )
        images, labels = [], []
        for name in sorted(n for n in bf.listdir(self.folder) if n.endswith(".npz")):
            if int(name[: -len(".npz")]) != sum(len(part) for part in images):
                break  # rounds are saved in order; anything after a gap is not used
            with bf.BlobFile(bf.join(self.folder, name), "rb") as f, np.load(f) as arrays:
                images.append(th.from_numpy(arrays["arr_0"]))
                if "arr_1" in arrays.files:
                    labels.append(th.from_numpy(arrays["arr_1"]))
        return images, labels

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
        write_npz(bf.join(self.folder, f"{start:09d}.npz"), *arrays)

    def remove(self):
        """Delete the folder (once the final samples are written)."""
        if bf.exists(self.folder):
            bf.rmtree(self.folder)

