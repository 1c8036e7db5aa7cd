"""
The quickstart's sampler study: quality per model evaluation. Every sampler of
guided_diffusion.solvers runs at several numbers of model evaluations per sample, without
guidance and at the middle classifier scale, from the same seeded x_T; the samples are
scored by the judge (recognition, precision, recall) and by a Frechet distance in the
judge's feature space against the held-out digits. The outputs are samplers.md (tables
and the fewest evaluations at which each sampler matches DDIM's at 25), samplers.csv
and samplers.png (Frechet distance against evaluations, guided).
"""

import csv
import io

import blobfile as bf
from PIL import Image, ImageDraw

from evaluations.scores import compute_statistics
from guided_diffusion import logger
from guided_diffusion.sampling import sample
from guided_diffusion.script_util import create_gaussian_diffusion, diffusion_defaults
from guided_diffusion.solvers import SAMPLERS, evaluations

from .report import draw_text, label_font, png_bytes, write_bytes

# The studies the quickstart's --sampler_study flag names: samplers and evaluations per sample.
STUDIES = {
    "quick": dict(samplers=("ddim", "dpmpp_2m", "unipc"), evaluations=(10, 25)),
    "full": dict(samplers=tuple(SAMPLERS), evaluations=(5, 10, 15, 25, 50)),
}
BASELINE = ("ddim", 25)  # the published ADM-G's fewest steps: what the others must match
MATCH = 0.05  # "matches": a Frechet distance within 5% of the baseline's
PLOT_RANGE = 4  # the plot's Frechet axis ends at this many times the baseline's
COLUMNS = ("classifier_scale", "sampler", "evaluations", "frechet", "recognised", "precision",
           "recall")
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75))


def frechet_distance(real_features, sample_features):
    """:return: the Frechet distance between the two feature sets' Gaussians."""
    return compute_statistics(real_features).frechet_distance(compute_statistics(sample_features))


def model_diffusion(model_flags, timestep_respacing=""):
    """
    :param model_flags: create_model_and_diffusion's flags.
    :return: the model's diffusion, respaced as asked ("": the full one, the solvers' choice).
    """
    flags = {name: model_flags[name] for name in diffusion_defaults()}
    flags.update(timestep_respacing=timestep_respacing, steps=flags.pop("diffusion_steps"))
    return create_gaussian_diffusion(**flags)


def judge_score(judge, real_features, labels, score_images):
    """
    :param score_images: the main table's scoring (recognised, precision, recall).
    :return: a function from uint8 images to their 'frechet' and score_images' values.
    """
    def score(images):
        return dict(frechet=frechet_distance(real_features, judge.features(images)),
                    **score_images(judge, real_features, images, labels))

    return score


def run_sampler_study(model, diffusion, classifier, scales, labels, batch_size, seed, score, study):
    """
    :param diffusion: the model's full diffusion (no respacing: the samplers choose times).
    :param scales: the classifier scales (0: no guidance).
    :param score: a function from uint8 images to a dict of 'frechet', 'recognised',
        'precision' and 'recall'.
    :param study: a STUDIES name.
    :return: one dict per (scale, sampler, evaluations), with the COLUMNS keys.
    """
    rows = []
    for scale in scales:
        guidance = dict(classifier=classifier, classifier_scale=scale) if scale else {}
        for sampler in STUDIES[study]["samplers"]:
            for steps in STUDIES[study]["evaluations"]:
                logger.log(f"sampler study: {sampler}, {steps} evaluations, classifier scale {scale:g}")
                images, _ = sample(model, diffusion, labels=labels, batch_size=batch_size, seed=seed,
                                   sampler=sampler, steps=steps, progress=False, **guidance)
                rows.append(dict(classifier_scale=scale, sampler=sampler,
                                 evaluations=evaluations(sampler, steps), **score(images)))
    return rows


def fewest_evaluations_to_match(rows, scale):
    """
    :return: (the baseline's Frechet distance, {sampler: the fewest evaluations whose
        distance is within MATCH of it, or None}) at one classifier scale.
    """
    at_scale = [row for row in rows if row["classifier_scale"] == scale]
    baseline = next((row["frechet"] for row in at_scale
                     if (row["sampler"], row["evaluations"]) == BASELINE), None)
    if baseline is None:
        return None, {}
    fewest = {row["sampler"]: None for row in at_scale}
    for row in sorted(at_scale, key=lambda row: -row["evaluations"]):
        if row["frechet"] <= baseline * (1 + MATCH):
            fewest[row["sampler"]] = row["evaluations"]
    return baseline, fewest


def study_markdown(rows, seconds):
    """
    :return: samplers.md: per classifier scale a table of Frechet distances (sampler x
        evaluations), then the fewest evaluations that match DDIM-25.
    """
    parts = ["# Sampler study", (
        "Frechet distance in the judge's feature space against the held-out digits (lower is "
        "better), by sampler and model evaluations per sample; recognition, precision and "
        f"recall are in samplers.csv. Sampling took {seconds:.0f} s.")]
    for scale in sorted({row["classifier_scale"] for row in rows}):
        at_scale = [row for row in rows if row["classifier_scale"] == scale]
        counts = sorted({row["evaluations"] for row in at_scale})
        lines = [f"Classifier scale {scale:g}:", "",
                 "| sampler | " + " | ".join(f"{count} evaluations" for count in counts) + " |",
                 "| --- |" + " ---: |" * len(counts)]
        for sampler in dict.fromkeys(row["sampler"] for row in at_scale):
            cells = {row["evaluations"]: f"{row['frechet']:.3f}" for row in at_scale
                     if row["sampler"] == sampler}
            lines.append(f"| {sampler} | " + " | ".join(cells.get(count, "") for count in counts) + " |")
        baseline, fewest = fewest_evaluations_to_match(rows, scale)
        if baseline is not None:
            matched = ", ".join(f"{sampler} {count if count else 'none of these'}"
                                for sampler, count in fewest.items())
            lines += ["", f"Fewest evaluations within {MATCH:.0%} of DDIM-25's {baseline:.3f}: {matched}."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def draw_study_plot(rows, scale, width=560, height=320):
    """
    :return: an RGB PIL image: the Frechet distance against the evaluations per sample
        (evenly spaced), one line per sampler, at one classifier scale, up to PLOT_RANGE
        times DDIM-25's.
    """
    at_scale = [row for row in rows if row["classifier_scale"] == scale]
    counts = sorted({row["evaluations"] for row in at_scale})
    baseline, _ = fewest_evaluations_to_match(rows, scale)
    highest = max(row["frechet"] for row in at_scale) or 1.0
    if baseline:  # larger values are drawn at the top, as open circles
        highest = min(highest, PLOT_RANGE * baseline)
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), label_font(13)
    left, right, top, bottom = 54, width - 145, 28, height - 48

    def x_of(count):
        return left + (right - left) * (counts.index(count) + 0.5) / len(counts)

    def y_of(value):
        return bottom - min(value, highest) / highest * (bottom - top)

    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(left, y_of(fraction * highest)), (right, y_of(fraction * highest))], fill=(225, 225, 225))
        draw_text(draw, (left - 6, y_of(fraction * highest)), f"{fraction * highest:.2g}", font, "right")
    draw.rectangle([left, top, right, bottom], outline="black")
    for count in counts:
        draw_text(draw, (x_of(count), bottom + 12), str(count), font, "center")
    draw_text(draw, ((left + right) / 2, height - 14), "model evaluations per sample", font, "center")
    draw_text(draw, ((left + right) / 2, 12), f"Frechet distance, classifier scale {scale:g}", font, "center")
    samplers = list(dict.fromkeys(row["sampler"] for row in at_scale))
    for index, sampler in enumerate(samplers):
        colour = COLOURS[index % len(COLOURS)]
        points = sorted((x_of(row["evaluations"]), y_of(row["frechet"]), row["frechet"] > highest)
                        for row in at_scale if row["sampler"] == sampler)
        if len(points) > 1:
            draw.line([(x, y) for x, y, _ in points], fill=colour, width=2)
        for x, y, clipped in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="white" if clipped else colour, outline=colour)
        legend_y = top + 10 + 20 * index
        draw.line([(right + 10, legend_y), (right + 28, legend_y)], fill=colour, width=2)
        draw_text(draw, (right + 34, legend_y), sampler, font)
    return image


def write_study(out_dir, rows, seconds):
    """
    Write samplers.md, samplers.csv and samplers.png (at the largest scale) into out_dir.
    """
    write_bytes(bf.join(out_dir, "samplers.md"), study_markdown(rows, seconds).encode("utf-8"))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row[key] for key in COLUMNS} for row in rows)
    write_bytes(bf.join(out_dir, "samplers.csv"), text.getvalue().encode("utf-8"))
    scale = max(row["classifier_scale"] for row in rows)
    write_bytes(bf.join(out_dir, "samplers.png"), png_bytes(draw_study_plot(rows, scale)))


def check_study(study):
    """Raise a ValueError unless study is "none" or a STUDIES name."""
    if study != "none" and study not in STUDIES:
        raise ValueError(f"sampler_study={study!r}: expected none, {', '.join(STUDIES)}")

