"""
Mixed-precision training: float32 master weights with float16 (loss-scaled) or
bfloat16 (autocast) computation.

With use_fp16 the model's convolution weights are float16 and the master weights
are flat float32 copies, one per parameter group (vectors, then matrices). Each
step the loss is multiplied by 2**lg_loss_scale before backward; the gradients
are copied to the masters, unscaled, checked, and either applied (the scale then
grows by fp16_scale_growth, up to max_lg_loss_scale) or, if any is inf or NaN,
dropped (the scale is halved and the weights stay as they were). After
max_nonfinite_steps consecutive dropped steps training stops with a RuntimeError.

With use_bf16 the parameters stay float32 (they are the master weights) and the
forward pass runs under torch.autocast(dtype=torch.bfloat16); no loss scale is needed.
"""

import contextlib
import math

import torch as th
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import logger
# convert_module_to_f16/f32 are re-exported: the original defined them here.
from .nn import convert_module_to_f16, convert_module_to_f32  # noqa: F401

INITIAL_LOG_LOSS_SCALE = 20.0


def bf16_autocast(device, enabled=True, cache_weights=True):
    """
    :param device: the device (or its type, e.g. "cuda") the model runs on.
    :param enabled: False gives a context manager that does nothing.
    :param cache_weights: keep the bfloat16 copies of the weights until the block ends
        (autocast's cache); without it each copy is freed after its use.
    :return: a context manager running its block under bfloat16 autocast.
    """
    if not enabled:
        return contextlib.nullcontext()
    device_type = device if isinstance(device, str) else th.device(device).type
    return th.autocast(device_type=device_type, dtype=th.bfloat16, cache_enabled=cache_weights)


def get_param_groups_and_shapes(named_model_params):
    """
    Split parameters into vectors/scalars (flattened to shape (-1,)) and matrices
    (flattened to shape (1, -1)), the two groups that get one master tensor each.

    :param named_model_params: an iterable of (name, parameter) pairs.
    :return: a list of ([(name, parameter), ...], shape) pairs: vectors first.
    """
    named_model_params = list(named_model_params)
    vectors = [(name, param) for name, param in named_model_params if param.ndim <= 1]
    matrices = [(name, param) for name, param in named_model_params if param.ndim > 1]
    return [(vectors, (-1,)), (matrices, (1, -1))]


def make_master_params(param_groups_and_shapes):
    """
    Make one flat float32 master parameter per group, holding copies of its parameters.

    :param param_groups_and_shapes: as returned by get_param_groups_and_shapes.
    :return: a list of nn.Parameter, one per group.
    """
    master_params = []
    for param_group, shape in param_groups_and_shapes:
        flat = _flatten_dense_tensors([param.detach().float() for _, param in param_group])
        master = nn.Parameter(flat.view(shape))
        master.requires_grad = True
        master_params.append(master)
    return master_params


def param_grad_or_zeros(param):
    """
    :param param: a parameter.
    :return: its gradient (detached), or zeros of its shape if it has none.
    """
    if param.grad is not None:
        return param.grad.data.detach()
    return th.zeros_like(param)


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """
    Copy the model's (float16) gradients into the flat float32 masters' .grad.

    :param param_groups_and_shapes: as returned by get_param_groups_and_shapes.
    :param master_params: as returned by make_master_params.
    """
    for master, (param_group, shape) in zip(master_params, param_groups_and_shapes):
        grads = [param_grad_or_zeros(param) for _, param in param_group]
        master.grad = _flatten_dense_tensors(grads).view(shape).float()


def unflatten_master_params(param_group, master_param):
    """
    :param param_group: a list of (name, parameter) pairs of one group.
    :param master_param: the group's flat master tensor (any view of it).
    :return: a list of views of master_param with each parameter's shape.
    """
    return _unflatten_dense_tensors(master_param, [param for _, param in param_group])


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """
    Copy the float32 master values into the model's (float16) parameters.

    :param param_groups_and_shapes: as returned by get_param_groups_and_shapes.
    :param master_params: as returned by make_master_params.
    """
    for master, (param_group, _) in zip(master_params, param_groups_and_shapes):
        values = unflatten_master_params(param_group, master.view(-1))
        for (_, param), value in zip(param_group, values):
            param.detach().copy_(value)


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """
    Build a float32 state dict of the model from master parameters.

    :param model: the model (supplies buffers and the key order).
    :param param_groups_and_shapes: as returned by get_param_groups_and_shapes (fp16 only).
    :param master_params: the flat masters (fp16) or one tensor per parameter.
    :param use_fp16: whether master_params are flat fp16 masters.
    :return: a state dict with the model's keys.
    """
    state_dict = model.state_dict()
    if use_fp16:
        for master, (param_group, _) in zip(master_params, param_groups_and_shapes):
            values = unflatten_master_params(param_group, master.view(-1))
            for (name, _), value in zip(param_group, values):
                state_dict[name] = value.detach()
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            state_dict[name] = value.detach()
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    """
    Build master parameters from a state dict (the inverse of master_params_to_state_dict).

    :param model: the model (supplies the parameter names and order).
    :param state_dict: a state dict with the model's keys.
    :param use_fp16: whether to build flat fp16 masters.
    :return: a list of master parameters.
    """
    if use_fp16:
        named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
        return make_master_params(get_param_groups_and_shapes(named))
    return [state_dict[name] for name, _ in model.named_parameters()]


def zero_master_grads(master_params):
    """
    :param master_params: parameters whose .grad is dropped (set to None).
    """
    for param in master_params:
        param.grad = None


def zero_grad(model_params):
    """
    Zero existing gradients in place (parameters without one are left alone).

    :param model_params: an iterable of parameters.
    """
    grads = [param.grad for param in model_params if param.grad is not None]
    for grad in grads:
        # Not detach_() on a gradient without history: DDP's gradients are views of its
        # communication buckets (gradient_as_bucket_view), which cannot be detached in place.
        if grad.grad_fn is not None:
            grad.detach_()
        else:
            grad.requires_grad_(False)
    if grads:
        th._foreach_zero_(grads)


def check_overflow(value):
    """
    :param value: a float.
    :return: True if value is inf, -inf or NaN.
    """
    return not math.isfinite(value)


class MixedPrecisionTrainer:
    """
    Runs backward and optimizer steps in float32, float16 with loss scaling, or bfloat16.

    Typical step: zero_grad(); with autocast(): loss = ...; backward(loss); optimize(opt).
    """

    def __init__(
        self,
        *,
        model,                                  # the network (convert_to_fp16() if use_fp16)
        use_fp16=False,                         # float16 weights, float32 masters, loss scale
        fp16_scale_growth=1e-3,                 # added to lg_loss_scale after each finite step
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,  # log2 of the first loss scale
        max_lg_loss_scale=24.0,                 # lg_loss_scale never grows above this
        max_nonfinite_steps=50,                 # consecutive skipped steps before RuntimeError
        use_bf16=False,                         # float32 weights, forward under bfloat16 autocast
    ):
        """
        See the argument comments; use_fp16 and use_bf16 are mutually exclusive.
        """
        if use_fp16 and use_bf16:
            raise ValueError("use_fp16 and use_bf16 are exclusive: choose one precision")
        self.model = model
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.fp16_scale_growth = fp16_scale_growth
        self.max_lg_loss_scale = max_lg_loss_scale
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale
        if use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            model.convert_to_fp16()

    def zero_grad(self):
        """Zero the model's gradients."""
        zero_grad(self.model_params)

    def autocast(self):
        """
        :return: a context manager for the forward pass: bfloat16 autocast when use_bf16,
            otherwise one that does nothing.
        """
        device_type = self.model_params[0].device.type if self.model_params else "cpu"
        return bf16_autocast(device_type, enabled=self.use_bf16)

    def backward(self, loss):
        """
        :param loss: a scalar loss; multiplied by the loss scale first when use_fp16.
        """
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        """
        Apply the gradients with opt, unless some are inf or NaN.

        :param opt: an optimizer over self.master_params.
        :return: True if the step was taken, False if it was skipped.
        """
        if self.use_fp16:
            logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
            model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
            grad_scale = 2**self.lg_loss_scale
        else:
            grad_scale = 1.0
        grad_norm, param_norm = self._compute_norms(grad_scale=grad_scale)
        if check_overflow(grad_norm):
            self._skip_step(grad_norm)
            return False
        self.nonfinite_steps = 0
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        if self.use_fp16:
            for master in self.master_params:
                master.grad.mul_(1.0 / grad_scale)
        opt.step()
        if self.use_fp16:
            zero_master_grads(self.master_params)
            master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
            grown = self.lg_loss_scale + self.fp16_scale_growth
            self.lg_loss_scale = min(grown, self.max_lg_loss_scale)
        return True

    def _skip_step(self, grad_norm):
        """
        Drop non-finite gradients, halve the loss scale, and stop after too many in a row.

        :param grad_norm: the (non-finite) gradient norm, for the messages.
        """
        self.nonfinite_steps += 1
        if self.use_fp16:
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
        else:
            logger.log(f"Found non-finite gradient norm {grad_norm}, skipped the step")
            self.zero_grad()
        if self.nonfinite_steps >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite_steps} consecutive steps had inf/NaN gradients"
                + (f" (lg_loss_scale is now {self.lg_loss_scale})" if self.use_fp16 else "")
                + ": the loss or the weights have probably diverged. Lower the learning rate, "
                "check the data for bad images, use microbatches or train in bfloat16 "
                "(use_bf16=True) or float32, and resume from the last good checkpoint"
            )

    def _compute_norms(self, grad_scale=1.0):
        """
        :param grad_scale: divides the gradient norm (the loss scale under fp16).
        :return: (gradient norm, parameter norm) over all master parameters, read from
            the device at once (not once per parameter).
        """
        grads = [param.grad for param in self.master_params if param.grad is not None]
        tensors = grads + list(self.master_params)
        if not tensors:
            return 0.0, 0.0
        with th.no_grad():
            squares = th.stack(th._foreach_norm(tensors, 2, dtype=th.float32)).double().square()
            sums = th.stack([squares[: len(grads)].sum(), squares[len(grads) :].sum()])
        grad_square, param_square = sums.tolist()
        return math.sqrt(grad_square) / grad_scale, math.sqrt(param_square)

    def master_params_to_state_dict(self, master_params):
        """
        :param master_params: master parameters (this trainer's or an EMA copy of them).
        :return: a float32 state dict of the model holding those values.
        """
        return master_params_to_state_dict(
            self.model, self.param_groups_and_shapes, master_params, self.use_fp16
        )

    def state_dict_to_master_params(self, state_dict):
        """
        :param state_dict: a state dict of the model.
        :return: master parameters (laid out like this trainer's) holding its values.
        """
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)
