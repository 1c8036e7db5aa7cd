"""
safetensors checkpoints as users type them: scripts/convert_checkpoint.py both ways,
training with --checkpoint_format safetensors and its resume, sampling from a
.safetensors file, and the strict loading and mismatch report on such files.
"""

import json

import numpy as np
import pytest
import torch as th

from test_sample_scripts import run_script
from test_sampling import tiny_flags, tiny_model
from guided_diffusion.checkpoint import load_checkpoint, read_sidecar, read_state_dict
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.training_state import save_checkpoint

TRAIN = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1",
         "--attention_resolutions", "", "--diffusion_steps", "50", "--batch_size", "2",
         "--save_interval", "2", "--log_interval", "1", "--seed", "0", "--num_workers", "0"]


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
