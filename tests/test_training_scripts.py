"""
End-to-end training in subprocesses: 2-process runs under mpiexec and torchrun (gloo,
CPU), exact resumption across processes, and the three training scripts' checkpoints.
Every subprocess has a timeout so a deadlock fails the test instead of hanging CI.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch as th

from guided_diffusion.checkpoint import load_checkpoint, read_sidecar
from guided_diffusion.script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from launchers import find_mpiexec, run_command

pytestmark = pytest.mark.slow  # every test runs the scripts, or shares a fixture that does
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "dist_train_driver.py")
TIMEOUT = 300
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                      "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OPENAI_LOGDIR")


def _environment():
    """This environment without launcher variables, one thread per process, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run(command, out_dir=None):
    """Run a command that must succeed; on failure show its output and, for the driver, each
    rank's standard error (OUT_DIR/stderr_rank<R>.txt)."""
    result = run_command(command, _environment(), REPO, TIMEOUT)
    if result.returncode != 0:
        ranks = "".join(f"\n--- {path.name}:\n{path.read_text()[-3000:]}"
                        for path in sorted(Path(out_dir or "/nonexistent").glob("stderr_rank*.txt")))
        pytest.fail(f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-3000:]}{ranks}")
    return result


def _fail(command):
    """Run a command that must fail; return its CompletedProcess."""
    result = run_command(command, _environment(), REPO, TIMEOUT)
    assert result.returncode != 0, f"{command} succeeded:\n{result.stdout[-3000:]}"
    return result


def _weights(path):
    return th.load(path, weights_only=True)


def _identical(first, second):
    return first.keys() == second.keys() and all(th.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def mpiexec_run(tmp_path_factory, tiny_image_dir):
    """OUT_DIR of `mpiexec -n 2 dist_train_driver.py ... interrupted`."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec is not installed (pip install mpich mpi4py)")
    pytest.importorskip("mpi4py")
    out_dir = tmp_path_factory.mktemp("mpiexec")
    _run([mpiexec, "-n", "2", sys.executable, DRIVER, tiny_image_dir, str(out_dir), "interrupted"], out_dir)
    return out_dir


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, tiny_image_dir):
    """OUT_DIR of `torchrun --standalone --nproc_per_node 2 dist_train_driver.py ... full`."""
    out_dir = tmp_path_factory.mktemp("torchrun")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          DRIVER, tiny_image_dir, str(out_dir), "full"], out_dir)
    return out_dir


@pytest.mark.slow
def test_mpiexec_ranks_end_with_identical_weights_after_a_resume(mpiexec_run):
    setups = [json.loads((mpiexec_run / f"setup_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["launcher"], s["rank"], s["world_size"], s["backend"]) for s in setups] == [
        ("mpi", 0, 2, "gloo"), ("mpi", 1, 2, "gloo")
    ]
    for run in ("part", "resumed"):
        rank0, rank1 = (_weights(mpiexec_run / f"{run}_rank{r}.pt") for r in (0, 1))
        assert _identical(rank0, rank1)
    part, resumed = (_weights(mpiexec_run / f"{run}_rank0.pt") for run in ("part", "resumed"))
    assert not _identical(part, resumed)
    training_state = th.load(mpiexec_run / "interrupted" / "opt000004.pt", weights_only=True)
    assert sorted(training_state["rng"]) == [0, 1] and sorted(training_state["data_state"]) == [0, 1]
    # Rank 0 writes the table (values averaged over ranks); samples count both ranks' batches.
    rows = (mpiexec_run / "interrupted" / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps_and_samples = [
        (row.split(",")[header.index("step")], row.split(",")[header.index("samples")]) for row in rows[1:]
    ]
    # The resumed run continued the interrupted run's table.
    assert steps_and_samples == [("0", "4"), ("1", "8"), ("2", "12"), ("3", "16")]
    assert (mpiexec_run / "interrupted" / "log-rank001.txt").exists()
    # A new run into the same log_dir is refused on both ranks alike (no deadlock).
    refusals = [(mpiexec_run / f"refused_rank{r}.txt").read_text() for r in (0, 1)]
    assert refusals[0] == refusals[1] and "resume_checkpoint=" in refusals[0]
    assert refusals[0].endswith("overwrite_log_dir=True to write over it")
    assert str(mpiexec_run / "interrupted" / "model000004.pt") in refusals[0]


@pytest.mark.slow
def test_torchrun_ranks_end_with_identical_weights(torchrun_run):
    setups = [json.loads((torchrun_run / f"setup_rank{r}.json").read_text()) for r in (0, 1)]
    summaries = [(s["launcher"], s["rank"], s["local_rank"]) for s in setups]
    assert summaries == [("torchrun", 0, 0), ("torchrun", 1, 1)]
    ddp = [json.loads((torchrun_run / f"full_ddp_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(d["gradient_as_bucket_view"] for d in ddp)  # the gradients are the buckets: no copy
    assert _identical(_weights(torchrun_run / "full_rank0.pt"), _weights(torchrun_run / "full_rank1.pt"))
    saved = _weights(torchrun_run / "full" / "model000004.pt")
    assert _identical(saved, _weights(torchrun_run / "full_rank0.pt"))


def test_two_process_resume_equals_the_uninterrupted_run_bit_for_bit(mpiexec_run, torchrun_run):
    # Same seeds and 2 processes each; the launcher does not change the arithmetic.
    assert _identical(_weights(mpiexec_run / "resumed_rank0.pt"), _weights(torchrun_run / "full_rank0.pt"))


TINY_UNET = ["--num_channels", "32", "--num_res_blocks", "1", "--attention_resolutions", "8",
             "--num_head_channels", "32"]
COMMON = ["--max_steps", "2", "--save_interval", "2", "--seed", "0", "--num_workers", "0",
          "--log_interval", "1"]
# Runs the three scripts in one interpreter where mpi4py cannot be imported (as when it is
# not installed), so setup_dist must work without MPI and without a launcher.
SCRIPT_RUNNER = """
import runpy, sys
sys.modules["mpi4py"] = None
for script, *argv in {runs!r}:
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory, tiny_image_dir):
    """Log directories of image_train.py, classifier_train.py and super_res_train.py runs."""
    root = tmp_path_factory.mktemp("scripts")
    runs = [
        ["scripts/image_train.py", "--data_dir", tiny_image_dir, "--image_size", "8", "--channel_mult", "1",
         "--class_cond", "True", "--num_classes", "3", "--learn_sigma", "True", "--batch_size", "4",
         "--microbatch", "2", "--ema_rate", "0.9,0.99", "--log_dir", str(root / "image"),
         *TINY_UNET, *COMMON],
        ["scripts/classifier_train.py", "--data_dir", tiny_image_dir, "--val_data_dir", tiny_image_dir,
         "--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1",
         "--classifier_attention_resolutions", "4", "--num_classes", "3", "--batch_size", "4",
         "--iterations", "2", "--log_dir", str(root / "classifier"), *COMMON[2:]],
        ["scripts/super_res_train.py", "--data_dir", tiny_image_dir, "--large_size", "8",
         "--small_size", "4", "--batch_size", "2", "--log_dir", str(root / "super_res"),
         *TINY_UNET, *COMMON],
    ]
    _run([sys.executable, "-c", SCRIPT_RUNNER.format(runs=runs)])
    return root


@pytest.mark.slow
def test_image_train_checkpoints_load_into_the_model_their_flags_build(script_runs):
    logdir = script_runs / "image"
    flags = read_sidecar(str(logdir / "model000002.pt"))["flags"]
    assert flags["class_cond"] is True and flags["num_classes"] == 3 and flags["seed"] == 0
    model, _ = create_model_and_diffusion(**args_to_dict(_Namespace(flags), model_and_diffusion_defaults()))
    for name in ("model000002.pt", "ema_0.9_000002.pt", "ema_0.99_000002.pt"):
        model.load_state_dict(_weights(logdir / name), strict=True)
        assert load_checkpoint(model, str(logdir / name), flags=flags)["step"] == 2
    header = (logdir / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "mse", "vb", "grad_norm", "step", "samples"} <= set(header)


def test_classifier_train_checkpoints_load_and_accuracy_is_logged(script_runs):
    logdir = script_runs / "classifier"
    flags = read_sidecar(str(logdir / "model000002.pt"))["flags"]
    model, _ = create_classifier_and_diffusion(
        **args_to_dict(_Namespace(flags), classifier_and_diffusion_defaults())
    )
    model.load_state_dict(_weights(logdir / "model000002.pt"), strict=True)
    header = (logdir / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1"} <= set(header)


def test_super_res_train_checkpoints_load_into_the_upsampler(script_runs):
    logdir = script_runs / "super_res"
    flags = read_sidecar(str(logdir / "model000002.pt"))["flags"]
    model, _ = sr_create_model_and_diffusion(
        **args_to_dict(_Namespace(flags), sr_model_and_diffusion_defaults())
    )
    model.load_state_dict(_weights(logdir / "ema_0.9999_000002.pt"), strict=True)


@pytest.mark.slow
def test_a_new_run_into_a_log_dir_holding_a_run_is_refused_unless_overwriting(
    script_runs, tiny_image_dir, tmp_path
):
    logdir = script_runs / "image"
    before = (logdir / "progress.csv").read_text()
    refused = _fail([sys.executable, "scripts/image_train.py", "--data_dir", tiny_image_dir,
                     "--image_size", "8", "--channel_mult", "1", "--batch_size", "4",
                     "--log_dir", str(logdir), *TINY_UNET, *COMMON])
    assert f"--resume_checkpoint {logdir / 'model000002.pt'}" in refused.stderr
    assert "--overwrite_log_dir True" in refused.stderr
    assert (logdir / "progress.csv").read_text() == before
    classifier_dir = shutil.copytree(script_runs / "classifier", tmp_path / "classifier")
    _run([sys.executable, "scripts/classifier_train.py", "--data_dir", tiny_image_dir,
          "--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1",
          "--classifier_attention_resolutions", "4", "--num_classes", "3", "--batch_size", "4",
          "--iterations", "1", "--log_dir", str(classifier_dir), "--overwrite_log_dir", "True",
          *COMMON[2:]])
    assert (classifier_dir / "model000001.pt").exists()


@pytest.mark.slow
def test_classifier_validation_labels_use_the_training_class_map(tmp_path, tiny_image_dir):
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    for name in os.listdir(tiny_image_dir):
        if not name.startswith("c0_"):  # no class c0: c1 must stay label 1
            shutil.copy(os.path.join(tiny_image_dir, name), val_dir / name)
    shutil.copy(os.path.join(tiny_image_dir, "c1_1.png"), val_dir / "zz_9.png")
    refused = _fail([sys.executable, "scripts/classifier_train.py", "--data_dir", tiny_image_dir,
                     "--val_data_dir", str(val_dir), "--image_size", "8", "--classifier_width", "32",
                     "--classifier_depth", "1", "--classifier_attention_resolutions", "4",
                     "--num_classes", "3", "--batch_size", "4", "--iterations", "1",
                     "--log_dir", str(tmp_path / "log"), *COMMON[2:]])
    assert "classes zz are not among the 3 given classes (c0, c1, c2)" in refused.stderr
    assert "zz_9.png" in refused.stderr


class _Namespace:
    """Attribute access to a flags dict, as args_to_dict expects an argparse namespace."""

    def __init__(self, flags):
        self.__dict__.update(flags)


@pytest.mark.slow
def test_the_class_folders_are_recorded_and_a_resume_with_other_classes_is_refused(tmp_path):
    from PIL import Image
    import numpy as np

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for folder, count in (("bird", 0), ("cat", 2), ("dog", 2)):
        (data / folder).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / folder / f"{index}.png")
    logdir = tmp_path / "run"
    train = [sys.executable, "scripts/image_train.py", "--data_dir", str(data), "--image_size", "8",
             "--channel_mult", "1", "--class_cond", "True", "--class_from", "folder", "--num_classes", "3",
             "--batch_size", "2", "--log_dir", str(logdir), *TINY_UNET, *COMMON]
    _run(train)
    assert read_sidecar(str(logdir / "model000002.pt"))["class_names"] == ["cat", "dog"]
    assert read_sidecar(str(logdir / "ema_0.9999_000002.pt"))["class_names"] == ["cat", "dog"]
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / "bird" / "0.png")
    resume = ["--resume_checkpoint", str(logdir / "model000002.pt"), "--max_steps", "4"]
    refused = _fail(train + resume)
    assert "Traceback" not in refused.stderr
    assert (f"--resume_checkpoint {logdir / 'model000002.pt'} was trained with other classes (label 0: "
            "'cat' -> 'bird', label 1: 'dog' -> 'cat', 2 classes -> 3)") in refused.stderr
    assert not (logdir / "model000004.pt").exists()
