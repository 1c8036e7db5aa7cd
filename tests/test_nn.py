import math

import pytest
import torch as th

from guided_diffusion.nn import (
    GroupNorm32,
    checkpoint,
    conv_nd,
    mean_flat,
    normalization,
    timestep_embedding,
    update_ema,
    zero_module,
)


def test_timestep_embedding_closed_form():
    timesteps = th.tensor([0.0, 1.0, 37.5, 999.0])
    dim = 6
    emb = timestep_embedding(timesteps, dim)
    assert emb.shape == (4, 6) and emb.dtype == th.float32
    for row, t in enumerate(timesteps.tolist()):
        for i in range(3):
            freq = math.exp(-math.log(10000) * i / 3)
            assert emb[row, i].item() == pytest.approx(math.cos(t * freq), abs=1e-5)
            assert emb[row, 3 + i].item() == pytest.approx(math.sin(t * freq), abs=1e-5)


def test_timestep_embedding_odd_dim_pads_with_zero():
    emb = timestep_embedding(th.tensor([5, 7]), 7)
    assert emb.shape == (2, 7)
    assert th.all(emb[:, -1] == 0)


def test_groupnorm32_computes_in_float32():
    norm = normalization(64)
    x = th.randn(2, 64, 4, 4) * 300
    out_half = norm(x.half())
    assert out_half.dtype == th.float16
    reference = th.nn.functional.group_norm(x.half().float(), 32, norm.weight, norm.bias)
    assert th.allclose(out_half.float(), reference, atol=2e-3)
    assert isinstance(norm, GroupNorm32)


def test_normalization_rejects_channels_not_divisible_by_32():
    with pytest.raises(ValueError, match="48 channels"):
        normalization(48)


def test_conv_nd_rejects_bad_dims():
    with pytest.raises(ValueError, match="dims=4"):
        conv_nd(4, 3, 3, 1)


def test_zero_module_and_mean_flat():
    conv = zero_module(conv_nd(2, 3, 5, 3))
    assert all(th.all(p == 0) for p in conv.parameters())
    x = th.arange(24.0).reshape(2, 3, 4)
    assert th.equal(mean_flat(x), th.tensor([5.5, 17.5]))


def test_update_ema_closed_form():
    target, source = [th.ones(3)], [th.full((3,), 3.0)]
    update_ema(target, source, rate=0.75)
    assert th.allclose(target[0], th.full((3,), 1.5))


def test_update_ema_is_bitwise_one_mul_and_add_per_tensor():
    generator = th.Generator().manual_seed(0)
    targets = [th.randn(shape, generator=generator) for shape in ((5,), (3, 4), (2, 2, 3))]
    sources = [th.randn(t.shape, generator=generator) for t in targets]
    expected = [t.clone().mul_(0.9999).add_(s, alpha=1 - 0.9999) for t, s in zip(targets, sources)]
    update_ema(targets, sources, rate=0.9999)
    assert all(th.equal(t, e) for t, e in zip(targets, expected))
    update_ema([], [])  # nothing to update


def test_checkpoint_gives_same_values_and_gradients():
    th.manual_seed(0)
    layer = th.nn.Linear(4, 4)
    x = th.randn(3, 4, requires_grad=True)

    def run(flag):
        x.grad = None
        layer.zero_grad()
        out = checkpoint(lambda v: th.tanh(layer(v)), (x,), layer.parameters(), flag)
        out.square().sum().backward()
        return out.detach(), x.grad.clone(), layer.weight.grad.clone()

    plain, checkpointed = run(False), run(True)
    for a, b in zip(plain, checkpointed):
        assert th.equal(a, b)
