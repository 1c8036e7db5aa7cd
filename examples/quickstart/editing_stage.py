"""
The quickstart's editing stage (--editing True): the editing methods of
guided_diffusion.editing (RePaint, SDEdit, ILVR, DPS) on held-out digits, with the
trained class-conditional model on its diffusion respaced to editing_steps DDPM steps.

- Inpainting: the bottom half, a centre box and a random editing_random_fill of the
  pixels are hidden; RePaint with plain replacement (r = 1) and with resampling (j, r),
  DPS with the mask operator and masked SDEdit fill them, told the digit's true class
  (the model has no unconditional label). Scored by the judge's recognition of the
  original class and the mean squared error on the hidden pixels (in [-1, 1]).
- Guided completion: the bottom half is completed as a requested class
  (editing_request) by RePaint (j, r) with classifier guidance at the quickstart's
  middle scale, beside guided sampling of the same labels without an input. Scored by
  recognition of the requested class.
- Super-resolution 2x: from 4x4 area-downsampled digits, DPS (downsample operator),
  ILVR (factor 2) and bicubic upsampling. Scored by recognition of the original class
  and the mean squared error to the original.

Outputs under out_dir: editing.csv, editing.md (the table and the goals),
editing_samples/TASK_INPUT_METHOD.npz (arr_0 uint8 NHWC results, arr_1 the labels the
model was given) and editing.png (per method: original, mask or 4x4 input, result).

Randomness: every method samples with sample(seed=seed) (one noise stream per input);
the random masks are drawn from a generator seeded with seed.
"""

import csv
import io
import math
import re
import time

import blobfile as bf
import numpy as np
import torch as th
import torch.nn.functional as F
from PIL import Image

from guided_diffusion import editing, logger
from guided_diffusion.edit_sampling import dps, edit, ilvr
from guided_diffusion.file_writing import write_npz
from guided_diffusion.image_grid import make_image_grid
from guided_diffusion.sampling import sample

from .report import captioned_tile, png_bytes, write_bytes
from .sampler_study import model_diffusion

MASKS = ("bottom half", "centre box", "random")
SR_FACTOR = 2  # super-resolution factor: 4x4 inputs for the 8x8 digits
COLUMNS = ("task", "input", "method", "labels", "evaluations", "recognised", "mse", "seconds")
ZOOM = 4  # pixel repetition in editing.png


def editing_defaults():
    """
    :return: the stage's options and their defaults (merged into quickstart_defaults()).
    """
    return dict(
        editing=False,                  # run the editing stage (editing_stage.py)
        editing_per_class=20,           # held-out digits of each class edited by every method
        editing_steps=50,               # DDPM steps the diffusion is respaced to for editing
        editing_jump_length=5,          # RePaint's j (levels per jump back up)
        editing_jump_n_sample=4,        # RePaint's r (resamplings; 1 is plain replacement)
        editing_random_fill=0.7,        # fraction of pixels the random mask hides
        editing_sdedit_strength=0.8,    # masked SDEdit's strength (start at this fraction of T)
        editing_dps_scale=1.0,          # DPS's step size zeta'
        editing_request="+1",           # completion's class: "+K" (true + K mod classes) or "C"
        editing_show=4,                 # digits per method in editing.png
    )


def parse_request(text):
    """
    :param text: "+K" (shift the true class by K) or "C" (always class C).
    :return: ("shift", K) or ("fixed", C).
    """
    match = re.fullmatch(r"\s*(\+?)(\d+)\s*", str(text))
    if not match:
        raise ValueError(f'--editing_request {text}: expected "+K" (the true class plus K) or a '
                         'class number C')
    return ("shift" if match.group(1) else "fixed"), int(match.group(2))


def check_editing_options(options):
    """Raise a ValueError naming the first editing_* option out of range (when editing is on)."""
    if not options["editing"]:
        return
    for name in ("editing_per_class", "editing_steps", "editing_jump_length", "editing_jump_n_sample",
                 "editing_show"):
        value = options[name]
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"--{name} {value}: expected a positive integer")
    if options["editing_steps"] > options.get("diffusion_steps", math.inf):
        raise ValueError(f"--editing_steps {options['editing_steps']}: expected at most --diffusion_steps "
                         f"{options['diffusion_steps']}")
    if not 0 < options["editing_random_fill"] < 1:
        raise ValueError(f"--editing_random_fill {options['editing_random_fill']}: expected a fraction in (0, 1)")
    if not 0 < options["editing_sdedit_strength"] <= 1:
        raise ValueError(f"--editing_sdedit_strength {options['editing_sdedit_strength']}: expected a "
                         "number in (0, 1]")
    scale = options["editing_dps_scale"]
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"--editing_dps_scale {scale}: expected a finite number >= 0")
    parse_request(options["editing_request"])


# ---------------------------------------------------------------------- inputs


def chosen_digits(labels, per_class):
    """:return: the indices of the first per_class images of every class, class by class."""
    return np.concatenate([np.flatnonzero(labels == label)[:per_class] for label in np.unique(labels)])


def requested_labels(labels, request, num_classes):
    """
    :param request: editing_request's text.
    :return: the class each completion is asked for.
    """
    kind, value = parse_request(request)
    if kind == "shift":
        return (labels + value) % num_classes
    if value >= num_classes:
        raise ValueError(f"--editing_request {request}: the model has {num_classes} classes")
    return np.full_like(labels, value)


def make_masks(count, size, random_fill, seed):
    """
    :return: {MASKS name: float mask [1 or count x 1 x size x size]}, 1 = keep, 0 = hide; the
        random one drawn per image.
    """
    bottom = th.ones(1, 1, size, size)
    bottom[..., size // 2:, :] = 0
    generator = th.Generator().manual_seed(seed)
    random = th.cat([editing.random_mask(size, generator, random_fill) for _ in range(count)])
    return {"bottom half": bottom, "centre box": editing.box_mask(size), "random": random}


def masked_guide(images, mask):
    """
    :param images: uint8 [N x H x W x C].
    :param mask: [1 or N x 1 x H x W], 1 = keep.
    :return: uint8 images whose hidden pixels hold the mean of the image's kept ones
        (SDEdit's guide: no hint of the hidden content).
    """
    keep = np.broadcast_to(mask.numpy().transpose(0, 2, 3, 1), images.shape[:3] + (1,)) > 0
    kept_sum = (images * keep).sum((1, 2, 3), keepdims=True)
    kept_mean = kept_sum / (keep.sum((1, 2, 3), keepdims=True) * images.shape[-1])
    return np.where(keep, images, np.rint(kept_mean)).astype(np.uint8)


def downsampled(images, factor):
    """:return: uint8 images area-downsampled by factor, then repeated back to their size."""
    pixels = th.from_numpy(images).permute(0, 3, 1, 2).float()
    small = F.avg_pool2d(pixels, factor)
    large = F.interpolate(small, scale_factor=factor, mode="nearest")
    return large.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def bicubic(images, factor):
    """:return: uint8 images: the blocky low-resolution images, area-downsampled and bicubic-upsampled."""
    pixels = editing.from_uint8(images)
    smooth = editing.low_pass(pixels, factor)
    return ((smooth + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------- scores


def mse(images, originals, hidden=None):
    """
    :param hidden: None (every pixel) or [1 or N x 1 x H x W], 1 where scored.
    :return: the mean squared error in [-1, 1] units, over the hidden pixels.
    """
    difference = (editing.from_uint8(images) - editing.from_uint8(originals)) ** 2
    if hidden is None:
        return float(difference.mean())
    weight = hidden.expand_as(difference)
    return float((difference * weight).sum() / weight.sum())


def result_row(task, input_name, method, labels_name, evaluations, recognised, error, seconds):
    """:return: one row with the COLUMNS keys."""
    return dict(task=task, input=input_name, method=method, labels=labels_name, evaluations=evaluations,
                recognised=recognised, mse=error, seconds=seconds)


# ---------------------------------------------------------------------- the runs


class _Runner:
    """
    Runs the methods with one model, diffusion, seed and batch size; times, scores and
    keeps each result.

    :param judge: the quickstart's fitted Judge.
    :param options: the quickstart's checked options.
    """

    def __init__(self, model, diffusion, judge, options, progress):
        self.model, self.diffusion, self.judge = model, diffusion, judge
        self.common = dict(seed=options["seed"], batch_size=options["sample_batch_size"], progress=progress)
        self.rows, self.examples = [], []

    def run(self, key, call, truth, originals, shown, hidden=None, evaluations=0, labels_name="true"):
        """
        Time call(), score its images against the class truth (and the originals on
        hidden, unless originals is None), keep them.

        :param key: (task, input, method).
        :param shown: uint8 images for the picture's middle column (mask or low-res input).
        :return: the images.
        """
        logger.log(f"editing: {' / '.join(key)}")
        begin = time.perf_counter()
        images = call()
        seconds = time.perf_counter() - begin
        recognised = float(np.mean(self.judge.predict(images) == truth))
        error = None if originals is None else mse(images, originals, hidden)
        self.rows.append(result_row(*key, labels_name, evaluations, recognised, error, seconds))
        self.examples.append((key, images, truth, shown))
        return images

    def edit(self, method, labels, **guidance):
        """:return: the uint8 images of an editing.EditMethod."""
        return edit(self.model, self.diffusion, method, labels=labels, **self.common, **guidance)[0]


def _mask_picture(mask, count):
    """:return: uint8 [count x H x W x 3]: white where kept, black where hidden."""
    mask = mask.expand(count, 1, *mask.shape[-2:])
    return (mask.permute(0, 2, 3, 1).repeat(1, 1, 1, 3) * 255).byte().numpy()


def _inpainting(runner, images, labels, masks, options):
    """RePaint (r = 1 and r), DPS and masked SDEdit for every mask."""
    steps, jump, resample = options["editing_steps"], options["editing_jump_length"], options["editing_jump_n_sample"]
    for name, mask in masks.items():
        hidden, shown, known = 1 - mask, _mask_picture(mask, len(images)), editing.from_uint8(images)
        for r in dict.fromkeys((1, resample)):
            method = editing.RePaint(known, mask, jump_length=jump, jump_n_sample=r)
            runner.run(("inpaint", name, f"RePaint j={jump} r={r}" if r > 1 else "RePaint r=1"),
                       lambda: runner.edit(method, labels), labels, images, shown, hidden, method.num_steps(steps))
        scale = options["editing_dps_scale"]
        runner.run(("inpaint", name, f"DPS {scale:g}"),
                   lambda: dps(runner.model, runner.diffusion, images, editing.MaskOperator(mask), scale=scale,
                               labels=labels, **runner.common)[0], labels, images, shown, hidden, steps)
        strength = options["editing_sdedit_strength"]
        method = editing.SDEdit(editing.from_uint8(masked_guide(images, mask)), strength, mask=mask)
        runner.run(("inpaint", name, f"SDEdit {strength:g}"), lambda: runner.edit(method, labels),
                   labels, images, shown, hidden, method.num_steps(steps))


def _completion(runner, images, requested, masks, classifier, scale, options):
    """Guided RePaint completion of the bottom half as the requested classes, and guided sampling."""
    guidance = dict(classifier=classifier, classifier_scale=scale) if scale else {}
    mask, steps = masks["bottom half"], options["editing_steps"]
    method = editing.RePaint(editing.from_uint8(images), mask, jump_length=options["editing_jump_length"],
                             jump_n_sample=options["editing_jump_n_sample"])
    name, shown = f"classifier scale {scale:g}", _mask_picture(mask, len(images))
    runner.run(("complete", "bottom half", f"guided RePaint j={method.jump_length} r={method.jump_n_sample}"),
               lambda: runner.edit(method, requested, **guidance), requested, None, shown,
               evaluations=method.num_steps(steps), labels_name=f"requested, {name}")
    runner.run(("complete", "none", "guided sampling"),
               lambda: sample(runner.model, runner.diffusion, labels=requested, **runner.common, **guidance)[0],
               requested, None, np.full_like(images, 128), evaluations=steps, labels_name=f"requested, {name}")


def _super_resolution(runner, images, labels, options):
    """DPS (downsample operator), ILVR and bicubic upsampling from the 4x4 digits."""
    low = downsampled(images, SR_FACTOR)
    steps, scale = options["editing_steps"], options["editing_dps_scale"]
    size = f"{images.shape[1] // SR_FACTOR}x{images.shape[2] // SR_FACTOR}"
    runner.run(("superres", size, f"DPS {scale:g}"),
               lambda: dps(runner.model, runner.diffusion, low, editing.DownsampleOperator(SR_FACTOR),
                           scale=scale, labels=labels, **runner.common)[0], labels, images, low, evaluations=steps)
    runner.run(("superres", size, f"ILVR {SR_FACTOR}"),
               lambda: ilvr(runner.model, runner.diffusion, low, SR_FACTOR, labels=labels, **runner.common)[0],
               labels, images, low, evaluations=steps)
    runner.run(("superres", size, "bicubic"), lambda: bicubic(low, SR_FACTOR), labels, images, low)


def run_editing_stage(model, model_flags, classifier, classifier_scale, heldout_images, heldout_labels, judge,
                      options, progress=True):
    """
    Run every edit on editing_per_class held-out digits of each class and score them.

    :param model: the trained class-conditional diffusion model (eval mode).
    :param model_flags: its create_model_and_diffusion flags (the diffusion is respaced).
    :param classifier: the noised classifier guiding the completions.
    :param classifier_scale: its scale (the quickstart's middle one; 0: no guidance).
    :param heldout_images: uint8 [N x H x W x 3] held-out digits; heldout_labels their int classes.
    :param judge: the fitted Judge (predict).
    :param options: the quickstart's checked options (out_dir, seed, sample_batch_size, editing_*).
    :return: (rows with the COLUMNS keys, examples: ((task, input, method), uint8 images, the
        classes they are judged by, uint8 middle-column images) per row, and the chosen originals).
    """
    chosen = chosen_digits(heldout_labels, options["editing_per_class"])
    images, labels = heldout_images[chosen], heldout_labels[chosen]
    num_classes = model_flags["num_classes"]
    diffusion = model_diffusion(model_flags, str(options["editing_steps"]))
    runner = _Runner(model, diffusion, judge, options, progress)
    masks = make_masks(len(images), images.shape[1], options["editing_random_fill"], options["seed"])
    _inpainting(runner, images, labels, masks, options)
    requested = requested_labels(labels, options["editing_request"], num_classes)
    _completion(runner, images, requested, masks, classifier, classifier_scale, options)
    _super_resolution(runner, images, labels, options)
    return runner.rows, (runner.examples, images)


# ---------------------------------------------------------------------- report


def _find(rows, task, input_name, prefix):
    """:return: the first row of task and input whose method starts with prefix, or None."""
    return next((row for row in rows if row["task"] == task and row["input"] == input_name
                 and row["method"].startswith(prefix)), None)


def goal_results(rows):
    """
    :return: per goal, (its sentence, the method's recognition, the baseline's, reached), or
        (sentence, None, None, None) where a row is missing.
    """
    plain = _find(rows, "inpaint", "bottom half", "RePaint r=1")
    resampled = _find(rows, "inpaint", "bottom half", "RePaint j=")
    guided = _find(rows, "complete", "bottom half", "guided RePaint")
    unconstrained = _find(rows, "complete", "none", "guided sampling")
    goals = [("RePaint with resampling recognised as the original class more often than plain "
              "replacement (bottom half)", resampled, plain, lambda a, b: a > b),
             ("guided completion recognised as the requested class at least as often as "
              "unconstrained guided sampling", guided, unconstrained, lambda a, b: a >= b)]
    return [(sentence, None, None, None) if a is None or b is None else
            (sentence, a["recognised"], b["recognised"], bool(better(a["recognised"], b["recognised"])))
            for sentence, a, b, better in goals]


def _cell(value, digits=3):
    """:return: a table cell: a number with `digits` decimals, or "-" for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def editing_table(rows):
    """:return: the markdown table of every row."""
    lines = ["| task | input | method | judged as | evaluations | recognised | MSE | seconds |",
             "| --- | --- | --- | --- |" + " ---: |" * 4]
    lines += [f"| {row['task']} | {row['input']} | {row['method']} | {row['labels']} | {row['evaluations']} | "
              f"{_cell(row['recognised'])} | {_cell(row['mse'], 4)} | {row['seconds']:.1f} |" for row in rows]
    return "\n".join(lines)


def editing_markdown(rows, options, count, seconds):
    """
    :param count: the number of digits each method edits.
    :return: editing.md: the setup, the table, the goals and whether they are reached.
    """
    setup = (
        f"{count} held-out digits ({options['editing_per_class']} per class), images in [-1, 1] as the model "
        f"sees them. The trained class-conditional model on its {options.get('diffusion_steps', '?')}-step "
        f"diffusion respaced to {options['editing_steps']} DDPM steps; RePaint's jumps scaled to it "
        f"(j = {options['editing_jump_length']}, r = {options['editing_jump_n_sample']}; the paper's "
        "j = 10, r = 10 at 250 steps). Inpainting hides the bottom half, a centre box or "
        f"{options['editing_random_fill']:.0%} random pixels and tells the model the true class (it has "
        "no unconditional label); MSE on the hidden pixels. Completion asks for class "
        f"{options['editing_request']} (\"+K\": the true class plus K) with classifier guidance; "
        "guided sampling draws the same classes from noise. Super-resolution starts from the digits "
        f"area-downsampled by {SR_FACTOR}; MSE over all pixels. Methods: 'DPS z' "
        "(step size zeta' = z; each evaluation adds a backward pass through the model), 'SDEdit s' "
        "(strength s), 'ILVR N' (factor N). 'recognised': the judge's recognition of the class in "
        f"'judged as'. Seed {options['seed']}; took {seconds:.0f} s.")
    goals = [f"- Goal: {sentence}: " + ("not measured." if reached is None else
                                        f"{a:.3f} against {b:.3f}, {'reached' if reached else 'not reached'}.")
             for sentence, a, b, reached in goal_results(rows)]
    plain, resampled = _find(rows, "inpaint", "bottom half", "RePaint r=1"), _find(rows, "inpaint", "bottom half",
                                                                                  "RePaint j=")
    if plain and resampled:
        goals.append(f"- Hidden-pixel MSE of the bottom half (lower is better): RePaint with resampling "
                     f"{resampled['mse']:.4f}, plain replacement {plain['mse']:.4f}.")
    return "\n\n".join(["# Editing held-out digits", setup, editing_table(rows), "\n".join(goals)]) + "\n"


def _slug(key):
    """:return: a file name stem from (task, input, method)."""
    return re.sub(r"[^0-9a-zA-Z.=]+", "_", "_".join(key)).strip("_")


def editing_picture(examples, originals, show):
    """
    :param examples: run_editing_stage's (key, images, classes, middle column) per method.
    :param originals: the edited originals.
    :param show: digits per method.
    :return: an RGB PIL image: per method a captioned row of (original, mask or input, result) triples.
    """
    picks = np.linspace(0, len(originals) - 1, min(show, len(originals))).round().astype(int)
    tiles = []
    for key, images, _, middle in examples:
        triples = np.stack([np.stack([originals[i], middle[i], images[i]]) for i in picks])
        grid = make_image_grid(triples.reshape(-1, *originals.shape[1:]), nrow=3 * len(picks))
        tiles.append(captioned_tile(grid, " / ".join(key), ZOOM))
    canvas = Image.new("RGB", (max(tile.width for tile in tiles), sum(tile.height for tile in tiles)), "white")
    top = 0
    for tile in tiles:
        canvas.paste(tile, (0, top))
        top += tile.height
    return canvas


def write_editing(out_dir, rows, examples, options, seconds):
    """
    Write editing.csv, editing.md, editing_samples/*.npz and editing.png into out_dir.

    :param examples: run_editing_stage's second result.
    :param seconds: the stage's wall time.
    """
    per_method, originals = examples
    bf.makedirs(out_dir)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: ("" if row[key] is None else row[key]) for key in COLUMNS} for row in rows)
    write_bytes(bf.join(out_dir, "editing.csv"), text.getvalue().encode("utf-8"))
    report = editing_markdown(rows, options, len(originals), seconds)
    write_bytes(bf.join(out_dir, "editing.md"), report.encode("utf-8"))
    samples_dir = bf.join(out_dir, "editing_samples")
    bf.makedirs(samples_dir)
    for key, images, classes, _ in per_method:
        write_npz(bf.join(samples_dir, _slug(key) + ".npz"), images, classes)
    write_bytes(bf.join(out_dir, "editing.png"), png_bytes(editing_picture(per_method, originals,
                                                                             options["editing_show"])))
