"""Tests for guided_diffusion.fp16_util: master weights, loss scaling, skipped steps, bf16."""

import pytest
import torch as th
import torch.nn as nn

from guided_diffusion import logger
from guided_diffusion.fp16_util import (
    MixedPrecisionTrainer,
    convert_module_to_f16,
    convert_module_to_f32,
    get_param_groups_and_shapes,
    model_grads_to_master_grads,
)
from guided_diffusion.script_util import create_model


class SmallNet(nn.Module):
    """A conv (converted to float16 by convert_to_fp16), a norm and a linear layer."""

    def __init__(self):
        super().__init__()
        generator = th.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)
        with th.no_grad():
            for param in self.parameters():
                param.copy_(th.randn(param.shape, generator=generator))

    def convert_to_fp16(self):
        self.conv.apply(convert_module_to_f16)

    def forward(self, x):
        h = self.conv(x.type(self.conv.weight.dtype)).float()
        return self.head(self.norm(h).mean(dim=(2, 3)))


@pytest.fixture(autouse=True)
def fresh_logger_values():
    """optimize() logs through the logger; start and end each test with no pending values."""
    logger.get_current().name2val.clear()
    logger.get_current().name2cnt.clear()
    yield
    logger.get_current().name2val.clear()
    logger.get_current().name2cnt.clear()


def _set_scaled_grads(trainer, grads_by_name):
    """Give every model parameter the gradient grads_by_name[name] * loss scale (in its dtype)."""
    scale = 2**trainer.lg_loss_scale if trainer.use_fp16 else 1.0
    for name, param in trainer.model.named_parameters():
        param.grad = (grads_by_name[name] * scale).to(param.dtype)


def _small_grads(model, seed=1):
    """Gradients that float16 represents exactly: multiples of 1/64 in [-1, 1]."""
    generator = th.Generator().manual_seed(seed)
    return {
        name: th.randint(-64, 65, param.shape, generator=generator).float() / 64
        for name, param in model.named_parameters()
    }


def test_param_groups_put_vectors_first_then_matrices():
    groups = get_param_groups_and_shapes(SmallNet().named_parameters())
    assert [name for name, _ in groups[0][0]] == ["conv.bias", "norm.weight", "norm.bias", "head.bias"]
    assert [name for name, _ in groups[1][0]] == ["conv.weight", "head.weight"]
    assert [shape for _, shape in groups] == [(-1,), (1, -1)]


def test_master_weights_are_float32_copies_and_round_trip_through_state_dicts():
    model = SmallNet()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True)
    assert model.conv.weight.dtype == th.float16 and model.head.weight.dtype == th.float32
    assert [m.dtype for m in trainer.master_params] == [th.float32, th.float32]
    assert [m.shape for m in trainer.master_params] == [th.Size([4 + 4 + 4 + 3]), th.Size([1, 72 + 12])]
    state_dict = trainer.master_params_to_state_dict(trainer.master_params)
    assert all(th.equal(state_dict[k], original[k]) for k in original)
    rebuilt = trainer.state_dict_to_master_params(state_dict)
    assert all(th.equal(a, b) for a, b in zip(rebuilt, trainer.master_params))


def test_fp16_gradients_match_float32_gradients(torch_single_thread):
    th.manual_seed(0)
    flags = dict(channel_mult="1", attention_resolutions="8", num_head_channels=32)
    model32 = create_model(8, 32, 1, **flags)
    with th.no_grad():
        for param in model32.out.parameters():  # the output layer starts at zero
            param.normal_(0, 0.1)
    model16 = create_model(8, 32, 1, use_fp16=True, **flags)
    model16.load_state_dict(model32.state_dict())
    trainer32 = MixedPrecisionTrainer(model=model32)
    trainer16 = MixedPrecisionTrainer(model=model16, use_fp16=True)
    x, t = th.randn(1, 3, 8, 8), th.tensor([500])
    trainer32.backward((model32(x, t) ** 2).mean())
    trainer16.backward((model16(x, t).float() ** 2).mean())
    model_grads_to_master_grads(trainer16.param_groups_and_shapes, trainer16.master_params)
    grad16 = th.cat([m.grad.view(-1) for m in trainer16.master_params]) / 2**trainer16.lg_loss_scale
    groups = get_param_groups_and_shapes(model32.named_parameters())
    grad32 = th.cat([p.grad.view(-1) for group, _ in groups for _, p in group])
    assert grad32.norm() > 0
    assert ((grad16 - grad32).norm() / grad32.norm()).item() < 1e-2


def test_a_step_unscales_every_parameter_group():
    model = SmallNet()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=4.0)
    before = trainer.master_params_to_state_dict([m.detach().clone() for m in trainer.master_params])
    grads = _small_grads(model)
    _set_scaled_grads(trainer, grads)
    assert trainer.optimize(th.optim.SGD(trainer.master_params, lr=1.0))
    after = trainer.master_params_to_state_dict(trainer.master_params)
    for name in grads:  # both the vector and the matrix group moved by exactly -grad
        assert th.allclose(after[name], before[name] - grads[name], atol=1e-6), name
    assert model.conv.weight.dtype == th.float16
    assert th.allclose(model.conv.weight.float(), after["conv.weight"], atol=1e-2)
    expected_norm = th.cat([g.view(-1) for g in grads.values()]).norm().item()
    assert logger.getkvs()["grad_norm"] == pytest.approx(expected_norm, rel=1e-6)
    assert trainer.lg_loss_scale == pytest.approx(4.0 + 1e-3)


@pytest.mark.parametrize("bad_value", [float("inf"), float("nan")])
def test_non_finite_gradients_skip_the_step_and_halve_the_scale(bad_value):
    model = SmallNet()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=4.0)
    opt = th.optim.AdamW(trainer.master_params, lr=0.1)
    masters = [m.detach().clone() for m in trainer.master_params]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = _small_grads(model)
    grads["head.weight"][0, 0] = bad_value
    _set_scaled_grads(trainer, grads)
    assert trainer.optimize(opt) is False
    assert trainer.lg_loss_scale == 3.0
    assert all(th.equal(a, b) for a, b in zip(masters, trainer.master_params))
    assert all(th.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(m.grad is None for m in trainer.master_params) and not opt.state
    _set_scaled_grads(trainer, _small_grads(model))
    assert trainer.optimize(opt) is True
    assert trainer.lg_loss_scale == pytest.approx(3.0 + 1e-3)


def test_the_loss_scale_is_bounded():
    model = SmallNet()
    trainer = MixedPrecisionTrainer(
        model=model, use_fp16=True, initial_lg_loss_scale=4.0, fp16_scale_growth=1.0, max_lg_loss_scale=6.0
    )
    opt = th.optim.SGD(trainer.master_params, lr=0.0)
    for _ in range(4):
        _set_scaled_grads(trainer, _small_grads(model))
        assert trainer.optimize(opt)
    assert trainer.lg_loss_scale == 6.0


def test_too_many_consecutive_non_finite_steps_abort_with_advice():
    model = SmallNet()
    trainer = MixedPrecisionTrainer(
        model=model, use_fp16=True, initial_lg_loss_scale=4.0, max_nonfinite_steps=3
    )
    opt = th.optim.SGD(trainer.master_params, lr=0.0)
    bad = _small_grads(model)
    bad["conv.bias"][0] = float("nan")
    for grads in (bad, bad, _small_grads(model), bad, bad):  # a finite step resets the count
        _set_scaled_grads(trainer, grads)
        trainer.optimize(opt)
    _set_scaled_grads(trainer, bad)
    message = r"3 consecutive steps had inf/NaN gradients \(lg_loss_scale is now -0\.99.*Lower the learning rate"
    with pytest.raises(RuntimeError, match=message):
        trainer.optimize(opt)


def test_float32_training_also_skips_non_finite_steps():
    model = SmallNet()
    trainer = MixedPrecisionTrainer(model=model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = _small_grads(model)
    grads["norm.weight"][1] = float("inf")
    _set_scaled_grads(trainer, grads)
    assert trainer.optimize(th.optim.SGD(trainer.master_params, lr=1.0)) is False
    assert all(th.equal(weights[k], v) for k, v in model.state_dict().items())


def test_bf16_autocast_keeps_float32_weights_and_gradients():
    model = SmallNet()
    trainer = MixedPrecisionTrainer(model=model, use_bf16=True)
    x = th.randn(2, 2, 5, 5)
    with trainer.autocast():
        out = model(x)
    assert out.dtype == th.bfloat16
    trainer.backward(out.float().pow(2).mean())
    assert all(p.dtype == th.float32 and p.grad.dtype == th.float32 for p in model.parameters())
    reference = model(x).pow(2).mean()
    assert abs(out.float().pow(2).mean().item() - reference.item()) < 0.05 * reference.item()
    assert trainer.optimize(th.optim.SGD(trainer.master_params, lr=0.1))
    with pytest.raises(ValueError, match="use_fp16 and use_bf16 are exclusive"):
        MixedPrecisionTrainer(model=SmallNet(), use_fp16=True, use_bf16=True)


def test_convert_module_to_f16_and_back_touches_only_convolutions():
    net = SmallNet()
    net.apply(convert_module_to_f16)
    assert net.conv.weight.dtype == th.float16 and net.conv.bias.dtype == th.float16
    assert net.head.weight.dtype == th.float32
    net.apply(convert_module_to_f32)
    assert net.conv.weight.dtype == th.float32


def test_norms_are_the_root_sum_of_squared_parameter_norms():
    model = SmallNet()
    trainer = MixedPrecisionTrainer(model=model)
    for index, param in enumerate(model.parameters()):
        param.grad = th.full_like(param, float(index + 1))
    grad_norm, param_norm = trainer._compute_norms(grad_scale=2.0)
    expected_grad = sum((index + 1) ** 2 * p.numel() for index, p in enumerate(model.parameters()))
    expected_param = sum(float(p.detach().double().square().sum()) for p in model.parameters())
    assert grad_norm == pytest.approx(expected_grad**0.5 / 2.0, rel=1e-6)
    assert param_norm == pytest.approx(expected_param**0.5, rel=1e-6)
    next(model.parameters()).grad[0] = float("inf")
    assert trainer._compute_norms()[0] == float("inf")
