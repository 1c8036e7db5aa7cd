"""Tests for guided_diffusion.training_state: names, atomic writes, sidecars, RNG states,
resume plans and what a log directory may hold."""

import errno
import io
import json
import os
import random

import numpy as np
import pytest
import torch as th

from guided_diffusion import file_writing, training_state


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


def test_stale_temporaries_of_checkpoint_saves_are_removed_and_others_kept(tmp_path):
    names = []
    file_writing.atomic_write(str(tmp_path / "model000010.pt"),
                                lambda f: names.append(os.path.basename(f.name)))
    stale = names + ["opt000002.pt.tmp-" + "f" * 32, "ema_0.9999_000010.json.tmp-" + "0" * 32,
                     "target_000010.pt.tmp-" + "a" * 32]  # consistency distillation's target
    kept = ["model000010.pt", "notes.txt.tmp-" + "0" * 32, "opt000002.pt.tmp-short",
            "model000010.pt.tmp-" + "0" * 32 + ".bak"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(training_state.remove_stale_temporaries(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


class _FullDisk(io.RawIOBase):
    """A file that takes 100 bytes, then fails as a full disk does."""

    def __init__(self, path):
        self.path, self.written = path, 0
        open(path, "wb").close()

    def writable(self):
        return True

    def write(self, data):
        if self.written + len(data) > 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return len(data)


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "model000002.pt")
    training_state.save_checkpoint(path, {"w": th.ones(2)})
    monkeypatch.setattr(file_writing, "open", lambda name, mode: _FullDisk(name), raising=False)
    # torch.save reports the failed write as RuntimeError "unexpected pos ...".
    with pytest.raises(OSError, match=r"No space left on device while writing .*model000002.pt: "
                                      "the disk is full") as raised:
        training_state.save_checkpoint(path, {"w": th.zeros(1000)})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == path
    with pytest.raises(OSError, match="No space left on device while writing .*model000002.json"):
        file_writing.atomic_write(path[:-3] + ".json", lambda f: f.write(b"x" * 200))
    assert th.equal(th.load(path, weights_only=True)["w"], th.ones(2))
    assert os.listdir(tmp_path) == ["model000002.pt"]


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("content, message", [
    ("truncated", "is corrupt"),
    (b"\x00garbage" * 20, "is corrupt or not a torch file"),
    ({"optimizer": _RunsCode()}, "would execute code"),
    ({"w": th.ones(2)}, "is not a training-state file: it holds a dict"),
    ([1, 2], "is not a training-state file: it holds a list"),
])
def test_an_unreadable_opt_file_is_named_with_what_to_do(tmp_path, content, message):
    model = str(tmp_path / "model000004.pt")
    opt = tmp_path / "opt000004.pt"
    training_state.save_checkpoint(model, {"w": th.ones(1)})
    if content == "truncated":
        buffer = io.BytesIO()
        th.save(dict(optimizer={}, step=4), buffer)
        opt.write_bytes(buffer.getvalue()[:-40])
    elif isinstance(content, bytes):
        opt.write_bytes(content)
    else:
        th.save(content, opt)
    with pytest.raises(ValueError, match=(
        f"{opt}.*{message}.*Resume from an earlier step's modelNNNNNN.pt, or start a new run "
        f"from these weights with init_checkpoint={model}"
    )):
        training_state.resume_plan(model)


def _touch(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_a_new_run_is_refused_a_log_dir_holding_a_run_with_what_to_do(tmp_path):
    run = _touch(tmp_path / "run", "model000002.pt", "ema_0.9_000002.pt", "opt000002.pt")
    with pytest.raises(ValueError, match=(
        f"log_dir={run} already holds a run .*resume_checkpoint={run / 'model000002.pt'}, "
        "start a new run in another log directory, or pass overwrite_log_dir=True"
    )):
        training_state.prepare_log_dir(str(run), new_run=True)
    for name in ("opt000002.pt", "ema_0.9_000002.pt"):  # any checkpoint marks a run
        alone = _touch(tmp_path / f"holds_{name}", name)
        with pytest.raises(ValueError, match="already holds a run .*None of its steps is complete"):
            training_state.prepare_log_dir(str(alone), new_run=True)
    # A save of step 4 interrupted before its opt file: the advice is step 2, the last complete one.
    _touch(run, "model000004.pt", "ema_0.9_000004.pt")
    with pytest.raises(ValueError, match=(
        f"its latest complete step with resume_checkpoint={run / 'model000002.pt'}, start a new run"
    )):
        training_state.prepare_log_dir(str(run), new_run=True)
    training_state.prepare_log_dir(str(run), new_run=True, overwrite=True)
    training_state.prepare_log_dir(str(run), new_run=False)
    training_state.prepare_log_dir(str(_touch(tmp_path / "other", "notes.txt")), new_run=True)
    training_state.prepare_log_dir(str(tmp_path / "not_yet_made"), new_run=True)


def test_preparing_a_log_dir_removes_stale_temporaries_of_its_saves(tmp_path):
    stale = "model000010.pt.tmp-" + "0" * 32
    _touch(tmp_path, stale, "notes.txt")
    training_state.prepare_log_dir(str(tmp_path), new_run=True)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_resuming_an_incomplete_step_names_the_latest_complete_one(tmp_path):
    for name in ("model000002.pt", "opt000002.pt", "model000004.pt"):
        training_state.save_checkpoint(str(tmp_path / name), dict(optimizer={}, step=2))
    with pytest.raises(FileNotFoundError, match=(
        "opt000004.pt is missing.*the save of step 4 was interrupted.*The latest complete step in "
        f".* is 2: continue with resume_checkpoint={tmp_path / 'model000002.pt'}"
    )):
        training_state.resume_plan(str(tmp_path / "model000004.pt"))
    os.remove(tmp_path / "opt000002.pt")
    with pytest.raises(FileNotFoundError, match=(
        f"No step in .* is complete: start a new run from these weights with "
        f"init_checkpoint={tmp_path / 'model000004.pt'}"
    )):
        training_state.resume_plan(str(tmp_path / "model000004.pt"))


def test_a_consistency_target_checkpoint_marks_a_run(tmp_path):
    (tmp_path / "target_000002.pt").write_bytes(b"x")
    (tmp_path / "notes.pt").write_bytes(b"x")
    assert training_state.run_checkpoints(str(tmp_path)) == ["target_000002.pt"]
