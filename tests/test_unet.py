import pytest
import torch as th
import torch.nn.functional as F

from guided_diffusion.acceleration import set_fast_attention
from guided_diffusion.nn import GroupNorm32
from guided_diffusion.unet import (
    AttentionBlock,
    AttentionPool2d,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    SuperResModel,
    UNetModel,
)


def tiny_unet(**overrides):
    kwargs = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        channel_mult=(1, 2, 2),
        num_classes=10,
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    kwargs.update(overrides)
    return UNetModel(**kwargs)


def randomize(model, seed=0, std=0.05):
    """Overwrite every parameter (zero-initialised ones too) from a seeded generator."""
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for p in model.parameters():
            p.copy_(th.randn(p.shape, generator=generator) * std)
    return model


def inputs(batch=2, size=16, channels=3, seed=1):
    generator = th.Generator().manual_seed(seed)
    x = th.randn(batch, channels, size, size, generator=generator)
    t = th.tensor([3, 517, 999, 0][:batch])
    y = th.tensor([1, 7, 3, 0][:batch])
    return x, t, y


def test_output_is_zero_at_initialisation():
    th.manual_seed(0)
    model = tiny_unet()
    x, t, y = inputs()
    assert th.equal(model(x, t, y), th.zeros(2, 6, 16, 16))


def test_golden_output_of_seeded_tiny_model():
    model = randomize(tiny_unet(), seed=0)
    x, t, y = inputs()
    with th.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 6, 16, 16)
    # Golden values of this implementation, which equals the original ADM code
    # for the same weights (checked with an oracle copy of it, see docs/parity.md).
    assert out.sum().item() == pytest.approx(GOLDEN_UNET["sum"], rel=1e-5, abs=1e-4)
    assert out.abs().mean().item() == pytest.approx(GOLDEN_UNET["abs_mean"], rel=1e-5)
    assert out[1, 4, 7, 3].item() == pytest.approx(GOLDEN_UNET["entry"], rel=1e-5, abs=1e-6)


GOLDEN_UNET = {"sum": -19.339927673339844, "abs_mean": 0.058144956827163696, "entry": 0.00820527970790863}


def _legacy_rows_from_new(channels, heads):
    """Row permutation mapping the new qkv layout onto the legacy one."""
    head_channels = channels // heads
    order = []
    for head in range(heads):
        for part in range(3):
            start = part * channels + head * head_channels
            order.extend(range(start, start + head_channels))
    return th.tensor(order)


@pytest.mark.parametrize("fast", [True, False])
def test_legacy_and_new_attention_orders_agree_under_permutation(fast):
    channels, heads = 64, 4
    new = randomize(AttentionBlock(channels, num_heads=heads, use_new_attention_order=True))
    legacy = AttentionBlock(channels, num_heads=heads)
    for block in (new, legacy):
        set_fast_attention(block, fast)
    legacy.load_state_dict(new.state_dict())
    rows = _legacy_rows_from_new(channels, heads)
    with th.no_grad():
        legacy.qkv.weight.copy_(new.qkv.weight[rows])
        legacy.qkv.bias.copy_(new.qkv.bias[rows])
    x = th.randn(2, channels, 5, 5)
    assert th.allclose(new(x), legacy(x), atol=1e-5)
    # Without the permutation the same weights give a different result: loading
    # a checkpoint in the wrong order is silently wrong, so the order matters.
    legacy.load_state_dict(new.state_dict())
    assert not th.allclose(new(x), legacy(x), atol=1e-3)


def test_attention_order_classes_follow_flag():
    assert isinstance(AttentionBlock(64, 2, use_new_attention_order=True).attention, QKVAttention)
    legacy = AttentionBlock(64, 2).attention
    assert isinstance(legacy, QKVAttentionLegacy)


@pytest.mark.parametrize("cls", [QKVAttention, QKVAttentionLegacy])
def test_fast_attention_equals_exact_attention(cls):
    qkv = th.randn(3, 3 * 4 * 16, 37)
    assert th.allclose(cls(4, fast=True)(qkv), cls(4, fast=False)(qkv), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [QKVAttention, QKVAttentionLegacy])
def test_fast_attention_gradients_equal_exact_gradients(cls):
    qkv = th.randn(2, 3 * 2 * 16, 24, requires_grad=True)
    weights = th.randn(2, 2 * 16, 24)
    grads = [th.autograd.grad((cls(2, fast=fast)(qkv) * weights).sum(), qkv)[0]
             for fast in (True, False)]
    assert th.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_fast_attention_reaches_the_fused_kernel_and_bf16_stays_close():
    qkv = th.randn(2, 3 * 4 * 16, 64)
    with th.profiler.profile() as prof:
        QKVAttentionLegacy(4, fast=True)(qkv)
    names = {event.key for event in prof.key_averages()}
    # The [N x H x T x C] layout with contiguous channels selects the flash kernel, not
    # the unfused fallback that 3-D inputs get.
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    with th.autocast("cpu", dtype=th.bfloat16):
        low = QKVAttentionLegacy(4, fast=True)(qkv)
    assert low.dtype == th.bfloat16
    exact = QKVAttentionLegacy(4, fast=False)(qkv)
    assert th.allclose(low.float(), exact, atol=0.05)


def test_qkv_attention_matches_naive_softmax_attention():
    heads, head_channels, length = 2, 8, 5
    qkv = th.randn(1, 3 * heads * head_channels, length)
    out = QKVAttention(heads, fast=False)(qkv)
    q, k, v = qkv.reshape(3, heads, head_channels, length)
    for head in range(heads):
        weights = th.softmax(q[head].T @ k[head] / head_channels**0.5, dim=-1)
        expected = (weights @ v[head].T).T
        got = out[0, head * head_channels : (head + 1) * head_channels]
        assert th.allclose(got, expected, atol=1e-5)


def test_attention_is_equivariant_to_spatial_permutation():
    block = randomize(AttentionBlock(64, num_head_channels=32))
    x = th.randn(2, 64, 12)
    perm = th.randperm(12)
    assert th.allclose(block(x)[..., perm], block(x[..., perm]), atol=1e-5)


def test_use_checkpoint_gives_same_outputs_and_gradients():
    plain = randomize(tiny_unet())
    checkpointed = tiny_unet(use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = inputs()
    results = []
    for model in (plain, checkpointed):
        out = model(x, t, y)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert th.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert th.allclose(a, b, atol=1e-6)


def test_fp16_conversion_keeps_norms_and_embeddings_in_float32():
    model = tiny_unet()
    model.convert_to_fp16()
    for module in model.modules():
        if isinstance(module, GroupNorm32):
            assert module.weight.dtype == th.float32
        if isinstance(module, th.nn.Linear):
            assert module.weight.dtype == th.float32
    assert model.input_blocks[0][0].weight.dtype == th.float16
    assert model.output_blocks[0][0].in_layers[2].weight.dtype == th.float16
    assert model.out[2].weight.dtype == th.float32
    model.convert_to_fp32()
    assert all(p.dtype == th.float32 for p in model.parameters())


def test_super_res_model_concatenates_bilinear_upsample():
    sr = randomize(
        SuperResModel(16, 3, 32, 3, 1, (2,), channel_mult=(1, 2), num_head_channels=16)
    )
    base = UNetModel(16, 6, 32, 3, 1, (2,), channel_mult=(1, 2), num_head_channels=16)
    base.load_state_dict(sr.state_dict())
    x, t, _ = inputs()
    low_res = th.randn(2, 3, 8, 8)
    upsampled = F.interpolate(low_res, (16, 16), mode="bilinear")
    expected = base(th.cat([x, upsampled], dim=1), t)
    assert th.allclose(sr(x, t, low_res=low_res), expected, atol=1e-6)
    with pytest.raises(ValueError, match="low_res"):
        sr(x, t)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_pools_give_logits(pool):
    model = randomize(
        EncoderUNetModel(
            16, 3, 32, 10, 1, (2, 4), channel_mult=(1, 2, 2), num_head_channels=16, pool=pool
        )
    )
    x, t, _ = inputs()
    logits = model(x, t)
    assert logits.shape == (2, 10)
    # Each sample is processed independently of the others in the batch.
    assert th.allclose(model(x[:1], t[:1]), logits[:1], atol=1e-5)


def test_attention_pool_closed_form_single_position():
    pool = randomize(AttentionPool2d(1, 32, 32, 5))
    x = th.randn(3, 32, 1, 1)
    # Two tokens (mean and the one position) that are identical but for the
    # positional embedding; check against a direct computation.
    tokens = th.cat([x.reshape(3, 32, 1)] * 2, dim=-1) + pool.positional_embedding[None]
    q, k, v = pool.qkv_proj(tokens).chunk(3, dim=1)
    weights = th.softmax(q[:, :, :1].transpose(1, 2) @ k / 32**0.5, dim=-1)
    attended = (v @ weights.transpose(1, 2))
    expected = pool.c_proj(attended)[:, :, 0]
    assert th.allclose(pool(x), expected, atol=1e-5)


def test_dims_1_and_3():
    t = th.tensor([1, 2])
    model_1d = UNetModel(16, 3, 32, 3, 1, (2,), channel_mult=(1, 2), dims=1)
    assert model_1d(th.randn(2, 3, 16), t).shape == (2, 3, 16)
    model_3d = UNetModel(8, 3, 32, 3, 1, (2,), channel_mult=(1, 2), dims=3)
    # 3-D models resample only the inner two dimensions.
    assert model_3d(th.randn(2, 3, 5, 8, 8), t).shape == (2, 3, 5, 8, 8)


def test_label_changes_output_of_conditional_model():
    model = randomize(tiny_unet())
    x, t, y = inputs()
    assert not th.allclose(model(x, t, y), model(x, t, (y + 1) % 10))


def test_bad_inputs_raise_clear_errors():
    model = tiny_unet()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet(num_classes=None)(x, t, y)
    with pytest.raises(ValueError, match="input channels"):
        model(th.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor"):
        model(th.randn(2, 3, 18, 18), t, y)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, th.tensor([1, 2, 3]), y)


def test_bad_constructor_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_head_channels=24"):
        tiny_unet(num_head_channels=24)
    with pytest.raises(ValueError, match="num_heads=3"):
        tiny_unet(num_head_channels=-1, num_heads=3)
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_unet(model_channels=48, num_head_channels=16)
    with pytest.raises(ValueError, match="image_size=18"):
        tiny_unet(image_size=18)
    with pytest.raises(ValueError, match="pool="):
        EncoderUNetModel(16, 3, 32, 10, 1, (2,), channel_mult=(1, 2), pool="max")
    with pytest.warns(UserWarning, match=r"\[8\]"):
        tiny_unet(attention_resolutions=(2, 8))


def test_bf16_autocast_keeps_the_layers_the_fp16_path_keeps_in_float32():
    # The fp16 path converts only the torso's convolutions: the embeddings, their
    # projections in the residual blocks and the output head stay float32 (the variance
    # channels feed bits per dimension). Under bf16 autocast they must too.
    model = UNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=6,
                      num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                      num_classes=3)
    dtypes = {}
    watched = {"time_embed": model.time_embed[-1], "label_emb": model.label_emb,
               "emb_layers": model.input_blocks[1][0].emb_layers[-1], "out": model.out[-1],
               "torso": model.input_blocks[1][0].in_layers[-1]}
    def record(name):
        def hook(module, inputs, output):
            dtypes.setdefault(name, output.dtype)
        return hook

    for name, module in watched.items():
        module.register_forward_hook(record(name))
    x, t, y = th.randn(2, 3, 8, 8), th.tensor([1, 5]), th.tensor([0, 2])
    with th.autocast("cpu", dtype=th.bfloat16):
        out = model(x, t, y=y)
    assert out.dtype == th.float32 and dtypes.pop("torso") == th.bfloat16
    assert dtypes == dict.fromkeys(["time_embed", "label_emb", "emb_layers", "out"], th.float32)
    reference = model(x, t, y=y)  # without autocast nothing changes
    assert reference.dtype == th.float32 and th.allclose(out, reference, atol=0.1)
