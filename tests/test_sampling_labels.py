"""
Tests for guided_diffusion/sampling_labels.py: the labels a sampling run draws.
"""

import pytest
import torch as th

from guided_diffusion.sampling_labels import balanced_labels, check_labels, choose_labels


@pytest.mark.parametrize("num_samples, num_classes, counts", [
    (10, 4, [3, 2, 3, 2]), (7, 3, [3, 2, 2]), (8, 4, [2, 2, 2, 2]), (3, 4, [1, 1, 1, 0]),
    (3, 9, [1, 0, 0, 1, 0, 0, 1, 0, 0]),
])
def test_balanced_labels_have_exact_counts(num_samples, num_classes, counts):
    labels = balanced_labels(num_samples, num_classes, th.Generator().manual_seed(0))
    assert labels.dtype == th.int64
    assert th.bincount(labels, minlength=num_classes).tolist() == counts


def test_choose_labels():
    assert choose_labels(10, 4) is None
    seeded = choose_labels(100, 4, seed=3)
    assert th.equal(seeded, choose_labels(100, 4, seed=3))
    assert not th.equal(seeded, choose_labels(100, 4, seed=4))
    assert seeded.min() == 0 and seeded.max() == 3
    assert th.equal(choose_labels(10, 4, class_balanced=True), choose_labels(10, 4, class_balanced=True))
    assert th.bincount(choose_labels(1000, 1000, class_balanced=True, seed=1)).tolist() == [1] * 1000


def test_labels_on_a_device_are_copied_to_the_host():
    from test_image_grid import DeviceTensor

    labels = th.tensor([0, 3, 1]).as_subclass(DeviceTensor)
    checked = check_labels(labels, uses_labels=True, num_classes=4)
    assert type(checked) is th.Tensor and checked.tolist() == [0, 3, 1]
