"""
The prepared GPU check: the CUDA paths in one go, with one summary at the end.

python scripts/gpu_check.py                      # every visible GPU (at least 1), about 10 min on an H200
python scripts/gpu_check.py --processes 2 --skip_benchmark
python scripts/gpu_check.py --device cpu --processes 1 --benchmark_flags "--repeats 1"   # the CPU rehearsal

Steps, each a subprocess of the real scripts on tiny generated images (torchrun with
--processes ranks: NCCL on GPUs, gloo on the CPU): fp16 training with --sample_interval,
its resume, bf16 training, a classifier, 25-step DDIM and 10-evaluation DPM-Solver++(2M)
classifier-guided sampling, the
evaluator on the samples (random Inception weights unless --inception_path: the same
cost), and scripts/benchmark.py at the 256x256 flags (fp16 exact path against bf16 +
compile + fast attention: images/s, memory, MFU), then three short eager bf16 runs that
settle the defaults of --channels_last and --cudnn_benchmark (each changes one switch).
Prints one line per step and the benchmarks' figures; exits 1 if a step failed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch as th
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # evaluations/ beside the package

from evaluations.inception import InceptionV3  # noqa: E402

MODEL = ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
         "--attention_resolutions", "8", "--num_head_channels", "32", "--diffusion_steps", "100",
         "--class_cond", "True", "--num_classes", "2"]
CLASSIFIER = ["--image_size", "16", "--classifier_width", "32", "--classifier_depth", "1",
              "--classifier_attention_resolutions", "8", "--num_classes", "2",
              "--diffusion_steps", "100"]
TRAIN = ["--batch_size", "4", "--save_interval", "2", "--log_interval", "1", "--seed", "0",
         "--num_workers", "0"]
BENCHMARK = ["--config", "256x256_diffusion", "--batch_size", "16", "--use_fp16", "True",
             "--use_bf16", "True", "--compile", "True", "--repeats", "3", "--eval_images", "256",
             "--eval_batch_size", "64"]
# Short eager bf16 runs that settle the defaults of the switches tuned on a CPU only:
# each changes one switch from its default; their fast paths are compared.
SWITCH_RUN = ["--config", "256x256_diffusion", "--batch_size", "8", "--use_bf16", "True",
              "--repeats", "1", "--eval_images", "0"]
SWITCHES = {
    "defaults": [],
    "channels_last False": ["--channels_last", "False"],
    "cudnn_benchmark True": ["--cudnn_benchmark", "True"],
}


def write_images(folder, count=16, size=16):
    """Labelled images c0_*.png and c1_*.png whose class shows in their brightness."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        pixels = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels //= 1 + 3 * (index % 2)
        Image.fromarray(pixels).save(folder / f"c{index % 2}_{index}.png")


def steps(work, args, processes):
    """The check's steps with `processes` ranks: (name, command) in order."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={processes}"]
    script = lambda name: str(REPO / "scripts" / name)  # noqa: E731
    data = ["--data_dir", str(work / "images")]
    inception = args.inception_path or str(work / "inception.pt")
    count = 4 * processes  # at least 4: the evaluator's precision and recall need k + 1 = 4
    samples = work / "guided" / f"samples_{count}x16x16x3.npz"
    guided = [*launch, script("classifier_sample.py"), *MODEL, *CLASSIFIER, "--classifier_scale", "1.0",
              "--seed", "0", "--num_samples", str(count), "--batch_size", "2",
              "--model_path", str(work / "fp16" / "ema_0.9999_000004.pt"),
              "--classifier_path", str(work / "classifier" / "model000002.pt")]
    listed = [
        ("train fp16, --sample_interval", [*launch, script("image_train.py"), *data, *MODEL, *TRAIN,
                                           "--use_fp16", "True", "--max_steps", "2",
                                           "--sample_interval", "2", "--log_dir", str(work / "fp16")]),
        ("resume fp16", [*launch, script("image_train.py"), *data, *MODEL, *TRAIN, "--use_fp16", "True",
                         "--max_steps", "4", "--sample_interval", "2", "--log_dir", str(work / "fp16"),
                         "--resume_checkpoint", str(work / "fp16" / "model000002.pt")]),
        ("train bf16", [*launch, script("image_train.py"), *data, *MODEL, *TRAIN, "--use_bf16", "True",
                        "--max_steps", "2", "--log_dir", str(work / "bf16")]),
        ("train classifier", [*launch, script("classifier_train.py"), *data, *CLASSIFIER, *TRAIN,
                              "--iterations", "2", "--log_dir", str(work / "classifier")]),
        ("guided sampling, 25 DDIM steps", [
            *guided, "--use_ddim", "True", "--timestep_respacing", "ddim25",
            "--log_dir", str(work / "guided")]),
        ("guided sampling, dpmpp_2m 10 evaluations", [
            *guided, "--sampler", "dpmpp_2m", "--steps", "10", "--log_dir", str(work / "guided_fast")]),
        ("evaluator: reference batch", [sys.executable, str(REPO / "evaluations" / "make_reference.py"),
                       str(work / "images"), str(work / "reference.npz"), "--image_size", "16",
                       "--num_pr_images", "16", "--inception_path", inception,
                       "--device", args.device]),
        ("evaluator: scores", [sys.executable, str(REPO / "evaluations" / "evaluator.py"),
                       str(work / "reference.npz"), str(samples), "--inception_path", inception,
                       "--json", "--device", args.device]),
    ]
    if not args.skip_benchmark:
        benchmark = [sys.executable, script("benchmark.py"), "--device", args.device]
        listed.append(("benchmark", [*benchmark, *BENCHMARK, *args.benchmark_flags.split()]))
        for name, flags in SWITCHES.items():
            listed.append((f"switches: {name}",
                           [*benchmark, *SWITCH_RUN, *flags, *args.benchmark_flags.split()]))
    return listed


def run_step(name, command, env, log):
    """Run one step, appending its output to log; return (ok, seconds, stdout)."""
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}\n")
    return result.returncode == 0, time.perf_counter() - start, result.stdout


def benchmark_summary(stdout):
    """The benchmark's figures from its JSON line."""
    result = json.loads(stdout.strip().splitlines()[-1])
    lines = [f"benchmark on {result['device_name']} ({result['precision']}, batch "
             f"{result['batch_size']}):"]
    for name, path in result["paths"].items():
        lines.append(
            f"  {name:10s} train {path['train_images_per_s']:8.2f} img/s, sample "
            f"{path['sample_s_per_step']:.4f} s/step, guided {path['guided_s_per_step']:.4f} s/step, "
            f"peak train {path['peak_train_mb']} MB, train MFU {path['train_mfu']} "
            f"(peak {path['peak_tflops']} TFLOP/s {path['peak_kind']})"
        )
    lines.append(f"  speedup over exact: {json.dumps(result['speedup'])}")
    return lines


def switch_summary(stdout):
    """One line of a switch run's figures: its fast path's speeds."""
    fast = json.loads(stdout.strip().splitlines()[-1])["paths"]["fast"]
    return [f"  fast path: train {fast['train_images_per_s']:8.2f} img/s, sample "
            f"{fast['sample_s_per_step']:.4f} s/step, guided {fast['guided_s_per_step']:.4f} s/step"]


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.device == "cuda" and not th.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA device visible (use --device cpu for the CPU rehearsal)")
    processes = args.processes or max(1, th.cuda.device_count())
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    write_images(work / "images")
    if not args.inception_path:
        th.manual_seed(0)
        th.save(InceptionV3().state_dict(), work / "inception.pt")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("OPENAI_LOGDIR", None)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    summary, failed = [], False
    with open(work / "gpu_check.log", "w") as log:
        for name, command in steps(work, args, processes):
            ok, seconds, stdout = run_step(name, command, env, log)
            failed |= not ok
            summary.append(f"{'ok  ' if ok else 'FAIL'} {seconds:7.1f} s  {name}")
            if ok and name == "benchmark":
                summary.extend(benchmark_summary(stdout))
            elif ok and name.startswith("switches: "):
                summary.extend(switch_summary(stdout))
    print("\n".join(summary + [f"log: {work / 'gpu_check.log'}"]), flush=True)
    return 1 if failed else 0


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for the rehearsal")
    parser.add_argument("--processes", type=int, default=0, help="ranks (0: one per visible GPU)")
    parser.add_argument("--work_dir", default="", help="where to write (default: a new temp folder)")
    parser.add_argument("--inception_path", default="", help="real Inception weights (optional)")
    parser.add_argument("--skip_benchmark", action="store_true", help="leave out the benchmark")
    parser.add_argument("--benchmark_flags", default="", help="extra flags for benchmark.py")
    return parser


if __name__ == "__main__":
    sys.exit(main())
