"""
Self-attention of the ADM networks: multi-head attention on packed qkv tensors in
both layouts of the released checkpoints, the attention block, and the classifier's
attention pooling.
"""

import math

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .nn import checkpoint, conv_nd, normalization, zero_module


def _einsum_attention(q, k, v):
    """
    The original's softmax attention for [B*H x C x T] queries, keys and values:
    q and k each scaled by C**-1/4, the softmax in float32; returns [B*H x C x T].
    """
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = th.softmax(weight.float(), dim=-1).type(weight.dtype)
    return th.einsum("bts,bcs->bct", weight, v)


class QKVAttention(nn.Module):
    """
    Multi-head attention on a packed [N x (3 * H * C) x T] qkv tensor laid out as
    q, k, v first and heads inside each (the "new" order, used by the 64x64 model).

    :param n_heads: number of heads.
    :param fast: use torch's scaled_dot_product_attention kernels (flash or
                 memory-efficient), equal to the original's arithmetic within
                 float32 rounding; False runs the original's einsum arithmetic
                 (acceleration.set_fast_attention switches a built model).
    """

    # How the packed channel axis nests: (q/k/v, heads) here, (heads, q/k/v) in legacy.
    qkv_outermost = True

    def __init__(self, n_heads, fast=True):
        super().__init__()
        self.n_heads = n_heads
        self.fast = fast

    def forward(self, qkv):
        """
        :param qkv: an [N x (3 * H * C) x T] tensor of queries, keys and values.
        :return: an [N x (H * C) x T] tensor after attention.
        """
        if self.fast:
            return self._fused_attention(qkv)
        q, k, v = self.split_heads(qkv)
        return _einsum_attention(q, k, v).reshape(qkv.shape[0], -1, qkv.shape[2])

    def split_heads(self, qkv):
        """
        Split a packed qkv tensor into [N*H x C x T] queries, keys and values.
        """
        batch, width, length = qkv.shape
        head_channels = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        return tuple(t.reshape(batch * self.n_heads, head_channels, length) for t in (q, k, v))

    def _fused_attention(self, qkv):
        """
        scaled_dot_product_attention on [N x H x T x C] views of one token-major
        copy of qkv (the layout the fused CPU and GPU kernels take); the output
        comes back as a view, without a copy.
        """
        batch, width, length = qkv.shape
        nesting = (3, self.n_heads) if self.qkv_outermost else (self.n_heads, 3)
        tokens = qkv.transpose(1, 2).contiguous().view(batch, length, *nesting, -1)
        q, k, v = (part.transpose(1, 2) for part in tokens.unbind(2 if self.qkv_outermost else 3))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, length, -1).transpose(1, 2)


class QKVAttentionLegacy(QKVAttention):
    """
    Multi-head attention on a packed qkv tensor laid out as heads first and q, k, v
    inside each head (the order of every released model except 64x64).
    """

    qkv_outermost = False

    def split_heads(self, qkv):
        batch, width, length = qkv.shape
        head_channels = width // (3 * self.n_heads)
        packed = qkv.reshape(batch * self.n_heads, 3 * head_channels, length)
        return packed.split(head_channels, dim=1)


def _heads_for(channels, num_heads, num_head_channels):
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide {channels} attention channels; "
                "choose num_heads dividing every attention level's width, or set num_head_channels"
            )
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise ValueError(
            f"num_head_channels={num_head_channels} does not divide {channels} attention "
            "channels; choose a divisor of every attention level's width (or -1 to use num_heads)"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """
    Self-attention over all spatial positions, with a residual connection.

    :param channels: channels of the input.
    :param num_heads: number of heads (ignored when num_head_channels is set).
    :param num_head_channels: channels per head, or -1 to use num_heads.
    :param use_checkpoint: recompute activations in the backward pass.
    :param use_new_attention_order: q/k/v split before heads (QKVAttention) rather
                                    than heads before q/k/v (QKVAttentionLegacy).
    :param recompute: recompute activations in the backward pass even without
                      use_checkpoint, as the original always did (its memory use);
                      False keeps them: faster training, more memory.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
        recompute=True,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = _heads_for(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.recompute = recompute
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attention_class = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_class(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        """
        :param x: an [N x C x ...] tensor.
        :return: an [N x C x ...] tensor.
        """
        flag = self.use_checkpoint or self.recompute
        return checkpoint(self._forward, (x,), self.parameters(), flag)

    def _forward(self, x):
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, *spatial)


class AttentionPool2d(nn.Module):
    """
    CLIP-style attention pooling: the mean feature, prepended to the spatial
    features with a learned positional embedding, attends over them; its output
    is the result.

    :param spacial_dim: side of the square input feature map.
    :param embed_dim: input channels.
    :param num_heads_channels: channels per attention head.
    :param output_dim: output channels (defaults to embed_dim).
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            th.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = _heads_for(embed_dim, 1, num_heads_channels)
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        """
        :param x: an [N x C x H x W] tensor with H * W = spacial_dim ** 2.
        :return: an [N x output_dim] tensor.
        """
        batch, channels = x.shape[:2]
        x = x.reshape(batch, channels, -1)
        expected = self.positional_embedding.shape[1] - 1
        if x.shape[2] != expected:
            raise ValueError(
                f"AttentionPool2d expected {expected} spatial positions, got {x.shape[2]}; "
                "the classifier's image_size must match its input"
            )
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]
