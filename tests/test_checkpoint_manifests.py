"""
Every released ADM checkpoint's architecture, rebuilt from its README flags on the
meta device, has exactly the released state-dict keys, order and shapes.
"""

import inspect
import json
from pathlib import Path

import pytest
import torch as th

from guided_diffusion import script_util

MANIFEST_DIR = Path(__file__).parent / "data" / "checkpoint_manifests"
MANIFESTS = sorted(MANIFEST_DIR.glob("*.json"))


def _build(manifest):
    kind, flags = manifest["kind"], manifest["flags"]
    if kind == "diffusion":
        args = script_util.model_and_diffusion_defaults()
        factory = script_util.create_model
    elif kind == "classifier":
        args = script_util.classifier_defaults()
        factory = script_util.create_classifier
    else:
        args = script_util.sr_model_and_diffusion_defaults()
        factory = script_util.sr_create_model
    args.update(flags)
    accepted = inspect.signature(factory).parameters
    with th.device("meta"):
        return factory(**{name: value for name, value in args.items() if name in accepted})


def test_all_twelve_released_checkpoints_are_listed():
    assert len(MANIFESTS) == 12


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_state_dict_matches_release(path):
    manifest = json.loads(path.read_text())
    model = _build(manifest)
    state = model.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == list(
        manifest["state_dict"].items()
    )
    assert sum(v.numel() for v in state.values()) == manifest["num_parameters"]

    released = {
        key: th.empty(shape, device="meta") for key, shape in manifest["state_dict"].items()
    }
    result = model.load_state_dict(released, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_use_fp16_changes_no_keys():
    manifest = json.loads((MANIFEST_DIR / "64x64_diffusion.json").read_text())
    manifest["flags"]["use_fp16"] = False
    fp32 = _build(manifest).state_dict()
    manifest["flags"]["use_fp16"] = True
    fp16 = _build(manifest).state_dict()
    assert {k: v.shape for k, v in fp32.items()} == {k: v.shape for k, v in fp16.items()}
