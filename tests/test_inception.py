"""
Tests of evaluations.inception (the 2015-12-05 Inception-v3 graph) and
evaluations.inception_weights / graphdef (its weight formats), on random weights.
"""

import io
import struct
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluations import inception_weights
from evaluations.inception import (
    ConvBN,
    InceptionV3,
    tf1_resize_bilinear,
)
from evaluations.graphdef import read_graphdef
from evaluations.inception_weights import conv_layers, load_inception, read_state_dict


def random_state_dict(seed=0):
    """Random weights for InceptionV3 that keep activations of order one."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in InceptionV3().state_dict().items():
        if name.endswith(".weight") and tensor.ndim == 4:
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif name.endswith(".var"):
            value = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif name == "output.weight":
            value = torch.randn(tensor.shape, generator=generator) * 0.05
        else:  # beta, mean, output.bias
            value = 0.1 * torch.randn(tensor.shape, generator=generator)
        state[name] = value
    return state


def random_gammas(seed=1):
    """A random batch-norm scale per convolution, {our module name: [out] tensor}."""
    generator = torch.Generator().manual_seed(seed)
    betas = {n: t for n, t in InceptionV3().state_dict().items() if n.endswith(".beta")}
    return {n[: -len(".beta")]: 0.5 + torch.rand(t.shape, generator=generator) for n, t in betas.items()}


def to_pytorch_fid(state, gammas):
    """Our weights in pytorch-fid's layout, with batch-norm scales that fold back to them."""
    result = {}
    for _, ours, theirs in conv_layers():
        gamma = gammas[ours]
        result[f"{theirs}.conv.weight"] = state[f"{ours}.weight"] / gamma[:, None, None, None]
        result[f"{theirs}.bn.weight"] = gamma
        result[f"{theirs}.bn.bias"] = state[f"{ours}.beta"]
        result[f"{theirs}.bn.running_mean"] = state[f"{ours}.mean"] / gamma
        result[f"{theirs}.bn.running_var"] = state[f"{ours}.var"]
        result[f"{theirs}.bn.num_batches_tracked"] = torch.tensor(0)
    result["fc.weight"] = state["output.weight"]
    result["fc.bias"] = state["output.bias"]
    return result


# --- a minimal protobuf writer, independent of the reader under test ---
def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number, payload):
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number, value):
    return _varint(number << 3) + _varint(value)


def _tensor_proto(array, dtype=1, packed_floats=False):
    shape = b"".join(_field(2, _varint_field(1, d)) for d in array.shape)
    proto = _varint_field(1, dtype) + _field(2, shape)
    if dtype != 1:
        return proto + _field(7, b"".join(_varint(int(v)) for v in array.ravel()))  # int_val
    data = np.asarray(array, "<f4").tobytes()
    return proto + (_field(5, data) if packed_floats else _field(4, data))


def _node(name, op, attrs):
    body = _field(1, name.encode()) + _field(2, op.encode()) + _field(3, b"some_input:0")
    for key, value in attrs.items():
        body += _field(5, _field(1, key.encode()) + _field(2, value))
    return _field(1, body)


def to_graphdef(state, gammas):
    """
    Our weights as a TensorFlow GraphDef with the 2015-12-05 graph's node names; every
    other batch norm applies its gamma (scale_after_normalization), the others ignore it.
    """
    def const(name, array, **kwargs):
        return _node(name, "Const", {"value": _field(8, _tensor_proto(np.asarray(array), **kwargs))})

    nodes = [
        const("Sub/y", np.array(128.0, np.float32), packed_floats=True),
        const("ResizeBilinear/size", np.array([299, 299]), dtype=3),
        _node("conv/Conv2D", "Conv2D", {"padding": _field(2, b"VALID")}),
    ]
    for index, (scope, ours, _) in enumerate(conv_layers()):
        scale_after_normalization = index % 2 == 0
        gamma = gammas[ours].numpy() if scale_after_normalization else np.ones(1, np.float32)
        weight = state[f"{ours}.weight"].numpy().transpose(2, 3, 1, 0) / gamma  # HWIO
        nodes += [
            const(f"{scope}/conv2d_params", weight),
            const(f"{scope}/batchnorm/beta", state[f"{ours}.beta"].numpy()),
            const(f"{scope}/batchnorm/gamma", gammas[ours].numpy()),
            const(f"{scope}/batchnorm/moving_mean", state[f"{ours}.mean"].numpy() / gamma),
            const(f"{scope}/batchnorm/moving_variance", state[f"{ours}.var"].numpy()),
            _node(f"{scope}/batchnorm", "BatchNormWithGlobalNormalization", {
                "variance_epsilon": _varint(4 << 3 | 5) + struct.pack("<f", 0.001),
                "scale_after_normalization": _varint_field(5, int(scale_after_normalization)),
            }),
        ]
    nodes += [
        const("softmax/weights", state["output.weight"].numpy().T),
        const("softmax/biases", state["output.bias"].numpy()),
    ]
    return b"".join(nodes) + _varint_field(3, 21)  # GraphDef.version


@pytest.fixture(scope="module")
def state():
    return random_state_dict()


@pytest.fixture(scope="module")
def model(state):
    net = InceptionV3()
    net.load_state_dict(state)
    return net.eval()


def _tf1_resize_reference(image, out_h, out_w):
    """TensorFlow 1's resize_bilinear (align_corners=False), one pixel at a time in float32."""
    in_h, in_w = image.shape
    scale_y = np.float32(in_h) / np.float32(out_h)
    scale_x = np.float32(in_w) / np.float32(out_w)
    out = np.zeros((out_h, out_w), np.float32)
    for y in range(out_h):
        in_y = np.float32(y) * scale_y
        y0 = int(np.floor(in_y))
        y1, y_lerp = min(y0 + 1, in_h - 1), np.float32(in_y - np.float32(y0))
        for x in range(out_w):
            in_x = np.float32(x) * scale_x
            x0 = int(np.floor(in_x))
            x1, x_lerp = min(x0 + 1, in_w - 1), np.float32(in_x - np.float32(x0))
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * x_lerp
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * x_lerp
            out[y, x] = top + (bottom - top) * y_lerp
    return out


@pytest.mark.parametrize(
    "in_size,out_size", [((5, 7), (299, 299)), ((37, 23), (11, 13)), ((6, 6), (6, 6))]
)
def test_resize_matches_tf1_formula(in_size, out_size):
    image = np.random.RandomState(0).uniform(0, 255, size=(1, 2, *in_size)).astype(np.float32)
    resized = tf1_resize_bilinear(torch.from_numpy(image), out_size).numpy()
    for channel in range(2):
        expected = _tf1_resize_reference(image[0, channel], *out_size)
        np.testing.assert_allclose(resized[0, channel], expected, rtol=0, atol=1e-4)
    if in_size == out_size:
        np.testing.assert_array_equal(resized, image)


def test_resize_is_not_half_pixel_bilinear():
    image = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5) * 10
    ours = tf1_resize_bilinear(image, (299, 299))
    torch_default = F.interpolate(image, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - torch_default).abs().max() > 5
    assert ours[0, 0, 0, 0] == image[0, 0, 0, 0]  # TF1 samples source pixel 0 exactly
    assert ours[0, 0, -1, -1] == image[0, 0, -1, -1]  # and clamps at the last pixel


def test_conv_bn_is_conv_then_batch_norm_without_scale_then_relu():
    layer = ConvBN(2, 3, (1, 3), padding=(0, 1))
    generator = torch.Generator().manual_seed(0)
    for buffer in ("weight", "beta", "mean"):
        getattr(layer, buffer).copy_(torch.randn(getattr(layer, buffer).shape, generator=generator))
    layer.var.copy_(torch.rand(3, generator=generator) + 0.5)
    x = torch.randn(1, 2, 4, 5, generator=generator)
    conv = F.conv2d(x, layer.weight, padding=(0, 1))
    normalized = (conv - layer.mean[:, None, None]) / torch.sqrt(layer.var[:, None, None] + 1e-3)
    expected = torch.relu(normalized + layer.beta[:, None, None])
    torch.testing.assert_close(layer(x), expected)


def test_features_shapes_and_spatial_tensor(model):
    images = torch.from_numpy(np.random.RandomState(1).randint(0, 256, (2, 40, 24, 3), dtype=np.uint8))
    captured = {}

    def capture(name):
        return lambda module, inputs, output: captured.__setitem__(name, output)

    hooks = [
        model.layers.mixed_6.conv.register_forward_hook(capture("mixed_6/conv")),
        model.layers.mixed_10.register_forward_hook(capture("mixed_10")),
    ]
    try:
        with torch.inference_mode():
            pool, spatial = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    branch = captured["mixed_6/conv"]  # the 1x1 branch of the third 17x17 block, after ReLU
    assert branch.shape == (2, 192, 17, 17)
    torch.testing.assert_close(spatial, branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(pool, captured["mixed_10"].mean(dim=(2, 3)))
    assert spatial.min() >= 0 and (spatial > 0).float().mean() > 0.1
    assert torch.isfinite(pool).all() and pool.std() > 0


def test_preprocess_maps_to_minus_one_one():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 1, 3, 1).expand(1, 1, 3, 3)
    x = InceptionV3.preprocess(images.contiguous())
    assert x.shape == (1, 3, 299, 299)
    assert x.min() == -1.0 and x.max() == 127 / 128


def _features(path, images):
    with torch.inference_mode():
        return load_inception(str(path))(images)


@pytest.mark.slow
def test_weight_formats_give_the_same_network(tmp_path, state):
    gammas = random_gammas()
    files = {
        "openai": tmp_path / "inception-2015-12-05.pt",
        "pytorch_fid": tmp_path / "pt_inception-2015-12-05-6726825d.pth",
        "graphdef": tmp_path / "classify_image_graph_def.pb",
    }
    torch.save(state, files["openai"])
    # pytorch-fid's release predates zip serialization: write the legacy format.
    torch.save(to_pytorch_fid(state, gammas), files["pytorch_fid"], _use_new_zipfile_serialization=False)
    files["graphdef"].write_bytes(to_graphdef(state, gammas))  # both gamma conventions
    images = torch.from_numpy(np.random.RandomState(2).randint(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    expected = _features(files["openai"], images)
    for kind in ("pytorch_fid", "graphdef"):
        loaded = read_state_dict(str(files[kind]))
        assert loaded.keys() == state.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(loaded[name], tensor, rtol=1e-5, atol=1e-6)
        # The conversions fold batch-norm scales into float32 weights: features near zero
        # differ by a few float32 roundings of the larger ones (1.2e-5 seen on 2 threads).
        for ours, theirs in zip(expected, _features(files[kind], images)):
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=5e-5)


def test_graphdef_reader_on_a_small_graph():
    def const(name, tensor):
        return _node(name, "Const", {"value": _field(8, tensor)})

    shape = _field(2, _field(2, _varint_field(1, 2)) + _field(2, _varint_field(1, 3)))
    filled = _varint_field(1, 1) + shape
    one_float = _varint(5 << 3 | 5) + struct.pack("<f", 1.5)  # float_val, not packed
    graph = b"".join([
        const("content", _tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3))),
        const("packed", _tensor_proto(np.array([2.5, -1.0], np.float32), packed_floats=True)),
        const("filled", filled + one_float),  # one value repeated over the [2, 3] shape
        const("integers", _tensor_proto(np.array([299, 299]), dtype=3)),
        _node("bn", "BatchNormWithGlobalNormalization", {
            "variance_epsilon": _varint(4 << 3 | 5) + struct.pack("<f", 0.001),
            "scale_after_normalization": _varint_field(5, 1),
        }),
    ])
    constants, batch_norms = read_graphdef(graph)
    assert sorted(constants) == ["content", "filled", "packed"]
    np.testing.assert_array_equal(constants["content"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(constants["packed"], [2.5, -1.0])
    np.testing.assert_array_equal(constants["filled"], np.full((2, 3), 1.5))
    assert batch_norms["bn"]["scale_after_normalization"] is True
    assert batch_norms["bn"]["variance_epsilon"] == pytest.approx(0.001)
    with pytest.raises(ValueError, match="runs past the end"):
        read_graphdef(graph[:-3])


def test_torchscript_archive_is_refused_with_advice(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(ValueError, match="TorchScript.*consistency/inception"):
        read_state_dict(str(path))


def test_wrong_weights_are_refused(tmp_path, state):
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="do not fit"):
        load_inception(str(other))
    wrong_shape = dict(state, **{"output.weight": torch.zeros(1000, 2048)})
    torch.save(wrong_shape, other)
    with pytest.raises(ValueError, match="output.weight"):
        load_inception(str(other))
    garbage = tmp_path / "notes.txt"
    garbage.write_bytes(b"these are not weights")
    with pytest.raises(ValueError, match="neither a PyTorch state dict nor the Inception GraphDef"):
        read_state_dict(str(garbage))
    incomplete = tmp_path / "incomplete.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, incomplete)
    with pytest.raises(ValueError, match="missing 'Conv2d_1a_3x3.bn.weight'"):
        read_state_dict(str(incomplete))


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(inception_weights.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(inception_weights.INCEPTION_PATH_ENV, raising=False)
    return tmp_path / "cache"


def test_missing_weights_offline_says_what_to_get_and_where(empty_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception_weights.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as error:
        inception_weights.resolve_weights_path()
    message = str(error.value)
    for text in (inception_weights.OPENAI_WEIGHTS_URL, inception_weights.PYTORCH_FID_WEIGHTS_URL,
                 inception_weights.TF_GRAPH_URL, str(empty_cache), "--inception_path"):
        assert text in message
    assert not empty_cache.exists() or not any(empty_cache.iterdir())  # no partial download


def test_download_goes_to_the_cache_folder(empty_cache, monkeypatch):
    class Response(io.BytesIO):
        headers = {"Content-Length": "5"}

    fake_urlopen = lambda url, timeout: Response(b"bytes")  # noqa: E731
    monkeypatch.setattr(inception_weights.urllib.request, "urlopen", fake_urlopen)
    path = inception_weights.resolve_weights_path()
    assert path == str(empty_cache / "inception-2015-12-05.pt")
    assert open(path, "rb").read() == b"bytes"
    assert sorted(p.name for p in empty_cache.iterdir()) == ["inception-2015-12-05.pt"]
    assert inception_weights.resolve_weights_path() == path  # found in the cache next time


def test_explicit_and_environment_paths(empty_cache, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        inception_weights.resolve_weights_path(str(tmp_path / "nowhere.pt"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv(inception_weights.INCEPTION_PATH_ENV, str(weights))
    assert inception_weights.resolve_weights_path() == str(weights)
    monkeypatch.setenv(inception_weights.INCEPTION_PATH_ENV, str(tmp_path / "gone.pt"))
    with pytest.raises(FileNotFoundError, match="GUIDED_DIFFUSION_INCEPTION"):
        inception_weights.resolve_weights_path()
