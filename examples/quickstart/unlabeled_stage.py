"""
The quickstart's stage without labels (--unlabeled True): guidance for a model that
never saw a class. An unconditional diffusion model of the quickstart's architecture is
trained on the training images; its EMA at the fraction unlabeled_guide_at of the
steps (a checkpoint of the same run) is its autoguidance guide (Karras et al. 2024).
k-means on its own UNet features or on raw pixels makes K pseudo-classes (clustering.py),
written as a labels file, and a noised classifier is trained on them through
load_data(labels_file=...).
Samples at DDIM-25 and dpmpp_2m-10 from one seed: unguided, autoguided, self-labelled
classifier guidance, both with a guidance interval in sigma, and, for reference, the
main pipeline's true-label classifier at the same scales. They are judged as the main
table is (Frechet distance in the judge's features, precision, recall) and by
agreement: the judge's class against the class asked for (a pseudo-class standing for
its majority true class).

The true labels serve reporting only: purity and NMI of the clusters, the pseudo-class
to true-class map of agreement, and, with unlabeled_features "auto", the choice of the
purer feature set (the one place a label informs the stage; "unet" or "pixels" avoid it).

Outputs under out_dir: unlabeled/diffusion and unlabeled/classifier (logs, checkpoints),
unlabeled/clusters.csv (the labels file), unlabeled.csv, unlabeled.md (tables and the
goals), unlabeled_samples/SAMPLER_GUIDANCE.npz (arr_0 uint8 NHWC, arr_1 the classes
asked for, if any) and unlabeled.png.
"""

import csv
import io
import math
import time

import blobfile as bf
import numpy as np
import torch as th
from PIL import Image

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoint import load_for_inference
from guided_diffusion.clustering import (
    kmeans_labels, middle_block_features, normalized_mutual_information, purity,
)
from guided_diffusion.file_writing import write_npz
from guided_diffusion.guidance import check_guide_scale, check_interval
from guided_diffusion.image_datasets import list_image_files
from guided_diffusion.labels_file import relative_path, write_labels_file
from guided_diffusion.sampling import sample
from guided_diffusion.script_util import (
    architecture_flags, classifier_defaults, create_classifier, create_model_and_diffusion,
)
from guided_diffusion.training_state import ema_filename

from .report import captioned_tile, class_grid, png_bytes, write_bytes
from .sampler_study import model_diffusion

FEATURE_FRACTION = 10  # UNet features at timestep T / FEATURE_FRACTION
FEATURES = ("auto", "unet", "pixels")
SAMPLERS = (("ddim", 25), ("dpmpp_2m", 10))
RECALL_MARGIN = 0.05  # autoguidance may lose this much recall
PRECISION_MARGIN = 0.05  # self-labelled guidance's precision within this of true-label guidance's
COLUMNS = ("sampler", "evaluations", "guidance", "scale", "interval", "frechet", "precision",
           "recall", "agreement")


# ---------------------------------------------------------------------- options


def _numbers(options, name, positive):
    """:return: the comma-separated numbers of options[name], refused by name unless valid."""
    text = str(options[name])
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and (v > 0 if positive else v >= 0) for v in values):
        raise ValueError(f'--{name} "{text}": expected comma-separated '
                         f'{"positive" if positive else "non-negative"} numbers')
    return sorted(set(values))


def check_unlabeled_options(options):
    """
    Raise a ValueError naming the first unlabeled_* option out of range (when the stage is on).

    :return: (autoguidance weights, classifier scales, (sigma_lo, sigma_hi)), or None when off.
    """
    if not options["unlabeled"]:
        return None
    if options["unlabeled_steps"] < 0:
        raise ValueError(f"--unlabeled_steps {options['unlabeled_steps']}: expected 0 (train_steps) "
                         "or a positive integer")
    if options["unlabeled_clusters"] < 2:
        raise ValueError(f"--unlabeled_clusters {options['unlabeled_clusters']}: expected at least 2")
    if not 0 < options["unlabeled_guide_at"] < 1:
        raise ValueError(f"--unlabeled_guide_at {options['unlabeled_guide_at']}: expected a fraction of the "
                         "training steps between 0 and 1 (exclusive), e.g. 0.4")
    if options["unlabeled_features"] not in FEATURES:
        raise ValueError(f"--unlabeled_features {options['unlabeled_features']!r}: expected one of "
                         f"{', '.join(FEATURES)}")
    guide_scales = _numbers(options, "unlabeled_guide_scales", positive=False)
    for scale in guide_scales:
        check_guide_scale(scale)
    try:
        interval = check_interval(*map(float, str(options["unlabeled_interval"]).split(",")))
    except (ValueError, TypeError):
        raise ValueError(f"--unlabeled_interval {options['unlabeled_interval']}: expected LO,HI with "
                         "0 <= LO < HI, noise levels sigma (e.g. 0.3,5)") from None
    return guide_scales, _numbers(options, "unlabeled_scales", positive=True), interval


def stage_dir(out_dir):
    """:return: the folder of the stage's training logs, checkpoints and labels file."""
    return bf.join(out_dir, "unlabeled")


def guide_step(steps, fraction):
    """:return: the training step whose EMA is the autoguidance guide: fraction of steps."""
    return max(1, round(steps * fraction))


def unconditional_flags(model_flags):
    """:return: the main model's flags without class conditioning."""
    return dict(model_flags, class_cond=False)


# ---------------------------------------------------------------------- pseudo-classes


def pixel_features(images):
    """:return: float32 [N x H*W*C]: uint8 NHWC images flattened, in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255


def unet_features(model, diffusion, images, seed, batch_size=256):
    """
    :param model: the unconditional model (eval mode).
    :return: float32 [N x channels]: its middle block features (clustering.py) of the uint8
        NHWC images noised to timestep T / FEATURE_FRACTION, noise from a generator seeded
        with seed, batch after batch in order.
    """
    timestep = diffusion.num_timesteps // FEATURE_FRACTION
    generator, features = th.Generator().manual_seed(seed), []
    for start in range(0, len(images), batch_size):
        x_0 = th.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        t = th.full((len(x_0),), timestep, dtype=th.long)
        x_t = diffusion.q_sample(x_0, t, noise=th.randn(x_0.shape, generator=generator))
        features.append(middle_block_features(model, x_t.to(dist_util.dev()), t.to(dist_util.dev())).cpu())
    return th.cat(features).numpy()


def cluster_features(feature_sets, true_labels, num_clusters, seed):
    """
    :param feature_sets: {name: [N x D] features}.
    :param true_labels: the images' true classes (for purity and NMI only).
    :return: {name: (k-means clusters [N], purity, NMI)}.
    """
    results = {}
    for name, features in feature_sets.items():
        clusters = kmeans_labels(features, num_clusters, seed=seed)
        results[name] = (clusters, purity(true_labels, clusters),
                         normalized_mutual_information(true_labels, clusters))
    return results


def majority_classes(clusters, true_labels, num_clusters):
    """:return: int64 [num_clusters]: each cluster's most common true class (reporting only)."""
    return np.array([np.bincount(true_labels[clusters == c]).argmax() if np.any(clusters == c) else -1
                     for c in range(num_clusters)], dtype=np.int64)


def write_clusters(labels_file, data_dir, clusters):
    """
    Write the clusters of the images of data_dir (in list_image_files' order) as a labels
    file of classes cluster_00, cluster_01, ..., empty clusters dropped and the rest
    renumbered in order.

    :return: (the clusters renumbered [N], their names).
    """
    _, clusters = np.unique(clusters, return_inverse=True)
    names = [f"cluster_{cluster:02d}" for cluster in range(clusters.max() + 1)]
    entries = list_image_files(data_dir)
    write_labels_file(labels_file, [relative_path(path, folders) for path, folders in entries],
                      [names[cluster] for cluster in clusters])
    return clusters.astype(np.int64), names


# ---------------------------------------------------------------------- sampling


def load_model(flags, path):
    """:return: the diffusion model of flags with the checkpoint's weights, for sampling."""
    model, _ = create_model_and_diffusion(**flags)
    return load_for_inference(model, path, flags=architecture_flags(flags), device=dist_util.dev())


def load_classifier(flags, path):
    """:return: the noised classifier of create_classifier_and_diffusion's flags, loaded."""
    classifier_only = {name: flags[name] for name in classifier_defaults()}
    return load_for_inference(create_classifier(**classifier_only), path,
                              flags=architecture_flags(classifier_only), device=dist_util.dev())


def guidance_sets(guide_scales, scales, interval):
    """:return: (guidance, scale, interval or None) of every sample set, unguided first."""
    sets = [("unguided", 0.0, None)]
    for kind, kind_scales in (("autoguidance", guide_scales), ("self-labelled", scales)):
        sets += [(kind, scale, window) for window in (None, interval) for scale in kind_scales]
    return sets + [("true-label", scale, None) for scale in scales]


def draw_set(model, model_flags, networks, labels, guidance, scale, interval, sampler, steps, options):
    """
    :param networks: {"autoguidance": the guide, "self-labelled": the pseudo-class
        classifier, "true-label": the main classifier}.
    :param labels: {"self-labelled": pseudo-classes, "true-label": true classes} asked for.
    :return: uint8 images from the stage's seed (unguided and autoguided: len(pseudo-classes)).
    """
    kwargs = dict(batch_size=options["sample_batch_size"], seed=options["seed"], progress=False,
                  guidance_interval=interval)
    if guidance in ("unguided", "autoguidance"):
        kwargs.update(num_samples=len(labels["self-labelled"]))
        if guidance == "autoguidance":
            kwargs.update(guide=networks[guidance], guide_scale=scale)
    else:
        kwargs.update(classifier=networks[guidance], classifier_scale=scale, labels=labels[guidance])
    diffusion = model_diffusion(model_flags, f"ddim{steps}" if sampler == "ddim" else "")
    if sampler == "ddim":
        return sample(model, diffusion, use_ddim=True, **kwargs)[0]
    return sample(model, diffusion, sampler=sampler, steps=steps, **kwargs)[0]


def set_name(sampler, guidance, scale, interval):
    """:return: the file-name stem of a sample set."""
    stem = f"{sampler}_{guidance}" + (f"_{scale:g}" if guidance != "unguided" else "")
    return stem + ("_interval" if interval else "")


# ---------------------------------------------------------------------- goals and report


def _find(rows, sampler, guidance, scale=0.0, interval=False):
    """:return: the row of one sample set, or None."""
    return next((row for row in rows if (row["sampler"], row["guidance"], row["scale"], bool(row["interval"]))
                 == (sampler, guidance, scale, interval)), None)


def goal_results(rows, sampler):
    """
    :return: (goal text, reached: True, False or None where unmeasured) of the issue's three
        goals for one sampler.
    """
    unguided = _find(rows, sampler, "unguided")
    autos = [row for row in rows if row["sampler"] == sampler and row["guidance"] == "autoguidance"
             and not row["interval"]]
    better = [row["scale"] for row in autos if unguided and row["frechet"] < unguided["frechet"]
              and row["recall"] >= unguided["recall"] - RECALL_MARGIN]
    results = [(f"autoguidance lowers the Frechet distance at some w without losing more than "
                f"{RECALL_MARGIN:g} recall" + (f" (w = {', '.join(f'{w:g}' for w in better)})" if better else ""),
                None if not (unguided and autos) else bool(better))]
    for row in rows:
        if row["sampler"] == sampler and row["guidance"] == "self-labelled" and not row["interval"]:
            true = _find(rows, sampler, "true-label", row["scale"])
            reached = None if not (unguided and true) else bool(
                row["precision"] > unguided["precision"]
                and row["precision"] >= true["precision"] - PRECISION_MARGIN)
            results.append((f"self-labelled guidance at scale {row['scale']:g} raises precision over "
                            f"unguided, within {PRECISION_MARGIN:g} of true-label guidance's", reached))
    pairs = [(row, _find(rows, sampler, row["guidance"], row["scale"], True)) for row in rows
             if row["sampler"] == sampler and row["guidance"] in ("autoguidance", "self-labelled")
             and not row["interval"]]
    pairs = [(everywhere, within) for everywhere, within in pairs if within]
    results.append(("a guidance interval's Frechet distance is at most that of guidance everywhere, "
                    "for every guidance and scale",
                    all(within["frechet"] <= everywhere["frechet"] for everywhere, within in pairs)
                    if pairs else None))
    return results


def _cell(value):
    return "-" if value is None or value == "" else f"{value:.3f}"


def unlabeled_markdown(rows, clustering, chosen, options, seconds):
    """
    :param clustering: {feature name: (clusters, purity, NMI)}; chosen: the name used.
    :return: unlabeled.md: the setup, the clusters, per sampler a table and the goals.
    """
    steps = options["unlabeled_steps"] or options["train_steps"]
    quality = "; ".join(f"{name}{' (used)' * (name == chosen)}: purity {p:.3f}, NMI {n:.3f}"
                        for name, (_, p, n) in clustering.items())
    parts = ["# Guidance without labels", (
        f"An unconditional diffusion model trained for {steps} steps; its guide is the EMA at step "
        f"{guide_step(steps, options['unlabeled_guide_at'])}. {options['unlabeled_clusters']} k-means "
        f"pseudo-classes against the true classes ({quality}); a noised classifier trained on them for "
        f"{options['classifier_steps']} steps. Frechet distance, precision and recall in the "
        "judge's features against the held-out images; agreement: the judge's class against the "
        "class asked for (a pseudo-class standing for its majority true class). Interval: "
        f"guidance only at sigma in ({options['unlabeled_interval']}]. Took {seconds:.0f} s.")]
    for sampler, steps in SAMPLERS:
        lines = [f"{sampler}, {steps} steps:", "",
                 "| guidance | scale | interval | Frechet | precision | recall | agreement |",
                 "| --- | ---: | --- |" + " ---: |" * 4]
        lines += [f"| {row['guidance']} | {row['scale']:g} | {'yes' if row['interval'] else 'no'} | "
                  f"{_cell(row['frechet'])} | {_cell(row['precision'])} | {_cell(row['recall'])} | "
                  f"{_cell(row['agreement'])} |" for row in rows if row["sampler"] == sampler]
        lines.append("")
        lines += [f"- Goal: {text}: {'not measured' if reached is None else 'reached' if reached else 'not reached'}."
                  for text, reached in goal_results(rows, sampler)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def unlabeled_picture(shown, columns, zoom, gap=12):
    """
    :param shown: (caption, uint8 images, their classes [N]) triples; a grid each, one row
        per class.
    :return: an RGB PIL image of the captioned grids side by side.
    """
    tiles = [captioned_tile(class_grid(images, classes, classes.max() + 1, columns), caption, zoom)
             for caption, images, classes in shown]
    canvas = Image.new("RGB", (sum(t.width + gap for t in tiles) + gap, max(t.height for t in tiles) + 2 * gap),
                       "white")
    x = gap
    for tile in tiles:
        canvas.paste(tile, (x, gap))
        x += tile.width + gap
    return canvas


def write_unlabeled(out_dir, rows, image_sets, markdown, shown, columns, zoom):
    """
    Write unlabeled.csv, unlabeled.md, unlabeled_samples/NAME.npz and unlabeled.png.

    :param image_sets: {set name: (uint8 images, classes asked for or None)}.
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if row[key] is None else row[key] for key in COLUMNS} for row in rows)
    write_bytes(bf.join(out_dir, "unlabeled.csv"), text.getvalue().encode("utf-8"))
    write_bytes(bf.join(out_dir, "unlabeled.md"), markdown.encode("utf-8"))
    samples_dir = bf.join(out_dir, "unlabeled_samples")
    bf.makedirs(samples_dir)
    for name, (images, classes) in image_sets.items():
        write_npz(bf.join(samples_dir, f"{name}.npz"), images, *([] if classes is None else [classes]))
    write_bytes(bf.join(out_dir, "unlabeled.png"), png_bytes(unlabeled_picture(shown, columns, zoom)))


# ---------------------------------------------------------------------- the stage


def run_unlabeled_stage(model_flags, classifier_flags, true_classifier, train_dir, train_images, true_labels,
                        train_model, train_classifier, scorer, options):
    """
    Train, cluster, sample, score and write the stage's outputs (see the module docstring).

    :param model_flags: the main model's flags (class conditioning is dropped).
    :param classifier_flags: the main classifier's create_classifier_and_diffusion flags.
    :param true_classifier: the main pipeline's classifier of the true classes (reference).
    :param train_images: uint8 NHWC training images in list_image_files(train_dir)'s order.
    :param true_labels: their true classes: reporting only.
    :param train_model: train_model(flags) trains a diffusion model on train_dir's images,
        saving every guide_step(steps, options["unlabeled_guide_at"]), and returns its last EMA
        checkpoint's path.
    :param train_classifier: train_classifier(flags, labels_file) trains a noised classifier
        on the labels file's classes and returns its checkpoint's path.
    :param scorer: scorer(labels) gives a function from uint8 images to 'frechet',
        'recognised', 'precision', 'recall' (recognised: the judge's class is labels).
    :return: the result rows (COLUMNS keys).
    """
    guide_scales, scales, interval = check_unlabeled_options(options)
    start = time.perf_counter()
    out_dir, seed, columns = options["out_dir"], options["seed"], min(options["grid_columns"], options["samples_per_class"])
    flags = unconditional_flags(model_flags)
    logger.log("training the unconditional diffusion model (no labels)...")
    model_path = train_model(flags)
    steps = options["unlabeled_steps"] or options["train_steps"]
    model = load_model(flags, model_path)
    guide_name = ema_filename(options["ema_rate"], guide_step(steps, options["unlabeled_guide_at"]))
    guide = load_model(flags, bf.join(bf.dirname(model_path), guide_name))

    feature_sets = {"unet": unet_features(model, model_diffusion(flags), train_images, seed),
                    "pixels": pixel_features(train_images)}
    clustering = cluster_features(feature_sets, true_labels, options["unlabeled_clusters"], seed)
    chosen = options["unlabeled_features"]
    if chosen == "auto":
        chosen = max(clustering, key=lambda name: clustering[name][1])
    labels_file = bf.join(stage_dir(out_dir), "clusters.csv")
    clusters, names = write_clusters(labels_file, train_dir, clustering[chosen][0])
    logger.log(f"{len(names)} pseudo-classes from {chosen} features; training their classifier...")
    classifier = load_classifier(dict(classifier_flags, num_classes=len(names)),
                                 train_classifier(dict(classifier_flags, num_classes=len(names)), labels_file))
    majority = majority_classes(clusters, true_labels, len(names))

    spc = options["samples_per_class"]
    asked = {"self-labelled": np.repeat(np.arange(len(names)), spc),
             "true-label": np.repeat(np.arange(true_classifier.out_channels), spc)}
    networks = {"autoguidance": guide, "self-labelled": classifier, "true-label": true_classifier}
    meaning = {"self-labelled": majority[asked["self-labelled"]], "true-label": asked["true-label"]}
    rows, image_sets = [], {}
    for sampler, count in SAMPLERS:
        for guidance, scale, window in guidance_sets(guide_scales, scales, interval):
            logger.log(f"unlabeled stage: {sampler}-{count}, {guidance} {scale:g}" + " interval" * bool(window))
            images = draw_set(model, flags, networks, asked, guidance, scale, window, sampler, count, options)
            target = meaning.get(guidance)
            score = scorer(target if target is not None else np.zeros(len(images), np.int64))(images)
            rows.append(dict(sampler=sampler, evaluations=count, guidance=guidance, scale=scale,
                             interval=f"{window[0]:g},{window[1]:g}" if window else "", frechet=score["frechet"],
                             precision=score["precision"], recall=score["recall"],
                             agreement=None if target is None else score["recognised"]))
            image_sets[set_name(sampler, guidance, scale, window)] = (images, asked.get(guidance))
    top, middle, first = scales[-1], guide_scales[len(guide_scales) // 2], SAMPLERS[0][0]
    in_rows = asked["self-labelled"]  # unguided and autoguided samples have no class: rows of spc
    shown = [(f"self-labelled, scale {top:g}", image_sets[set_name(first, "self-labelled", top, None)][0], in_rows),
             ("unguided", image_sets[set_name(first, "unguided", 0.0, None)][0], in_rows),
             (f"autoguided, w {middle:g}", image_sets[set_name(first, "autoguidance", middle, None)][0], in_rows)]
    markdown = unlabeled_markdown(rows, clustering, chosen, options, time.perf_counter() - start)
    write_unlabeled(out_dir, rows, image_sets, markdown, shown, columns, max(1, 32 // options["image_size"]))
    return rows
