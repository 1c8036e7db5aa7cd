"""
The quickstart's report: the results table (results.md, results.csv), the words on
how recognition, precision and recall move with the classifier scale, the sample
grids (one row per class), the trade-off plot (tradeoff.png) and the composite
picture of grids and plot (quickstart.png). pipeline.py runs the job and hands
its numbers and samples here.
"""

import csv
import io
import math

import blobfile as bf
import numpy as np
import torch as th
from PIL import Image, ImageDraw, ImageFont

from guided_diffusion.file_writing import atomic_write, write_npz
from guided_diffusion.image_grid import make_image_grid

# The result columns: key and title.
TABLE_COLUMNS = (
    ("classifier_scale", "classifier scale"),
    ("recognised", "recognised as the requested class"),
    ("precision", "precision"),
    ("recall", "recall"),
)
# The plotted metrics: key, legend and colour.
SERIES = (
    ("recognised", "recognised", (31, 119, 180)),
    ("precision", "precision", (255, 127, 14)),
    ("recall", "recall", (44, 160, 44)),
)


# ---------------------------------------------------------------------- table and words


def results_table(rows):
    """
    :param rows: dicts with the TABLE_COLUMNS keys.
    :return: a markdown table, one line per row.
    """
    lines = ["| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
             "|" + " ---: |" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = [f"{row['classifier_scale']:g}"] + [f"{row[key]:.3f}" for key, _ in TABLE_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results_csv(rows, path):
    """
    Write the rows as CSV, the TABLE_COLUMNS keys as header, atomically.

    :param rows: dicts with the TABLE_COLUMNS keys.
    :param path: the file's path or blobfile URL.
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[key for key, _ in TABLE_COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row[key] for key, _ in TABLE_COLUMNS} for row in rows)
    write_bytes(path, text.getvalue().encode("utf-8"))


def _trend(values):
    """:return: how a sequence moves, in words ("rises at every step", ...)."""
    steps = np.diff(values)
    if np.all(steps > 0):
        return "rises at every step"
    if np.all(steps < 0):
        return "falls at every step"
    if values[-1] != values[0]:
        return ("rises" if values[-1] > values[0] else "falls") + " overall, not at every step"
    return "ends where it starts"


def describe_trends(rows):
    """
    Say how each metric moves from the smallest to the largest scale, and whether the
    paper's trade-off (recognition and precision up, recall down) shows.

    :param rows: result dicts sorted by classifier scale.
    :return: markdown text.
    """
    first, last = rows[0], rows[-1]
    lines = [f"From classifier scale {first['classifier_scale']:g} to {last['classifier_scale']:g}:"]
    for key, label, _ in SERIES:
        values = [row[key] for row in rows]
        lines.append(f"- {label} {_trend(values)} ({values[0]:.3f} -> {values[-1]:.3f})")
    if len(rows) < 2:
        verdict = "One scale only: there is no trend to compare."
    elif (last["recognised"] > first["recognised"] and last["precision"] > first["precision"]
          and last["recall"] < first["recall"]):
        verdict = ("The fidelity-diversity trade-off shows: recognition and precision rise with "
                   "the scale while recall falls.")
    else:
        verdict = ("The expected trade-off (recognition and precision rising, recall falling) "
                   "does not fully show in these numbers.")
    return "\n".join(lines) + "\n\n" + verdict


def results_markdown(options, counts, num_classes, model, classifier, judge_line, rows, times):
    """
    :param options: the job's checked options (quickstart_defaults() names).
    :param counts: (number of training images, number of held-out images).
    :param num_classes: the number of classes.
    :param model: the diffusion model (its parameters are counted).
    :param classifier: the noised classifier (its parameters are counted).
    :param judge_line: the sentence describing the judge and the real images' scores.
    :param rows: result dicts sorted by classifier scale.
    :param times: the wall times, as text.
    :return: the text of results.md.
    """
    size, parameters = options["image_size"], [sum(p.numel() for p in net.parameters()) / 1e6
                                               for net in (model, classifier)]
    setup = (
        f"{counts[0]} training and {counts[1]} held-out images of {num_classes} classes at "
        f"{size}x{size}; diffusion model {parameters[0]:.2f}M parameters, {options['train_steps']} "
        f"steps of {options['batch_size']} images; noised classifier {parameters[1]:.2f}M "
        f"parameters, {options['classifier_steps']} steps; {options['sample_steps']} DDIM steps, "
        f"{num_classes * options['samples_per_class']} samples per scale; seed {options['seed']}; "
        f"torch threads: {th.get_num_threads()}."
    )
    return "\n\n".join(["# Quickstart results", setup, results_table(rows), judge_line,
                        describe_trends(rows), f"Wall time: {times}."]) + "\n"


# ---------------------------------------------------------------------- pictures


def class_grid(images, labels, num_classes, columns):
    """
    :param images: uint8 images [N x H x W x C].
    :param labels: their classes; every class has at least `columns` images.
    :return: a uint8 grid image, row c holding the first `columns` images of class c.
    """
    rows = [images[labels == label][:columns] for label in range(num_classes)]
    return make_image_grid(np.concatenate(rows), nrow=columns)


def label_font(size):
    """A scalable default font, or Pillow's bitmap one where it has no sizes (Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_text(draw, xy, text, font, align="left"):
    """Draw text vertically centred on xy, starting, centred or ending at its x."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    shift = {"left": 0, "center": (right - left) / 2, "right": right - left}[align]
    draw.text((xy[0] - shift - left, xy[1] - (top + bottom) / 2), text, fill="black", font=font)


def draw_tradeoff_plot(rows, width=460, height=300):
    """
    :param rows: result dicts sorted by classifier scale.
    :return: an RGB PIL image: recognition, precision and recall (0 to 1) against the
        classifier scale (evenly spaced).
    """
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = label_font(13)
    left, right, top, bottom = 44, width - 110, 24, height - 48

    def y_of(value):
        return bottom - value * (bottom - top)

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(left, y_of(tick)), (right, y_of(tick))], fill=(225, 225, 225))
        draw_text(draw, (left - 6, y_of(tick)), f"{tick:g}", font, align="right")
    draw.rectangle([left, top, right, bottom], outline="black")
    xs = [left + (right - left) * (index + 0.5) / len(rows) for index in range(len(rows))]
    for x, row in zip(xs, rows):
        draw_text(draw, (x, bottom + 12), f"{row['classifier_scale']:g}", font, align="center")
    draw_text(draw, ((left + right) / 2, height - 14), "classifier scale", font, align="center")
    for index, (key, label, colour) in enumerate(SERIES):
        points = [(x, y_of(row[key])) for x, row in zip(xs, rows)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=colour)
        legend_y = top + 12 + 22 * index
        draw.line([(right + 10, legend_y), (right + 30, legend_y)], fill=colour, width=2)
        draw_text(draw, (right + 36, legend_y), label, font)
    return image


def captioned_tile(grid, caption, zoom, caption_height=24):
    """
    :param grid: a uint8 grid image [H x W x C].
    :return: an RGB PIL image: the grid zoomed by pixel repetition, the caption above it.
    """
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).convert("RGB")
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    tile = Image.new("RGB", (picture.width, picture.height + caption_height), "white")
    tile.paste(picture, (0, caption_height))
    draw_text(ImageDraw.Draw(tile), (tile.width / 2, caption_height / 2), caption, label_font(14), "center")
    return tile


def overview_picture(grids, plot, zoom=2, gap=12, caption_height=24):
    """
    :param grids: (caption, uint8 grid image [H x W x C]) pairs, one per scale.
    :param plot: the trade-off plot (a PIL image).
    :param zoom: pixel repetition of the grids.
    :return: an RGB PIL image: the captioned grids in a near-square block, the plot to its right.
    """
    tiles = [captioned_tile(grid, caption, zoom, caption_height) for caption, grid in grids]
    per_row = math.ceil(math.sqrt(len(tiles)))
    tile_width, tile_height = max(t.width for t in tiles), max(t.height for t in tiles)
    block_width = per_row * (tile_width + gap) - gap
    block_height = math.ceil(len(tiles) / per_row) * (tile_height + gap) - gap
    height = max(block_height, plot.height)
    canvas = Image.new("RGB", (block_width + plot.width + 3 * gap, height + 2 * gap), "white")
    for index, tile in enumerate(tiles):
        row, column = divmod(index, per_row)
        canvas.paste(tile, (gap + column * (tile_width + gap), gap + row * (tile_height + gap)))
    canvas.paste(plot, (block_width + 2 * gap, gap + (height - plot.height) // 2))
    return canvas


# ---------------------------------------------------------------------- files


def png_bytes(image):
    """
    :param image: a PIL image.
    :return: the image as PNG bytes.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_bytes(path, data):
    """
    Write bytes to a path, atomically.

    :param path: the file's path or blobfile URL.
    :param data: the bytes.
    """
    atomic_write(path, lambda f: f.write(data))


def write_pictures(out_dir, rows, samples, labels, num_classes, columns, zoom):
    """
    Write samples/scale_S.npz and samples/scale_S.png per scale, tradeoff.png and
    quickstart.png (reduced to 256 colours, small enough to commit).

    :param out_dir: the job's output folder.
    :param rows: result dicts sorted by classifier scale.
    :param samples: a dict from scale to uint8 images, labelled by `labels`.
    :param labels: the requested class of each sample.
    :param num_classes: the number of classes (rows of each grid).
    :param columns: samples per class shown in the grids.
    :param zoom: pixel repetition of the grids in quickstart.png.
    """
    samples_dir = bf.join(out_dir, "samples")
    bf.makedirs(samples_dir)
    grids = []
    for row in rows:
        scale = row["classifier_scale"]
        write_npz(bf.join(samples_dir, f"scale_{scale:g}.npz"), samples[scale], labels)
        grid = class_grid(samples[scale], labels, num_classes, columns)
        write_bytes(bf.join(samples_dir, f"scale_{scale:g}.png"), png_bytes(Image.fromarray(grid)))
        grids.append((f"scale {scale:g}: {100 * row['recognised']:.0f}% recognised", grid))
    plot = draw_tradeoff_plot(rows)
    write_bytes(bf.join(out_dir, "tradeoff.png"), png_bytes(plot))
    overview = overview_picture(grids, plot, zoom).quantize(  # octree keeps the plot's colours
        256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    write_bytes(bf.join(out_dir, "quickstart.png"), png_bytes(overview))
