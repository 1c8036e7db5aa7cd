"""
scripts/benchmark.py on a tiny setting: the JSON line's keys, the paths' numbers
agree, and the exact path really is the original's execution.
"""

import contextlib
import io
import json
import runpy
import tempfile
from pathlib import Path

import pytest
import torch as th

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
    "--attention_resolutions", "4", "--num_head_channels", "16", "--num_classes", "3",
    "--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions", "4",
    "--batch_size", "2", "--repeats", "1", "--sample_steps", "2", "--eval_images", "2",
    "--eval_batch_size", "2", "--use_bf16", "True", "--device", "cpu", "--threads", "1",
]
PATH_KEYS = {
    "switches", "first_calls_s", "warmup_s", "train_step_s", "train_images_per_s", "sample_s_per_step",
    "guided_s_per_step", "peak_train_mb", "peak_sample_mb", "compiled", "train_tflops",
    "sample_tflops", "guided_tflops", "train_mfu", "sample_mfu", "guided_mfu", "peak_kind",
    "peak_tflops",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """
    One benchmark run (in this process), its JSON line checked against its result; it
    leaves no log folder behind and gives the logger back as it found it.
    """
    from guided_diffusion import logger

    main = runpy.run_path(str(REPO / "scripts" / "benchmark.py"), run_name="benchmark")["main"]
    threads, printed, previous = th.get_num_threads(), io.StringIO(), logger.get_current()
    temp_dir, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("temp"))
    try:
        with contextlib.redirect_stdout(printed):
            result = main(TINY)
        assert not list(Path(tempfile.tempdir).glob("benchmark-*"))
    finally:
        th.set_num_threads(threads)
        tempfile.tempdir = temp_dir
    assert logger.get_current() is previous
    lines = printed.getvalue().strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == json.loads(json.dumps(result))
    return result


@pytest.mark.slow
def test_json_line_has_every_measurement(tiny_run):
    assert set(tiny_run["paths"]) == {"exact", "fast", "fast_bf16"}
    for result in tiny_run["paths"].values():
        assert set(result) == PATH_KEYS
        assert result["train_images_per_s"] > 0 and result["sample_s_per_step"] > 0
        assert result["guided_s_per_step"] > 0 and result["peak_train_mb"] > 0
        assert result["train_mfu"] is None  # no known peak for a CPU
    assert [tiny_run["paths"][name]["peak_kind"] for name in ("exact", "fast", "fast_bf16")] == [
        "fp32", "fp32", "bf16"]
    assert set(tiny_run["speedup"]) == {"fast", "fast_bf16"}
    assert set(tiny_run["speedup"]["fast"]) == {
        "train", "sample", "guided", "peak_train_memory", "peak_sample_memory"
    }
    for key in ("device", "device_name", "threads", "torch", "load_average_start", "precision",
                "evaluator_images_per_s", "flops", "peak_memory_method", "model_flags"):
        assert key in tiny_run
    assert tiny_run["evaluator_images_per_s"] > 0
    assert tiny_run["flops"]["model_forward_backward"] > 2 * tiny_run["flops"]["model_forward"] > 0


@pytest.mark.slow
def test_fast_and_exact_paths_agree(tiny_run):
    fast = tiny_run["agreement"]["fast"]
    assert fast["model_output_rel"] < 1e-5 and fast["train_loss_rel"] < 1e-5 and fast["train_grad_rel"] < 1e-4
    assert fast["sample_rel"] < 1e-4 and fast["guided_rel"] < 1e-4
    # bfloat16 changes the numbers, but not by much.
    bf16 = tiny_run["agreement"]["fast_bf16"]
    assert 0 < bf16["model_output_rel"] < 0.05 and 0 < bf16["train_loss_rel"] < 0.05


@pytest.mark.slow
def test_the_exact_path_is_the_originals_execution(tiny_run):
    exact, fast = tiny_run["paths"]["exact"]["switches"], tiny_run["paths"]["fast"]["switches"]
    assert exact == dict(fast_attention=False, train_recompute=True, sample_recompute=True)
    assert fast["fast_attention"]
    assert fast["train_recompute"] and not fast["sample_recompute"]  # the scripts' defaults
    assert tiny_run["precision"] == "float32"


def test_too_few_sampling_steps_are_refused():
    main = runpy.run_path(str(REPO / "scripts" / "benchmark.py"), run_name="benchmark")["main"]
    with pytest.raises(ValueError, match="--sample_steps 1: expected at least 2"):
        main(["--sample_steps", "1"])


@pytest.fixture(scope="module")
def benchmark_module():
    return runpy.run_path(str(REPO / "scripts" / "benchmark.py"), run_name="benchmark")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0),
    ("NVIDIA L40S", 362.1), ("NVIDIA GeForce RTX 4090", None),
])
def test_device_peaks_match_the_model_not_a_substring(benchmark_module, name, peak):
    peaks = benchmark_module["device_peaks"](name)
    assert (peaks and peaks["bf16"]) == peak


def test_float32_paths_are_measured_against_a_float32_peak(benchmark_module, monkeypatch):
    peak_kind = benchmark_module["peak_kind"]
    cuda, cpu = th.device("cuda"), th.device("cpu")
    assert peak_kind({"use_bf16": True}, use_fp16=False, device=cuda) == "bf16"
    assert peak_kind({}, use_fp16=True, device=cuda) == "bf16"
    monkeypatch.setattr(th.backends.cudnn, "allow_tf32", True)
    assert peak_kind({}, use_fp16=False, device=cuda) == "tf32"
    assert peak_kind({}, use_fp16=False, device=cpu) == "fp32"  # no TF32 on a CPU
    monkeypatch.setattr(th.backends.cudnn, "allow_tf32", False)
    assert peak_kind({}, use_fp16=False, device=cuda) == "fp32"


def test_the_bf16_path_of_an_fp16_run_does_not_round_its_input_to_fp16(benchmark_module, tmp_path):
    from guided_diffusion import logger

    args = benchmark_module["create_argparser"]().parse_args(TINY + ["--use_fp16", "True"])
    previous = logger.Logger.CURRENT
    logger.configure(str(tmp_path), ["log"])
    try:
        bench = benchmark_module["Benchmark"](args, th.device("cpu"))
    finally:
        logger.Logger.CURRENT.close()
        logger.Logger.CURRENT = previous
    assert bench.groups["fp16"]["model"].dtype == th.float16
    assert bench.groups["fp32"]["model"].dtype == th.float32
    assert bench.groups["fp32"]["classifier"].dtype == th.float32


# ---------------------------------------------------------------------- gpu_check.py's summaries
# (here, to share the benchmark run)


def gpu_check():
    return runpy.run_path(str(REPO / "scripts" / "gpu_check.py"), run_name="gpu_check")


@pytest.mark.slow
def test_the_gpu_check_summary_shows_each_paths_figures(tiny_run):
    lines = gpu_check()["benchmark_summary"](json.dumps(tiny_run) + "\n")
    assert lines[0].startswith("benchmark on ") and "batch 2" in lines[0]
    assert [line.split()[0] for line in lines[1:-1]] == list(tiny_run["paths"])
    assert "img/s" in lines[1] and "MFU" in lines[1] and lines[-1].startswith("  speedup over exact")


@pytest.mark.slow
def test_the_gpu_check_switch_runs_change_one_switch_each_and_are_summarised(tmp_path, tiny_run):
    check = gpu_check()
    args = check["create_argparser"]().parse_args(["--device", "cpu", "--processes", "1"])
    listed = dict(check["steps"](tmp_path, args, processes=1))
    runs = {name: command for name, command in listed.items() if name.startswith("switches: ")}
    base = runs["switches: defaults"]
    assert "--use_bf16" in base and "--compile" not in base
    assert runs["switches: channels_last False"][len(base):] == ["--channels_last", "False"]
    assert runs["switches: cudnn_benchmark True"][len(base):] == ["--cudnn_benchmark", "True"]
    line, = check["switch_summary"](json.dumps(tiny_run) + "\n")
    assert line.startswith("  fast path: train") and "s/step" in line
