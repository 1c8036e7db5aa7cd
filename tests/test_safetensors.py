"""
safetensors checkpoints as users type them: scripts/convert_checkpoint.py both ways,
training with --checkpoint_format safetensors and its resume, sampling from a
.safetensors file, the strict loading and mismatch report on such files, and the
messages for truncated files and diffusers exports.
"""

import json

import numpy as np
import pytest
import safetensors.torch
import torch as th

from test_sample_scripts import MODEL_FLAGS, run_script
from test_sampling import tiny_flags, tiny_model
from guided_diffusion.checkpoint import (
    load_checkpoint, load_for_inference, read_sidecar, read_state_dict,
)
from guided_diffusion.diffusers_export import convert_state_dict
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.training_state import save_checkpoint

TRAIN = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1",
         "--attention_resolutions", "", "--diffusion_steps", "50", "--batch_size", "2",
         "--save_interval", "2", "--log_interval", "1", "--seed", "0", "--num_workers", "0"]


@pytest.mark.slow
def test_convert_both_ways_keeps_tensors_and_record(tmp_path):
    model, _ = tiny_model()
    record = {"format": "guided_diffusion/1", "kind": "model", "step": 7, "flags": {"lr": 0.1}}
    save_checkpoint(str(tmp_path / "model000007.pt"), model.state_dict(), record)
    run_script("convert_checkpoint.py", [tmp_path / "model000007.pt", tmp_path / "st" / "model000007.safetensors"])
    converted = str(tmp_path / "st" / "model000007.safetensors")
    assert not (tmp_path / "st" / "model000007.json").exists()  # the record is inside
    assert read_sidecar(converted) == record
    state = read_state_dict(converted)
    assert sorted(state) == sorted(model.state_dict())
    assert all(th.equal(state[k], v) for k, v in model.state_dict().items())
    run_script("convert_checkpoint.py", [converted, tmp_path / "back" / "model000007.pt"])
    assert json.loads((tmp_path / "back" / "model000007.json").read_text()) == record
    back = read_state_dict(str(tmp_path / "back" / "model000007.pt"))
    assert all(th.equal(back[k], v) for k, v in model.state_dict().items())
    refused = run_script("convert_checkpoint.py", [converted, tmp_path / "back" / "model000007.pt"], check=False)
    assert refused.returncode == 1 and "exists: pass --overwrite" in refused.stderr


def test_a_safetensors_file_loads_strictly_with_the_mismatch_report(tmp_path):
    model, _ = tiny_model()
    path = str(tmp_path / "weights.safetensors")
    save_checkpoint(path, model.state_dict())
    fresh, _ = create_model_and_diffusion(**tiny_flags())
    load_checkpoint(fresh, path)
    assert all(th.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    wider, _ = create_model_and_diffusion(**tiny_flags(num_channels=64))
    with pytest.raises(ValueError, match="(?s)weights.safetensors. does not fit.*num_channels"):
        load_checkpoint(wider, path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "weights.safetensors").read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        read_state_dict(str(truncated))


@pytest.mark.slow
def test_training_writes_safetensors_resumes_from_them_and_samples(tmp_path, tiny_image_dir):
    flags = ["--data_dir", tiny_image_dir, *TRAIN, "--checkpoint_format", "safetensors"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_script("image_train.py", flags + ["--max_steps", 4, "--log_dir", full])
    run_script("image_train.py", flags + ["--max_steps", 2, "--log_dir", part])
    run_script("image_train.py", flags + ["--max_steps", 4, "--log_dir", part,
                                          "--resume_checkpoint", part / "model000002.safetensors"])
    for name in ("model000004.safetensors", "ema_0.9999_000004.safetensors"):
        a, b = read_state_dict(str(full / name)), read_state_dict(str(part / name))
        assert all(th.equal(a[k], b[k]) for k in a)  # the resume is exact
    assert (part / "opt000004.pt").exists() and read_sidecar(str(part / "model000004.safetensors"))["step"] == 4
    model_flags = TRAIN[:12]
    run_script("image_sample.py", [*model_flags, "--model_path", part / "ema_0.9999_000004.safetensors",
                                   "--num_samples", 2, "--batch_size", 2, "--sampler", "ddim",
                                   "--steps", 3, "--log_dir", tmp_path / "samples"])
    with np.load(tmp_path / "samples" / "samples_2x8x8x3.npz") as data:
        assert data["arr_0"].shape == (2, 8, 8, 3)


@pytest.fixture(scope="module")
def diffusers_export(tmp_path_factory):
    """
    A tiny model's weights under diffusers' names, as save_pretrained lays them out:
    export/unet/{config.json, diffusion_pytorch_model.safetensors}, and a lone .bin.
    """
    folder = tmp_path_factory.mktemp("diffusers")
    state = convert_state_dict(tiny_model()[0])
    unet = folder / "export" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    safetensors.torch.save_file(state, str(unet / "diffusion_pytorch_model.safetensors"),
                                metadata={"format": "pt"})
    (folder / "bin").mkdir()
    th.save(state, folder / "bin" / "diffusion_pytorch_model.bin")
    return folder


def test_a_diffusers_export_is_named_with_the_way_to_load_it(diffusers_export):
    unet = diffusers_export / "export" / "unet"
    cases = [
        (unet / "diffusion_pytorch_model.safetensors", "export (diffusers key names)", unet),
        (diffusers_export / "bin" / "diffusion_pytorch_model.bin", "export (diffusers key names)",
         diffusers_export / "bin"),
        (diffusers_export / "export", "export folder", unet),
        (unet, "export folder", unet),
    ]
    for path, kind, folder in cases:
        with pytest.raises(ValueError) as error:
            load_for_inference(tiny_model()[0], str(path), flags=tiny_flags())
        assert str(error.value) == (
            f"{str(path)!r} is a diffusers UNet2DModel {kind}, not an ADM checkpoint: load it with "
            f"diffusers (UNet2DModel.from_pretrained({str(folder)!r})), or use the ADM checkpoint "
            "it was exported from"
        )


def _cut(source, target, keep=None, extra=b""):
    """Write the first `keep` bytes of a file, then `extra`, to target; return its path."""
    target.write_bytes(source.read_bytes()[:keep] + extra)
    return str(target)


def test_a_truncated_or_damaged_safetensors_file_says_so(tmp_path):
    model, _ = tiny_model()
    whole = tmp_path / "model000004.safetensors"
    record = {"format": "guided_diffusion/1", "kind": "model", "step": 4, "flags": tiny_flags()}
    save_checkpoint(str(whole), model.state_dict(), record)
    size = whole.stat().st_size
    header_end = 8 + int.from_bytes(whole.read_bytes()[:8], "little")
    fix = "download it again, or convert it again with scripts/convert_checkpoint.py"
    cases = [
        (_cut(whole, tmp_path / "half.safetensors", size // 2),
         f"is a truncated safetensors file: its header says {size} bytes, the file has {size // 2}"),
        (_cut(whole, tmp_path / "head.safetensors", 100),
         f"is a truncated safetensors file: its header says it has at least {header_end} bytes, "
         "the file has 100"),
        (_cut(whole, tmp_path / "long.safetensors", extra=b"junk"),
         f"is a damaged safetensors file: its header says {size} bytes, the file has {size + 4}"),
    ]
    broken = bytearray(whole.read_bytes())
    broken[9:13] = b"\x00\x01\x02\x03"
    (tmp_path / "broken.safetensors").write_bytes(bytes(broken))
    cases.append((str(tmp_path / "broken.safetensors"),
                  "is a damaged safetensors file: its header does not describe tensors "
                  "(JSONDecodeError"))
    for path, message in cases:
        for load in (read_state_dict, lambda p: load_for_inference(tiny_model()[0], p, tiny_flags())):
            with pytest.raises(ValueError) as error:
                load(path)
            assert str(error.value).startswith(f"{path!r} {message}")
            assert str(error.value).endswith(fix)


@pytest.mark.parametrize("model_path, message", [
    ("DIFFUSERS", "is a diffusers UNet2DModel export (diffusers key names), not an ADM checkpoint: "
                  "load it with diffusers (UNet2DModel.from_pretrained("),
    ("TRUNCATED", "is a truncated safetensors file: its header says"),
])
@pytest.mark.slow
def test_image_sample_names_a_wrong_model_path(tmp_path, diffusers_export, model_path, message):
    if model_path == "DIFFUSERS":
        model_path = diffusers_export / "export" / "unet" / "diffusion_pytorch_model.safetensors"
    else:
        state = tiny_model()[0].state_dict()
        save_checkpoint(str(tmp_path / "whole.safetensors"), state)
        model_path = _cut(tmp_path / "whole.safetensors", tmp_path / "model.safetensors", 2000)
    flags = ["--model_path", model_path, "--num_samples", 1, "--log_dir", tmp_path / "log"]
    result = run_script("image_sample.py", MODEL_FLAGS + flags, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"image_sample.py: {str(model_path)!r} {message}" in result.stderr, result.stderr[-3000:]
