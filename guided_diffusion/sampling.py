"""
Sampling: one call from a model to uint8 images, with classifier guidance,
classifier-free guidance or autoguidance (each optionally in a guidance interval),
seeded per-sample noise, chosen labels and the gathering of samples from several
processes in order.

Work is split into rounds across ranks as work_split.py describes.

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

import functools
import math

import numpy as np
import torch as th
from tqdm.auto import tqdm

from . import dist_util, logger
from .acceleration import accelerate
from .guidance import (
    GuidanceInterval, autoguided_model, check_classifier, check_classifier_free, check_guide,
    check_guide_scale, classifier_cond_fn, classifier_free_model,
)
from .image_grid import to_uint8_nhwc
from .sampling_labels import check_labels, choose_labels, resolve_num_classes
from .consistency import ConsistencyFunction, consistency_sample, consistency_sigma_range, consistency_sigmas
from .solver_schedule import ContinuousSchedule
from .solvers import SAMPLERS, check_sampler, evaluations, sampler_steps
from .unet import SuperResModel
from .work_split import PerSampleNoise, check_counts, check_seed, gather_in_order, rounds

DEFAULT_STEPS = 15  # a fast sampler's model evaluations per sample when steps is not given
CONSISTENCY = "consistency"  # the sampler of consistency students: one evaluation per step (default 1)


class SamplingRun:
    """
    One sampling run, set up and checked, optionally guided: over all processes when a
    process group with several ranks exists. Iterate rounds() for all the samples (every
    rank gets them), or new_rounds() for those sampled now; sample() collects them.

    With `partial` (which needs a seed), the samples it holds are not drawn again and
    rank 0 adds each new round to it, so an interrupted run continues where it
    stopped, with the same images as an uninterrupted one.

    Every batch goes through one sampling function with the signature of the diffusion's
    loops (p_sample_loop, ddim_sample_loop, sample_loop), chosen once (_sampling_function);
    it reports each step to one callback, which advances the progress bar and calls the
    user's `callback`.

    Attributes: num_samples, image_shape (H, W, C), labelled (whether the samples have
    labels: a class-conditional model or classifier guidance).
    """

    def __init__(
        self,
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
        guide=None,             # autoguidance: a weaker network of the same images (None: off)
        guide_scale=1.0,        # autoguidance weight (1: the model alone)
        guidance_interval=None,  # (sigma_lo, sigma_hi): guidance only at sigma in (lo, hi] (None: always)
        seed=None,              # per-sample seeded noise and labels (None: global RNG)
        low_res=None,           # super-resolution: uint8 NHWC images, one per sample
        device=None,            # default: the model's device
        progress=True,          # tqdm bar (on rank 0)
        num_classes=None,       # real classes (default: the model's or classifier's)
        class_balanced=False,   # exactly num_samples / num_classes labels per class
        use_bf16=False,         # bfloat16 autocast for the model and classifier (other numbers)
        compile=False,          # torch.compile them (eager if compilation fails)
        partial=None,           # a PartialSamples: continue from its finished samples, add each round
        sampler=None,           # a fast sampler of solvers.py (e.g. "dpmpp_2m"), "consistency" (a
                                # consistency student), or None (the DDPM / DDIM loops)
        steps=None,             # the sampler's model evaluations per sample (default DEFAULT_STEPS; consistency: 1)
        time_grid=None,         # the sampler's time grid (None: its default)
        dynamic_threshold=None,  # the sampler's dynamic thresholding percentile (e.g. 0.995)
        sampler_options=None,   # the sampler's own options, e.g. {"eta": 0.5} for "ddim"
        callback=None,          # called at every step: the loop's dict and "indices" (the batch's samples)
        editing=None,           # an editing method of editing.py (RePaint, SDEdit, ILVR, DPS), one sample
                                # per input, on the DDPM (or use_ddim) loop
    ):
        conditional = getattr(model, "num_classes", None) is not None
        self.labelled = conditional or classifier is not None
        num_classes = resolve_num_classes(model, classifier, num_classes, cfg_scale)
        low_res = None if low_res is None else _check_low_res(low_res)
        labels = _expand_labels(labels, num_samples)
        labels = check_labels(labels, self.labelled, num_classes)
        self.num_samples = _count_samples(num_samples, labels, low_res, editing)
        _check_guidance(classifier, classifier_scale, cfg_scale, class_balanced, self.labelled, labels)
        _check_autoguidance(guide, guide_scale, cfg_scale)
        guided = classifier is not None or cfg_scale is not None or guide is not None
        if guidance_interval is not None and not guided:
            raise ValueError(f"guidance_interval={guidance_interval} without guidance: it limits a "
                             "classifier's, cfg_scale's or a guide's guidance to some noise levels")
        if sampler == CONSISTENCY and guided:
            raise ValueError(f"sampler={CONSISTENCY} with a classifier or cfg_scale, or a guide: a "
                             "consistency student samples the guidance it was distilled with, on its own")
        check_counts(num_samples=self.num_samples, batch_size=batch_size)
        check_seed(seed)
        if partial is not None and seed is None:
            raise ValueError("partial samples need a seed: without one an interrupted run cannot be continued")
        shape = _sample_shape(model, low_res)
        self.image_shape = (shape[2], shape[3], shape[1])
        if labels is None and self.labelled:
            labels = choose_labels(self.num_samples, num_classes, class_balanced, seed)
        self._labels, self._num_classes, self._low_res = labels, num_classes, low_res
        self._sample_fn, self._steps_per_batch = _sampling_function(
            diffusion, sampler, steps, time_grid, dynamic_threshold, sampler_options, use_ddim
        )
        self._editing = editing
        if editing is not None:
            self._sample_fn, self._steps_per_batch = _editing_function(diffusion, editing, sampler,
                                                                       use_ddim, shape)
        device = next(model.parameters()).device if device is None else device
        interval = _guidance_interval(diffusion, guidance_interval)
        speed_ups = dict(compile=compile, use_bf16=use_bf16, device=device)
        self._build_networks(model, classifier, classifier_scale, cfg_scale, conditional, interval, speed_ups)
        if guide is not None:  # autoguidance of the model function (labels dropped or not)
            self._model_fn = autoguided_model(self._model_fn, accelerate(guide, **speed_ups), guide_scale,
                                              check_guide(model, guide, num_classes), interval)
        self._shape, self._batch_size, self._seed, self._device = shape, batch_size, seed, device
        self._clip_denoised, self._progress, self._callback = clip_denoised, progress, callback
        self.partial = partial
        self.finished = partial.finished() if partial is not None else 0

    def _build_networks(self, model, classifier, classifier_scale, cfg_scale, conditional, interval,
                        speed_ups):
        """
        Set the model function the loop calls (accelerated, with classifier-free guidance
        or without labels for an unconditional model) and the classifier guidance gradient,
        each guiding inside `interval` (a GuidanceInterval, or None: everywhere).
        """
        self._model_fn = _model_function(model, accelerate(model, **speed_ups), conditional,
                                         cfg_scale, self._num_classes, interval)
        self._cond_fn = None
        if classifier is not None:
            check_classifier(classifier, model.image_size, self._num_classes)
            self._cond_fn = classifier_cond_fn(accelerate(classifier, **speed_ups), classifier_scale,
                                               interval)

    def rounds(self):
        """
        :return: a generator of every round's (images, labels) in sample order: the partial
                 samples' finished rounds (read from disk) and then new_rounds().
        """
        if self.finished:
            yield from self.partial.rounds()
        yield from self.new_rounds()

    def new_rounds(self):
        """
        Sample the rounds not finished yet; a collective: every rank must iterate it to the end.

        :return: a generator of (images, labels) per round, gathered from all ranks in order:
                 a uint8 CPU tensor [n x H x W x C] and the int64 CPU labels [n], or None
                 without labels.
        """
        world_size, rank = dist_util.get_world_size(), dist_util.get_rank()
        if self.finished:
            logger.log(f"continuing after {self.finished} finished samples in {self.partial.folder}")
        plan = rounds(self.num_samples, self._batch_size, world_size, first=self.finished)
        steps = sum(len(work[rank]) > 0 for work in plan) * self._steps_per_batch
        with tqdm(total=steps, unit="step", desc="sampling", disable=not self._progress or rank > 0) as bar:
            for work in plan:
                images, labels = self._sample_round(work, work[rank], bar)
                if self.partial is not None and rank == 0:
                    self.partial.save(work[0].start, images, labels)
                logger.debug(f"created {work[-1].stop} samples")
                yield images, labels

    def _sample_round(self, work, indices, bar):
        """
        :return: one round's (images, labels), gathered from all ranks, checked to be finite.
        """
        model_kwargs = self._model_kwargs(indices)
        images = th.zeros((0, *self.image_shape), dtype=th.uint8, device=self._device)
        finite = th.ones(0, dtype=th.uint8, device=self._device)
        if len(indices):
            batch = self._sample_batch(indices, model_kwargs, bar)
            images = to_uint8_nhwc(batch)
            finite = th.isfinite(batch).flatten(1).all(1).to(th.uint8)
        _check_finite_samples(gather_in_order(finite, work, self._batch_size), work)
        images = gather_in_order(images, work, self._batch_size).cpu()
        if not self.labelled:
            return images, None
        return images, gather_in_order(model_kwargs["y"], work, self._batch_size).cpu()

    def _model_kwargs(self, indices):
        """
        The model keyword arguments of a batch: "y", the chosen labels or, when none
        were chosen, labels drawn now with th.randint on the global RNG (the
        original's draw, just before the batch's noise); "low_res" for super-resolution.
        """
        model_kwargs = {}
        if self.labelled:
            model_kwargs["y"] = (
                th.randint(0, self._num_classes, (len(indices),), device=self._device)
                if self._labels is None
                else self._labels[list(indices)].to(self._device)
            )
        if self._low_res is not None:
            model_kwargs["low_res"] = _to_model_range(self._low_res[list(indices)], self._device)
        return model_kwargs

    def _sample_batch(self, indices, model_kwargs, bar):
        """
        Run one batch through the sampling function, advancing the progress bar per step.

        :return: the float [N x C x H x W] samples.
        """
        def on_step(state):
            bar.update(1)
            if self._callback is not None:
                self._callback(dict(state, indices=indices))

        noise_fn = None if self._seed is None else PerSampleNoise(self._seed, indices)  # x_T, then each step
        inputs = {} if self._editing is None else {"indices": indices}  # the batch's inputs to edit
        return self._sample_fn(
            self._model_fn, (len(indices), *self._shape[1:]), clip_denoised=self._clip_denoised,
            cond_fn=self._cond_fn, model_kwargs=model_kwargs, device=self._device, noise_fn=noise_fn,
            callback=on_step, **inputs,
        )


def sample(model, diffusion, **options):
    """
    Sample images in one call, optionally guided; over all processes when a process
    group with several ranks exists (every rank gets all samples).

    :param model: the diffusion model.
    :param diffusion: its GaussianDiffusion (or SpacedDiffusion).
    :param options: SamplingRun's keyword arguments (classifier, labels, num_samples,
        batch_size, seed, partial, ...).
    :return: (images, labels): a uint8 numpy array [N x H x W x 3], and the int64
             labels [N] when the samples have labels (class-conditional model or
             classifier guidance), else None.
    """
    run = SamplingRun(model, diffusion, **options)
    images = np.empty((run.num_samples, *run.image_shape), dtype=np.uint8)
    labels = np.empty(run.num_samples, dtype=np.int64) if run.labelled else None
    start = 0
    for round_images, round_labels in run.rounds():
        images[start: start + len(round_images)] = round_images.numpy()
        if labels is not None:
            labels[start: start + len(round_images)] = round_labels.numpy()
        start += len(round_images)
    return images, labels


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


def _count_samples(num_samples, labels, low_res, editing=None):
    """
    :return: num_samples, defaulting to the number of labels, low-res images or inputs to
             edit, checked against them.
    """
    given = {name: len(values) for name, values in (("labels", labels), ("low_res", low_res),
                                                    ("editing inputs", editing))
             if values is not None}
    if num_samples is None:
        if not given:
            raise ValueError("num_samples is required (or labels / low_res, one per sample)")
        num_samples = next(iter(given.values()))
    for name, count in given.items():
        if count != num_samples:
            raise ValueError(f"{name} has {count} entries for num_samples={num_samples}")
    return num_samples


def _check_low_res(low_res):
    """
    :return: low_res as a uint8 numpy array [N x h x w x 3], checked (a GPU tensor is
        copied to the host).
    """
    low_res = np.asarray(low_res.detach().cpu() if isinstance(low_res, th.Tensor) else low_res)
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


def _model_function(model, run, conditional, cfg_scale, num_classes, interval):
    """
    The model as the sampling loop calls it (through `run`, the model or its
    accelerated form): with classifier-free guidance (inside `interval`), or dropping
    the labels (only the classifier uses them) for an unconditional model.
    """
    if cfg_scale is not None:
        null_label = check_classifier_free(model, cfg_scale, num_classes)
        return classifier_free_model(run, cfg_scale, null_label, interval)
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


def _expand_labels(labels, num_samples):
    """
    :return: labels, with one int label made one per sample.
    """
    if labels is None or np.ndim(labels) != 0:
        return labels
    if num_samples is None:
        raise ValueError(f"labels={labels}: one label for all samples needs num_samples")
    return [int(labels)] * num_samples


def _check_guidance(classifier, classifier_scale, cfg_scale, class_balanced, labelled, labels):
    """
    Check the guidance scales and the label choice they allow.
    """
    for name, scale in (("classifier_scale", classifier_scale), ("cfg_scale", cfg_scale)):
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"{name}={scale}: expected a finite number")
    if classifier is None and classifier_scale != 1.0:
        raise ValueError(
            f"classifier_scale={classifier_scale} without a classifier: classifier guidance needs "
            "a classifier (or use cfg_scale with a model trained for classifier-free guidance)"
        )
    if class_balanced and (not labelled or labels is not None):
        raise ValueError("class_balanced needs labels to choose: a class-conditional model or a "
                         "classifier, and no explicit labels")


def _guidance_interval(diffusion, guidance_interval):
    """
    :return: the GuidanceInterval of a (sigma_lo, sigma_hi) pair on the diffusion's
        schedule, or None for None (guidance everywhere).
    """
    if guidance_interval is None:
        return None
    if len(guidance_interval) != 2:
        raise ValueError(f"guidance_interval={guidance_interval}: expected a pair (sigma_lo, sigma_hi)")
    return GuidanceInterval(diffusion, *guidance_interval)


def _check_autoguidance(guide, guide_scale, cfg_scale):
    """
    Check the autoguidance weight, and that autoguidance comes alone or with a classifier.
    """
    check_guide_scale(guide_scale)
    if guide is None and guide_scale != 1.0:
        raise ValueError(f"guide_scale={guide_scale} without a guide: autoguidance needs the guide "
                         "network (a weaker model of the same images)")
    if guide is not None and cfg_scale is not None:
        raise ValueError(f"a guide (autoguidance, guide_scale={guide_scale}) and cfg_scale={cfg_scale}: "
                         "autoguidance and classifier-free guidance do not combine; choose one "
                         "(a classifier may guide on top of either)")


def _sampling_function(diffusion, sampler, steps, time_grid, dynamic_threshold, sampler_options,
                       use_ddim):
    """
    Choose the function that samples a batch: the diffusion's DDPM or DDIM loop, or its
    fast sampler (checked, its model evaluations per sample logged). Each takes
    (model, shape, clip_denoised=, cond_fn=, model_kwargs=, device=, noise_fn=, callback=).

    :return: (the function, the number of steps it reports to its callback per batch).
    """
    if sampler is None or sampler == CONSISTENCY:
        given = [f"{name}={value}" for name, value in (("steps", steps), ("time_grid", time_grid),
                 ("dynamic_threshold", dynamic_threshold), ("sampler_options", sampler_options))
                 if value is not None and (sampler is None or name != "steps")]
        if given:
            raise ValueError(f"{', '.join(given)} without a sampler: pass sampler= (one of "
                             f"{', '.join(SAMPLERS)})" if sampler is None else
                             f"{', '.join(given)}: not options of sampler={CONSISTENCY} (only steps)")
    if use_ddim and sampler is not None:
        raise ValueError(f"use_ddim=True and sampler={sampler}: choose one (sampler=ddim is DDIM "
                         "on the sampler's time grid)")
    if sampler is None:
        loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
        return loop, diffusion.num_timesteps
    if sampler == CONSISTENCY:
        steps = 1 if steps is None else steps
        logger.log(f"sampler {CONSISTENCY}: {steps} model evaluations per sample")
        return _consistency_sampling(diffusion, steps), steps
    steps = DEFAULT_STEPS if steps is None else steps
    options = dict(sampler_options or {})
    check_sampler(sampler, steps, time_grid, options)
    logger.log(f"sampler {sampler}: {evaluations(sampler, steps)} model evaluations per sample")
    function = functools.partial(diffusion.sample_loop, sampler=sampler, steps=steps,
                                 time_grid=time_grid, dynamic_threshold=dynamic_threshold, **options)
    return function, sampler_steps(sampler, steps)


def _editing_function(diffusion, editing, sampler, use_ddim, shape):
    """
    The sampling function of an editing method (editing.py) on the diffusion's DDPM or
    DDIM loop, checked against the model's sample shape, with its steps per batch.
    """
    if sampler is not None:
        raise ValueError(f"sampler={sampler} with an editing method: editing runs the DDPM loop "
                         "(or DDIM with use_ddim=True); leave sampler unset")
    editing.check_shape(shape[1:])
    function = functools.partial(editing.sample, diffusion, use_ddim=use_ddim)
    return function, editing.num_steps(diffusion.num_timesteps)


def _consistency_sampling(diffusion, steps):
    """
    Multistep consistency sampling of a consistency student (consistency.consistency_sample)
    on its diffusion's schedule, as a function with the signature of the diffusion's loops
    (cond_fn must be None: a student samples the guidance it was distilled with).

    :param diffusion: the student's diffusion (its teacher's schedule).
    :param steps: the model evaluations per sample (consistency.consistency_sigmas).
    """
    schedule = ContinuousSchedule(diffusion)
    sigma_min, sigma_max = consistency_sigma_range(schedule)
    sigmas = consistency_sigmas(sigma_min, sigma_max, steps)

    def sample_batch(model, shape, clip_denoised=True, cond_fn=None, model_kwargs=None, device=None,
                     noise_fn=None, callback=None):
        function = ConsistencyFunction(model, schedule, diffusion.model_mean_type, sigma_min,
                                       clip_denoised=clip_denoised)  # as the student was trained
        return consistency_sample(function, schedule, shape, sigmas, noise_fn=noise_fn,
                                  model_kwargs=model_kwargs, clip_denoised=clip_denoised,
                                  callback=callback, device=device)

    return sample_batch
