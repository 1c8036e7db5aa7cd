"""
Find, download and load the weights of the 2015-12-05 Inception-v3 graph in any of its
public forms, mapped onto `evaluations.inception.InceptionV3`:

- OpenAI's PyTorch port `inception-2015-12-05.pt` (plain state dict; keys as our network),
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision's Inception-v3 names),
- the TensorFlow graph `classify_image_graph_def.pb` itself, read without TensorFlow.
"""

import hashlib
import io
import logging
import os
import pickle
import urllib.error
import urllib.request
import zipfile

import blobfile as bf
import numpy as np
import torch
from tqdm.auto import tqdm

from evaluations.graphdef import read_graphdef
from evaluations.inception import BATCH_NORM_EPS, InceptionV3
from guided_diffusion.file_writing import atomic_write

logger = logging.getLogger(__name__)

OPENAI_WEIGHTS_NAME = "inception-2015-12-05.pt"
OPENAI_WEIGHTS_URL = (
    "https://openaipublic.blob.core.windows.net/consistency/inception/inception-2015-12-05.pt"
)
PYTORCH_FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
TF_GRAPH_NAME = "classify_image_graph_def.pb"
TF_GRAPH_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
    "classify_image_graph_def.pb"
)
WEIGHTS_NAMES = (OPENAI_WEIGHTS_NAME, PYTORCH_FID_WEIGHTS_NAME, TF_GRAPH_NAME)
INCEPTION_PATH_ENV = "GUIDED_DIFFUSION_INCEPTION"  # a weights file
CACHE_DIR_ENV = "GUIDED_DIFFUSION_CACHE"  # folder searched for WEIGHTS_NAMES

_SUFFIXES = ["", "_1", "_2", "_3", "_4"]  # conv, conv_1, ... in a graph tower
# Graph scopes of each block type -> torchvision's (pytorch-fid's) layer names.
_BLOCK_LAYERS = {
    "A": {
        "conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
        "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
        "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
        "tower/conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2",
        "tower/conv_2": "branch7x7_3", "tower_2/conv": "branch_pool",
        **{f"tower_1/conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(_SUFFIXES[:5])},
    },
    "D": {
        "tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2",
        **{f"tower_1/conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(_SUFFIXES[:4])},
    },
    "E": {
        "conv": "branch1x1", "tower/conv": "branch3x3_1", "tower/mixed/conv": "branch3x3_2a",
        "tower/mixed/conv_1": "branch3x3_2b", "tower_1/conv": "branch3x3dbl_1",
        "tower_1/conv_1": "branch3x3dbl_2", "tower_1/mixed/conv": "branch3x3dbl_3a",
        "tower_1/mixed/conv_1": "branch3x3dbl_3b", "tower_2/conv": "branch_pool",
    },
}
# Graph blocks in order: (scope, block type, torchvision name).
_BLOCKS = [
    ("mixed", "A", "Mixed_5b"), ("mixed_1", "A", "Mixed_5c"), ("mixed_2", "A", "Mixed_5d"),
    ("mixed_3", "B", "Mixed_6a"), ("mixed_4", "C", "Mixed_6b"), ("mixed_5", "C", "Mixed_6c"),
    ("mixed_6", "C", "Mixed_6d"), ("mixed_7", "C", "Mixed_6e"), ("mixed_8", "D", "Mixed_7a"),
    ("mixed_9", "E", "Mixed_7b"), ("mixed_10", "E", "Mixed_7c"),
]
_STEM = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
}


def conv_layers():
    """
    Every convolution of the graph.

    :return: a list of (graph scope, our module name, torchvision module name), e.g.
             ('mixed_6/conv', 'layers.mixed_6.conv', 'Mixed_6d.branch1x1').
    """
    layers = [(scope, f"layers.{scope}", name) for scope, name in _STEM.items()]
    for block, kind, tv_block in _BLOCKS:
        for inner, tv_name in _BLOCK_LAYERS[kind].items():
            # Our E blocks keep their layers flat (tower_mixed_conv), the others nest towers.
            ours = inner.replace("/", "_" if kind == "E" else ".")
            layers.append((f"{block}/{inner}", f"layers.{block}.{ours}", f"{tv_block}.{tv_name}"))
    return layers


def from_pytorch_fid(state_dict):
    """
    Map pytorch-fid's state dict onto ours. Its batch norms have a scale (gamma), which is
    folded into the convolution: gamma * (conv(x, W) - m) / s = (conv(x, gamma W) - gamma m) / s.

    :param state_dict: {torchvision name: tensor}.
    :return: {our name: tensor}.
    """
    result = {}
    for _, ours, theirs in conv_layers():
        scale = _get(state_dict, f"{theirs}.bn.weight")
        weight = _get(state_dict, f"{theirs}.conv.weight")
        result[f"{ours}.weight"] = weight * scale[:, None, None, None]
        result[f"{ours}.mean"] = _get(state_dict, f"{theirs}.bn.running_mean") * scale
        result[f"{ours}.var"] = _get(state_dict, f"{theirs}.bn.running_var")
        result[f"{ours}.beta"] = _get(state_dict, f"{theirs}.bn.bias")
    result["output.weight"] = _get(state_dict, "fc.weight")
    result["output.bias"] = _get(state_dict, "fc.bias")
    return result


def from_graphdef(data):
    """
    Map the constants of the TensorFlow graph onto our state dict.

    :param data: the bytes of `classify_image_graph_def.pb`.
    :return: {our name: tensor}.
    """
    constants, batch_norms = read_graphdef(data)
    result = {}
    for scope, ours, _ in conv_layers():
        settings = batch_norms.get(f"{scope}/batchnorm")
        if settings is None:
            raise ValueError(f"GraphDef: no node {scope}/batchnorm; not the Inception graph")
        if not np.isclose(settings["variance_epsilon"], BATCH_NORM_EPS):
            raise ValueError(
                f"GraphDef: {scope}/batchnorm has variance_epsilon "
                f"{settings['variance_epsilon']}, expected {BATCH_NORM_EPS}"
            )
        weight = _get(constants, f"{scope}/conv2d_params")  # [kh, kw, in, out]
        mean = _get(constants, f"{scope}/batchnorm/moving_mean")
        if settings["scale_after_normalization"]:
            scale = _get(constants, f"{scope}/batchnorm/gamma")
            weight, mean = weight * scale, mean * scale
        result[f"{ours}.weight"] = weight.transpose(3, 2, 0, 1)
        result[f"{ours}.mean"] = mean
        result[f"{ours}.var"] = _get(constants, f"{scope}/batchnorm/moving_variance")
        result[f"{ours}.beta"] = _get(constants, f"{scope}/batchnorm/beta")
    result["output.weight"] = _get(constants, "softmax/weights").T  # [2048, 1008] in the graph
    result["output.bias"] = _get(constants, "softmax/biases")
    return {
        name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        for name, value in result.items()
    }


def _get(mapping, key):
    """mapping[key], with an error naming the missing key when a file is not the expected one."""
    if key not in mapping:
        raise ValueError(f"missing {key!r}: not a 2015-12-05 Inception-v3 in this format")
    return mapping[key]


def read_state_dict(path):
    """
    Read a weights file in any supported format, with torch.load(weights_only=True) for
    PyTorch files.

    :param path: a local path or blobfile URL.
    :return: {our name: float32 tensor} for `InceptionV3.load_state_dict`.
    """
    with bf.BlobFile(path, "rb") as f:
        data = f.read()
    if data[:4] == b"PK\x03\x04":  # zip: PyTorch >= 1.6, or TorchScript
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            names = []  # torch.load below names the file as corrupt
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise ValueError(
                f"{path} is a TorchScript archive (NVIDIA's port of the graph has the same "
                f"name), which cannot be read with weights_only=True; use OpenAI's plain state "
                f"dict {OPENAI_WEIGHTS_URL}"
            )
    elif data[:1] != b"\x80":  # neither zip nor a legacy pickle: a GraphDef protobuf
        try:
            return from_graphdef(data)
        except ValueError as error:
            message = f"{path}: neither a PyTorch state dict nor the Inception GraphDef ({error})"
            raise ValueError(message) from error
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refusing to unpickle it, it holds more than tensors ({error})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path}: a corrupt or truncated PyTorch file ({error}); expected "
            "inception-2015-12-05.pt, pt_inception-2015-12-05-6726825d.pth or "
            "classify_image_graph_def.pb"
        ) from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    if "Conv2d_1a_3x3.conv.weight" in state_dict:
        state_dict = from_pytorch_fid(state_dict)
    return {k: v.float() for k, v in state_dict.items()}


def default_cache_dir():
    """
    :return: the folder searched for weights and downloaded into: $GUIDED_DIFFUSION_CACHE,
             else ~/.cache/guided_diffusion.
    """
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "guided_diffusion"
    )


def _missing_weights_message(reason):
    """The error text that says which file to get and where to put it."""
    cache_dir = default_cache_dir()
    return (
        f"{reason}. Get the Inception-v3 (2015-12-05) weights, one of\n"
        f"  {OPENAI_WEIGHTS_URL}\n  {PYTORCH_FID_WEIGHTS_URL}\n  {TF_GRAPH_URL}\n"
        f"and put it in {cache_dir}/ (keeping its file name), or pass --inception_path FILE "
        f"(Evaluator(inception_path=FILE)), or set {INCEPTION_PATH_ENV}=FILE."
    )


def download_weights(url=OPENAI_WEIGHTS_URL, folder=None):
    """
    Download a weights file into the cache folder, atomically.

    :param url: where to download from.
    :param folder: destination folder; default_cache_dir() if None.
    :return: the path of the downloaded file.
    """
    folder = folder or default_cache_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, url.rsplit("/", 1)[-1])
    logger.info("downloading %s to %s", url, path)

    def copy_response(out):
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="Inception weights") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))

    atomic_write(path, copy_response)
    return path


def resolve_weights_path(inception_path=None):
    """
    Find the weights: the given path, else $GUIDED_DIFFUSION_INCEPTION, else a known file
    name in the cache folder, else download OpenAI's port into the cache folder.

    :param inception_path: an explicit weights file, or None.
    :return: the path of an existing weights file.
    """
    explicit = inception_path or os.environ.get(INCEPTION_PATH_ENV)
    if explicit:
        if not bf.exists(explicit):
            source = "inception_path" if inception_path else f"${INCEPTION_PATH_ENV}"
            message = _missing_weights_message(f"{source} {explicit!r} does not exist")
            raise FileNotFoundError(message)
        return explicit
    cache_dir = default_cache_dir()
    for name in WEIGHTS_NAMES:
        if os.path.exists(os.path.join(cache_dir, name)):
            return os.path.join(cache_dir, name)
    try:
        return download_weights(OPENAI_WEIGHTS_URL, cache_dir)
    except (urllib.error.URLError, OSError) as error:
        raise FileNotFoundError(
            _missing_weights_message(f"no weights in {cache_dir} and the download failed ({error})")
        ) from None


def load_inception(inception_path=None, device="cpu"):
    """
    Build the network with its weights.

    :param inception_path: a weights file in any supported format, or None to search
                           (see resolve_weights_path).
    :param device: the torch device to put the network on.
    :return: an InceptionV3 in eval mode.
    """
    path = resolve_weights_path(inception_path)
    model = InceptionV3()
    try:
        model.load_state_dict(read_state_dict(path), strict=True)
    except RuntimeError as error:
        message = f"{path}: weights do not fit the 2015-12-05 Inception-v3: {error}"
        raise ValueError(message) from error
    return model.eval().to(device)


def weights_fingerprint(model):
    """
    A hash of the network's weights, to key cached features by.

    :param model: an InceptionV3.
    :return: a hex digest.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
