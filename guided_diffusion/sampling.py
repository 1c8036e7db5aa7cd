"""
Sampling: one call from a model to uint8 images, with classifier guidance,
classifier-free guidance, seeded per-sample noise, label choice and the
gathering of samples from several processes in order.

Work is cut into rounds of `batch_size * world_size` consecutive sample indices;
in each round rank r takes indices [start + r * batch_size, start + (r + 1) *
batch_size), clipped to num_samples, so the last round may give some ranks a
partial or empty batch and no padding sample reaches the output.

Random draws:
- with `seed=None` (the original behaviour): per batch, th.randint for the labels
  (when labels are needed and not given), then the diffusion loop's own draws on
  the global RNG (th.randn for x_T, one th.randn_like per step);
- with a seed: sample i owns a torch.Generator seeded from (seed, i) that draws
  its x_T and then its noise at every step; the labels are drawn once for all
  samples from a generator seeded from (seed, "labels"). The images then depend
  only on the seed and the sample index, not on the batch size or the number of
  processes.
"""

import argparse
import io
import json
import math
import os
import shutil

import blobfile as bf
import numpy as np
import torch as th
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from . import dist_util, logger
from .acceleration import (
    accelerate,
    acceleration_defaults,
    set_attention_recompute,
    to_channels_last,
)
from .checkpoint import load_checkpoint
from .guidance import check_classifier, check_classifier_free, classifier_cond_fn, classifier_free_model
from .image_grid import save_image_grid, to_uint8_nhwc
from .script_util import add_dict_to_argparser, architecture_flags, args_to_dict, str2bool
from .training_state import atomic_write
from .unet import SuperResModel

# Streams of derived seeds: one per purpose, so no two purposes share draws
# (bpd.py's evaluation uses stream 2).
_NOISE_STREAM = 0
_LABEL_STREAM = 1
# Samples shown in the PNG grid next to the .npz.
GRID_SAMPLES = 64


def derived_seed(*words):
    """
    A 64-bit seed mixed from non-negative integers (numpy's SeedSequence), so that
    nearby inputs such as (seed, 0) and (seed, 1) give unrelated streams.

    :param words: non-negative integers, e.g. (seed, stream, sample_index).
    :return: an integer in [0, 2**64).
    """
    high, low = np.random.SeedSequence([int(word) for word in words]).generate_state(2, np.uint32)
    return (int(high) << 32) | int(low)


class PerSampleNoise:
    """
    Gaussian noise drawn per sample: sample i of the batch draws from its own CPU
    generator seeded from (seed, indices[i]), first x_T, then one draw per step.
    Call it as the `noise_fn` of the sampling loops.

    :param seed: the run's seed, a non-negative integer.
    :param indices: the global sample indices of the batch, in batch order.
    :param stream: which family of generators to use (sampling, or another
                   purpose such as bpd.py's).
    """

    def __init__(self, seed, indices, stream=_NOISE_STREAM):
        self.generators = [
            th.Generator().manual_seed(derived_seed(seed, stream, index)) for index in indices
        ]

    def draw(self, shape, device):
        """
        :param shape: the batch shape (N, C, H, W), N = len(indices).
        :param device: where to put the noise.
        :return: a float32 [N x C x H x W] tensor, row i from generator i.
        """
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for shape {tuple(shape)} but {len(self.generators)} generators")
        rows = [th.randn(tuple(shape[1:]), generator=generator) for generator in self.generators]
        return th.stack(rows).to(device)

    def __call__(self, x):
        return self.draw(x.shape, x.device).to(x.dtype)


def balanced_labels(num_samples, num_classes, generator):
    """
    Labels with every class floor(num_samples / num_classes) times; the remaining
    num_samples % num_classes labels go to classes spread evenly over the range
    (class k * num_classes // remainder for k = 0 .. remainder - 1); then shuffled.

    :param num_samples: how many labels.
    :param num_classes: classes 0 .. num_classes - 1.
    :param generator: the torch.Generator of the shuffle.
    :return: an int64 tensor of num_samples labels.
    """
    per_class, remainder = divmod(num_samples, num_classes)
    counts = th.full((num_classes,), per_class, dtype=th.int64)
    counts[[k * num_classes // remainder for k in range(remainder)]] += 1
    ordered = th.repeat_interleave(th.arange(num_classes), counts)
    return ordered[th.randperm(num_samples, generator=generator)]


def choose_labels(num_samples, num_classes, class_balanced=False, seed=None):
    """
    The labels of a run decided before sampling, or None when they are drawn per
    batch from the global RNG (no seed, not balanced: the original behaviour).

    :param num_samples: how many samples.
    :param num_classes: the number of classes.
    :param class_balanced: exact counts per class (see balanced_labels); the
                           shuffle uses the seed, or 0 without one, so that
                           every process computes the same labels.
    :param seed: None, or the run's seed (uniformly random labels).
    :return: an int64 tensor of num_samples labels, or None.
    """
    generator = th.Generator().manual_seed(derived_seed(seed or 0, _LABEL_STREAM))
    if class_balanced:
        return balanced_labels(num_samples, num_classes, generator)
    if seed is None:
        return None
    return th.randint(0, num_classes, (num_samples,), generator=generator)


def rounds(num_samples, batch_size, world_size, first=0):
    """
    Split sample indices first .. num_samples - 1 into rounds of work.

    :return: a list of rounds, each a list with one range of sample indices per rank.
    """
    def clip(index):
        return min(index, num_samples)

    per_round = batch_size * world_size
    return [
        [
            range(clip(start + rank * batch_size), clip(start + (rank + 1) * batch_size))
            for rank in range(world_size)
        ]
        for start in range(first, num_samples, per_round)
    ]


def gather_in_order(local, ranges, batch_size):
    """
    Collect one round's results from every rank, in rank order, without padding.

    A collective when several processes run: every rank must call it each round.

    :param local: this rank's [n x ...] tensor (n may be 0), on its device.
    :param ranges: the round's index ranges, one per rank (see rounds()).
    :param batch_size: the largest n of any rank.
    :return: the [sum of n x ...] tensor of all ranks' rows, on local's device.
    """
    if dist_util.get_world_size() == 1:
        return local
    padded = local.new_zeros((batch_size, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [th.zeros_like(padded) for _ in ranges]
    dist.all_gather(parts, padded)
    return th.cat([part[: len(indices)] for part, indices in zip(parts, ranges)])


def check_counts(**counts):
    """
    Raise ValueError unless every count is a positive integer.

    :param counts: names (as flags, e.g. num_samples) to values.
    """
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"--{name} {value}: expected a positive integer")


def sample(
    model,
    diffusion,
    classifier=None,        # noised-image classifier for classifier guidance (ADM-G)
    classifier_scale=1.0,   # classifier guidance scale
    labels=None,            # target labels, one per sample (an int: all the same)
    num_samples=None,       # default: len(labels) or len(low_res)
    batch_size=16,          # samples per forward pass on each process
    use_ddim=False,         # DDIM (eta = 0) instead of ancestral sampling
    clip_denoised=True,     # clamp x_0 predictions to [-1, 1]
    cfg_scale=None,         # classifier-free guidance weight (None: off)
    seed=None,              # per-sample seeded noise and labels (None: global RNG)
    low_res=None,           # super-resolution: uint8 NHWC images, one per sample
    device=None,            # default: the model's device
    progress=True,          # tqdm bar (on rank 0)
    num_classes=None,       # real classes (default: the model's or classifier's)
    class_balanced=False,   # exactly num_samples / num_classes labels per class
    use_bf16=False,         # bfloat16 autocast for the model and classifier (other numbers)
    compile=False,          # torch.compile them (eager if compilation fails)
    partial=None,           # a PartialSamples: continue from its finished samples, add each round
):
    """
    Sample images in one call, optionally guided; over all processes when a
    process group with several ranks exists (every rank gets all samples).

    With `partial` (which needs a seed), the samples it holds are not drawn again and
    rank 0 adds each finished round to it, so an interrupted call continues where it
    stopped, with the same images as an uninterrupted one.

    :return: (images, labels): a uint8 numpy array [N x H x W x 3], and the int64
             labels [N] when the samples have labels (class-conditional model or
             classifier guidance), else None.
    """
    if device is None:
        device = next(model.parameters()).device
    conditional = getattr(model, "num_classes", None) is not None
    uses_labels = conditional or classifier is not None
    num_classes = _resolve_num_classes(model, classifier, num_classes, cfg_scale)
    if labels is not None and np.ndim(labels) == 0:
        if num_samples is None:
            raise ValueError(f"labels={labels}: one label for all samples needs num_samples")
        labels = [int(labels)] * num_samples
    labels = _check_labels(labels, uses_labels, num_classes)
    low_res = None if low_res is None else _check_low_res(low_res)
    num_samples = _count_samples(num_samples, labels, low_res)
    check_counts(num_samples=num_samples, batch_size=batch_size)
    check_seed(seed)
    shape = _sample_shape(model, low_res)
    for name, scale in (("classifier_scale", classifier_scale), ("cfg_scale", cfg_scale)):
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"{name}={scale}: expected a finite number")
    if classifier is None and classifier_scale != 1.0:
        raise ValueError(
            f"classifier_scale={classifier_scale} without a classifier: classifier guidance needs "
            "--classifier_path (or use --cfg_scale with a model trained for classifier-free guidance)"
        )
    if class_balanced and (not uses_labels or labels is not None):
        raise ValueError("class_balanced needs labels to choose: a class-conditional model or a "
                         "classifier, and no explicit labels")
    if labels is None and uses_labels:
        labels = choose_labels(num_samples, num_classes, class_balanced, seed)
    if partial is not None and seed is None:
        raise ValueError("partial samples need a seed: without one an interrupted run cannot be continued")
    all_images, all_labels = partial.load() if partial is not None else ([], [])

    speed_ups = dict(compile=compile, use_bf16=use_bf16, device=device)
    run = accelerate(model, **speed_ups)
    model_fn = _model_function(model, run, conditional, cfg_scale, num_classes)
    cond_fn = None
    if classifier is not None:
        check_classifier(classifier, shape[-1], num_classes)
        cond_fn = classifier_cond_fn(accelerate(classifier, **speed_ups), classifier_scale)

    world_size, rank = dist_util.get_world_size(), dist_util.get_rank()
    finished = sum(len(part) for part in all_images)
    if finished:
        logger.log(f"continuing after {finished} finished samples in {partial.folder}")
    plan = rounds(num_samples, batch_size, world_size, first=finished)
    steps = sum(len(work[rank]) > 0 for work in plan) * diffusion.num_timesteps
    with tqdm(total=steps, unit="step", desc="sampling", disable=not progress or rank > 0) as bar:
        for work in plan:
            indices = work[rank]
            model_kwargs = _batch_kwargs(indices, uses_labels, labels, num_classes, low_res, device)
            images = th.zeros((0, shape[2], shape[3], shape[1]), dtype=th.uint8, device=device)
            finite = th.ones(0, dtype=th.uint8, device=device)
            if len(indices):
                batch = _sample_batch(
                    diffusion, model_fn, cond_fn, (len(indices), *shape[1:]), model_kwargs,
                    indices, seed, use_ddim, clip_denoised, device, bar,
                )
                images = to_uint8_nhwc(batch)
                finite = th.isfinite(batch).flatten(1).all(1).to(th.uint8)
            _check_finite_samples(gather_in_order(finite, work, batch_size), work)
            all_images.append(gather_in_order(images, work, batch_size).cpu())
            if uses_labels:
                all_labels.append(gather_in_order(model_kwargs["y"], work, batch_size).cpu())
            if partial is not None and rank == 0:
                partial.save(work[0].start, all_images[-1], all_labels[-1] if uses_labels else None)
            logger.debug(f"created {sum(len(part) for part in all_images)} samples")
    return th.cat(all_images).numpy(), (th.cat(all_labels).numpy() if uses_labels else None)


def _check_finite_samples(finite, work):
    """
    Raise a ValueError on every rank alike when a round produced NaN or inf samples
    (they would be written as black images).

    :param finite: the round's [n] flags (1: every value of the sample is finite), gathered
        from all ranks in order.
    :param work: the round's index ranges, one per rank.
    """
    bad = [index for index, ok in zip((i for part in work for i in part), finite.tolist()) if not ok]
    if bad:
        raise ValueError(
            f"samples {bad[:8]} hold NaN or inf values. Likely causes: non-finite model or "
            "classifier outputs (a diverged checkpoint), too large a classifier_scale or "
            "cfg_scale, or float16 overflow (try use_fp16=False or use_bf16=True)"
        )


class PartialSamples:
    """
    The finished rounds of a seeded sampling run, kept on disk so that a rerun with the
    same flags continues where it stopped: a folder with `record.json` (the run's
    flags) and one `NNNNNNNNN.npz` per round (arr_0 images, arr_1 labels if any),
    named by its first sample index, each written atomically.

    :param folder: the folder (e.g. partial_samples in the log directory).
    :param record: a JSON-serialisable dict of the flags that decide the images.
    """

    def __init__(self, folder, record):
        self.folder = folder
        self.record = record

    def load(self):
        """
        :return: (images, labels): lists of uint8 and int64 tensors of the finished rounds
                 in order (labels empty without labels); empty lists when there are none.
        """
        record_path = bf.join(self.folder, "record.json")
        if not bf.exists(record_path):
            return [], []
        with bf.BlobFile(record_path, "r") as f:
            recorded = json.load(f)
        differing = sorted(k for k in set(recorded) | set(self.record) if recorded.get(k) != self.record.get(k))
        if differing:
            details = "; ".join(f"{k}: partial {recorded.get(k)!r}, now {self.record.get(k)!r}" for k in differing)
            raise ValueError(
                f"{self.folder} holds the finished samples of a run with other flags ({details}); "
                "rerun with the same flags to continue it, or delete the folder to start afresh"
            )
        images, labels = [], []
        for name in sorted(n for n in bf.listdir(self.folder) if n.endswith(".npz")):
            if int(name[: -len(".npz")]) != sum(len(part) for part in images):
                break  # rounds are saved in order; anything after a gap is not used
            with bf.BlobFile(bf.join(self.folder, name), "rb") as f, np.load(f) as arrays:
                images.append(th.from_numpy(arrays["arr_0"]))
                if "arr_1" in arrays.files:
                    labels.append(th.from_numpy(arrays["arr_1"]))
        return images, labels

    def save(self, start, images, labels):
        """
        Add one finished round.

        :param start: the round's first sample index.
        :param images: its uint8 [n x H x W x 3] tensor.
        :param labels: its int64 [n] tensor, or None.
        """
        record_path = bf.join(self.folder, "record.json")
        if not bf.exists(record_path):
            bf.makedirs(self.folder)
            text = json.dumps(self.record, sort_keys=True).encode("utf-8")
            atomic_write(record_path, lambda f: f.write(text))
        arrays = [images.numpy()] + ([] if labels is None else [labels.numpy()])
        write_npz(bf.join(self.folder, f"{start:09d}.npz"), *arrays)

    def remove(self):
        """Delete the folder (once the final samples are written)."""
        if bf.exists(self.folder):
            bf.rmtree(self.folder)


def _batch_kwargs(indices, uses_labels, labels, num_classes, low_res, device):
    """
    The model keyword arguments of a batch: "y", the chosen labels or, when none
    were chosen, labels drawn now with th.randint on the global RNG (the
    original's draw, just before the batch's noise); "low_res" for super-resolution.
    """
    model_kwargs = {}
    if uses_labels:
        model_kwargs["y"] = (
            th.randint(0, num_classes, (len(indices),), device=device)
            if labels is None
            else labels[list(indices)].to(device)
        )
    if low_res is not None:
        model_kwargs["low_res"] = _to_model_range(low_res[list(indices)], device)
    return model_kwargs


def _count_samples(num_samples, labels, low_res):
    """
    :return: num_samples, defaulting to the number of labels or low-res images,
             checked against them.
    """
    given = {name: len(values) for name, values in (("labels", labels), ("low_res", low_res))
             if values is not None}
    if num_samples is None:
        if not given:
            raise ValueError("num_samples is required (or labels / low_res, one per sample)")
        num_samples = next(iter(given.values()))
    for name, count in given.items():
        if count != num_samples:
            raise ValueError(f"{name} has {count} entries for num_samples={num_samples}")
    return num_samples


def _resolve_num_classes(model, classifier, num_classes, cfg_scale):
    """
    The number of real classes: given, else the model's embedding rows (less the
    null row under classifier-free guidance), else the classifier's outputs.
    """
    if num_classes is not None:
        check_counts(num_classes=num_classes)
        return num_classes
    rows = getattr(model, "num_classes", None)
    if rows is not None:
        return rows - 1 if cfg_scale is not None else rows
    if classifier is not None:
        return classifier.out_channels
    return None


def _check_labels(labels, uses_labels, num_classes):
    """
    :return: labels as an int64 CPU tensor (or None), checked against num_classes.
    """
    if labels is None:
        return None
    if not uses_labels:
        raise ValueError("labels were given but the model is unconditional and there is no classifier")
    labels = th.as_tensor(np.asarray(labels)).long().reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels range from {int(labels.min())} to {int(labels.max())}: expected class ids in "
            f"[0, {num_classes - 1}]"
        )
    return labels


def _check_low_res(low_res):
    """
    :return: low_res as a uint8 numpy array [N x h x w x 3], checked.
    """
    low_res = np.asarray(low_res)
    if low_res.dtype != np.uint8 or low_res.ndim != 4 or low_res.shape[-1] != 3:
        raise ValueError(
            f"low_res of shape {low_res.shape} and dtype {low_res.dtype}: expected uint8 images "
            "[N x h x w x 3] (as in a samples_*.npz)"
        )
    return low_res


def _sample_shape(model, low_res):
    """
    :return: the shape (1, C, H, W) of one sample of the model.
    """
    super_res = isinstance(model, SuperResModel)
    if super_res != (low_res is not None):
        raise ValueError(
            "a super-resolution model needs low_res images" if super_res
            else "low_res was given but the model is not a super-resolution model"
        )
    channels = model.in_channels // 2 if super_res else model.in_channels
    return (1, channels, model.image_size, model.image_size)


def _model_function(model, run, conditional, cfg_scale, num_classes):
    """
    The model as the sampling loop calls it (through `run`, the model or its
    accelerated form): with classifier-free guidance, or dropping the labels (only
    the classifier uses them) for an unconditional model.
    """
    if cfg_scale is not None:
        null_label = check_classifier_free(model, cfg_scale, num_classes)
        return classifier_free_model(run, cfg_scale, null_label)
    if conditional:
        return run

    def unconditional_model(x, t, y=None, **kwargs):
        return run(x, t, **kwargs)

    return unconditional_model


def _to_model_range(images_uint8, device):
    """
    :return: uint8 NHWC images as a float32 NCHW tensor in [-1, 1] on device.
    """
    batch = th.from_numpy(np.ascontiguousarray(images_uint8)).float() / 127.5 - 1.0
    return batch.permute(0, 3, 1, 2).to(device)


def _sample_batch(
    diffusion, model_fn, cond_fn, shape, model_kwargs, indices, seed, use_ddim, clip_denoised,
    device, bar,
):
    """
    Run one batch through the sampling loop, advancing the progress bar per step.

    :return: the float [N x C x H x W] samples.
    """
    loop = diffusion.ddim_sample_loop_progressive if use_ddim else diffusion.p_sample_loop_progressive
    options = dict(
        clip_denoised=clip_denoised, cond_fn=cond_fn, model_kwargs=model_kwargs, device=device,
        progress=False,
    )
    if seed is not None:
        options["noise_fn"] = PerSampleNoise(seed, indices)  # draws x_T first, then each step
    for out in loop(model_fn, shape, **options):
        bar.update(1)
    return out["sample"]


def load_for_sampling(
    model, path, flags, flag_name="--model_path", use_fp16=False, device=None, channels_last=False
):
    """
    Load a checkpoint strictly into a model (a mismatch raises checkpoint.load_checkpoint's
    report), move it to a device, convert it to float16 and channels_last if asked, and
    set eval mode. Its attention blocks keep their activations instead of recomputing
    them (a classifier's gradient is faster; sampling stores no activations for long).

    :param model: the model built from the flags.
    :param path: the checkpoint file; "" is refused with a hint.
    :param flags: the flags the model was built from (its architecture flags are
        compared with the checkpoint's record).
    :param flag_name: the command-line flag that named the path, for messages.
    :param use_fp16: call model.convert_to_fp16().
    :param device: where to put the model (default: dist_util.dev()).
    :param channels_last: store its weights in channels_last order.
    :return: the model.
    """
    if not path:
        raise ValueError(
            f"{flag_name} is empty: pass the checkpoint file (e.g. {flag_name} models/"
            "256x256_diffusion.pt), or --config NAME, whose preset sets it"
        )
    load_checkpoint(model, path, flags=architecture_flags(flags))
    model.to(dist_util.dev() if device is None else device)
    if use_fp16:
        model.convert_to_fp16()
    if channels_last:
        to_channels_last(model)
    set_attention_recompute(model, False)
    model.eval()
    return model


def load_model_and_diffusion(args, factory, defaults):
    """
    Build a model and its diffusion from flags, then load --model_path into it
    (load_for_sampling, with --use_fp16 and --channels_last).

    :param args: the parsed flags.
    :param factory: e.g. script_util.create_model_and_diffusion.
    :param defaults: the factory's flag defaults; the flags of these names build the model.
    :return: (model, diffusion).
    """
    flags = args_to_dict(args, defaults.keys())
    model, diffusion = factory(**flags)
    load_for_sampling(
        model, args.model_path, flags, use_fp16=args.use_fp16, channels_last=args.channels_last
    )
    return model, diffusion


def read_base_samples(path, small_size, class_cond):
    """
    Read the low-resolution images (and labels) that super-resolution starts
    from: a .npz whose arr_0 is uint8 [N x small_size x small_size x 3] and,
    for a class-conditional model, arr_1 the N integer labels.

    :param path: the .npz path or blobfile URL.
    :param small_size: the side the model expects.
    :param class_cond: whether labels are needed.
    :return: (images, labels or None) as numpy arrays.
    """
    if not path:
        raise ValueError("--base_samples is empty: pass a samples_NxHxWx3.npz of low-resolution images")
    if not bf.exists(path):
        raise FileNotFoundError(f"--base_samples {path!r} does not exist")
    with bf.BlobFile(path, "rb") as f:
        data = f.read()
    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        contents = {name: arrays[name] for name in arrays.files}
    except (ValueError, OSError, AttributeError) as error:
        raise ValueError(f"--base_samples {path!r} is not a readable .npz file ({error})") from None
    if "arr_0" not in contents:
        raise ValueError(
            f"--base_samples {path!r} has arrays {sorted(contents)}; expected arr_0 (images)"
        )
    images = contents["arr_0"]
    expected = (small_size, small_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected or not len(images):
        raise ValueError(
            f"--base_samples {path!r}: arr_0 has shape {images.shape} and dtype {images.dtype}; "
            f"expected uint8 [N x {small_size} x {small_size} x 3] with N > 0 "
            f"(--small_size {small_size})"
        )
    if not class_cond:
        return images, None
    labels = contents.get("arr_1")
    if labels is None or labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        found = "no arr_1" if labels is None else f"arr_1 of shape {labels.shape}, dtype {labels.dtype}"
        raise ValueError(
            f"--base_samples {path!r}: a class-conditional model needs arr_1 with {len(images)} "
            f"integer labels, found {found}"
        )
    return images, labels


def samples_name(images):
    """
    :param images: the [N x H x W x C] samples.
    :return: the original's file stem, e.g. "samples_100x256x256x3".
    """
    return "samples_" + "x".join(str(side) for side in images.shape)


def save_samples(images, labels, out_dir, save_png=False):
    """
    Write samples as the evaluator reads them: `samples_NxHxWx3.npz` with arr_0
    the uint8 images and arr_1 the labels (when there are labels), atomically;
    next to it `samples_NxHxWx3.png`, a grid of the first GRID_SAMPLES, and with
    save_png every sample as `samples_NxHxWx3/NNNNNN.png`.

    :param images: uint8 numpy array [N x H x W x 3].
    :param labels: int numpy array [N], or None.
    :param out_dir: the folder (local or blobfile URL).
    :param save_png: also write one PNG per sample.
    :return: the .npz path.
    """
    stem = bf.join(out_dir, samples_name(images))
    write_npz(stem + ".npz", *([images] if labels is None else [images, labels]))
    save_grid(images[:GRID_SAMPLES], stem + ".png")
    if save_png:
        _write_png_folder(images, stem)
    return stem + ".npz"


def _write_png_folder(images, folder):
    """
    Write one PNG per image into a local folder as a whole: into `folder.partial` first
    (removing one an interrupted run left), renamed to `folder` once complete, so that a
    folder of that name always holds every sample. Blob-store URLs are written in place.

    :param images: uint8 numpy array [N x H x W x 3].
    :param folder: the destination folder, replaced if it exists.
    """
    local = "://" not in folder
    target = folder + ".partial" if local else folder
    if local and os.path.isdir(target):
        shutil.rmtree(target)
    bf.makedirs(target)
    for index, image in enumerate(images):
        _write_png(image, bf.join(target, f"{index:06d}.png"))
    if local:
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(target, folder)


def write_npz(path, *arrays):
    """
    Write arrays as arr_0, arr_1, ... of an .npz file, atomically.

    :param path: the file's path or blobfile URL.
    :param arrays: numpy arrays.
    """
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def save_grid(images, path):
    """
    Write images as one square-ish PNG grid.

    :param images: uint8 numpy array [N x H x W x 3].
    :param path: the PNG's path.
    """
    save_image_grid(images, path, nrow=math.ceil(math.sqrt(len(images))))


def _write_png(image, path):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def sampling_defaults():
    """
    :return: the flag defaults image_sample.py, classifier_sample.py and
        super_res_sample.py share (the original's).
    """
    return dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="")


def sampling_argparser(doc, defaults, guidance=True, images=True):
    """
    The flags of a sampling script: one per entry of `defaults`, then add_sampling_flags.

    :param doc: the script's docstring; its first line describes the script.
    :param defaults: the script's flag defaults.
    :param guidance: add --cfg_scale and --class_balanced.
    :param images: add --save_png.
    :return: an argparse.ArgumentParser.
    """
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_sampling_flags(parser, guidance=guidance, images=images)
    return parser


def add_sampling_flags(parser, guidance=True, images=True):
    """
    Add the flags this project adds to the original sampling scripts: --seed,
    --log_dir, the speed-ups (acceleration_defaults) and those below.

    :param parser: an argparse.ArgumentParser.
    :param guidance: add --cfg_scale and --class_balanced.
    :param images: add --save_png.
    """
    parser.add_argument("--seed", type=int, default=None,
                        help="same seed, same images whatever the batch size and process count")
    parser.add_argument("--log_dir", default="", help="output folder (default: $OPENAI_LOGDIR)")
    add_dict_to_argparser(parser, acceleration_defaults())
    if images:
        parser.add_argument("--save_png", type=str2bool, nargs="?", const=True, default=False,
                            help="also write every sample as a PNG")
    if guidance:
        parser.add_argument("--cfg_scale", type=float, default=None,
                            help="classifier-free guidance weight (needs --class_dropout_prob > 0)")
        parser.add_argument("--class_balanced", type=str2bool, nargs="?", const=True, default=False,
                            help="exactly num_samples / num_classes samples per class")


def start_sampling(args):
    """
    Check --num_samples, --batch_size, --seed and the precision flags, then set up the
    processes and the log directory (--log_dir).

    :param args: the parsed flags.
    """
    check_counts(num_samples=args.num_samples, batch_size=args.batch_size)
    check_seed(args.seed)
    if args.use_fp16 and args.use_bf16:
        raise ValueError("--use_fp16 and --use_bf16 are exclusive: choose one precision")
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None, comm=logger.TorchDistComm())


def partial_samples(args):
    """
    Where a seeded run keeps its finished rounds: `partial_samples/` in the log directory,
    recording every flag but --log_dir and --save_png, and the number of processes.
    Without --seed, warn that an interrupted run cannot be continued.

    :param args: the parsed flags (after start_sampling).
    :return: a PartialSamples, or None without --seed.
    """
    if args.seed is None:
        logger.warn("no --seed: an interrupted run cannot be continued (with --seed S a rerun "
                    "with the same flags continues from the finished samples)")
        return None
    record = {name: value for name, value in vars(args).items() if name not in ("log_dir", "save_png")}
    record["world_size"] = dist_util.get_world_size()
    return PartialSamples(bf.join(logger.get_dir(), "partial_samples"), record)


def finish_sampling(images, labels, save_png=False, partial=None):
    """
    Save the samples from rank 0 (see save_samples) and remove the partial samples,
    then wait for every process.

    :param images: uint8 numpy array [N x H x W x 3].
    :param labels: int numpy array [N], or None.
    :param save_png: also write one PNG per sample.
    :param partial: the run's PartialSamples, or None.
    """
    if dist_util.get_rank() == 0:
        path = save_samples(images, labels, logger.get_dir(), save_png=save_png)
        logger.log(f"saved {len(images)} samples to {path}")
        if partial is not None:
            partial.remove()
    dist.barrier()
    logger.log("sampling complete")


def check_seed(seed):
    """
    Raise ValueError unless seed is None or a non-negative integer.
    """
    if seed is not None and seed < 0:
        raise ValueError(f"--seed {seed}: expected a non-negative integer")
