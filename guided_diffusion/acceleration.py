"""
Runtime switches of a built model, none of which changes its architecture or its
checkpoints: the attention kernel, recomputing the attention blocks' activations in
backward, the channels_last memory format (all set by configure_runtime), the
process's CUDA arithmetic (set_cuda_math), and the wrappers around a model's call: torch.compile with a fallback to eager execution, and
bfloat16 autocast.

fast attention, compile and channels_last keep the numbers within float32 rounding;
bfloat16 changes them (norms and softmax still run in float32).
"""

import contextlib

import torch as th

from . import logger
from .attention import AttentionBlock, QKVAttention
# bf16_autocast is re-exported: it lived here before fp16_util owned precision.
from .fp16_util import bf16_autocast  # noqa: F401


def acceleration_defaults():
    """
    :return: the speed-up flags every training and sampling script takes; on by default:
        those that keep the numbers within float32 rounding and did not slow the CPU
        benchmark down.
    """
    return dict(
        use_bf16=False,  # bfloat16 autocast for the model (changes the numbers)
        compile=False,  # torch.compile the model; eager when compilation fails
        channels_last=True,  # channels_last weights (sampling ~7% faster on our CPU)
        fast_attention=True,  # scaled_dot_product_attention (False: the original's einsum)
        tf32=True,  # TF32 float32 matmuls and convolutions on CUDA (the original's PyTorch default)
        cudnn_benchmark=False,  # let cuDNN time its convolution algorithms per shape
    )


def training_acceleration_defaults():
    """
    :return: acceleration_defaults and the switch only training has: recompute the
        attention blocks' activations in the backward pass, as the original always did
        (same numbers; False trades memory for a faster backward).
    """
    return dict(acceleration_defaults(), recompute_attention=True)


def configure_runtime(model, fast_attention=None, recompute_attention=None, channels_last=None):
    """
    Set the runtime switches of a built model (in place); None leaves a switch as it is.

    :param model: a torch.nn.Module (e.g. a UNetModel or a classifier).
    :param fast_attention: attention through scaled_dot_product_attention (the networks'
        default), or the original's einsum arithmetic.
    :param recompute_attention: attention blocks recompute their activations in the
        backward pass (the original's memory use), or keep them.
    :param channels_last: store the 4-D weights in channels_last order (not undone by False).
    :return: the model.
    """
    if fast_attention is not None:
        set_fast_attention(model, fast_attention)
    if recompute_attention is not None:
        set_attention_recompute(model, recompute_attention)
    if channels_last:
        to_channels_last(model)
    return model


def set_cuda_math(tf32=True, cudnn_benchmark=False):
    """
    Set this process's CUDA arithmetic explicitly (no effect without a GPU), rather than
    leave it to torch's defaults, which changed between versions.

    :param tf32: float32 matmuls and convolutions may use TF32 tensor cores on Ampere and
        later GPUs (10 mantissa bits in the products), as PyTorch 1.7-1.11, the versions
        the original ran on, did by default; False: full float32 (for agreement checks).
    :param cudnn_benchmark: cuDNN times its convolution algorithms at the first call of
        each shape and keeps the fastest (faster with fixed shapes; the low bits may then
        differ from run to run).
    """
    th.backends.cuda.matmul.allow_tf32 = tf32
    th.backends.cudnn.allow_tf32 = tf32
    th.backends.cudnn.benchmark = cudnn_benchmark


def set_fast_attention(model, enabled):
    """
    Choose the attention kernel of every attention layer of the model.

    :param model: a torch.nn.Module.
    :param enabled: scaled_dot_product_attention (flash / memory-efficient kernels on
        GPU), or the original's einsum arithmetic.
    :return: the model.
    """
    for module in model.modules():
        if isinstance(module, QKVAttention):
            module.fast = enabled
    return model


def set_attention_recompute(model, enabled):
    """
    Choose whether the model's attention blocks recompute their activations in the
    backward pass (blocks built with use_checkpoint always do).

    :param model: a torch.nn.Module.
    :param enabled: recompute (the original's memory use) or keep the activations.
    :return: the model.
    """
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.recompute = enabled
    return model


def bf16_model(model, device):
    """
    :param model: a callable returning a tensor (a network or a guided model function).
    :param device: the device it runs on.
    :return: a callable running model under bfloat16 autocast and returning float32.
        Autocast's weight cache is off: every weight is used once per call, and the cache
        would hold a bfloat16 copy of all of them at once (half the model's size again).
    """

    def run(*args, **kwargs):
        with bf16_autocast(device, cache_weights=False):
            return model(*args, **kwargs).float()

    return run


def to_channels_last(model):
    """
    Store the model's 4-D weights in channels_last order (in place); the convolutions
    then produce channels_last activations whatever the input's order.

    :param model: a torch.nn.Module.
    :return: the model.
    """
    return model.to(memory_format=th.channels_last)


# What a failed compilation raises, at torch.compile or at a call of its result.
def _compiler_errors():
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler, OperatorIssue

    return (TorchDynamoException, CppCompileError, InvalidCxxCompiler, OperatorIssue)


class CompiledModel:
    """
    A model run through torch.compile, falling back to the eager model for good, with
    one warning, when compilation fails: when torch.compile raises, or when a call of
    the compiled model raises a compiler error (compilation happens at the first call
    and at calls with new shapes; the backward graph is compiled with the forward one,
    so its failures surface there too). Other errors propagate.

    Attributes other than the call are the model's (e.g. num_classes).

    :param model: the module (or DDP wrapper) to compile.
    :param compile_kwargs: keyword arguments of torch.compile (e.g. mode).
    """

    def __init__(self, model, **compile_kwargs):
        self.model = model
        self.compiled = None
        try:
            self.compiled = th.compile(model, **compile_kwargs)
        except Exception as error:  # noqa: BLE001 (any failure means: run eagerly)
            self._fall_back(error)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                with _eager_backward_lowering():
                    return self.compiled(*args, **kwargs)
            except _compiler_errors() as error:
                self._fall_back(error)
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("model", "compiled"):  # not set yet (during unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)

    def _fall_back(self, error):
        self.compiled = None
        cause = getattr(error, "inner_exception", None) or error  # a backend's own error
        first_line = (str(cause).strip().splitlines() or [""])[0]
        logger.warn(
            f"torch.compile failed ({type(cause).__name__}: {first_line}); running the "
            "model eagerly (pass compile=False to skip the attempt)"
        )


def _eager_backward_lowering():
    """
    :return: a context in which torch.compile lowers the backward graph together with
        the forward one (instead of at the first backward), where torch has the switch.
    """
    config = getattr(getattr(th, "_functorch", None), "config", None)
    if config is None or not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


def accelerate(model, compile=False, use_bf16=False, device=None):
    """
    Wrap a model (or a model function) in the chosen speed-ups.

    :param model: a callable returning a tensor.
    :param compile: run it through torch.compile (see CompiledModel).
    :param use_bf16: run it under bfloat16 autocast and return float32.
    :param device: where it runs (needed with use_bf16).
    :return: the callable to use; the model itself when no speed-up is chosen.
    """
    if compile:
        model = CompiledModel(model)
    if use_bf16:
        model = bf16_model(model, device)
    return model
