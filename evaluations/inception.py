"""
The Inception-v3 network of TensorFlow's 2015-12-05 graph (`classify_image_graph_def.pb`),
the network FID, sFID, Inception Score and precision/recall are defined with.

Module names follow the graph's scopes (`layers.mixed_6.conv` is `mixed_6/conv`), which is
also the key layout of OpenAI's PyTorch port `inception-2015-12-05.pt`. The differences
from torchvision's Inception-v3 are the graph's: batch norm without a learned scale and
with eps 1e-3, average pools that do not count padding, a max pool in the pool branch of
the last block, 1008 output classes, and TensorFlow 1's `resize_bilinear` at the input.
"""

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299  # the graph resizes every image to 299 x 299
POOL_FEATURES = 2048  # pool_3
SPATIAL_BLOCK = "mixed_6"  # third 17 x 17 block; torchvision's Mixed_6d
SPATIAL_CHANNELS = 7  # first channels of mixed_6/conv kept for sFID
SPATIAL_FEATURES = SPATIAL_CHANNELS * 17 * 17  # 2023, flattened in NHWC order
NUM_CLASSES = 1008
BATCH_NORM_EPS = 1e-3


def tf1_resize_indices(in_size, out_size):
    """
    Source indices and weights of TensorFlow 1's `resize_bilinear` along one axis
    (align_corners=False, no half-pixel centers): source = index * (in / out) in float32.

    :param in_size: the input length.
    :param out_size: the output length.
    :return: (lower, upper, lerp): int64 arrays of the two neighbours and float32 weights.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(source)
    lerp = (source - lower).astype(np.float32)
    lower = lower.astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, lerp


def tf1_resize_bilinear(images, size):
    """
    Resize like TensorFlow 1's `tf.image.resize_bilinear(images, size)` with its defaults,
    which is not `F.interpolate(mode="bilinear")` (that one uses half-pixel centers).

    Each output is top + (bottom - top) * y_lerp with top and bottom interpolated along x
    first, in float32, in TensorFlow's order of operations.

    :param images: a float32 [N x C x H x W] tensor.
    :param size: (height, width) of the output.
    :return: a float32 [N x C x height x width] tensor.
    """
    height, width = images.shape[-2:]
    rows = [torch.from_numpy(a).to(images.device) for a in tf1_resize_indices(height, size[0])]
    cols = [torch.from_numpy(a).to(images.device) for a in tf1_resize_indices(width, size[1])]
    y_lerp = rows[2][:, None]

    def along_x(row):
        left, right = row[..., cols[0]], row[..., cols[1]]
        return left + (right - left) * cols[2]

    top = along_x(images[..., rows[0], :])
    bottom = along_x(images[..., rows[1], :])
    return top + (bottom - top) * y_lerp


class ConvBN(nn.Module):
    """
    A graph layer `<scope>/Conv2D -> <scope>/batchnorm -> <scope>`: convolution without
    bias, batch norm with running statistics and no scale, ReLU.
    """

    def __init__(
        self,
        in_channels,  # input channels
        out_channels,  # output channels
        kernel_size,  # int or (height, width)
        stride=1,  # int
        padding=0,  # int or (height, width); the graph's SAME padding is symmetric here
    ):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride = stride
        self.padding = padding
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = F.batch_norm(x, self.mean, self.var, bias=self.beta, eps=BATCH_NORM_EPS)
        return F.relu(x)


def _tower(*layers):
    """A chain of layers named like a graph tower: conv, conv_1, conv_2, ..."""
    names = ["conv"] + [f"conv_{i}" for i in range(1, len(layers))]
    return nn.Sequential(OrderedDict(zip(names, layers)))


def _pooled(pool, conv):
    """The pool branch `tower_2`: a pool, then a 1x1 convolution."""
    return nn.Sequential(OrderedDict(pool=pool, conv=conv))


def _avg_pool_3x3():
    """TensorFlow's 3x3 SAME average pool, which averages only the pixels inside the image."""
    return nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (mixed, mixed_1, mixed_2): 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | avg pool, 1x1."""

    def __init__(self, in_channels, pool_channels):
        super().__init__()
        self.conv = ConvBN(in_channels, 64, 1)
        self.tower = _tower(ConvBN(in_channels, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _tower(
            ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)
        )
        self.tower_2 = _pooled(_avg_pool_3x3(), ConvBN(in_channels, pool_channels, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionB(nn.Module):
    """35x35 to 17x17 reduction (mixed_3): 3x3 stride 2 | 1x1, 3x3, 3x3 stride 2 | max pool."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = ConvBN(in_channels, 384, 3, stride=2)
        self.tower = _tower(
            ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2)
        )
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


class InceptionC(nn.Module):
    """17x17 block (mixed_4 to mixed_7): 1x1 | factorised 7x7 | double 7x7 | avg pool, 1x1."""

    def __init__(self, in_channels, mid_channels):
        super().__init__()
        row = dict(kernel_size=(1, 7), padding=(0, 3))
        col = dict(kernel_size=(7, 1), padding=(3, 0))
        c = mid_channels
        self.conv = ConvBN(in_channels, 192, 1)
        self.tower = _tower(ConvBN(in_channels, c, 1), ConvBN(c, c, **row), ConvBN(c, 192, **col))
        self.tower_1 = _tower(
            ConvBN(in_channels, c, 1), ConvBN(c, c, **col), ConvBN(c, c, **row),
            ConvBN(c, c, **col), ConvBN(c, 192, **row),
        )
        self.tower_2 = _pooled(_avg_pool_3x3(), ConvBN(in_channels, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionD(nn.Module):
    """17x17 to 8x8 reduction (mixed_8): 1x1, 3x3 s2 | 1x1, 1x7, 7x1, 3x3 s2 | max pool."""

    def __init__(self, in_channels):
        super().__init__()
        self.tower = _tower(ConvBN(in_channels, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _tower(
            ConvBN(in_channels, 192, 1), ConvBN(192, 192, kernel_size=(1, 7), padding=(0, 3)),
            ConvBN(192, 192, kernel_size=(7, 1), padding=(3, 0)), ConvBN(192, 192, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


class InceptionE(nn.Module):
    """
    8x8 block (mixed_9, mixed_10): 1x1 | 1x1 then 1x3 and 3x1 | 1x1, 3x3 then 1x3 and 3x1 |
    pool, 1x1. The graph pools by average in mixed_9 and by maximum in mixed_10.
    """

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.conv = ConvBN(in_channels, 320, 1)
        self.tower_conv = ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = (
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1) if max_pool else _avg_pool_3x3()
        )
        self.tower_2_conv = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        tower = self.tower_conv(x)
        tower_1 = self.tower_1_conv_1(self.tower_1_conv(x))
        branches = [
            self.conv(x),
            self.tower_mixed_conv(tower),
            self.tower_mixed_conv_1(tower),
            self.tower_1_mixed_conv(tower_1),
            self.tower_1_mixed_conv_1(tower_1),
            self.tower_2_conv(self.tower_2_pool(x)),
        ]
        return torch.cat(branches, dim=1)


class InceptionV3(nn.Module):
    """
    The 2015-12-05 Inception-v3 graph from its input `ExpandDims` (float NHWC images in
    [0, 255]) to `pool_3` and `mixed_6/conv`, plus the logits' weights `output`.

    Weights start at zero; load them with `evaluations.inception_weights.load_inception`.
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            OrderedDict(
                conv=ConvBN(3, 32, 3, stride=2),
                conv_1=ConvBN(32, 32, 3),
                conv_2=ConvBN(32, 64, 3, padding=1),
                pool0=nn.MaxPool2d(kernel_size=3, stride=2),
                conv_3=ConvBN(64, 80, 1),
                conv_4=ConvBN(80, 192, 3),
                pool1=nn.MaxPool2d(kernel_size=3, stride=2),
                mixed=InceptionA(192, pool_channels=32),
                mixed_1=InceptionA(256, pool_channels=64),
                mixed_2=InceptionA(288, pool_channels=64),
                mixed_3=InceptionB(288),
                mixed_4=InceptionC(768, mid_channels=128),
                mixed_5=InceptionC(768, mid_channels=160),
                mixed_6=InceptionC(768, mid_channels=160),
                mixed_7=InceptionC(768, mid_channels=192),
                mixed_8=InceptionD(768),
                mixed_9=InceptionE(1280, max_pool=False),
                mixed_10=InceptionE(2048, max_pool=True),
            )
        )
        self.output = nn.Linear(POOL_FEATURES, NUM_CLASSES)  # softmax/weights, softmax/biases
        self.output.requires_grad_(False)

    @staticmethod
    def preprocess(images):
        """
        The graph's input path: resize_bilinear to 299 x 299, then (x - 128) / 128.

        :param images: a [N x H x W x 3] uint8 or float tensor in [0, 255].
        :return: a float32 [N x 3 x 299 x 299] tensor in [-1, 1).
        """
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128.0) / 128.0

    def forward(self, images):
        """
        :param images: a [N x H x W x 3] uint8 or float tensor in [0, 255].
        :return: (pool, spatial): float32 [N x 2048] `pool_3` features and [N x 2023]
                 first 7 channels of `mixed_6/conv` (after its ReLU), flattened as NHWC.
        """
        x = self.preprocess(images)
        spatial = None
        for name, layer in self.layers.named_children():
            x = layer(x)
            if name == SPATIAL_BLOCK:
                # The 1x1 branch `mixed_6/conv` comes first in the block's concatenation.
                spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        pool = x.mean(dim=(2, 3))  # pool_3: 8x8 VALID average pool over the 8x8 map
        return pool, spatial
