"""
Small building blocks shared by the networks: normalisation, layer factories,
the sinusoidal timestep embedding, gradient checkpointing and the float16 casts
of convolutions.
"""

import contextlib
import math

import torch as th
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

GROUPNORM_GROUPS = 32


class SiLU(nn.SiLU):
    """x * sigmoid(x); kept as a named class for code written against the original."""


class GroupNorm32(nn.GroupNorm):
    """
    GroupNorm that always computes in float32 and returns the input's dtype, so
    fp16/bf16 activations are normalised without loss of precision.
    """

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """
    Create a 1D, 2D or 3D convolution.

    :param dims: number of spatial dimensions (1, 2 or 3).
    :param args: positional arguments of the torch convolution class.
    :param kwargs: keyword arguments of the torch convolution class.
    """
    return _by_dims(dims, (nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv_nd")(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """
    Create a 1D, 2D or 3D average pooling layer.

    :param dims: number of spatial dimensions (1, 2 or 3).
    """
    pools = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    return _by_dims(dims, pools, "avg_pool_nd")(*args, **kwargs)


def _by_dims(dims, classes, what):
    if dims not in (1, 2, 3):
        raise ValueError(f"{what}: dims={dims!r} is not supported; expected 1, 2 or 3")
    return classes[dims - 1]


def linear(*args, **kwargs):
    """
    Create a linear layer (same arguments as torch.nn.Linear).
    """
    return nn.Linear(*args, **kwargs)


def normalization(channels):
    """
    Create the network's normalisation layer: GroupNorm with 32 groups in float32.

    :param channels: number of input channels; must be divisible by 32.
    """
    if channels % GROUPNORM_GROUPS:
        raise ValueError(
            f"normalization: {channels} channels cannot be split into {GROUPNORM_GROUPS} "
            f"groups; use a channel count divisible by {GROUPNORM_GROUPS} "
            "(num_channels times every channel_mult entry)"
        )
    return GroupNorm32(GROUPNORM_GROUPS, channels)


def zero_module(module):
    """
    Zero the parameters of a module in place and return it.

    :param module: the module whose parameters are set to zero.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """
    Multiply the parameters of a module by a constant in place and return it.

    :param module: the module to scale.
    :param scale: the factor.
    """
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def update_ema(target_params, source_params, rate=0.99):
    """
    Move target parameters towards source parameters by an exponential moving
    average: target = rate * target + (1 - rate) * source (foreach kernels, the same
    arithmetic as one mul_ and add_ per tensor).

    :param target_params: the target parameter sequence (updated in place).
    :param source_params: the source parameter sequence.
    :param rate: the EMA rate (closer to 1 means slower).
    """
    pairs = list(zip(target_params, source_params))
    if not pairs:
        return
    targets = [target.detach() for target, _ in pairs]
    th._foreach_mul_(targets, rate)
    th._foreach_add_(targets, [source.detach() for _, source in pairs], alpha=1 - rate)


def mean_flat(tensor):
    """
    Take the mean over all non-batch dimensions.

    :param tensor: an [N x ...] tensor.
    :return: an [N] tensor.
    """
    return tensor.mean(dim=list(range(1, tensor.dim())))


def timestep_embedding(timesteps, dim, max_period=10000):
    """
    Sinusoidal timestep embeddings: [cos(t * f_i), sin(t * f_i)] with frequencies
    f_i = max_period ** (-i / (dim // 2)); a zero column pads odd dims.

    :param timesteps: a 1-D tensor of N (possibly fractional) timesteps.
    :param dim: the dimension of the output.
    :param max_period: controls the minimum frequency of the embeddings.
    :return: an [N x dim] float32 tensor of positional embeddings.
    """
    half = dim // 2
    exponents = th.arange(half, dtype=th.float32, device=timesteps.device) / half
    freqs = th.exp(-math.log(max_period) * exponents)
    angles = timesteps[:, None].float() * freqs[None]
    embedding = th.cat([th.cos(angles), th.sin(angles)], dim=-1)
    if dim % 2:
        embedding = th.cat([embedding, th.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def float32_region(tensor):
    """
    A context in which autocast is off on tensor's device: the layers the float16 path
    keeps in float32 (the time and label embeddings, their projections in the residual
    blocks, the output head) stay float32 under bfloat16 autocast too.

    :param tensor: a tensor on the device the layers run on.
    :return: a context manager (a no-op without autocast).
    """
    device_type = tensor.device.type
    try:
        enabled = th.is_autocast_enabled(device_type)
    except RuntimeError:  # a device without autocast (meta tensors)
        enabled = False
    if enabled:
        return th.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def checkpoint(func, inputs, params, flag):
    """
    Evaluate a function, recomputing its activations in the backward pass instead
    of storing them when `flag` is set (torch.utils.checkpoint, non-reentrant, so
    it composes with torch.compile and with inputs that need no gradient).

    :param func: the function to evaluate.
    :param inputs: the argument sequence to pass to `func`.
    :param params: parameters `func` depends on; accepted for compatibility with
                   the original signature (the non-reentrant checkpoint finds
                   them itself).
    :param flag: if False, disable gradient checkpointing.
    """
    del params
    if flag and th.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def convert_module_to_f16(module):
    """
    Cast a convolution's weight and bias to float16 (other modules are left alone).

    :param module: a module, typically visited by model.apply.
    """
    _cast_convolution(module, th.float16)


def convert_module_to_f32(module):
    """
    Cast a convolution's weight and bias back to float32 (undoes convert_module_to_f16).

    :param module: a module, typically visited by model.apply.
    """
    _cast_convolution(module, th.float32)


def _cast_convolution(module, dtype):
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        for param in (module.weight, module.bias):
            if param is not None:
                param.data = param.data.to(dtype)
