"""
scripts/gpu_check.py's CPU rehearsal: every step of the GPU check through the real
scripts under torchrun with 1 gloo rank, and the commands for 2 ranks. The benchmark
step, and the summaries printed from a benchmark result, are checked in
test_benchmark.py beside the benchmark run.
"""

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_step(tmp_path):
    # One rank: the scripts' two-rank runs are the other script tests'; the commands for
    # two ranks are checked below.
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu",
         "--processes", "1", "--skip_benchmark", "--work_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert [re.sub(r"^\S+\s+[\d.]+ s  ", "", line) for line in lines[:-1]] == [
        "train fp16, --sample_interval", "resume fp16", "train bf16", "train classifier",
        "guided sampling, 25 DDIM steps", "guided sampling, dpmpp_2m 10 evaluations",
        "evaluator: reference batch", "evaluator: scores",
    ]
    assert all(line.startswith("ok") for line in lines[:-1])
    fp16 = tmp_path / "fp16"
    assert (fp16 / "samples_000002.png").exists() and (fp16 / "samples_000004.png").exists()
    assert (fp16 / "model000004.pt").exists()
    with np.load(tmp_path / "guided" / "samples_4x16x16x3.npz") as samples:
        assert samples["arr_0"].shape == (4, 16, 16, 3) and set(samples["arr_1"]) <= {0, 1}
    log = (tmp_path / "gpu_check.log").read_text().splitlines()
    scores = [json.loads(line) for line in log if line.startswith("{") and '"fid"' in line]
    assert len(scores) == 1 and np.isfinite(scores[0]["fid"])


def test_two_ranks_launch_every_script_and_sample_for_both(tmp_path):
    check = runpy.run_path(str(REPO / "scripts" / "gpu_check.py"), run_name="gpu_check")
    args = check["create_argparser"]().parse_args(["--device", "cpu", "--skip_benchmark"])
    listed = dict(check["steps"](tmp_path, args, processes=2))
    launched = [name for name, command in listed.items() if "--nproc_per_node=2" in command]
    assert launched == list(listed)[:6]  # the training and sampling steps; the evaluator is one process
    guided = listed["guided sampling, 25 DDIM steps"]
    assert guided[guided.index("--num_samples") + 1] == "8"
    assert listed["evaluator: scores"][3] == str(tmp_path / "guided" / "samples_8x16x16x3.npz")


def test_a_failed_step_is_reported(tmp_path):
    check = runpy.run_path(str(REPO / "scripts" / "gpu_check.py"), run_name="gpu_check")
    ok, seconds, _ = check["run_step"]("x", [sys.executable, "-c", "raise SystemExit(3)"], None,
                                       open(tmp_path / "log", "w"))
    assert not ok and seconds >= 0
