"""
Benchmark this library's fast path against the original implementation's execution
(the "exact" path) in one process, the paths interleaved, and print one JSON line.

Per path: training images/s (TrainLoop.run_step: forward, hybrid loss, backward,
optimizer step, EMA), sampling seconds per ancestral step, classifier-guided seconds
per step (medians of --repeats), the peak memory of a training and of a sampling step,
TFLOP/s and model FLOP utilisation (FLOPs counted analytically), and the time of its
first calls (compilation included). Also: the evaluator's Inception images/s, the
ratios to the exact path, and how far each path's numbers are from the exact path's
(same weights, batch, timesteps and noise).

The exact path reproduces the original's costs: einsum attention, attention blocks
recomputed in every backward (the original's AttentionBlock always checkpointed, the
classifier's gradient in guided sampling included), schedules converted at every step,
float32 (or the original fp16 path with --use_fp16 on CUDA), no compile, contiguous
weights. The fast path is what the scripts run with the same flags: fused attention,
attention recomputed in training unless --recompute_attention False, attention
activations kept in guided sampling (the sampling scripts' choice), schedules on the
device, channels_last (unless --channels_last False), --compile when asked.
--use_bf16 adds a third path, fast + bfloat16 autocast, which changes the numbers.

    python scripts/benchmark.py                                      # default config (CPU)
    python scripts/benchmark.py --config 256x256_diffusion --batch_size 1 --repeats 1
    python scripts/benchmark.py --device cuda --config 256x256_diffusion --batch_size 16 \\
        --use_bf16 True --compile True        # the preset's use_fp16 is the exact path's
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python scripts/benchmark.py`: import from the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch as th
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion import logger
from guided_diffusion.acceleration import (
    CompiledModel,
    accelerate,
    configure_runtime,
    set_cuda_math,
    set_fast_attention,
    training_acceleration_defaults,
)
from guided_diffusion.command_line import parse_args_with_config
from guided_diffusion.guidance import classifier_cond_fn
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import TrainLoop

# The architecture flags the result records.
MODEL_KEYS = (
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
    "num_heads", "num_head_channels", "resblock_updown", "use_scale_shift_norm", "learn_sigma",
    "class_cond", "use_fp16", "use_checkpoint", "classifier_width", "classifier_depth",
    "classifier_attention_resolutions",
)
# The default configuration (a small class-conditional ImageNet-32 model).
DEFAULT_MODEL = dict(
    image_size=32, num_channels=64, num_res_blocks=2, attention_resolutions="16,8",
    num_head_channels=32, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
    class_cond=True, classifier_width=64, classifier_attention_resolutions="16,8",
)
# Dense peaks (TFLOP/s, no sparsity) for model FLOP utilisation: 16-bit tensor cores, TF32
# tensor cores and plain float32, by device model. A name matches when all its words are
# words of torch.cuda.get_device_name; the most specific match wins ("H100 PCIe" before "H100").
PEAK_TFLOPS = {
    "H200 NVL": dict(bf16=835.5, tf32=417.5, fp32=60.0),
    "H200": dict(bf16=989.4, tf32=494.7, fp32=66.9),
    "H100 NVL": dict(bf16=835.5, tf32=417.5, fp32=60.0),
    "H100 PCIe": dict(bf16=756.5, tf32=378.0, fp32=51.2),
    "H100": dict(bf16=989.4, tf32=494.7, fp32=66.9),  # SXM
    "A100": dict(bf16=312.0, tf32=156.0, fp32=19.5),
    "L40S": dict(bf16=362.1, tf32=183.0, fp32=91.6),
    "A10": dict(bf16=125.0, tf32=62.5, fp32=31.2),
    "V100": dict(bf16=125.0, tf32=None, fp32=15.7),  # 16 bits: float16 only
}
PEAK_MEMORY_METHOD = {
    "cpu": "torch CPU allocations above those live at the step's start (profiler memory events)",
    "cuda": "torch.cuda.max_memory_allocated above memory_allocated at the step's start",
}


def main(argv=None):
    args = parse_args_with_config(create_argparser(), purpose="sample", argv=argv)
    for name in ("repeats", "train_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: expected a positive integer")
    if args.sample_steps < 2:
        raise ValueError(f"--sample_steps {args.sample_steps}: expected at least 2 (a respaced "
                         "diffusion needs two steps)")
    if args.threads > 0:
        th.set_num_threads(args.threads)
    device = th.device(args.device or ("cuda" if th.cuda.is_available() else "cpu"))
    set_cuda_math(tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    if device.type == "cpu":  # the original's fp16 path needs a GPU: compare in float32
        args.use_fp16 = args.classifier_use_fp16 = False
    # The training loop logs; its log goes to a folder removed at the end.
    with tempfile.TemporaryDirectory(prefix="benchmark-") as log_dir, \
            logger.scoped_configure(dir=log_dir, format_strs=["log"]):
        result = measure(args, device)
    print(json.dumps(result), flush=True)
    return result


def measure(args, device):
    """:return: the benchmark's result dict (printed by main as one JSON line)."""
    load_start = os.getloadavg()
    bench = Benchmark(args, device)
    result = dict(
        config=args.config or "default",
        model_flags={name: getattr(args, name) for name in MODEL_KEYS},
        batch_size=args.batch_size,
        precision="float16 (original fp16 path)" if args.use_fp16 else "float32",
        tf32=args.tf32,
        cudnn_benchmark=args.cudnn_benchmark,
        **machine(device),
        repeats=args.repeats,
        train_steps=args.train_steps,
        sample_steps=args.sample_steps,
        peak_memory_method=PEAK_MEMORY_METHOD[device.type],
        agreement=bench.agreement(),
        paths=bench.measure(),
        flops=bench.flops,
        evaluator_images_per_s=evaluator_images_per_s(args, device) if args.eval_images else None,
        load_average_start=[round(value, 2) for value in load_start],
        load_average_end=[round(value, 2) for value in os.getloadavg()],
    )
    result["speedup"] = speedups(result["paths"])
    return result


class Benchmark:
    """
    The networks, shared by the paths of one precision ("fp16": the original's float16
    path; "fp32": float32 weights, with or without bfloat16 autocast), whose switches
    are set for each path before it runs: every path sees the same weights, and paths
    are interleaved without holding a model per path.
    """

    def __init__(self, args, device):
        self.args, self.device = args, device
        th.manual_seed(args.seed)
        model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
        model, self.diffusion = create_model_and_diffusion(
            **dict(model_flags, timestep_respacing="")
        )
        _, self.sample_diffusion = create_model_and_diffusion(
            **dict(model_flags, timestep_respacing=str(args.sample_steps))
        )
        classifier = create_classifier(**args_to_dict(args, classifier_defaults().keys()))
        for network in (model, classifier):
            _randomize(network)  # no zero output layers: outputs and gradients to compare
        self.flops = count_flops(model_flags, args)
        fast = dict(fast_attention=True, train_recompute=args.recompute_attention,
                    sample_recompute=False, compile=args.compile,
                    channels_last=args.channels_last)
        exact = dict(fast_attention=False, train_recompute=True, sample_recompute=True)
        self.paths = {"exact": exact, "fast": fast}
        if args.use_bf16:
            self.paths["fast_bf16"] = dict(fast, use_bf16=True)
        keys = sorted({self._group_key(switches) for switches in self.paths.values()})
        networks = {key: (model, classifier) if index == 0 else copy.deepcopy((model, classifier))
                    for index, key in enumerate(keys)}  # copied before any fp16 conversion
        self.groups = {key: self._group(key, *networks[key]) for key in keys}
        self.runners = {}
        self.first_calls_s = {}  # the agreement's calls, the first of each path (compilation)
        self.batch = th.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        self.labels = th.randint(0, args.num_classes, (args.batch_size,), device=device)
        self.cond = {"y": self.labels} if args.class_cond else {}

    def _group_key(self, switches):
        return "fp16" if self.args.use_fp16 and not switches.get("use_bf16") else "fp32"

    def _group(self, key, model, classifier):
        model.to(self.device)
        classifier.to(self.device)
        if key == "fp16" and self.args.classifier_use_fp16:
            classifier.convert_to_fp16()
        if key == "fp32":  # built from the --use_fp16 flags: do not round inputs to fp16
            model.dtype = classifier.dtype = th.float32
        loop = TrainLoop(
            model=model, diffusion=self.diffusion, data=None, batch_size=self.args.batch_size,
            microbatch=-1, lr=1e-4, ema_rate="0.9999", log_interval=10**9, save_interval=10**9,
            resume_checkpoint="", use_fp16=key == "fp16",  # converts the model's torso
        )
        return dict(model=model, classifier=classifier, loop=loop)

    # ------------------------------------------------------------------ switches

    def use(self, name, training=True):
        """
        Set the switches of a path on its networks, for training or for sampling.

        :return: (its group, its runners: the training model callable and the sampling
            model and classifier callables).
        """
        switches = self.paths[name]
        group = self.groups[self._group_key(switches)]
        memory_format = th.channels_last if switches.get("channels_last") else th.contiguous_format
        recompute = switches["train_recompute" if training else "sample_recompute"]
        for network in (group["model"], group["classifier"]):
            network.to(memory_format=memory_format)
            configure_runtime(network, fast_attention=switches["fast_attention"],
                              recompute_attention=recompute)
        if name not in self.runners:
            compiled = [accelerate(group[key], compile=switches.get("compile", False))
                        for key in ("model", "classifier")]
            use_bf16 = switches.get("use_bf16", False)
            sampled = [accelerate(runner, use_bf16=use_bf16, device=self.device)
                       for runner in compiled]
            self.runners[name] = (compiled[0], *sampled)
        group["loop"].ddp_model = self.runners[name][0]
        group["loop"].mp_trainer.use_bf16 = switches.get("use_bf16", False)
        return group, self.runners[name]

    # ------------------------------------------------------------------ the measured steps

    def train_step(self, name):
        group, _ = self.use(name)
        group["model"].train()
        group["loop"].run_step(self.batch, self.cond)

    def sample_steps(self, name, guided, seed=0):
        """Run args.sample_steps ancestral steps from seeded noise; return the last sample."""
        group, (_, model_fn, classifier_fn) = self.use(name, training=False)
        group["model"].eval()
        if not self.args.class_cond:
            conditional_only = model_fn
            model_fn = lambda x, t, y=None, **kwargs: conditional_only(x, t, **kwargs)  # noqa: E731
        cond_fn = classifier_cond_fn(classifier_fn, self.args.classifier_scale) if guided else None
        th.manual_seed(seed)
        return self.sample_diffusion.p_sample_loop(
            model_fn, tuple(self.batch.shape), cond_fn=cond_fn, model_kwargs={"y": self.labels},
            device=self.device,
        ).float()

    # ------------------------------------------------------------------ results

    def agreement(self):
        """How far each path's numbers are from the exact path's, from the same state."""
        results = {}
        for name in self.paths:
            start = time.perf_counter()
            results[name] = dict(zip(("loss", "grads"), self._loss_and_gradient(name)),
                                 output=self._output(name), sample=self.sample_steps(name, False),
                                 guided=self.sample_steps(name, True))
            self._synchronize()
            self.first_calls_s[name] = round(time.perf_counter() - start, 3)
        exact = results.pop("exact")
        return {
            name: dict(
                model_output_rel=_max_relative(got["output"], exact["output"]),
                train_loss_rel=abs(got["loss"] - exact["loss"]) / abs(exact["loss"]),
                train_grad_rel=float((got["grads"] - exact["grads"]).norm()
                                     / exact["grads"].norm()),
                sample_rel=_max_relative(got["sample"], exact["sample"]),
                guided_rel=_max_relative(got["guided"], exact["guided"]),
            )
            for name, got in results.items()
        }

    def _output(self, name):
        """The sampling model's output on the batch at timesteps spread over the process."""
        group, (_, model_fn, _) = self.use(name, training=False)
        group["model"].eval()
        steps = self.diffusion.num_timesteps
        t = th.linspace(0, steps - 1, self.args.batch_size, device=self.device).long()
        with th.no_grad():
            return model_fn(self.batch, t, **self.cond).float()

    def _loss_and_gradient(self, name):
        """The hybrid loss of the batch at seeded timesteps and noise, and its gradient."""
        group, _ = self.use(name)
        group["model"].train()
        trainer = group["loop"].mp_trainer
        trainer.zero_grad()
        th.manual_seed(self.args.seed)
        t = th.randint(0, self.diffusion.num_timesteps, (self.args.batch_size,), device=self.device)
        with trainer.autocast():
            losses = self.diffusion.training_losses(
                group["loop"].ddp_model, self.batch, t, self.cond
            )
        loss = losses["loss"].mean()
        trainer.backward(loss)
        scale = 2.0**trainer.lg_loss_scale if trainer.use_fp16 else 1.0
        grads = [param.grad.float().flatten() / scale for param in trainer.model_params
                 if param.grad is not None]
        trainer.zero_grad()
        return loss.item(), th.cat(grads).cpu()

    def measure(self):
        """Time every path, interleaved (medians of args.repeats); then its peak memory."""
        args = self.args
        steps = {
            "train_step_s": (lambda name: [self.train_step(name) for _ in range(args.train_steps)],
                             args.train_steps),
            "sample_s_per_step": (lambda name: self.sample_steps(name, False), args.sample_steps),
            "guided_s_per_step": (lambda name: self.sample_steps(name, True), args.sample_steps),
        }
        paths = {name: {"switches": switches, "first_calls_s": self.first_calls_s.get(name)}
                 for name, switches in self.paths.items()}
        for name in self.paths:  # warm-up: compilation, allocator, caches
            warmup = sum(self._timed(run, name) for run, _ in steps.values())
            paths[name]["warmup_s"] = round(warmup, 3)
        times = {(name, key): [] for name in self.paths for key in steps}
        for _ in range(args.repeats):
            for key, (run, count) in steps.items():
                for name in self.paths:
                    times[name, key].append(self._timed(run, name) / count)
        for name, result in paths.items():
            for key in steps:
                result[key] = round(statistics.median(times[name, key]), 5)
            result["train_images_per_s"] = round(args.batch_size / result["train_step_s"], 3)
            result["peak_train_mb"] = self._peak_mb(lambda: self.train_step(name), name)
            result["peak_sample_mb"] = self._peak_mb(lambda: self.sample_steps(name, False), name)
            result["compiled"] = any(
                isinstance(runner, CompiledModel) and runner.compiled is not None
                for runner in self.runners[name]
            )
            kind = peak_kind(result["switches"], self._group_key(result["switches"]) == "fp16",
                             self.device)
            result.update(utilisation(self.flops, result, args, self.device, kind))
        return paths

    def _timed(self, run, name):
        self.use(name)  # switching (e.g. the memory format) is not timed
        self._synchronize()
        start = time.perf_counter()
        run(name)
        self._synchronize()
        return time.perf_counter() - start

    def _peak_mb(self, step, name):
        self.use(name)
        return peak_mb(step, self.device)

    def _synchronize(self):
        if self.device.type == "cuda":
            th.cuda.synchronize(self.device)


def _max_relative(value, reference):
    """max |value - reference| over max |reference|."""
    return float((value - reference).abs().max() / reference.abs().max())


def _randomize(network, scale=0.02, seed=1):
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for param in network.parameters():
            param.add_(th.randn(param.shape, generator=generator) * scale)


def peak_mb(step, device):
    """
    :return: the peak memory of a step in MiB, above what was allocated when it started
        (see PEAK_MEMORY_METHOD), or None where it cannot be measured.
    """
    if device.type == "cuda":
        th.cuda.synchronize(device)
        base = th.cuda.memory_allocated(device)
        th.cuda.reset_peak_memory_stats(device)
        step()
        th.cuda.synchronize(device)
        return round((th.cuda.max_memory_allocated(device) - base) / 2**20, 2)
    activities = [th.profiler.ProfilerActivity.CPU]
    with th.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    changes = sorted(
        (event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]"
    )
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return round(peak / 2**20, 2)


def count_flops(model_flags, args):
    """
    FLOPs per batch, counted analytically (torch.utils.flop_counter on meta tensors, the
    einsum attention, no recomputation): the model's forward and forward + backward, the
    classifier's forward and forward + input gradient (what guidance computes).
    """
    with th.device("meta"):
        model, _ = create_model_and_diffusion(
            **dict(model_flags, use_fp16=False, use_checkpoint=False)
        )
        classifier = create_classifier(**dict(args_to_dict(args, classifier_defaults().keys()),
                                              classifier_use_fp16=False))
        for network in (model, classifier):
            set_fast_attention(network, False)
        x = th.randn(args.batch_size, 3, args.image_size, args.image_size)
        t = th.zeros(args.batch_size, dtype=th.long)
        kwargs = {"y": th.zeros(args.batch_size, dtype=th.long)} if args.class_cond else {}
    with FlopCounterMode(display=False) as forward:
        out = model(x, t, **kwargs)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as classifier_forward:
        logits = classifier(x, t)
    with FlopCounterMode(display=False) as classifier_backward:
        th.autograd.grad(logits.sum(), x)
    return dict(
        model_forward=forward.get_total_flops(),
        model_forward_backward=forward.get_total_flops() + backward.get_total_flops(),
        classifier_forward=classifier_forward.get_total_flops(),
        classifier_forward_input_grad=classifier_forward.get_total_flops()
        + classifier_backward.get_total_flops(),
    )


def device_peaks(device_name):
    """
    :param device_name: e.g. "NVIDIA H100 PCIe".
    :return: the PEAK_TFLOPS entry of the most specific matching model, or None.
    """
    words = set(re.findall(r"[A-Za-z0-9]+", device_name.upper()))
    matches = [name for name in PEAK_TFLOPS if set(name.upper().split()) <= words]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def peak_kind(switches, use_fp16, device):
    """
    :return: the peak a path is measured against: "bf16" (16-bit tensor cores) for the
        fp16 and bf16 paths, "tf32" for float32 on CUDA when cuDNN may use TF32 (--tf32,
        for the convolutions, which dominate the UNet), else "fp32".
    """
    if switches.get("use_bf16") or use_fp16:
        return "bf16"
    return "tf32" if device.type == "cuda" and th.backends.cudnn.allow_tf32 else "fp32"


def utilisation(flops, result, args, device, kind):
    """Achieved TFLOP/s and model FLOP utilisation (with a known or given peak of `kind`)."""
    achieved = {
        "train_tflops": flops["model_forward_backward"] / result["train_step_s"] / 1e12,
        "sample_tflops": flops["model_forward"] / result["sample_s_per_step"] / 1e12,
        "guided_tflops": (flops["model_forward"] + flops["classifier_forward_input_grad"])
        / result["guided_s_per_step"] / 1e12,
    }
    peaks = device_peaks(th.cuda.get_device_name(device)) if device.type == "cuda" else None
    peak = args.peak_tflops or (peaks or {}).get(kind)
    out = {key: round(value, 4) for key, value in achieved.items()}
    out["peak_kind"], out["peak_tflops"] = kind, peak
    for key, value in achieved.items():
        out[key.replace("tflops", "mfu")] = round(value / peak, 4) if peak else None
    return out


def speedups(paths):
    """Ratios of each other path to the exact one (higher is better; memory: fast / exact)."""
    exact = paths["exact"]
    out = {}
    for name, result in paths.items():
        if name == "exact":
            continue
        out[name] = dict(
            train=round(result["train_images_per_s"] / exact["train_images_per_s"], 3),
            sample=round(exact["sample_s_per_step"] / result["sample_s_per_step"], 3),
            guided=round(exact["guided_s_per_step"] / result["guided_s_per_step"], 3),
            peak_train_memory=_ratio(result["peak_train_mb"], exact["peak_train_mb"]),
            peak_sample_memory=_ratio(result["peak_sample_mb"], exact["peak_sample_mb"]),
        )
    return out


def _ratio(value, reference):
    return round(value / reference, 3) if value is not None and reference else None


def evaluator_images_per_s(args, device):
    """Inception feature images/s of evaluations.Evaluator (random weights: same cost)."""
    from evaluations.evaluator import Evaluator
    from evaluations.inception import InceptionV3

    generator = th.Generator().manual_seed(0)
    state = {name: (th.ones_like(value) if name.endswith(".var") else
                    th.randn(value.shape, generator=generator) * 0.05)
             for name, value in InceptionV3().state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "inception-random.pt")
        th.save(state, path)
        evaluator = Evaluator(inception_path=path, device=device, batch_size=args.eval_batch_size)
    images = np.random.default_rng(0).integers(
        0, 256, (args.eval_images, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    batches = [images[start:start + args.eval_batch_size]
               for start in range(0, len(images), args.eval_batch_size)]
    evaluator.compute_activations(batches[:1])  # warm-up
    start = time.perf_counter()
    evaluator.compute_activations(batches)
    return round(len(images) / (time.perf_counter() - start), 3)


def machine(device):
    """The machine, for the record."""
    if device.type == "cuda":
        name = th.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            name = models[0] if models else name
    return dict(device=device.type, device_name=name, cpu_count=os.cpu_count(),
                threads=th.get_num_threads(), torch=th.__version__)


def create_argparser():
    defaults = dict(model_and_diffusion_defaults(), **classifier_defaults())
    defaults.update(DEFAULT_MODEL)
    defaults.update(training_acceleration_defaults())
    del defaults["fast_attention"]  # both attention paths are measured
    defaults.update(
        batch_size=16,
        device="",  # "" picks cuda when available, else cpu
        threads=0,  # torch threads (0: torch's default, one per core)
        repeats=5,  # timed repetitions per measurement; medians are reported
        train_steps=1,  # training steps per timed repetition
        sample_steps=3,  # sampling steps per timed repetition (at least 2)
        classifier_scale=1.0,
        eval_images=32,  # images for the evaluator's images/s (0: skip)
        eval_batch_size=16,
        peak_tflops=0.0,  # the device's peak for MFU (0: known GPUs only)
        seed=0,
    )
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
