"""
Image grids: model outputs in [-1, 1] to uint8, tiled into one array (written by
file_writing.save_image_grid).
"""

import math

import numpy as np
import torch as th


def to_uint8_nhwc(images):
    """
    Convert model outputs to displayable pixels, as the sampling scripts do.

    :param images: an [N x C x H x W] tensor with values in [-1, 1].
    :return: an [N x H x W x C] uint8 tensor: round-down of (x + 1) * 127.5, clamped.
    """
    pixels = ((images + 1) * 127.5).clamp(0, 255).to(th.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def make_image_grid(images_uint8_nhwc, nrow, padding=2):
    """
    Tile images row by row on a black background.

    :param images_uint8_nhwc: an [N x H x W x C] uint8 array or tensor (C is 1 or 3), on
        any device (a GPU tensor is copied to the host).
    :param nrow: images per row.
    :param padding: pixels between images and around the border.
    :return: a [rows * (H + padding) + padding, nrow * (W + padding) + padding, C] uint8 array.
    """
    if isinstance(images_uint8_nhwc, th.Tensor):
        images_uint8_nhwc = images_uint8_nhwc.detach().cpu()
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"images of shape {images.shape} and dtype {images.dtype}: "
            "expected uint8 [N x H x W x C]"
        )
    if nrow < 1:
        raise ValueError(f"nrow={nrow}: expected at least 1")
    count, height, width, channels = images.shape
    rows = math.ceil(count / nrow)
    grid = np.zeros(
        (rows * (height + padding) + padding, nrow * (width + padding) + padding, channels),
        dtype=np.uint8,
    )
    for index, image in enumerate(images):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid

