import argparse
import json
from pathlib import Path

import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.command_line import parse_args_with_config
from guided_diffusion.presets import preset_names, read_preset

MANIFEST_DIR = Path(__file__).parent / "data" / "checkpoint_manifests"
RELEASED = [p.stem for p in sorted(MANIFEST_DIR.glob("*.json"))]
LSUN_SIBLINGS = ["lsun_cat", "lsun_horse", "lsun_horse_nodropout"]
ADM_NAMES = (
    [f"ADM_diffusion_{s}_{c}" for s in (64, 128, 256, 512) for c in ("conditioned", "unconditioned")]
    + [f"ADM_classifier_{s}" for s in (64, 128, 256, 512)]
    + ["ADM_U_64_256", "ADM_U_128_512"]
)


def build_on_meta(name):
    preset = read_preset(name)
    kind = preset["kind"]
    if kind == "classifier":
        args = {**su.classifier_defaults(), **preset["flags"]}
        factory = su.create_classifier
    elif kind == "diffusion":
        args = {**su.model_and_diffusion_defaults(), **preset["flags"]}
        factory = su.create_model_and_diffusion
    else:
        args = {**su.sr_model_and_diffusion_defaults(), **preset["flags"]}
        factory = su.sr_create_model_and_diffusion
    with th.device("meta"):
        built = factory(**{k: v for k, v in args.items() if k in factory.__code__.co_varnames})
    return preset, built[0] if isinstance(built, tuple) else built


def test_every_release_and_adm_name_has_a_preset():
    names = set(preset_names())
    assert set(RELEASED + LSUN_SIBLINGS + ADM_NAMES) <= names


@pytest.mark.parametrize("name", RELEASED + LSUN_SIBLINGS)
def test_preset_matches_release_manifest(name):
    manifest_name = "lsun_bedroom" if name in LSUN_SIBLINGS else name
    manifest = json.loads((MANIFEST_DIR / f"{manifest_name}.json").read_text())
    preset, model = build_on_meta(name)
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert shapes == list(manifest["state_dict"].items())
    assert preset["num_parameters"] == manifest["num_parameters"]


@pytest.mark.parametrize("name", ADM_NAMES)
def test_adm_names_build_with_their_parameter_count(name):
    preset, model = build_on_meta(name)
    assert sum(p.numel() for p in model.state_dict().values()) == preset["num_parameters"]
    if name.endswith("_unconditioned"):
        assert model.num_classes is None


def test_horse_nodropout_differs_only_in_dropout():
    horse, nodrop = read_preset("lsun_horse"), read_preset("lsun_horse_nodropout")
    assert horse["flags"].pop("dropout") == 0.1 and nodrop["flags"].pop("dropout") == 0.0
    assert horse["flags"] == nodrop["flags"]


def test_sample_config_includes_classifier_and_scale():
    flags = su.load_config("256x256_diffusion_uncond", purpose="sample")
    assert flags["classifier_scale"] == 10.0 and flags["class_cond"] is False
    assert flags["classifier_path"] == "models/256x256_classifier.pt"
    assert flags["classifier_depth"] == 2 and flags["timestep_respacing"] == "250"
    assert "timestep_respacing" not in su.load_config("256x256_diffusion")
    assert su.load_config("64x64_diffusion", "sample")["classifier_depth"] == 4


def _parser():
    parser = argparse.ArgumentParser()
    defaults = su.model_and_diffusion_defaults()
    defaults.update(model_path="", classifier_scale=1.0)
    su.add_dict_to_argparser(parser, defaults)
    return parser


def test_config_then_explicit_flag_overrides():
    args = parse_args_with_config(
        _parser(), "sample", ["--config", "128x128_diffusion", "--num_channels", "64"]
    )
    assert args.num_channels == 64
    assert args.num_heads == 4 and args.image_size == 128 and args.classifier_scale == 0.5
    assert args.model_path == "models/128x128_diffusion.pt"


def test_config_from_path_with_extends(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"extends": "64x64_diffusion", "flags": {"num_channels": 64}}))
    args = parse_args_with_config(_parser(), "train", ["--config", str(path)])
    assert args.num_channels == 64 and args.noise_schedule == "cosine"


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown preset.*64x64_diffusion"):
        su.load_config("64x64_difusion")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        su.load_config(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="classifier preset"):
        parse_args_with_config(_parser(), "train", ["--config", "64x64_classifier"])
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({"extends": str(loop)}))
    with pytest.raises(ValueError, match="loops"):
        su.load_config(str(loop))


def tiny_preset(tmp_path, **flag_overrides):
    flags = dict(
        image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8",
        channel_mult="1,2", learn_sigma=True, class_cond=True, diffusion_steps=40,
        num_head_channels=16, use_fp16=False,
    )
    flags.update(flag_overrides)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"kind": "diffusion", "flags": flags}))
    return str(path), flags


def test_create_pretrained_round_trip(tmp_path):
    config, flags = tiny_preset(tmp_path)
    th.manual_seed(0)
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **flags})
    state = {k: th.randn_like(v) for k, v in model.state_dict().items()}
    th.save(state, tmp_path / "tiny.pt")
    loaded, diffusion = su.create_pretrained(config, str(tmp_path / "tiny.pt"))
    assert not loaded.training and diffusion.num_timesteps == 40
    for key, value in loaded.state_dict().items():
        assert th.equal(value, state[key])
    respaced = su.create_pretrained(config, str(tmp_path / "tiny.pt"), timestep_respacing="5")[1]
    assert respaced.num_timesteps == 5


def test_create_pretrained_classifier_returns_classifier_alone(tmp_path):
    flags = dict(image_size=16, classifier_width=64, classifier_depth=1,
                 classifier_attention_resolutions="8")
    path = tmp_path / "clf.json"
    path.write_text(json.dumps({"kind": "classifier", "flags": flags}))
    classifier = su.create_classifier(**{**su.classifier_defaults(), **flags})
    th.save(classifier.state_dict(), tmp_path / "clf.pt")
    loaded = su.create_pretrained(str(path), str(tmp_path / "clf.pt"))
    assert isinstance(loaded, type(classifier)) and not loaded.training


@pytest.mark.parametrize("preset_fp16, use_fp16", [(True, False), (False, True), (True, None)])
def test_create_pretrained_precision_override_builds_and_converts_alike(tmp_path, preset_fp16,
                                                                        use_fp16):
    config, flags = tiny_preset(tmp_path, use_fp16=preset_fp16)
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **flags})
    th.save(model.state_dict(), tmp_path / "tiny.pt")
    loaded, _ = su.create_pretrained(config, str(tmp_path / "tiny.pt"), use_fp16=use_fp16)
    half = preset_fp16 if use_fp16 is None else use_fp16
    assert loaded.dtype == (th.float16 if half else th.float32)
    assert loaded.input_blocks[1][0].in_layers[2].weight.dtype == loaded.dtype
    if not half:  # float16 convolutions need a GPU; float32 runs here
        out = loaded(th.randn(1, 3, 16, 16), th.tensor([3]), y=th.tensor([1]))
        assert out.dtype == th.float32 and out.shape == (1, 6, 16, 16)


def test_every_released_checkpoint_has_the_original_readmes_url():
    from guided_diffusion.presets import preset_names, read_preset

    released = {name: read_preset(name) for name in preset_names() if read_preset(name).get("checkpoint")}
    assert len({preset["checkpoint"] for preset in released.values()}) == 15
    for preset in released.values():
        assert preset["checkpoint_url"] == (
            "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/" + preset["checkpoint"])
