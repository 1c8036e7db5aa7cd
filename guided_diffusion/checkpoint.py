"""
Safe checkpoint reading and strict loading with a readable mismatch report.

Checkpoints are read through blobfile (local paths or cloud URLs) with
`torch.load(weights_only=True)`: a file whose unpickling would run code is
refused, never executed. Accepted forms: the released `.pt` files (plain state
dicts), this project's `modelNNNNNN.pt` / `ema_RATE_NNNNNN.pt` (plain state dicts
with a sidecar `<stem>.json` recording the run's flags and step), a dict that
wraps a state dict under "state_dict", "model" or "ema", and `.safetensors` files
(recognised by their header, whatever the name), whose metadata may hold the sidecar's
record under METADATA_KEY. Files that are something else (a truncated download, a
diffusers export, an .npz batch, a JSON record, a folder) are refused with a ValueError
that says what they are.
"""

import io
import json
import pickle
import zipfile

import blobfile as bf
import safetensors.torch
import torch as th

from .acceleration import configure_runtime

SIDECAR_FORMAT = "guided_diffusion/1"
SAFETENSORS_SUFFIX = ".safetensors"
METADATA_KEY = "guided_diffusion"  # a safetensors file's metadata entry holding the record
_WRAPPER_KEYS = ("state_dict", "model", "ema")
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's limit on its JSON header
REFETCH_HINT = "download it again, or convert it again with scripts/convert_checkpoint.py"
# The weights file diffusers' save_pretrained writes, and its config beside it.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_CONFIG = "config.json"


def sidecar_path(path):
    """
    The JSON file that records how a checkpoint was made: same stem, `.json`.

    :param path: the checkpoint's path (.pt or .safetensors).
    """
    for suffix in (".pt", SAFETENSORS_SUFFIX):
        if path.endswith(suffix):
            return path[: -len(suffix)] + ".json"
    return path + ".json"


def read_sidecar(path):
    """
    Read a checkpoint's sidecar record (flags, step, kind), if it has one: the `.json`
    beside it, else a safetensors file's METADATA_KEY metadata.

    :param path: the checkpoint's path.
    :return: the record as a dict, or None when there is no sidecar.
    """
    record_path = sidecar_path(path)
    if not bf.exists(record_path):
        if path.endswith(SAFETENSORS_SUFFIX) and bf.exists(path):
            embedded = safetensors_metadata(path).get(METADATA_KEY)
            return None if embedded is None else json.loads(embedded)
        return None
    with bf.BlobFile(record_path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{record_path}: not valid JSON ({error})") from None


def read_state_dict(path, map_location="cpu"):
    """
    Read a state dict from a checkpoint file without executing any code.

    :param path: a local path or blobfile URL.
    :param map_location: where to put the tensors.
    :return: a dict of parameter names to tensors.
    """
    if not bf.exists(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} does not exist; download the released checkpoints into "
            "models/ (see README) or pass the right checkpoint path"
        )
    if bf.isdir(path):
        raise ValueError(_folder_message(path))
    with bf.BlobFile(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"{path!r} is empty (0 bytes), as after an interrupted download or "
                         f"copy; {REFETCH_HINT}")
    if _safetensors_header(data, len(data), path) is not None:
        try:
            loaded = safetensors.torch.load(data)
        except Exception as error:  # safetensors raises its own SafetensorError
            message = f"{path!r} is a damaged safetensors file ({error}); {REFETCH_HINT}"
            raise ValueError(message) from None
        return {name: tensor.to(map_location) for name, tensor in loaded.items()}
    if not _has_torch_header(data):
        raise ValueError(_not_a_checkpoint_message(path, data))
    arrays = _npz_arrays(data)
    if arrays is not None:
        raise ValueError(
            f"{path!r} is a numpy .npz archive (arrays {arrays[:6]}), not a checkpoint: .npz files "
            "hold image batches (samples, reference batches for evaluations/evaluator.py); pass "
            "a .pt or .safetensors checkpoint"
        )
    try:
        loaded = th.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path!r}: unpickling it would execute code that is not "
            f"plain tensors and containers ({error}). Checkpoints are loaded with "
            "weights_only=True; re-save the file as a plain state dict "
            "(torch.save(model.state_dict(), path)) from a trusted environment."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(
            f"{path!r} is not a readable torch checkpoint (corrupt or truncated?): {error}"
        ) from None
    return _unwrap(loaded, path)


def _safetensors_header(head, size, path):
    """
    Parse a safetensors file's header and check the file's size against it.

    :param head: the file's first bytes: its 8-byte length and its header, or all it has.
    :param size: the file's size in bytes.
    :param path: the file, for messages.
    :return: the header as a dict, or None when the bytes do not start like a safetensors
        file (an 8-byte little-endian length up to SAFETENSORS_MAX_HEADER, then "{").
    """
    length = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or length > SAFETENSORS_MAX_HEADER:
        return None
    if 8 + length > size:
        raise ValueError(
            f"{path!r} is a truncated safetensors file: its header says it has at least "
            f"{8 + length} bytes, the file has {size}; {REFETCH_HINT}"
        )
    try:
        header = json.loads(head[8 : 8 + length])
        tensors = [entry for name, entry in header.items() if name != "__metadata__"]
        expected = 8 + length + max((entry["data_offsets"][1] for entry in tensors), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise ValueError(
            f"{path!r} is a damaged safetensors file: its header does not describe tensors "
            f"({type(error).__name__}: {error}); {REFETCH_HINT}"
        ) from None
    if expected != size:
        damage = "truncated" if size < expected else "damaged"
        raise ValueError(
            f"{path!r} is a {damage} safetensors file: its header says {expected} bytes, the "
            f"file has {size}; {REFETCH_HINT}"
        )
    return header


def safetensors_metadata(path):
    """
    :param path: a .safetensors file (local path or blobfile URL).
    :return: its string metadata ({} if none, or if the file is not in the safetensors
        format), read from the header only; a ValueError when the file is truncated.
    """
    with bf.BlobFile(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little")
        head += f.read(length if length <= SAFETENSORS_MAX_HEADER else 1)
    header = _safetensors_header(head, bf.stat(path).size, path)
    return {} if header is None else header.get("__metadata__") or {}


def _has_torch_header(data):
    """
    :param data: a file's bytes.
    :return: whether they start like a torch.save file: a zip archive or a pickle stream.
    """
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def _npz_arrays(data):
    """
    :param data: a file's bytes.
    :return: the array names of a numpy .npz archive (a zip of .npy files), else None.
    """
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, OSError, ValueError):  # not a readable zip: torch.load says more
        return None
    if names and all(name.endswith(".npy") for name in names):
        return [name[: -len(".npy")] for name in names]
    return None


def _not_a_checkpoint_message(path, data):
    """
    :param path: a file in none of the checkpoint formats.
    :param data: its bytes.
    :return: a message saying what the file is, as far as a JSON parse can tell.
    """
    generic = (
        f"{path!r} is not a checkpoint: it is neither a zip archive (torch.save), a pickle "
        "(legacy torch.save) nor a safetensors file; it is corrupt, truncated or of another format"
    )
    if data[:64].lstrip()[:1] != b"{":
        return generic
    try:
        record = json.loads(data)
    except ValueError:
        return generic
    if not isinstance(record, dict):
        return generic
    if record.get("format") == SIDECAR_FORMAT:
        return (
            f"{path!r} is the JSON record of a checkpoint (its flags and step), not the "
            "checkpoint: pass the .pt or .safetensors file of the same name"
        )
    if "_class_name" in record:
        return _diffusers_message(path, str(record["_class_name"]), "config file", bf.dirname(path))
    return (
        f"{path!r} is a JSON file (keys {sorted(record)[:6]}), not a checkpoint: pass a .pt "
        "or .safetensors checkpoint"
    )


def _folder_message(path):
    """
    :param path: a folder given as a checkpoint.
    :return: a message naming the checkpoints in it, or the diffusers export it holds.
    """
    names = bf.listdir(path)
    for folder in (path, bf.join(path, "unet")):  # a UNet2DModel's folder, or a pipeline's
        if bf.isdir(folder) and set(bf.listdir(folder)) & set(DIFFUSERS_WEIGHTS):
            return _diffusers_message(path, _diffusers_class(folder), "export folder", folder)
    checkpoints = sorted(name for name in names if name.endswith((".pt", SAFETENSORS_SUFFIX)))
    held = f"one of {_abbreviate(checkpoints, 4)}" if checkpoints else "a .pt or .safetensors file"
    return f"{path!r} is a folder, not a checkpoint file: pass {held} (the file's path)"


def _diffusers_class(folder):
    """
    :param folder: a folder holding a diffusers export.
    :return: the class its config.json names, else "UNet2DModel".
    """
    config = bf.join(folder, DIFFUSERS_CONFIG) if folder else DIFFUSERS_CONFIG
    try:
        with bf.BlobFile(config, "r") as f:
            return str(json.load(f)["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):  # no config.json, or not diffusers'
        return "UNet2DModel"


def _diffusers_message(path, class_name, kind, folder):
    """
    :param path: the file or folder given as a checkpoint.
    :param class_name: the diffusers class it belongs to.
    :param kind: what it is ("export folder", "config file", ...).
    :param folder: the folder diffusers loads it from.
    :return: the message that says so, and how to load it.
    """
    return (
        f"{path!r} is a diffusers {class_name} {kind}, not an ADM checkpoint: load it with "
        f"diffusers ({class_name}.from_pretrained({folder or '.'!r})), or use the ADM "
        "checkpoint it was exported from"
    )


def _has_diffusers_keys(state):
    """
    :param state: a state dict.
    :return: whether its names are a diffusers UNet's (conv_in, down_blocks, ...).
    """
    return "conv_in.weight" in state and any(
        key.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for key in state
    )


def check_finite(state, path):
    """
    Raise a ValueError naming the file and the first tensors that hold NaN or inf.

    :param state: a state dict.
    :param path: the checkpoint it came from, for the message.
    """
    bad = {
        name: int((~th.isfinite(tensor)).sum())
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(th.isfinite(tensor).all())
    }
    if bad:
        shown = ", ".join(f"{name} ({count} values)" for name, count in list(bad.items())[:5])
        raise ValueError(
            f"{path!r} holds NaN or inf weights in {len(bad)} tensors: {shown}. The run that "
            "wrote it diverged (try a lower lr, bf16 instead of fp16, or an earlier checkpoint)"
        )


def _unwrap(loaded, path):
    if isinstance(loaded, dict) and loaded and all(th.is_tensor(v) for v in loaded.values()):
        return loaded
    if isinstance(loaded, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                return _unwrap(loaded[key], path)
    raise ValueError(
        f"{path!r} holds {type(loaded).__name__} {_describe(loaded)}, not a state dict of "
        f"tensors (nor a dict wrapping one under {', '.join(_WRAPPER_KEYS)})"
    )


def _describe(obj):
    if isinstance(obj, dict):
        return f"with keys {sorted(map(str, obj))[:8]}"
    return ""


def load_checkpoint(model, path, flags=None, map_location="cpu"):
    """
    Load a checkpoint into a model strictly, or raise a ValueError that lists the
    missing, unexpected and mis-shaped keys and names the flags that most likely
    differ.

    :param model: the model to fill.
    :param path: a local path or blobfile URL of the checkpoint.
    :param flags: the flags that shaped the model and its diffusion
                  (script_util.architecture_flags); compared first with the flags a
                  checkpoint of this project records (see flag_differences).
    :param map_location: where to read the tensors.
    :return: the checkpoint's sidecar record (or None).
    """
    record = read_sidecar(path)
    if flags is not None and record and isinstance(record.get("flags"), dict):
        differing = flag_differences(record["flags"], flags)
        if differing:
            raise ValueError(
                f"{path!r} was trained with different flags than requested: "
                + "; ".join(differing)
                + ". Pass the checkpoint's values (or use its preset)."
            )
    state = read_state_dict(path, map_location=map_location)
    report = mismatch_report(model.state_dict(), state)
    if report and _has_diffusers_keys(state):
        folder = bf.dirname(path)
        kind = "export (diffusers key names)"
        raise ValueError(_diffusers_message(path, _diffusers_class(folder), kind, folder))
    if report:
        raise ValueError(f"{path!r} does not fit the model built from the flags:\n{report}")
    check_finite(state, path)
    model.load_state_dict(state, strict=True)
    return record


def load_for_inference(
    model, path, flags=None, use_fp16=False, device="cpu", channels_last=False
):
    """
    The one way a model is loaded to sample or evaluate with (the sampling scripts,
    script_util.create_pretrained): load a checkpoint strictly (load_checkpoint), move
    the model to a device, convert it to float16 and channels_last if asked, keep the
    attention blocks' activations instead of recomputing them (a classifier's gradient
    is faster; sampling stores no activations for long), and set eval mode.

    :param model: the model to fill.
    :param path: the checkpoint file (local path or blobfile URL).
    :param flags: the architecture flags the model was built from, compared with the
        checkpoint's record (None: not compared).
    :param use_fp16: call model.convert_to_fp16().
    :param device: where to put the model.
    :param channels_last: store its 4-D weights in channels_last order.
    :return: the model.
    """
    if not path:
        raise ValueError(
            "path is empty: pass the checkpoint file (e.g. models/256x256_diffusion.pt)"
        )
    load_checkpoint(model, path, flags=flags)
    model.to(device)
    if use_fp16:
        model.convert_to_fp16()
    configure_runtime(model, recompute_attention=False, channels_last=channels_last)
    model.eval()
    return model


# Flags that do not change what a checkpoint's weights mean: precision, recomputation,
# the attention kernel, dropout, sampling's respacing, and the training objective.
NON_ARCHITECTURE_FLAGS = (
    "use_fp16", "classifier_use_fp16", "use_checkpoint", "fast_attention", "dropout",
    "timestep_respacing", "use_kl", "rescale_learned_sigmas",
)
# Flags that mean something only for a class-conditional diffusion model.
CLASS_COND_ONLY_FLAGS = ("num_classes", "class_dropout_prob")


def flag_differences(recorded, requested):
    """
    List the flags whose values differ between a checkpoint's record and the flags a
    model was built from, among the names both hold, leaving out NON_ARCHITECTURE_FLAGS
    and, unless both are class-conditional, CLASS_COND_ONLY_FLAGS.

    :param recorded: the flags a checkpoint records.
    :param requested: the flags the caller built the model from (pass only those that
        shape the network and the diffusion: script_util.architecture_flags).
    :return: a list of "name: checkpoint X, requested Y" strings.
    """
    compared = (set(recorded) & set(requested)) - set(NON_ARCHITECTURE_FLAGS)
    if not (recorded.get("class_cond", True) and requested.get("class_cond", True)):
        compared -= set(CLASS_COND_ONLY_FLAGS)
    return [
        f"{name}: checkpoint {recorded[name]!r}, requested {requested[name]!r}"
        for name in sorted(compared)
        if recorded[name] != requested[name]
    ]


def mismatch_report(expected, found):
    """
    Describe how a state dict differs from the one a model expects.

    :param expected: the model's state dict (or a dict of names to tensors/shapes).
    :param found: the checkpoint's state dict.
    :return: a multi-line report, or "" when they match key for key and shape for shape.
    """
    expected_shapes = {k: tuple(v.shape) for k, v in expected.items()}
    found_shapes = {k: tuple(v.shape) for k, v in found.items()}
    missing = [k for k in expected_shapes if k not in found_shapes]
    unexpected = [k for k in found_shapes if k not in expected_shapes]
    misshaped = [
        (k, found_shapes[k], expected_shapes[k])
        for k in expected_shapes
        if k in found_shapes and found_shapes[k] != expected_shapes[k]
    ]
    if not (missing or unexpected or misshaped):
        return ""
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_abbreviate(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_abbreviate(unexpected)}")
    for key, got, want in misshaped[:8]:
        lines.append(f"  {key}: checkpoint {list(got)}, model {list(want)}")
    if len(misshaped) > 8:
        lines.append(f"  ... and {len(misshaped) - 8} more mis-shaped keys")
    suspects = likely_flags(expected_shapes, found_shapes, missing, unexpected)
    lines.append(
        "  flags that probably differ: "
        + (", ".join(suspects) if suspects else "unknown; compare the flags with the checkpoint's preset")
    )
    return "\n".join(lines)


def _abbreviate(keys, most=6):
    shown = ", ".join(keys[:most])
    return shown + (f", ... ({len(keys) - most} more)" if len(keys) > most else "")


def likely_flags(expected_shapes, found_shapes, missing, unexpected):
    """
    Guess which flags explain a state-dict mismatch.

    :return: a list of flag names with a short reason each.
    """
    suspects = _wrong_kind(expected_shapes, found_shapes)

    def first_dim(shapes, key):
        return shapes[key][0] if key in shapes else None

    if any(k.startswith("label_emb.") for k in missing + unexpected):
        has = "has" if any(k.startswith("label_emb.") for k in unexpected) else "lacks"
        suspects.append(f"class_cond (the checkpoint {has} a class embedding)")
    out_found, out_expected = first_dim(found_shapes, "out.2.weight"), first_dim(
        expected_shapes, "out.2.weight"
    )
    if {out_found, out_expected} == {3, 6}:
        suspects.append(f"learn_sigma (checkpoint outputs {out_found} channels, model {out_expected})")
    elif out_found and out_expected and out_found != out_expected:
        suspects.append(f"output classes/channels ({out_found} vs {out_expected})")
    width_found = first_dim(found_shapes, "time_embed.0.weight")
    width_expected = first_dim(expected_shapes, "time_embed.0.weight")
    if width_found and width_expected and width_found != width_expected:
        suspects.append(
            f"num_channels / classifier_width (checkpoint {width_found // 4}, model {width_expected // 4})"
        )
    in_found = found_shapes.get("input_blocks.0.0.weight")
    in_expected = expected_shapes.get("input_blocks.0.0.weight")
    if in_found and in_expected and in_found[1] != in_expected[1]:
        suspects.append(
            f"model type: input channels {in_found[1]} vs {in_expected[1]} (super-resolution "
            "models take 6: use super_res_sample.py / sr flags)"
        )
    if in_found and in_expected and in_found[0] != in_expected[0] and width_found == width_expected:
        suspects.append("channel_mult (first level width differs; image_size sets its default)")
    if _block_count(found_shapes) != _block_count(expected_shapes):
        suspects.append(
            "num_res_blocks / classifier_depth or channel_mult (number of blocks differs; "
            "image_size sets the default channel_mult)"
        )
    if any(_is_attention_key(k) for k in missing + unexpected):
        suspects.append("attention_resolutions (attention layers at other resolutions)")
    pos_found = found_shapes.get("out.2.positional_embedding")
    pos_expected = expected_shapes.get("out.2.positional_embedding")
    if pos_found and pos_expected and pos_found != pos_expected:
        suspects.append("image_size (the classifier's attention pool size differs)")
    return suspects


def _wrong_kind(expected_shapes, found_shapes):
    """
    :return: a one-item list when a diffusion UNet's checkpoint (it has output_blocks) is
        loaded into a classifier (none), or the reverse; else an empty list.
    """
    def is_unet(shapes):
        return any(key.startswith("output_blocks.") for key in shapes)

    if is_unet(found_shapes) and not is_unet(expected_shapes):
        return ["model type: the checkpoint looks like a diffusion model, not a classifier "
                "(pass it as model_path=)"]
    is_encoder = any(key.startswith("out.") for key in found_shapes) and any(
        key.startswith("input_blocks.") for key in found_shapes)
    if is_unet(expected_shapes) and not is_unet(found_shapes) and is_encoder:
        return ["model type: the checkpoint looks like a classifier, not a diffusion model "
                "(pass it as classifier_path=)"]
    return []


def _block_count(shapes):
    blocks = set()
    for key in shapes:
        parts = key.split(".")
        if parts[0] in ("input_blocks", "output_blocks"):
            blocks.add((parts[0], parts[1]))
    return len(blocks)


def _is_attention_key(key):
    return any(f".{name}." in key for name in ("qkv", "proj_out", "norm"))
