"""
Presets: the flags of every released ADM model, one JSON file each in `configs/`,
usable by name (`--config 256x256_diffusion`) or by path.

A preset file holds:
- "flags": the architecture and diffusion flags (the original README's MODEL_FLAGS);
- "sample_flags": flags only sampling scripts take (model_path, timestep_respacing,
  classifier_scale, classifier_path);
- "classifier": for guided models, the name of the guiding classifier's preset,
  whose flags sampling scripts also take;
- "kind" ("diffusion", "classifier", "super_res"), "checkpoint", "num_parameters",
  "description";
- or "extends": another preset whose content it updates ("flags" and
  "sample_flags" are merged key by key).
"""

import inspect
import json
from pathlib import Path

import blobfile as bf

CONFIG_DIRS = (
    Path(__file__).resolve().parent.parent / "configs",  # a source checkout
    Path(__file__).resolve().parent / "configs",  # an installed package
)
_PURPOSES = ("train", "sample")


def preset_names():
    """
    The names of the presets shipped in `configs/`.
    """
    names = set()
    for folder in CONFIG_DIRS:
        if folder.is_dir():
            names.update(path.stem for path in folder.glob("*.json"))
    return sorted(names)


def _locate(name_or_path):
    if name_or_path.endswith(".json") or "/" in name_or_path or "://" in name_or_path:
        if not bf.exists(name_or_path):
            raise FileNotFoundError(f"--config {name_or_path!r}: no such file")
        return name_or_path
    for folder in CONFIG_DIRS:
        candidate = folder / f"{name_or_path}.json"
        if candidate.is_file():
            return str(candidate)
    raise ValueError(
        f"--config {name_or_path!r}: unknown preset; expected a path to a .json file or one "
        f"of: {', '.join(preset_names())}"
    )


def read_preset(name_or_path, _seen=()):
    """
    Read a preset file, resolving "extends".

    :param name_or_path: a preset name (e.g. "256x256_diffusion") or a JSON path.
    :return: the preset as a dict (see the module docstring).
    """
    path = _locate(name_or_path)
    if path in _seen:
        raise ValueError(f"--config {name_or_path!r}: 'extends' loops back to {path}")
    with bf.BlobFile(path, "r") as f:
        try:
            preset = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(preset, dict):
        raise ValueError(f"--config {path}: expected a JSON object")
    parent_name = preset.pop("extends", None)
    if parent_name is None:
        return preset
    merged = read_preset(parent_name, _seen + (path,))
    for key, value in preset.items():
        if key in ("flags", "sample_flags"):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def load_config(name_or_path, purpose="train"):
    """
    The flags of a preset as a flat dict.

    :param name_or_path: a preset name or a JSON path.
    :param purpose: "train": the architecture and diffusion flags; "sample": those
                    plus the sampling flags and, for a guided model, the guiding
                    classifier's flags.
    :return: a dict of flag names to values.
    """
    if purpose not in _PURPOSES:
        raise ValueError(f"purpose={purpose!r}: expected one of {_PURPOSES}")
    preset = read_preset(name_or_path)
    flags = dict(preset.get("flags", {}))
    if purpose == "sample":
        if preset.get("classifier"):
            classifier = read_preset(preset["classifier"])
            flags.update(classifier.get("flags", {}))
            flags.update(classifier.get("sample_flags", {}))
            flags.update(preset.get("flags", {}))
        flags.update(preset.get("sample_flags", {}))
    return flags


def parse_args_with_config(parser, purpose="train", argv=None):
    """
    Parse command-line flags where `--config NAME_OR_PATH` supplies defaults and
    explicit flags override them.

    :param parser: an argparse.ArgumentParser with the script's flags.
    :param purpose: "train" or "sample" (see load_config).
    :param argv: the arguments (default: sys.argv[1:]).
    :return: the parsed argparse.Namespace (with a `config` attribute).
    """
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument(
            "--config", default="", help="preset name (see configs/) or path to a JSON file"
        )
    known, _ = parser.parse_known_args(argv)
    if known.config:
        flags = load_config(known.config, purpose=purpose)
        preset = read_preset(known.config)
        accepted = {action.dest for action in parser._actions}
        unknown = sorted(set(preset.get("flags", {})) - accepted)
        if unknown:
            raise ValueError(
                f"--config {known.config}: flags {unknown} are not flags of this script; "
                f"it is a {preset.get('kind', 'different')} preset, use it with the matching script"
            )
        parser.set_defaults(**{k: v for k, v in flags.items() if k in accepted})
    return parser.parse_args(argv)


def create_pretrained(name, path, device="cpu", use_fp16=None, **overrides):
    """
    Build a released model from its preset, load its weights strictly, and put it
    in eval mode.

    :param name: a preset name or JSON path (e.g. "256x256_diffusion").
    :param path: the checkpoint file (e.g. "models/256x256_diffusion.pt").
    :param device: where to put the model.
    :param use_fp16: convert the torso to float16; None follows the preset.
    :param overrides: flags that replace the preset's (e.g. timestep_respacing="250").
    :return: (model, diffusion) for a diffusion or super-resolution preset, the
             classifier alone for a classifier preset.
    """
    from . import script_util
    from .checkpoint import load_checkpoint

    preset = read_preset(name)
    kind = preset.get("kind")
    flags = {**preset.get("flags", {}), **overrides}
    if kind == "classifier":
        args = {**script_util.classifier_defaults(), **flags}
        model = script_util.create_classifier(**_accepted(script_util.create_classifier, args))
        fp16 = args["classifier_use_fp16"] if use_fp16 is None else use_fp16
        diffusion = None
    elif kind in ("diffusion", "super_res"):
        if kind == "diffusion":
            defaults, factory = script_util.model_and_diffusion_defaults(), (
                script_util.create_model_and_diffusion
            )
        else:
            defaults, factory = script_util.sr_model_and_diffusion_defaults(), (
                script_util.sr_create_model_and_diffusion
            )
        args = {**defaults, **flags}
        model, diffusion = factory(**_accepted(factory, args))
        fp16 = args["use_fp16"] if use_fp16 is None else use_fp16
    else:
        raise ValueError(f"preset {name!r} has kind {kind!r}; expected diffusion, super_res or classifier")
    load_checkpoint(model, path, flags=script_util.architecture_flags(args))
    model.to(device)
    if fp16:
        model.convert_to_fp16()
    model.eval()
    return model if diffusion is None else (model, diffusion)


def _accepted(factory, args):
    names = inspect.signature(factory).parameters
    return {k: v for k, v in args.items() if k in names}
