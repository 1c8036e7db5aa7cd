"""Tests for guided_diffusion.training_state: names, atomic writes, sidecars, RNG states."""

import json
import os
import random

import numpy as np
import pytest
import torch as th

from guided_diffusion import training_state


def test_file_names_keep_the_original_pattern():
    assert training_state.model_filename(1000) == "model001000.pt"
    assert training_state.ema_filename("0.9999", 1000) == "ema_0.9999_001000.pt"
    assert training_state.ema_filename(0.9999432, 5) == "ema_0.9999432_000005.pt"
    assert training_state.opt_filename(123456) == "opt123456.pt"


def test_steps_are_parsed_only_from_model_file_names():
    assert training_state.parse_resume_step_from_filename("/runs/a/model012345.pt") == 12345
    for name in ("256x256_diffusion.pt", "mymodel.pt", "ema_0.9999_000100.pt", "model.pt"):
        assert training_state.parse_resume_step_from_filename(name) is None


def test_save_checkpoint_writes_the_file_and_its_sidecar_atomically(tmp_path):
    path = str(tmp_path / "model000007.pt")
    sidecar = training_state.make_sidecar("model", 7, {"lr": 1e-4, "log_dir": tmp_path})
    training_state.save_checkpoint(path, {"w": th.ones(2)}, sidecar)
    training_state.save_checkpoint(path, {"w": th.zeros(2)}, sidecar)  # replaces the old file
    assert th.equal(th.load(path, weights_only=True)["w"], th.zeros(2))
    record = json.loads((tmp_path / "model000007.json").read_text())
    assert record == dict(format="guided_diffusion/1", kind="model", ema_rate=None, step=7,
                          flags={"lr": 1e-4, "log_dir": str(tmp_path)})
    assert sorted(os.listdir(tmp_path)) == ["model000007.json", "model000007.pt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "opt000001.pt")
    training_state.save_checkpoint(path, {"step": 1})

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        training_state.atomic_write(path, fail)
    assert th.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["opt000001.pt"]


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    th.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    path = str(tmp_path / "rng.pt")
    training_state.save_checkpoint(path, training_state.capture_rng_state())
    expected = (th.rand(3), np.random.normal(size=3), random.random())
    th.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    training_state.restore_rng_state(th.load(path, weights_only=True))
    assert th.equal(th.rand(3), expected[0])
    assert np.array_equal(np.random.normal(size=3), expected[1])
    assert random.random() == expected[2]


def test_resume_plan_checks_the_recorded_step(tmp_path):
    model = str(tmp_path / "model000004.pt")
    training_state.save_checkpoint(model, {"w": th.ones(1)})
    training_state.save_checkpoint(str(tmp_path / "opt000004.pt"), dict(optimizer={}, step=5))
    with pytest.raises(ValueError, match="records step 5 but .*model000004.pt is step 4"):
        training_state.resume_plan(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        training_state.resume_plan(str(tmp_path / "model000009.pt"))
