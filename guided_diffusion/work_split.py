"""
Splitting and seeding work across ranks: the rounds that sampling and bpd cut their
indices into, the in-order gathering of each round's results, the per-sample
generators that make outputs independent of the batch size and the number of processes,
and the seeding of training's global generators (one stream per rank).

Work is cut into rounds of `batch_size * world_size` consecutive indices; in each
round rank r takes indices [start + r * batch_size, start + (r + 1) * batch_size),
clipped to the total, so the last round may give some ranks a partial or empty batch
and no padding item reaches the output.

Every purpose draws from its own family of derived seeds (its stream), so no two
purposes share draws.
"""

import contextlib
import random

import numpy as np
import torch as th
import torch.distributed as dist

from . import dist_util

NOISE_STREAM = 0  # sampling noise: x_T, then one draw per step
LABEL_STREAM = 1  # the labels of a seeded sampling run
BPD_STREAM = 2  # bpd's evaluation noise


def set_seed(seed):
    """
    Seed Python's, numpy's and torch's global generators with seed + rank.

    :param seed: an integer.
    """
    seed = seed + dist_util.get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    th.manual_seed(seed)


@contextlib.contextmanager
def forked_torch_seed(seed, device):
    """
    Run a block with torch's global generators seeded to seed, then restore the CPU's
    and (for a GPU) device's generator: the block's draws repeat from run to run and
    leave the caller's streams on those devices where they were.

    :param seed: an integer.
    :param device: the torch.device the block draws on.
    """
    devices = [device] if th.device(device).type == "cuda" else []
    with th.random.fork_rng(devices=devices):
        th.manual_seed(seed)
        yield


def derived_seed(*words):
    """
    A 64-bit seed mixed from non-negative integers (numpy's SeedSequence), so that
    nearby inputs such as (seed, 0) and (seed, 1) give unrelated streams.

    :param words: non-negative integers, e.g. (seed, stream, sample_index).
    :return: an integer in [0, 2**64).
    """
    high, low = np.random.SeedSequence([int(word) for word in words]).generate_state(2, np.uint32)
    return (int(high) << 32) | int(low)


class PerSampleNoise:
    """
    Gaussian noise drawn per sample: sample i of the batch draws from its own CPU
    generator seeded from (seed, indices[i]), first x_T, then one draw per step.
    Call it as the `noise_fn` of the sampling loops.

    :param seed: the run's seed, a non-negative integer.
    :param indices: the global sample indices of the batch, in batch order.
    :param stream: which family of generators to use (sampling, or another
                   purpose such as bpd.py's).
    """

    def __init__(self, seed, indices, stream=NOISE_STREAM):
        self.generators = [
            th.Generator().manual_seed(derived_seed(seed, stream, index)) for index in indices
        ]

    def draw(self, shape, device):
        """
        :param shape: the batch shape (N, C, H, W), N = len(indices).
        :param device: where to put the noise.
        :return: a float32 [N x C x H x W] tensor, row i from generator i.
        """
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for shape {tuple(shape)} but {len(self.generators)} generators")
        rows = [th.randn(tuple(shape[1:]), generator=generator) for generator in self.generators]
        noise = th.stack(rows)
        if th.device(device).type == "cuda":
            # Page-locked, so that the copy overlaps the GPU's work instead of waiting for it.
            return noise.pin_memory().to(device, non_blocking=True)
        return noise.to(device)

    def __call__(self, x):
        return self.draw(x.shape, x.device).to(x.dtype)


def rounds(num_samples, batch_size, world_size, first=0):
    """
    Split sample indices first .. num_samples - 1 into rounds of work.

    :return: a list of rounds, each a list with one range of sample indices per rank.
    """
    def clip(index):
        return min(index, num_samples)

    per_round = batch_size * world_size
    return [
        [
            range(clip(start + rank * batch_size), clip(start + (rank + 1) * batch_size))
            for rank in range(world_size)
        ]
        for start in range(first, num_samples, per_round)
    ]


def gather_in_order(local, ranges, batch_size):
    """
    Collect one round's results from every rank, in rank order, without padding.

    A collective when several processes run: every rank must call it each round.

    :param local: this rank's [n x ...] tensor (n may be 0), on its device.
    :param ranges: the round's index ranges, one per rank (see rounds()).
    :param batch_size: the largest n of any rank.
    :return: the [sum of n x ...] tensor of all ranks' rows, on local's device.
    """
    if dist_util.get_world_size() == 1:
        return local
    padded = local.new_zeros((batch_size, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [th.zeros_like(padded) for _ in ranges]
    dist.all_gather(parts, padded)
    return th.cat([part[: len(indices)] for part, indices in zip(parts, ranges)])


def check_counts(**counts):
    """
    Raise ValueError unless every count is a positive integer.

    :param counts: argument names (e.g. num_samples) to values.
    """
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value}: expected a positive integer")


def check_seed(seed):
    """
    Raise ValueError unless seed is None or a non-negative integer.
    """
    if seed is not None and seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative integer")

