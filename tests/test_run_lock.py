"""
run_lock: one run at a time per log directory; a lock left by a dead process is taken
over; a second training script on a busy log directory is refused, naming the first.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guided_diffusion import run_lock
from launchers import run_command

REPO = Path(__file__).resolve().parent.parent
HOLD_AND_WAIT = """
import sys, time
from guided_diffusion import run_lock
run_lock.hold_log_dir(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def _environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("OPENAI_LOGDIR", None)
    return env


def _start_holder(logdir):
    """A process that holds logdir until killed; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(logdir)], env=_environment(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_held_log_dir_is_refused_naming_the_holder(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(ValueError, match=(
            rf"log_dir={tmp_path} is in use by another run \(pid {holder.pid} on .*, started "
            r"\d{4}-\d\d-\d\dT[\d:]+: python\S* -c .*\): wait for it to end, or give this run another log_dir"
        )):
            run_lock.hold_log_dir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = _start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = tmp_path / run_lock.LOCK_NAME
    assert f"pid {holder.pid} " in lock.read_text()  # the file stays, its flock does not
    try:
        assert run_lock.hold_log_dir(str(tmp_path)) is True
        assert lock.read_text().startswith(f"pid {os.getpid()} ")
        assert run_lock.hold_log_dir(str(tmp_path)) is False  # held already: a no-op
    finally:
        run_lock.release_log_dir(str(tmp_path))
    assert not lock.exists()


@pytest.mark.slow
def test_release_lets_the_next_run_in(tmp_path):
    assert run_lock.hold_log_dir(str(tmp_path / "new"))  # created
    run_lock.release_log_dir(str(tmp_path / "new"))
    probe = subprocess.run([sys.executable, "-c", "import sys; from guided_diffusion import run_lock; "
                            "print(run_lock.hold_log_dir(sys.argv[1]))", str(tmp_path / "new")],
                           env=_environment(), capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "True", probe.stderr


def test_a_log_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("notes")
    with pytest.raises(ValueError, match=f"log_dir={tmp_path / 'file'} is a file, not a folder"):
        run_lock.hold_log_dir(str(tmp_path / "file"))


TRAIN = ["scripts/image_train.py", "--image_size", "8", "--channel_mult", "1", "--num_channels", "32",
         "--num_res_blocks", "1", "--attention_resolutions", "8", "--num_head_channels", "32",
         "--batch_size", "2", "--num_workers", "0", "--log_interval", "1"]


@pytest.mark.slow
def test_a_second_training_run_on_a_busy_log_dir_is_refused_naming_the_first(tmp_path, tiny_image_dir):
    logdir = tmp_path / "run"
    train = [sys.executable, str(REPO / TRAIN[0]), *TRAIN[1:], "--data_dir", tiny_image_dir,
             "--log_dir", str(logdir)]
    first = subprocess.Popen(train + ["--max_steps", "100000"], cwd=REPO, env=_environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = logdir / run_lock.LOCK_NAME
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
            assert first.poll() is None, "the first run ended before it took the lock"
            time.sleep(0.2)
        second = run_command(train + ["--max_steps", "1"], _environment(), REPO, 180)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert (f"image_train.py: --log_dir {logdir} is in use by another run (pid {first.pid} on "
                in second.stderr), second.stderr
        assert "image_train.py" in lock.read_text()
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no clean-up
        first.wait()
    third = run_command(train + ["--max_steps", "1"], _environment(), REPO, 180)
    assert third.returncode == 0, third.stderr[-3000:]
    assert (logdir / "model000001.pt").exists() and not lock.exists()
