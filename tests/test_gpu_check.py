"""
scripts/gpu_check.py's CPU rehearsal: every step of the GPU check through the real
scripts under torchrun with 2 gloo ranks (the benchmark step is test_benchmark.py's),
and the summary it prints from a benchmark result.
"""

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_benchmark import tiny_run  # noqa: F401, F811 (a fixture shared with test_benchmark)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_step(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu",
         "--processes", "2", "--skip_benchmark", "--work_dir", str(tmp_path)],
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
    assert (fp16 / "model000004.pt").exists() and (fp16 / "log-rank001.txt").exists()
    with np.load(tmp_path / "guided" / "samples_4x16x16x3.npz") as samples:
        assert samples["arr_0"].shape == (4, 16, 16, 3) and set(samples["arr_1"]) <= {0, 1}
    log = (tmp_path / "gpu_check.log").read_text().splitlines()
    scores = [json.loads(line) for line in log if line.startswith("{") and '"fid"' in line]
    assert len(scores) == 1 and np.isfinite(scores[0]["fid"])


def test_a_failed_step_is_reported(tmp_path):
    check = runpy.run_path(str(REPO / "scripts" / "gpu_check.py"), run_name="gpu_check")
    ok, seconds, _ = check["run_step"]("x", [sys.executable, "-c", "raise SystemExit(3)"], None,
                                       open(tmp_path / "log", "w"))
    assert not ok and seconds >= 0


@pytest.mark.slow
def test_the_summary_shows_each_paths_figures(tiny_run):  # noqa: F811
    check = runpy.run_path(str(REPO / "scripts" / "gpu_check.py"), run_name="gpu_check")
    lines = check["benchmark_summary"](json.dumps(tiny_run) + "\n")
    assert lines[0].startswith("benchmark on ") and "batch 2" in lines[0]
    assert [line.split()[0] for line in lines[1:-1]] == list(tiny_run["paths"])
    assert "img/s" in lines[1] and "MFU" in lines[1] and lines[-1].startswith("  speedup over exact")


@pytest.mark.slow
def test_the_switch_runs_change_one_switch_each_and_are_summarised(tmp_path, tiny_run):  # noqa: F811
    check = runpy.run_path(str(REPO / "scripts" / "gpu_check.py"), run_name="gpu_check")
    args = check["create_argparser"]().parse_args(["--device", "cpu", "--processes", "1"])
    listed = dict(check["steps"](tmp_path, args, processes=1))
    runs = {name: command for name, command in listed.items() if name.startswith("switches: ")}
    base = runs["switches: defaults"]
    assert "--use_bf16" in base and "--compile" not in base
    assert runs["switches: channels_last False"][len(base):] == ["--channels_last", "False"]
    assert runs["switches: cudnn_benchmark True"][len(base):] == ["--cudnn_benchmark", "True"]
    line, = check["switch_summary"](json.dumps(tiny_run) + "\n")
    assert line.startswith("  fast path: train") and "s/step" in line
