"""
The quickstart job: ADM end to end on a CPU in minutes. A small class-conditional
diffusion model and a small noised-image classifier are trained on real images, sampled
with classifier guidance at several scales and judged by a classifier unrelated to the
guidance: the fidelity-diversity trade-off of "Diffusion Models Beat GANs" (Dhariwal &
Nichol 2021, section 4) at small scale.

The default data are the 1,797 8x8 handwritten digits that ship inside scikit-learn
(nothing is downloaded), written as a labelled image folder that follows the library's
real path: load_data -> TrainLoop / ClassifierTrainLoop -> checkpoints -> sampling.sample
-> the evaluator's precision and recall (evaluations.manifold).

Outputs under out_dir: data/train and data/heldout (the digits as CLASS_INDEX.png);
diffusion/ and classifier/ (logs, progress.csv, checkpoints); samples/scale_S.npz (arr_0
uint8 NHWC samples, arr_1 requested labels) and samples/scale_S.png (one row per class);
results.md and results.csv; tradeoff.png (the plot); quickstart.png (grids and plot).
report.py writes everything from samples/ on.

The judge (judge.py) is a scikit-learn MLP fitted on the real training images
area-downsampled; precision and recall compare each scale's samples with the held-out
real images in its hidden-layer features.

Randomness: every stage draws from generators seeded by `seed`: the digits' split, each
network's initialisation and training (set_seed, load_data's seed), the samples
(sample(seed=...): sample i starts from the same x_T at every scale) and the judge.
"""

import contextlib
import math
import time

import blobfile as bf
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoint import load_for_inference
from guided_diffusion.classifier_train_util import ClassifierTrainLoop
from guided_diffusion.consistency_train_util import ConsistencyTrainLoop
from guided_diffusion.image_datasets import (
    center_crop_arr,
    class_labels,
    list_image_files,
    load_data,
    read_image,
)
from guided_diffusion.sampling import sample
from guided_diffusion.script_util import (
    architecture_flags,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    create_classifier,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import TrainLoop
from guided_diffusion.training_state import ema_filename, model_filename
from guided_diffusion.work_split import set_seed

from . import distill_stage, editing_stage, unlabeled_stage
from .judge import Judge, score_images
from .sampler_study import (
    check_study, judge_score, model_diffusion, run_sampler_study, write_study,
)
from .report import (
    describe_trends,
    png_bytes,
    results_markdown,
    results_table,
    write_bytes,
    write_pictures,
    write_results_csv,
)

# Pixel values of scikit-learn's digits run from 0 to this.
DIGITS_MAX_VALUE = 16
# Steps between rows of the training logs (progress.csv) and between validation batches.
LOG_INTERVAL = 50


def quickstart_defaults():
    """
    :return: the job's options and their defaults (the flags of scripts/quickstart.py).
    """
    return dict(
        out_dir="runs/quickstart",      # every output goes here
        data_dir="",                    # labelled training images ("": scikit-learn's digits)
        heldout_dir="",                 # labelled real images kept out of training ("": with
                                        # data_dir, the training images themselves)
        class_from="prefix",            # labels from the file-name prefix or the sub-folder
        heldout_per_class=30,           # digits of each class held out (the digits only)
        image_size=8,                   # side of the training images and samples
        num_channels=32,                # UNet base width
        num_res_blocks=1,               # UNet residual blocks per resolution
        attention_resolutions="",       # feature-map sides with self-attention ("": none)
        diffusion_steps=1000,           # T of the training diffusion
        noise_schedule="cosine",        # "linear" or "cosine"
        train_steps=3000,               # diffusion training steps
        batch_size=64,                  # training images per step (both networks)
        lr=5e-4,                        # diffusion learning rate, decayed linearly to 0
        ema_rate=0.995,                 # EMA of the diffusion weights that is sampled
        classifier_width=32,            # classifier base width
        classifier_depth=1,             # classifier residual blocks per resolution
        classifier_steps=400,           # classifier training steps (on noised images)
        classifier_lr=1e-3,             # classifier learning rate, decayed linearly to 0
        classifier_scales="0,1,3,10",   # guidance scales to sample and compare
        sample_steps=25,                # DDIM steps per sample
        sampler_study="quick",          # quality per model evaluation of the fast samplers:
                                        # "quick" (3 samplers, 10 and 25), "full" (all, 5-50), "none"
        samples_per_class=30,           # samples of each class at each scale
        sample_batch_size=100,          # samples per forward pass
        judge_size=8,                   # side the judge sees images at
        judge_hidden=64,                # judge MLP hidden units (the feature dimension)
        grid_columns=10,                # samples per class shown in the grids
        distill=False,                  # consistency-distil the model at scale 0 and the middle
                                        # scale and judge the student (distill_stage.py)
        distill_steps=1500,             # distillation training steps per scale
        distill_num_scales=18,          # noise levels of the distillation's grid
        distill_batch_size=64,          # distillation training images per step
        distill_lr=1e-4,                # distillation learning rate, decayed linearly to 0
        unlabeled=False,                # run the stage without labels (unlabeled_stage.py)
        unlabeled_steps=0,              # its diffusion training steps (0: train_steps)
        unlabeled_clusters=10,          # k-means pseudo-classes K
        unlabeled_features="pixels",    # "unet", "pixels" or "auto" (the purer against the true labels)
        unlabeled_guide_at=0.4,         # the guide: the EMA at this fraction of the steps
        unlabeled_guide_scales="1.5,2,3",  # autoguidance weights w
        unlabeled_scales="1,3,6",       # classifier scales, self-labelled and true-label
        unlabeled_interval="0.3,5",     # guidance interval in sigma, LO,HI
        **editing_stage.editing_defaults(),  # the editing stage's options (editing_stage.py)
        seed=0,                         # seed of every random draw
    )


def parse_scales(text):
    """
    :param text: comma-separated non-negative guidance scales, e.g. "0,1,3,10".
    :return: the scales as floats, in the given order.
    """
    try:
        scales = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        scales = []
    if not scales or any(scale < 0 or not math.isfinite(scale) for scale in scales):
        raise ValueError(f'--classifier_scales "{text}": expected comma-separated non-negative '
                         'numbers, e.g. "0,1,3,10"')
    if len(set(scales)) != len(scales):
        raise ValueError(f'--classifier_scales "{text}": a scale is repeated')
    return scales


# ---------------------------------------------------------------------- data


def load_digits_arrays():
    """
    :return: (uint8 images [1797 x 8 x 8], int64 labels [1797]): scikit-learn's digits,
        dark ink on white.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError('the quickstart needs scikit-learn: pip install -e ".[quickstart]"') from None
    digits = load_digits()
    pixels = np.rint(255 - digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    return pixels, digits.target.astype(np.int64)


def split_per_class(labels, heldout_per_class, seed):
    """
    Hold out the same number of random images of every class.

    :param labels: int labels [N].
    :return: (training indices, held-out indices), each sorted.
    """
    rng = np.random.default_rng(seed)
    heldout = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if not 0 < heldout_per_class < len(members):
            raise ValueError(f"--heldout_per_class {heldout_per_class}: class {label} has "
                             f"{len(members)} images; expected 1 to {len(members) - 1}")
        heldout.extend(rng.permutation(members)[:heldout_per_class])
    heldout = np.sort(np.asarray(heldout))
    return np.setdiff1d(np.arange(len(labels)), heldout), heldout


def write_labelled_folder(images, labels, indices, folder):
    """
    Write images[i] as folder/LABEL_INDEX.png (load_data's file-name-prefix labels) for i
    in indices, after removing the PNGs a previous run left there.
    """
    bf.makedirs(folder)
    for name in bf.listdir(folder):
        if name.endswith(".png"):
            bf.remove(bf.join(folder, name))
    for index in indices:
        path = bf.join(folder, f"{labels[index]}_{index:04d}.png")
        write_bytes(path, png_bytes(Image.fromarray(images[index])))


def write_digit_folders(train_dir, heldout_dir, heldout_per_class, seed):
    """
    Write scikit-learn's digits as two labelled image folders.

    :return: (number of training images, number of held-out images).
    """
    images, labels = load_digits_arrays()
    train, heldout = split_per_class(labels, heldout_per_class, seed)
    write_labelled_folder(images, labels, train, train_dir)
    write_labelled_folder(images, labels, heldout, heldout_dir)
    return len(train), len(heldout)


def read_labelled_images(data_dir, image_size, class_from, class_names=None):
    """
    Read a labelled image folder, each image cut as load_data's center crop cuts it.

    :param class_from: "prefix" or "folder", as load_data.
    :param class_names: the training classes the labels must index (None: this folder's).
    :return: (uint8 images [N x S x S x 3], int64 labels [N], class names).
    """
    entries = list_image_files(data_dir)
    labels, names = class_labels(entries, class_from, data_dir=data_dir)
    if class_names is not None:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise ValueError(f"{data_dir} has classes {unknown[:5]} that the training images do not have")
        labels, names = [class_names.index(names[label]) for label in labels], list(class_names)
    images = np.stack([center_crop_arr(read_image(path), image_size) for path, _ in entries])
    return images, np.asarray(labels, dtype=np.int64), names


def balanced_subset(labels, per_class, seed):
    """
    :return: sorted indices of up to per_class random images of every class.
    """
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------- training


class _StepProgress:
    """Mixin for the training loops: advance a tqdm bar after every step, showing a logged value."""

    progress_bar = None
    progress_key = "loss"

    def run_step(self, batch, cond):
        super().run_step(batch, cond)
        if self.progress_bar is not None:
            value = logger.getkvs().get(self.progress_key)
            if value is not None:
                self.progress_bar.set_postfix({self.progress_key: f"{float(value):.4f}"}, refresh=False)
            self.progress_bar.update(1)


class _DiffusionTraining(_StepProgress, TrainLoop):
    """TrainLoop with a progress bar."""


class _ClassifierTraining(_StepProgress, ClassifierTrainLoop):
    """ClassifierTrainLoop with a progress bar."""

    progress_key = "train_acc@1"


class _Distillation(_StepProgress, ConsistencyTrainLoop):
    """ConsistencyTrainLoop with a progress bar."""


def _loader(data_dir, batch_size, image_size, class_from, num_classes, seed, class_names=None,
            class_cond=True, labels_file=None):
    """
    load_data for the quickstart: labelled (unless class_cond is False), unflipped (digits do not
    mirror), in-process; class_names numbers the labels by another loader's classes (validation).
    """
    return load_data(
        data_dir=data_dir, batch_size=batch_size, image_size=image_size, class_cond=class_cond,
        random_flip=False, class_from=class_from, num_classes=num_classes, seed=seed,
        num_workers=0, class_names=class_names, labels_file=labels_file,
    )


def _run_with_progress(loop, steps, name, progress):
    """Run a training loop of `steps` steps under a tqdm bar."""
    with tqdm(total=steps, desc=name, unit="step", disable=not progress) as bar:
        loop.progress_bar = bar
        loop.run_loop()


def train_diffusion(model_flags, data_dir, steps, batch_size, lr, ema_rate, class_from, seed,
                    progress=True, save_interval=None):
    """
    Train a diffusion model with TrainLoop (labels only when class-conditional), the
    learning rate decaying linearly to 0; checkpoints go to logger.get_dir().

    :param model_flags: create_model_and_diffusion's flags.
    :param save_interval: save every this many steps too (None: the last step only).
    :return: the path of the last EMA checkpoint.
    """
    set_seed(seed)
    model, diffusion = create_model_and_diffusion(**model_flags)
    model.to(dist_util.dev())
    data = _loader(data_dir, batch_size, model_flags["image_size"], class_from,
                   model_flags["num_classes"], seed, class_cond=model_flags["class_cond"])
    loop = _DiffusionTraining(
        model=model, diffusion=diffusion, data=data, batch_size=batch_size, microbatch=-1, lr=lr,
        ema_rate=ema_rate, log_interval=LOG_INTERVAL, save_interval=save_interval or steps,
        resume_checkpoint="", class_names=data.class_names,
        lr_anneal_steps=steps, max_steps=steps, seed=seed, flags=model_flags,
        overwrite_log_dir=True,  # a rerun of the quickstart replaces its own outputs
    )
    _run_with_progress(loop, steps, "diffusion", progress)
    return bf.join(logger.get_dir(), ema_filename(ema_rate, steps))


def train_classifier(classifier_flags, data_dir, heldout_dir, steps, batch_size, lr, class_from,
                     seed, progress=True, labels_file=None):
    """
    Train a noised-image classifier with ClassifierTrainLoop (validated on held-out
    images unless labels_file gives the classes), the learning rate decaying linearly
    to 0; the last step's checkpoint goes to logger.get_dir().

    :param classifier_flags: create_classifier_and_diffusion's flags.
    :return: the path of the checkpoint.
    """
    set_seed(seed)
    classifier, diffusion = create_classifier_and_diffusion(**classifier_flags)
    classifier.to(dist_util.dev())
    image_size, num_classes = classifier_flags["image_size"], classifier_flags["num_classes"]
    data = _loader(data_dir, batch_size, image_size, class_from, num_classes, seed, labels_file=labels_file)
    val_batch = min(batch_size, len(list_image_files(heldout_dir)))
    val_data = None if labels_file else _loader(heldout_dir, val_batch, image_size, class_from, num_classes,
                                                seed, class_names=data.class_names)
    loop = _ClassifierTraining(
        model=classifier, diffusion=diffusion, data=data, val_data=val_data, noised=True,
        iterations=steps, anneal_lr=True, eval_interval=LOG_INTERVAL, batch_size=batch_size,
        microbatch=-1, lr=lr, log_interval=LOG_INTERVAL, save_interval=steps, resume_checkpoint="",
        seed=seed, flags=classifier_flags, overwrite_log_dir=True, class_names=data.class_names,
    )
    _run_with_progress(loop, steps, "classifier", progress)
    return bf.join(logger.get_dir(), model_filename(steps))


# ---------------------------------------------------------------------- sampling


def sample_scales(model, diffusion, classifier, scales, labels, batch_size, seed, progress=True):
    """
    DDIM samples guided by the classifier at each scale; sample i starts from the same
    x_T at every scale. Scale 0 runs without the classifier (its gradient would be zeroed).

    :param labels: the requested class of each sample.
    :return: a dict from scale to uint8 images [N x H x W x 3].
    """
    samples = {}
    for scale in scales:
        logger.log(f"sampling {len(labels)} images at classifier scale {scale:g}...")
        guidance = dict(classifier=classifier, classifier_scale=scale) if scale else {}
        samples[scale], _ = sample(model, diffusion, labels=labels, batch_size=batch_size,
                                   use_ddim=True, seed=seed, progress=progress, **guidance)
    return samples


# ---------------------------------------------------------------------- the job


def _check_options(options):
    """
    :return: the defaults updated with options, checked.
    """
    merged = quickstart_defaults()
    unknown = sorted(set(options) - set(merged))
    if unknown:
        raise ValueError(f"unknown quickstart options {unknown}; expected some of {sorted(merged)}")
    merged.update(options)
    check_study(merged["sampler_study"])
    distill_stage.check_distill_options(merged)
    unlabeled_stage.check_unlabeled_options(merged)
    editing_stage.check_editing_options(merged)
    if merged["heldout_dir"] and not merged["data_dir"]:
        raise ValueError("--heldout_dir needs --data_dir (the digits bring their own held-out images)")
    for name in ("train_steps", "classifier_steps", "sample_steps", "samples_per_class",
                 "batch_size", "sample_batch_size", "grid_columns", "judge_size", "judge_hidden"):
        if merged[name] < 1:
            raise ValueError(f"--{name} {merged[name]}: expected a positive integer")
    return merged


def _network_flags(options, num_classes):
    """
    :return: (create_model_and_diffusion's flags, create_classifier_and_diffusion's flags)
        of the job's two networks.
    """
    shared = dict(image_size=options["image_size"], num_classes=num_classes,
                  diffusion_steps=options["diffusion_steps"], noise_schedule=options["noise_schedule"])
    model_flags = dict(model_and_diffusion_defaults(), class_cond=True, **shared)
    model_flags.update({name: options[name] for name in
                        ("num_channels", "num_res_blocks", "attention_resolutions")})
    classifier_flags = dict(classifier_and_diffusion_defaults(), classifier_attention_resolutions="",
                            classifier_width=options["classifier_width"],
                            classifier_depth=options["classifier_depth"], **shared)
    return model_flags, classifier_flags


@contextlib.contextmanager
def _logging_to(stage_dir, out_dir):
    """
    Log to stage_dir inside the block (log.txt, progress.csv: the training loops' records;
    their checkpoints go there too), then to stdout and out_dir/log.txt again.
    """
    logger.configure(dir=stage_dir, format_strs=["log", "csv"])
    try:
        yield
    finally:
        logger.configure(dir=out_dir, format_strs=["stdout", "log"])


@contextlib.contextmanager
def _timed(seconds, name):
    """Record the wall time of the with-block as seconds[name]."""
    begin = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - begin


def _prepare_data(options):
    """
    :return: (training folder, held-out folder): the digits written under out_dir/data,
        or the user's folders (the training one doubling as held-out if none is given).
    """
    out_dir, train_dir, heldout_dir = options["out_dir"], options["data_dir"], options["heldout_dir"]
    if not train_dir:
        train_dir, heldout_dir = bf.join(out_dir, "data", "train"), bf.join(out_dir, "data", "heldout")
        counts = write_digit_folders(train_dir, heldout_dir, options["heldout_per_class"], options["seed"])
        logger.log(f"wrote scikit-learn's digits: {counts[0]} training and {counts[1]} held-out "
                   f"images under {bf.join(out_dir, 'data')}")
    elif not heldout_dir:
        logger.warn("no --heldout_dir: precision and recall compare the samples with the training "
                    "images themselves")
        heldout_dir = train_dir
    return train_dir, heldout_dir


def _load_sampling_models(model_flags, model_path, classifier_flags, classifier_path, sample_steps):
    """
    :return: (model, its DDIM diffusion of sample_steps steps, classifier) from the checkpoints.
    """
    sampling_flags = dict(model_flags, timestep_respacing=f"ddim{sample_steps}")
    model, diffusion = create_model_and_diffusion(**sampling_flags)
    load_for_inference(model, model_path, flags=architecture_flags(sampling_flags),
                       device=dist_util.dev())
    classifier_only = {name: classifier_flags[name] for name in classifier_defaults()}
    classifier = load_for_inference(create_classifier(**classifier_only), classifier_path,
                                    flags=architecture_flags(classifier_only),
                                    device=dist_util.dev())
    return model, diffusion, classifier


def _sampler_study(options, model_flags, model, classifier, scales, labels, judge, real_features):
    """
    Run the sampler study (sampler_study.py) on the full diffusion, without guidance and
    at the middle classifier scale.

    :return: its result rows.
    """
    diffusion = model_diffusion(model_flags)
    middle = scales[len(scales) // 2]
    score = judge_score(judge, real_features, labels, score_images)
    return run_sampler_study(model, diffusion, classifier, sorted({0.0, middle}), labels,
                             options["sample_batch_size"], options["seed"], score,
                             options["sampler_study"])


def _distill(options, model_flags, model, classifier, scales, labels, samples, judge, real_features,
             train_dir, num_classes, progress):
    """
    Run the distillation stage (distill_stage.py) at scale 0 and the middle classifier
    scale, each training in its own log folder.

    :return: (its result rows, its sample sets).
    """
    out_dir, middle = options["out_dir"], scales[len(scales) // 2]

    def train(scale, **loop_kwargs):
        with _logging_to(distill_stage.stage_dir(out_dir, scale), out_dir):
            loop = _Distillation(log_interval=LOG_INTERVAL, **loop_kwargs)
            _run_with_progress(loop, options["distill_steps"], f"distil {scale:g}", progress)

    def make_data():
        return _loader(train_dir, options["distill_batch_size"], options["image_size"],
                       options["class_from"], num_classes, options["seed"])

    reusable = options["sample_steps"] == distill_stage.BASELINE_STEPS  # the main table's DDIM loop
    return distill_stage.run_distill_stage(
        model, model_flags, classifier, sorted({0.0, middle}), labels, make_data, train,
        judge_score(judge, real_features, labels, score_images), options,
        samples if reusable else None)


def _unlabeled(options, model_flags, classifier_flags, classifier, train_dir, heldout_dir, train_images,
               train_labels, judge, real_features, progress):
    """:return: the rows of the stage without labels (train_labels serve its report only)."""
    out_dir, stage = options["out_dir"], unlabeled_stage.stage_dir(options["out_dir"])
    steps = options["unlabeled_steps"] or options["train_steps"]
    common = (options["batch_size"], options["class_from"], options["seed"], progress)

    guide_step = unlabeled_stage.guide_step(steps, options["unlabeled_guide_at"])

    def train_model(flags):
        with _logging_to(bf.join(stage, "diffusion"), out_dir):
            return train_diffusion(flags, train_dir, steps, common[0], options["lr"], options["ema_rate"],
                                   *common[1:], save_interval=guide_step)

    def train_pseudo_classifier(flags, labels_file):
        with _logging_to(bf.join(stage, "classifier"), out_dir):
            return train_classifier(flags, train_dir, heldout_dir, options["classifier_steps"], common[0],
                                    options["classifier_lr"], *common[1:], labels_file=labels_file)

    return unlabeled_stage.run_unlabeled_stage(
        model_flags, classifier_flags, classifier, train_dir, train_images, train_labels, train_model,
        train_pseudo_classifier, lambda labels: judge_score(judge, real_features, labels, score_images), options)


def run_quickstart(progress=True, **options):
    """
    Run the whole job (see the module docstring). It configures `logger`: stdout and
    out_dir/log.txt, the training stages their own folders.

    :param progress: show tqdm progress bars.
    :param options: quickstart_defaults() names to change.
    :return: the result dicts, one per scale in increasing order: 'classifier_scale',
        'recognised', 'precision', 'recall'.
    """
    options = _check_options(options)
    scales = sorted(parse_scales(options["classifier_scales"]))
    out_dir, seed, class_from = options["out_dir"], options["seed"], options["class_from"]
    start, seconds = time.perf_counter(), {}
    logger.configure(dir=out_dir, format_strs=["stdout", "log"])

    with _timed(seconds, "data"):
        train_dir, heldout_dir = _prepare_data(options)
        train_images, train_labels, names = read_labelled_images(train_dir, options["image_size"], class_from)
        heldout_images, heldout_labels, _ = read_labelled_images(
            heldout_dir, options["image_size"], class_from, names)
    model_flags, classifier_flags = _network_flags(options, len(names))
    with _timed(seconds, "diffusion training"):
        logger.log(f"training the diffusion model for {options['train_steps']} steps...")
        with _logging_to(bf.join(out_dir, "diffusion"), out_dir):
            model_path = train_diffusion(
                model_flags, train_dir, options["train_steps"], options["batch_size"], options["lr"],
                options["ema_rate"], class_from, seed, progress)
    with _timed(seconds, "classifier training"):
        logger.log(f"training the noised classifier for {options['classifier_steps']} steps...")
        with _logging_to(bf.join(out_dir, "classifier"), out_dir):
            classifier_path = train_classifier(
                classifier_flags, train_dir, heldout_dir, options["classifier_steps"],
                options["batch_size"], options["classifier_lr"], class_from, seed, progress)
    with _timed(seconds, "sampling"):
        model, diffusion, classifier = _load_sampling_models(
            model_flags, model_path, classifier_flags, classifier_path, options["sample_steps"])
        labels = np.repeat(np.arange(len(names)), options["samples_per_class"])
        samples = sample_scales(model, diffusion, classifier, scales, labels,
                                options["sample_batch_size"], seed, progress)

    with _timed(seconds, "evaluation"):
        judge = Judge(options["judge_size"], options["judge_hidden"], seed).fit(train_images, train_labels)
        real_features = judge.features(heldout_images)
        rows = [dict(classifier_scale=scale, **score_images(judge, real_features, samples[scale], labels))
                for scale in scales]
        reference = balanced_subset(train_labels, options["samples_per_class"], seed)
        real = score_images(judge, real_features, train_images[reference], train_labels[reference])
        judge_line = (
            f"Judge: an MLP ({options['judge_hidden']} hidden units) on {options['judge_size']}x"
            f"{options['judge_size']} downsampled images, fitted on the training images; "
            f"{np.mean(judge.predict(heldout_images) == heldout_labels):.3f} accuracy on the held-out "
            f"images. Real training images (the same number per class as the samples) against the "
            f"held-out ones: precision {real['precision']:.3f}, recall {real['recall']:.3f}."
        )
    study_rows = []
    if options["sampler_study"] != "none":
        with _timed(seconds, "sampler study"):
            study_rows = _sampler_study(options, model_flags, model, classifier, scales, labels,
                                        judge, real_features)
        write_study(out_dir, study_rows, seconds["sampler study"])
    if options["distill"]:
        with _timed(seconds, "distillation"):
            distill_rows, distill_sets = _distill(options, model_flags, model, classifier, scales, labels,
                                                  samples, judge, real_features, train_dir, len(names), progress)
        distill_stage.write_distill(out_dir, distill_rows, distill_sets, labels, len(names),
                                    min(options["grid_columns"], options["samples_per_class"]),
                                    max(1, 32 // options["image_size"]), options, seconds["distillation"])
    if options["unlabeled"]:
        with _timed(seconds, "unlabeled stage"):
            _unlabeled(options, model_flags, classifier_flags, classifier, train_dir, heldout_dir, train_images,
                       train_labels, judge, real_features, progress)
    if options["editing"]:
        with _timed(seconds, "editing"):
            editing_rows, editing_examples = editing_stage.run_editing_stage(
                model, model_flags, classifier, scales[len(scales) // 2], heldout_images, heldout_labels,
                judge, options, progress)
        editing_stage.write_editing(out_dir, editing_rows, editing_examples, options, seconds["editing"])
    with _timed(seconds, "report"):
        columns = min(options["grid_columns"], options["samples_per_class"])
        write_pictures(out_dir, rows, samples, labels, len(names), columns,
                       zoom=max(1, 32 // options["image_size"]))
        write_results_csv(rows, bf.join(out_dir, "results.csv"))

    times = ", ".join([f"{name} {value:.0f} s" for name, value in seconds.items()]
                      + [f"total {time.perf_counter() - start:.0f} s"])
    report = results_markdown(options, (len(train_images), len(heldout_images)), len(names), model,
                     classifier, judge_line, rows, times)
    write_bytes(bf.join(out_dir, "results.md"), report.encode("utf-8"))
    logger.log(results_table(rows) + "\n" + describe_trends(rows))
    logger.log(f"wall time: {times}; outputs in {out_dir} (results.md, quickstart.png"
               + (", samplers.md)" if study_rows else ")"))
    return rows
