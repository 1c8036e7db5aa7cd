"""
Tests for guided_diffusion/work_split.py: derived seeds, per-sample noise, the rounds
that split work across processes, the argument checks, and the seeding of the global
generators.
"""

import random

import numpy as np
import pytest
import torch as th

from guided_diffusion import dist_util
from guided_diffusion.work_split import (
    PerSampleNoise,
    check_counts,
    check_seed,
    derived_seed,
    forked_torch_seed,
    gather_in_order,
    rounds,
    set_seed,
)


def test_derived_seeds_are_stable_and_distinct():
    assert derived_seed(5, 0, 1) == derived_seed(5, 0, 1)
    seeds = {derived_seed(s, stream, i) for s in (0, 1) for stream in (0, 1) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**64 for s in seeds)


def test_per_sample_noise_depends_only_on_the_sample_index():
    pair = PerSampleNoise(7, [3, 5])
    single = PerSampleNoise(7, [5])
    first, second = pair.draw((2, 3, 4, 4), "cpu"), pair(th.zeros(2, 3, 4, 4))
    assert th.equal(first[1:], single.draw((1, 3, 4, 4), "cpu"))
    assert th.equal(second[1:], single(th.zeros(1, 3, 4, 4)))
    assert not th.equal(first, second)
    expected = th.randn((3, 4, 4), generator=th.Generator().manual_seed(derived_seed(7, 0, 3)))
    assert th.equal(first[0], expected)
    with pytest.raises(ValueError, match="2 generators"):
        pair.draw((3, 3, 4, 4), "cpu")


@pytest.mark.parametrize("num_samples, batch_size, world_size", [(10, 3, 1), (10, 3, 2), (5, 4, 3), (8, 2, 2)])
def test_rounds_cover_every_index_once_in_order(num_samples, batch_size, world_size):
    plan = rounds(num_samples, batch_size, world_size)
    flat = [i for work in plan for indices in work for i in indices]
    assert flat == list(range(num_samples))
    assert all(len(work) == world_size and all(len(r) <= batch_size for r in work) for work in plan)
    assert len(plan) == -(-num_samples // (batch_size * world_size))


def test_gather_in_order_on_one_process_returns_the_local_samples():
    local = th.arange(5).view(5, 1)
    plan = rounds(5, 2, 1)
    ranges = [work[0] for work in plan]
    assert th.equal(gather_in_order(local, ranges, 2), local)


def test_counts_and_seeds_are_checked_in_argument_terms():
    check_counts(num_samples=3, batch_size=1)
    with pytest.raises(ValueError, match="batch_size=0: expected a positive integer"):
        check_counts(num_samples=3, batch_size=0)
    with pytest.raises(ValueError, match="seed=-1"):
        check_seed(-1)
    check_seed(None)


def _draws():
    return random.random(), np.random.random(), th.rand(1).item()


def test_set_seed_seeds_every_global_generator_with_the_seed_plus_the_rank(monkeypatch):
    set_seed(3)
    first = _draws()
    set_seed(3)
    assert _draws() == first
    monkeypatch.setattr(dist_util, "get_rank", lambda: 1)
    set_seed(2)  # rank 1 of seed 2 draws what rank 0 of seed 3 draws
    assert _draws() == first
    set_seed(3)
    assert _draws() != first


def test_forked_torch_seed_repeats_its_draws_and_leaves_the_callers_stream():
    th.manual_seed(5)
    expected = th.rand(2)
    th.manual_seed(5)
    inside = []
    for _ in range(2):
        with forked_torch_seed(0, th.device("cpu")):
            inside.append(th.rand(3))
    assert th.equal(inside[0], inside[1])
    assert th.equal(inside[0], th.rand(3, generator=th.Generator().manual_seed(0)))
    assert th.equal(th.rand(2), expected)
