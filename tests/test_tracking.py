"""
TensorBoard and Weights & Biases outputs through the training script as a user types it
(--log_format ...,tensorboard, --wandb_project with WANDB_MODE=offline), read back with
TensorBoard's own event reader and from W&B's offline run file; resume continues them.
"""

import glob
import json
import os
import struct
import sys
from pathlib import Path

import pytest

from test_sample_scripts import run_script

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1",
         "--attention_resolutions", "", "--diffusion_steps", "50", "--batch_size", "2",
         "--save_interval", "2", "--sample_interval", "2", "--log_interval", "1", "--seed", "0",
         "--num_workers", "0"]


def train_and_resume(data_dir, log_dir, extra):
    """Train to step 2, then resume from model000002.pt to step 4, in one log directory."""
    flags = ["--data_dir", data_dir, *TRAIN, "--log_dir", log_dir, *extra]
    run_script("image_train.py", flags + ["--max_steps", 2])
    run_script("image_train.py", flags + ["--max_steps", 4, "--resume_checkpoint",
                                          log_dir / "model000002.pt"])


@pytest.mark.slow
def test_tensorboard_events_hold_the_losses_previews_and_flags_and_continue(tmp_path, tiny_image_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "run"
    train_and_resume(tiny_image_dir, log_dir, ["--log_format", "stdout,log,csv,tensorboard"])
    events = EventAccumulator(str(log_dir / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
    losses = events.Scalars("loss")
    assert [event.step for event in losses] == [0, 1, 2, 3]  # continued, no step twice
    csv_rows = (log_dir / "progress.csv").read_text().splitlines()
    column = csv_rows[0].split(",").index("loss")
    assert [e.value for e in losses] == pytest.approx([float(r.split(",")[column]) for r in csv_rows[1:]])
    assert [event.step for event in events.Images("samples")] == [1, 3]  # after updates 2 and 4
    flags = events.Tensors("flags/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"max_steps": 2' in flags and '"log_format": "stdout,log,csv,tensorboard"' in flags


def wandb_records(run_file):
    """The protobuf records of a W&B run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    position, chunks, records = 7, b"", []  # after the ":W&B" header, magic and version
    while position + 7 <= len(data):
        block_left = 32768 - position % 32768
        if block_left < 7:
            position += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[position: position + 7])
        chunks += data[position + 7: position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
        if length == 0 and kind == 0:
            break
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_the_losses_and_flags_and_is_continued(tmp_path, tiny_image_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_files"))
    (tmp_path / "wandb_files").mkdir()
    log_dir = tmp_path / "run"
    train_and_resume(tiny_image_dir, log_dir, ["--wandb_project", "adm-tests", "--wandb_run_name", "tiny"])
    run_id = (log_dir / "wandb_run_id.txt").read_text()
    runs = sorted(glob.glob(str(tmp_path / "wandb_files" / "wandb" / f"offline-run-*-{run_id}")))
    assert len(runs) == 2  # the first run and its continuation, under one id
    steps, configs, keys = [], [], set()
    for run in runs:
        for record in wandb_records(glob.glob(os.path.join(run, f"run-{run_id}.wandb"))[0]):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                keys |= set(items)
                if "loss" in items:
                    steps.append(items["_step"])
            elif kind == "config":
                configs += [item.key or "/".join(item.nested_key) for item in record.config.update]
            elif kind == "run":
                assert record.run.display_name == "tiny" and record.run.project == "adm-tests"
    assert sorted(steps) == [0, 1, 2, 3] and len(set(steps)) == 4
    assert {"mse", "grad_norm", "samples"} <= keys  # every dumped key, and the preview grids
    assert {"max_steps", "lr", "wandb_project"} <= set(configs)


@pytest.mark.slow
def test_a_missing_tracking_package_is_named_before_training(tmp_path, tiny_image_dir):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorboard', 'wandb'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{hide}{os.pathsep}{REPO}")
    import subprocess

    for flags, extra in ((["--log_format", "log,tensorboard"], "tensorboard"),
                         (["--wandb_project", "p"], "wandb")):
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "image_train.py"), "--data_dir", str(tiny_image_dir),
             *TRAIN, "--log_dir", str(tmp_path / extra), *flags],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 1, result.stderr[-2000:]
        assert f'pip install -e ".[{extra}]"' in result.stderr
        assert not (tmp_path / extra / "model000000.pt").exists() and "training..." not in result.stdout


@pytest.mark.slow
def test_classifier_training_sends_its_losses_and_accuracies_to_tensorboard(tmp_path, tiny_image_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_script("classifier_train.py", [
        "--data_dir", tiny_image_dir, "--val_data_dir", tiny_image_dir, "--image_size", "8",
        "--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions", "4",
        "--num_classes", "3",
        "--diffusion_steps", "50", "--batch_size", "2", "--save_interval", "2", "--seed", "0",
        "--num_workers", "0", "--eval_interval", "1", "--log_interval", "1", "--iterations", "2",
        "--log_format", "log,csv,tensorboard", "--log_dir", tmp_path / "run",
    ])
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    assert {"train_loss", "train_acc@1", "val_loss", "val_acc@1"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train_loss")] == [0, 1]


def test_file_in_the_way_names_the_file_that_blocks_a_folder(tmp_path):
    from guided_diffusion.tracking import file_in_the_way

    (tmp_path / "a_file").write_text("")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    assert file_in_the_way(tmp_path / "new" / "deeper") is None
    assert file_in_the_way(tmp_path) is None
    assert file_in_the_way(tmp_path / "a_file") == str(tmp_path / "a_file")
    assert file_in_the_way(tmp_path / "a_file" / "tb") == str(tmp_path / "a_file")
    assert file_in_the_way(tmp_path / "broken" / "wandb") == str(tmp_path / "broken")


@pytest.mark.slow
@pytest.mark.parametrize("package, flags, blocking, message", [
    ("tensorboard", ["--log_format", "log,tensorboard"], "run/tb",
     "the tensorboard log format writes its event files in"),
    ("wandb", ["--wandb_project", "p"], "run/wandb", "the wandb log format writes its run files in"),
    ("wandb", ["--wandb_project", "p"], "wandb_dir", "the wandb log format writes its run files in"),
])
@pytest.mark.slow
def test_a_tracking_folder_that_is_a_file_is_refused_before_training(
    tmp_path, tiny_image_dir, monkeypatch, package, flags, blocking, message
):
    pytest.importorskip(package)
    monkeypatch.setenv("WANDB_MODE", "offline")
    if blocking == "wandb_dir":
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / blocking))
    else:
        monkeypatch.delenv("WANDB_DIR", raising=False)
    (tmp_path / "run").mkdir()
    (tmp_path / blocking).write_text("")
    result = run_script("image_train.py", ["--data_dir", tiny_image_dir, *TRAIN, "--max_steps", "1",
                                           "--log_dir", tmp_path / "run", *flags], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"image_train.py: {tmp_path / blocking} is not a folder: {message}" in result.stderr
    assert "training..." not in result.stdout and (tmp_path / blocking).read_text() == ""


def test_a_wandb_run_id_file_that_is_a_folder_is_refused(tmp_path):
    pytest.importorskip("wandb")
    from guided_diffusion.tracking import WANDB_ID_FILE, WandbOutputFormat

    (tmp_path / WANDB_ID_FILE).mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / WANDB_ID_FILE} is a folder: the wandb log format "
                                         "keeps its run id in a file there"):
        WandbOutputFormat(str(tmp_path), "p")
