"""
The quickstart's distillation stage (--distill True): consistency distillation (Song et
al. 2023, CD) of the trained diffusion model into a class-conditional student with
ConsistencyTrainLoop, without guidance and with the teacher's ODE steps guided by the
quickstart's classifier at the middle scale. The student's EMA samples at 1, 2 and 4
evaluations are judged as the main table is (Frechet distance in the judge's features,
recognition, precision, recall) beside the teacher's DDIM-25 and dpmpp_2m at 10, 5, 4
and 2 evaluations, from the same labels and seed. Outputs under out_dir:
distill_scale_S/ (logs and checkpoints), distill.csv, distill.md (tables and the goals),
distill_samples/scale_S_steps_K.npz (arr_0 uint8 NHWC, arr_1 labels) and distill.png.
"""

import csv
import io

import blobfile as bf
from PIL import Image, ImageDraw

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoint import load_for_inference
from guided_diffusion.consistency import init_student
from guided_diffusion.consistency_train_util import check_consistency_arguments
from guided_diffusion.file_writing import write_npz
from guided_diffusion.guidance import classifier_cond_fn
from guided_diffusion.sampling import sample
from guided_diffusion.script_util import architecture_flags, create_model_and_diffusion
from guided_diffusion.training_state import ema_filename
from guided_diffusion.work_split import set_seed

from .report import class_grid, draw_text, label_font, png_bytes, write_bytes
from .sampler_study import model_diffusion

TARGET_EMA = 0.95  # mu of the target network (CM's CD)
TEACHER_SOLVER = "heun"
LOSS = "pseudo_huber"
BASELINE_STEPS = 25  # the teacher's DDIM steps the student is compared with
FAST_SAMPLER, FAST_EVALUATIONS = "dpmpp_2m", (10, 5, 4, 2)
STUDENT_EVALUATIONS = (1, 2, 4)
# The goals: (student evaluations, the most its Frechet distance may be, in teacher DDIM-25's).
GOALS = ((2, 1.25), (1, 2.0))
COLUMNS = ("classifier_scale", "network", "sampler", "evaluations", "frechet", "recognised",
           "precision", "recall")


def check_distill_options(options):
    """Raise a ValueError naming the first distill_* option out of range (when distill is on)."""
    if not options["distill"]:
        return
    for name in ("distill_steps", "distill_batch_size"):
        if options[name] < 1:
            raise ValueError(f"--{name} {options[name]}: expected a positive integer")
    if not options["distill_lr"] > 0:
        raise ValueError(f"--distill_lr {options['distill_lr']}: expected a positive learning rate")
    if options["distill_num_scales"] < 2:
        raise ValueError(f"--distill_num_scales {options['distill_num_scales']}: expected at least 2")
    check_consistency_arguments(options["distill_num_scales"], TARGET_EMA, TEACHER_SOLVER, LOSS,
                                "uniform", options["distill_steps"])


def stage_dir(out_dir, scale):
    """:return: the log and checkpoint folder of the distillation at one classifier scale."""
    return bf.join(out_dir, f"distill_scale_{scale:g}")


def distil_student(teacher, model_flags, data, cond_fn, train, checkpoint_dir, steps, num_scales,
                   batch_size, lr, ema_rate, seed):
    """
    Distil the teacher into a student of its architecture, started from its weights.

    :param teacher: the trained class-conditional diffusion model (frozen, eval mode).
    :param data: the training batches (images and labels).
    :param cond_fn: classifier guidance of the teacher's ODE steps, or None.
    :param train: a function running ConsistencyTrainLoop(**its keyword arguments) with
        logger's folder at checkpoint_dir (and the quickstart's log_interval).
    :return: the path of the student's EMA checkpoint.
    """
    set_seed(seed)
    student, diffusion = create_model_and_diffusion(**model_flags)
    init_student(student, teacher.state_dict()).to(dist_util.dev())
    train(model=student, diffusion=diffusion, data=data, teacher=teacher, cond_fn=cond_fn,
          num_scales=num_scales, target_ema=TARGET_EMA, teacher_solver=TEACHER_SOLVER, loss=LOSS,
          batch_size=batch_size, microbatch=-1, lr=lr, ema_rate=ema_rate, save_interval=steps,
          resume_checkpoint="", lr_anneal_steps=steps, max_steps=steps, seed=seed,
          flags=dict(model_flags, consistency_student=True), overwrite_log_dir=True)
    return bf.join(checkpoint_dir, ema_filename(ema_rate, steps))


def load_student(model_flags, path):
    """:return: the student's EMA network from its checkpoint, for sampling."""
    student, _ = create_model_and_diffusion(**model_flags)
    return load_for_inference(student, path, flags=architecture_flags(model_flags), device=dist_util.dev())


def teacher_samples(teacher, model_flags, classifier, scale, labels, batch_size, seed, ddim_images=None):
    """
    :param ddim_images: the teacher's DDIM-25 samples at this scale if already drawn.
    :return: {(sampler, evaluations): uint8 images}: DDIM-25 (the main table's loop), then
        FAST_SAMPLER at each FAST_EVALUATIONS.
    """
    guidance = dict(classifier=classifier, classifier_scale=scale) if scale else {}
    common = dict(labels=labels, batch_size=batch_size, seed=seed, progress=False, **guidance)
    if ddim_images is None:
        ddim_diffusion = model_diffusion(model_flags, f"ddim{BASELINE_STEPS}")
        ddim_images, _ = sample(teacher, ddim_diffusion, use_ddim=True, **common)
    images = {("ddim", BASELINE_STEPS): ddim_images}
    for count in FAST_EVALUATIONS:
        images[FAST_SAMPLER, count], _ = sample(teacher, model_diffusion(model_flags), sampler=FAST_SAMPLER,
                                                steps=count, **common)
    return images


def student_samples(student, model_flags, labels, batch_size, seed):
    """:return: {("consistency", evaluations): uint8 images} at each STUDENT_EVALUATIONS."""
    return {("consistency", count): sample(student, model_diffusion(model_flags), labels=labels,
                                           batch_size=batch_size, seed=seed, progress=False,
                                           sampler="consistency", steps=count)[0]
            for count in STUDENT_EVALUATIONS}


def score_rows(scale, network, image_sets, score):
    """
    :param image_sets: {(sampler, evaluations): uint8 images}.
    :param score: a function from uint8 images to 'frechet', 'recognised', 'precision', 'recall'.
    :return: one dict with the COLUMNS keys per set.
    """
    return [dict(classifier_scale=scale, network=network, sampler=sampler, evaluations=count,
                 **score(images)) for (sampler, count), images in image_sets.items()]


# ---------------------------------------------------------------------- report


def goal_results(rows, scale):
    """
    :return: per GOALS entry at one scale, (student evaluations, its Frechet distance over
        the teacher's DDIM-25, the most allowed, reached); None where a row is missing.
    """
    at_scale = {(row["network"], row["evaluations"]): row["frechet"] for row in rows
                if row["classifier_scale"] == scale}
    baseline = at_scale.get(("teacher", BASELINE_STEPS))
    results = []
    for count, limit in GOALS:
        student = at_scale.get(("student", count))
        if baseline is None or student is None:
            results.append(None)
            continue
        ratio = student / baseline if baseline > 0 else float("inf")
        results.append((count, ratio, limit, bool(ratio <= limit)))
    return results


def distill_markdown(rows, options, seconds):
    """
    :return: distill.md: the setup, then per classifier scale a table of every sample set
        and whether the goals are reached.
    """
    parts = ["# Consistency distillation", (
        f"Students distilled for {options['distill_steps']} steps of {options['distill_batch_size']} "
        f"images over {options['distill_num_scales']} noise levels ({TEACHER_SOLVER} teacher steps, "
        f"{LOSS} loss, target EMA {TARGET_EMA}, learning rate {options['distill_lr']:g} decayed to 0, "
        "x_0 clamped); their EMA is sampled. Frechet distance in the "
        f"judge's features against the held-out images (lower is better). Took {seconds:.0f} s.")]
    for scale in sorted({row["classifier_scale"] for row in rows}):
        lines = [f"Classifier scale {scale:g}:", "",
                 "| network | sampler | evaluations | Frechet | recognised | precision | recall |",
                 "| --- | --- |" + " ---: |" * 5]
        lines += [f"| {row['network']} | {row['sampler']} | {row['evaluations']} | {row['frechet']:.3f} | "
                  f"{row['recognised']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} |"
                  for row in rows if row["classifier_scale"] == scale]
        lines.append("")
        for (count, limit), result in zip(GOALS, goal_results(rows, scale)):
            goal = (f"- Goal: student at {count} evaluation{'s' * (count > 1)} within {limit:g}x "
                    f"teacher DDIM-{BASELINE_STEPS}'s Frechet distance")
            lines.append(goal + (": not measured." if result is None else
                                 f": {result[1]:.2f}x, {'reached' if result[3] else 'not reached'}."))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _captioned(grid, caption, zoom, caption_height=24):
    """:return: an RGB PIL image: the grid zoomed, the caption above it."""
    picture = Image.fromarray(grid).convert("RGB")
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    tile = Image.new("RGB", (picture.width, picture.height + caption_height), "white")
    tile.paste(picture, (0, caption_height))
    draw_text(ImageDraw.Draw(tile), (tile.width / 2, caption_height / 2), caption, label_font(14), "center")
    return tile


def distill_picture(image_rows, labels, num_classes, columns, zoom, gap=12):
    """
    :param image_rows: per classifier scale, (caption, uint8 images) pairs drawn left to right.
    :return: an RGB PIL image: one row of captioned class grids per scale.
    """
    tiles = [[_captioned(class_grid(images, labels, num_classes, columns), caption, zoom)
              for caption, images in row] for row in image_rows]
    width = max(sum(tile.width + gap for tile in row) for row in tiles) + gap
    height = sum(max(tile.height for tile in row) + gap for row in tiles) + gap
    canvas, y = Image.new("RGB", (width, height), "white"), gap
    for row in tiles:
        x = gap
        for tile in row:
            canvas.paste(tile, (x, y))
            x += tile.width + gap
        y += max(tile.height for tile in row) + gap
    return canvas


def write_distill(out_dir, rows, image_sets, labels, num_classes, columns, zoom, options, seconds):
    """
    Write distill.csv, distill.md, distill_samples/scale_S_steps_K.npz and distill.png.

    :param image_sets: {scale: {(network, sampler, evaluations): uint8 images}}.
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row[key] for key in COLUMNS} for row in rows)
    write_bytes(bf.join(out_dir, "distill.csv"), text.getvalue().encode("utf-8"))
    write_bytes(bf.join(out_dir, "distill.md"), distill_markdown(rows, options, seconds).encode("utf-8"))
    samples_dir = bf.join(out_dir, "distill_samples")
    bf.makedirs(samples_dir)
    picture_rows = []
    for scale, sets in image_sets.items():
        shown = [(f"scale {scale:g}: teacher DDIM-{BASELINE_STEPS}",
                  sets["teacher", "ddim", BASELINE_STEPS])]
        for count in STUDENT_EVALUATIONS:
            images = sets["student", "consistency", count]
            write_npz(bf.join(samples_dir, f"scale_{scale:g}_steps_{count}.npz"), images, labels)
            shown.append((f"student {count} step{'s' * (count > 1)}", images))
        picture_rows.append(shown)
    picture = distill_picture(picture_rows, labels, num_classes, columns, zoom)
    write_bytes(bf.join(out_dir, "distill.png"), png_bytes(picture))


def run_distill_stage(teacher, model_flags, classifier, scales, labels, make_data, train, score, options,
                      main_samples=None):
    """
    Distil at each scale, sample the teacher and the student, score the samples.

    :param scales: the classifier scales to distil at (0: no guidance).
    :param make_data: a function of no arguments returning fresh training batches.
    :param train: train(scale, **ConsistencyTrainLoop's arguments) runs the loop, logging
        to stage_dir(out_dir, scale).
    :param main_samples: {scale: the main table's samples} when they are DDIM-25's, else None.
    :return: (rows with the COLUMNS keys, {scale: {(network, sampler, evaluations): images}}).
    """
    out_dir, seed, batch_size = options["out_dir"], options["seed"], options["sample_batch_size"]
    rows, image_sets = [], {}
    for scale in scales:
        logger.log(f"distilling the diffusion model at classifier scale {scale:g}...")
        path = distil_student(
            teacher, model_flags, make_data(), classifier_cond_fn(classifier, scale) if scale else None,
            lambda **loop_kwargs: train(scale, **loop_kwargs), stage_dir(out_dir, scale),
            options["distill_steps"], options["distill_num_scales"], options["distill_batch_size"],
            options["distill_lr"], options["ema_rate"], seed)
        logger.log(f"sampling the teacher and the student at classifier scale {scale:g}...")
        teacher_sets = teacher_samples(teacher, model_flags, classifier, scale, labels, batch_size, seed,
                                       None if main_samples is None else main_samples[scale])
        student_sets = student_samples(load_student(model_flags, path), model_flags, labels, batch_size, seed)
        rows += score_rows(scale, "teacher", teacher_sets, score) + score_rows(scale, "student", student_sets, score)
        image_sets[scale] = {("teacher", *key): images for key, images in teacher_sets.items()}
        image_sets[scale].update({("student", *key): images for key, images in student_sets.items()})
    return rows, image_sets
