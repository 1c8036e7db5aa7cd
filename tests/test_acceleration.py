import pytest
import torch as th
from torch._dynamo.backends.common import aot_autograd

from guided_diffusion import acceleration
from guided_diffusion.acceleration import (
    CompiledModel,
    accelerate,
    acceleration_defaults,
    bf16_autocast,
    bf16_model,
    set_attention_recompute,
    to_channels_last,
    training_acceleration_defaults,
)
from guided_diffusion.attention import AttentionBlock
from guided_diffusion.script_util import create_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def small_net():
    th.manual_seed(0)
    return th.nn.Sequential(th.nn.Conv2d(3, 4, 3, padding=1), th.nn.SiLU(), th.nn.Conv2d(4, 3, 1))


@pytest.fixture
def warnings_logged(monkeypatch):
    """The messages passed to logger.warn by the acceleration module."""
    messages = []
    monkeypatch.setattr(acceleration.logger, "warn", messages.append)
    return messages


def test_defaults_keep_the_numbers():
    assert acceleration_defaults() == dict(use_bf16=False, compile=False, channels_last=True,
                                          fast_attention=True, tf32=True, cudnn_benchmark=False)


def test_training_recomputes_attention_by_default_like_the_original():
    assert training_acceleration_defaults() == dict(acceleration_defaults(),
                                                    recompute_attention=True)
    assert AttentionBlock(32, num_head_channels=8).recompute


def saved_bytes(block, x):
    """Bytes the autograd graph of block(x) keeps for the backward pass, and the gradients."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with th.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = block(x)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [param.grad.clone() for param in block.parameters()]
    x.grad = None
    block.zero_grad()
    return sum(sizes), out.detach(), grads


def test_attention_recompute_keeps_the_numbers_and_saves_memory():
    th.manual_seed(0)
    block = AttentionBlock(32, num_head_channels=8)
    th.nn.init.normal_(block.proj_out.weight)  # zero-initialised: no gradient to compare
    x = th.randn(2, 32, 64, requires_grad=True)
    recomputed = saved_bytes(block, x)
    assert set_attention_recompute(block, False) is block and not block.recompute
    kept = saved_bytes(block, x)
    assert recomputed[0] < kept[0] / 4  # only the input is kept
    assert th.equal(recomputed[1], kept[1])
    for a, b in zip(recomputed[2], kept[2]):
        assert th.allclose(a, b, rtol=1e-6, atol=1e-7)
    block.use_checkpoint = True  # --use_checkpoint asks for recomputation whatever the switch
    assert saved_bytes(block, x)[0] == recomputed[0]


def test_accelerate_without_options_returns_the_model_itself():
    net = small_net()
    assert accelerate(net) is net


def test_compiled_model_runs_through_torch_compile_and_equals_eager(warnings_logged):
    net, x = small_net(), th.randn(2, 3, 5, 5)
    compiled = CompiledModel(net, backend="eager")
    assert th.equal(compiled(x), net(x))
    assert compiled.compiled is not None and warnings_logged == []


def test_a_backend_failing_at_the_first_call_falls_back_once(warnings_logged):
    calls = []

    def failing_backend(graph_module, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler found")

    net, x = small_net(), th.randn(2, 3, 5, 5)
    compiled = CompiledModel(net, backend=failing_backend)
    assert th.equal(compiled(x), net(x)) and th.equal(compiled(x), net(x))
    assert compiled.compiled is None and len(calls) == 1
    assert len(warnings_logged) == 1
    assert "RuntimeError: no C++ compiler found" in warnings_logged[0]


def test_a_failure_of_the_backward_graph_surfaces_at_the_first_call(warnings_logged):
    def broken_backward(graph_module, example_inputs):
        raise RuntimeError("cannot lower the backward graph")

    net = small_net()
    x = th.randn(2, 3, 5, 5, requires_grad=True)
    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=broken_backward)
    compiled = CompiledModel(net, backend=backend)
    compiled(x).sum().backward()  # eager after the fallback: backward works
    assert compiled.compiled is None and len(warnings_logged) == 1
    expected = th.autograd.grad(net(x).sum(), x)[0]
    assert th.allclose(x.grad, expected)


def test_torch_compile_raising_falls_back(monkeypatch, warnings_logged):
    def unavailable(model, **kwargs):
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(acceleration.th, "compile", unavailable)
    net, x = small_net(), th.randn(1, 3, 4, 4)
    compiled = CompiledModel(net)
    assert th.equal(compiled(x), net(x)) and len(warnings_logged) == 1


def test_errors_of_the_model_itself_propagate(monkeypatch, warnings_logged):
    def compiled_raising(*args, **kwargs):
        raise ValueError("bad input shape")

    monkeypatch.setattr(acceleration.th, "compile", lambda model, **kwargs: compiled_raising)
    compiled = CompiledModel(small_net())
    with pytest.raises(ValueError, match="bad input shape"):
        compiled(th.randn(1, 3, 4, 4))
    assert compiled.compiled is compiled_raising and warnings_logged == []


def test_compiled_model_exposes_the_models_attributes():
    net = small_net()
    net.num_classes = 7
    compiled = CompiledModel(net, backend="eager")
    assert compiled.num_classes == 7 and compiled.model is net


class AutocastProbe(th.nn.Module):
    """Records the autocast state its forward runs in; returns a bfloat16-able product."""

    def __init__(self):
        super().__init__()
        self.linear = th.nn.Linear(4, 4)
        self.seen = []

    def forward(self, x):
        self.seen.append((th.is_autocast_enabled("cpu"), th.get_autocast_dtype("cpu"),
                          th.is_autocast_cache_enabled()))
        return self.linear(x)


def test_bf16_model_runs_under_autocast_and_returns_float32():
    probe, x = AutocastProbe(), th.randn(3, 4)
    out = bf16_model(probe, "cpu")(x)
    assert probe.seen == [(True, th.bfloat16, False)]  # no cache of bfloat16 weight copies
    assert out.dtype == th.float32
    assert th.allclose(out, probe(x), rtol=0.02, atol=0.02)
    with bf16_autocast(th.device("cpu"), enabled=False):
        assert not th.is_autocast_enabled("cpu")


def test_channels_last_keeps_the_unets_numbers():
    unet = create_model(16, 32, 1, attention_resolutions="8", num_head_channels=16,
                        learn_sigma=True, class_cond=True, num_classes=3, resblock_updown=True)
    with th.no_grad():
        for param in unet.parameters():
            param.add_(th.randn_like(param) * 0.05)
    x, t, y = th.randn(2, 3, 16, 16), th.tensor([3, 500]), th.tensor([0, 2])
    expected = unet(x, t, y=y)
    assert to_channels_last(unet) is unet
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=th.channels_last)
    assert th.allclose(unet(x, t, y=y), expected, rtol=1e-5, atol=1e-5)


def test_cuda_math_is_set_explicitly():
    from guided_diffusion.acceleration import set_cuda_math

    saved = (th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32, th.backends.cudnn.benchmark)
    try:
        set_cuda_math(tf32=False, cudnn_benchmark=True)
        assert not th.backends.cuda.matmul.allow_tf32 and not th.backends.cudnn.allow_tf32
        assert th.backends.cudnn.benchmark
        set_cuda_math()  # the defaults: TF32 as the original's PyTorch had it, no autotuning
        assert th.backends.cuda.matmul.allow_tf32 and th.backends.cudnn.allow_tf32
        assert not th.backends.cudnn.benchmark
    finally:
        th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32, th.backends.cudnn.benchmark = saved
