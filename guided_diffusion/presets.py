"""
Presets: the flags of every released ADM model, one JSON file each in `configs/`,
usable by name (e.g. "256x256_diffusion") or by path. This module reads JSON only;
script_util.create_pretrained builds models from a preset and
command_line.parse_args_with_config turns one into flag defaults.

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
            raise FileNotFoundError(f"preset {name_or_path!r}: no such file")
        return name_or_path
    for folder in CONFIG_DIRS:
        candidate = folder / f"{name_or_path}.json"
        if candidate.is_file():
            return str(candidate)
    raise ValueError(
        f"preset {name_or_path!r}: unknown preset name; expected a path to a .json file or one "
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
        raise ValueError(f"preset {name_or_path!r}: 'extends' loops back to {path}")
    with bf.BlobFile(path, "r") as f:
        try:
            preset = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"preset {path}: not valid JSON ({error})") from None
    if not isinstance(preset, dict):
        raise ValueError(f"preset {path}: expected a JSON object")
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
