"""Tests for guided_diffusion.image_grid."""

import numpy as np
import pytest
import torch as th

from guided_diffusion.image_grid import make_image_grid, to_uint8_nhwc


def test_to_uint8_maps_minus_one_to_zero_and_one_to_255():
    images = th.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    pixels = to_uint8_nhwc(images)
    assert pixels.shape == (1, 1, 5, 3) and pixels.dtype == th.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 63, 127, 255, 255]


def test_grid_places_images_row_by_row_with_padding():
    images = np.stack([np.full((2, 3, 3), 10 * (i + 1), dtype=np.uint8) for i in range(3)])
    grid = make_image_grid(images, nrow=2, padding=1)
    assert grid.shape == (2 * (2 + 1) + 1, 2 * (3 + 1) + 1, 3)
    assert (grid[1:3, 1:4] == 10).all() and (grid[1:3, 5:8] == 20).all()
    assert (grid[4:6, 1:4] == 30).all() and (grid[4:6, 5:8] == 0).all()
    assert (grid[0] == 0).all() and (grid[:, 4] == 0).all()


def test_wrong_inputs_are_errors():
    with pytest.raises(ValueError, match="expected uint8"):
        make_image_grid(np.zeros((2, 4, 4, 3), dtype=np.float32), nrow=2)
    with pytest.raises(ValueError, match="nrow=0"):
        make_image_grid(np.zeros((2, 4, 4, 3), dtype=np.uint8), nrow=0)


class DeviceTensor(th.Tensor):
    """Stands in for a GPU tensor: numpy refuses it until it is copied to the host."""

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu()")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(th.Tensor)


def test_a_grid_of_device_tensors_is_copied_to_the_host_first():
    images = th.randint(0, 256, (3, 2, 2, 3), dtype=th.uint8)
    on_device = images.as_subclass(DeviceTensor)
    with pytest.raises(TypeError, match="cuda"):
        np.asarray(on_device)
    assert np.array_equal(make_image_grid(on_device, nrow=2), make_image_grid(images.numpy(), nrow=2))
