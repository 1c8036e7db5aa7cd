"""
The quickstart's editing stage (examples/quickstart/editing_stage.py) at tiny size: a
randomly initialised class-conditional model and classifier, a judge fitted on
synthetic 8x8 images of three classes; every output is written with the expected rows,
the inpainted known pixels are the inputs', the goals are judged from the rows, and bad
options are refused by name.
"""

import csv

import numpy as np
import pytest
import torch as th
from PIL import Image

from examples.quickstart import editing_stage
from examples.quickstart.judge import Judge
from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

NUM_CLASSES = 3
TINY_EDITING = dict(
    editing=True, editing_per_class=2, editing_steps=4, editing_jump_length=1, editing_jump_n_sample=2,
    editing_random_fill=0.7, editing_sdedit_strength=0.5, editing_dps_scale=1.0, editing_request="+1",
    editing_show=2, seed=3, sample_batch_size=4, diffusion_steps=20,
)
EXPECTED_ROWS = (
    [("inpaint", mask, method) for mask in ("bottom half", "centre box", "random")
     for method in ("RePaint r=1", "RePaint j=1 r=2", "DPS 1", "SDEdit 0.5")]
    + [("complete", "bottom half", "guided RePaint j=1 r=2"), ("complete", "none", "guided sampling")]
    + [("superres", "4x4", method) for method in ("DPS 1", "ILVR 2", "bicubic")]
)


def _class_images(per_class, seed):
    """per_class 8x8 RGB images of each class: a dark bar in a class-specific row, on light noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(190, 255, size=(NUM_CLASSES * per_class, 8, 8, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    for image, label in zip(images, labels):
        image[2 * label + 1: 2 * label + 3] = 0
    return images, labels


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory, torch_single_thread):
    """(out_dir, rows, the edited originals) of the stage at tiny size, written."""
    from guided_diffusion import logger

    th.manual_seed(0)
    model_flags = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1,
                       attention_resolutions="", class_cond=True, num_classes=NUM_CLASSES,
                       diffusion_steps=20, noise_schedule="cosine")
    model, _ = create_model_and_diffusion(**model_flags)
    classifier_flags = dict(classifier_defaults(), image_size=8, classifier_width=32, classifier_depth=1,
                            classifier_attention_resolutions="", num_classes=NUM_CLASSES)
    classifier = create_classifier(**classifier_flags)
    train_images, train_labels = _class_images(6, seed=0)
    judge = Judge(judge_size=8, hidden=8, seed=0).fit(train_images, train_labels)
    heldout_images, heldout_labels = _class_images(4, seed=1)
    out_dir = str(tmp_path_factory.mktemp("editing"))
    options = dict(TINY_EDITING, out_dir=out_dir)
    previous = logger.Logger.CURRENT
    logger.configure(dir=out_dir, format_strs=["log"])
    try:
        rows, examples = editing_stage.run_editing_stage(
            model.eval(), model_flags, classifier.eval(), 2.0, heldout_images, heldout_labels, judge, options,
            progress=False)
        editing_stage.write_editing(out_dir, rows, examples, options, seconds=1.0)
    finally:
        logger.Logger.CURRENT.close()
        logger.Logger.CURRENT = previous
    return out_dir, rows, examples[1]


def test_the_stage_writes_its_table_report_samples_and_picture(stage_run):
    out_dir, rows, originals = stage_run
    assert originals.shape == (6, 8, 8, 3)
    with open(f"{out_dir}/editing.csv") as f:
        table = list(csv.DictReader(f))
    assert [(row["task"], row["input"], row["method"]) for row in table] == EXPECTED_ROWS
    for row in table:
        assert 0 <= float(row["recognised"]) <= 1
        assert (row["mse"] == "") == (row["task"] == "complete")
    evaluations = {row["method"]: int(row["evaluations"]) for row in table if row["input"] == "bottom half"}
    # 4 steps, j = 1, r = 2: 4 + (2 - 1) * 1 * (4 - 1) reverse steps; SDEdit 0.5 starts at 2.
    assert evaluations == {"RePaint r=1": 4, "RePaint j=1 r=2": 7, "DPS 1": 4, "SDEdit 0.5": 2,
                           "guided RePaint j=1 r=2": 7}
    report = open(f"{out_dir}/editing.md").read()
    assert report.count("- Goal: ") == 2 and "reached" in report and "Hidden-pixel MSE" in report
    assert "respaced to 4 DDPM steps" in report
    for task, input_name, method in EXPECTED_ROWS:
        name = editing_stage._slug((task, input_name, method))
        with np.load(f"{out_dir}/editing_samples/{name}.npz") as arrays:
            assert arrays["arr_0"].shape == (6, 8, 8, 3) and arrays["arr_0"].dtype == np.uint8
            assert len(arrays["arr_1"]) == 6
    # 17 rows of (2 digits x 3 images of 8 pixels and 2-pixel borders) zoomed 4 times, captioned.
    assert Image.open(f"{out_dir}/editing.png").size == (4 * (6 * 10 + 2), 17 * (4 * 12 + 24))


def test_the_inpainted_known_pixels_are_the_inputs(stage_run):
    out_dir, _, originals = stage_run
    masks = editing_stage.make_masks(len(originals), 8, TINY_EDITING["editing_random_fill"], TINY_EDITING["seed"])
    for name, mask in masks.items():
        keep = np.broadcast_to(mask.numpy().transpose(0, 2, 3, 1) > 0, originals.shape)
        for method in ("RePaint r=1", "RePaint j=1 r=2", "SDEdit 0.5"):
            with np.load(f"{out_dir}/editing_samples/{editing_stage._slug(('inpaint', name, method))}.npz") as f:
                assert np.array_equal(f["arr_0"][keep], originals[keep]), (name, method)
    slug = editing_stage._slug(("complete", "bottom half", "guided RePaint j=1 r=2"))
    with np.load(f"{out_dir}/editing_samples/{slug}.npz") as arrays:
        assert np.array_equal(arrays["arr_0"][:, :4], originals[:, :4])
        assert np.array_equal(arrays["arr_1"], (np.repeat(np.arange(3), 2) + 1) % 3)


def _rows(plain, resampled, guided, unconstrained):
    """Synthetic rows holding the goals' four recognitions."""
    def row(task, input_name, method, recognised):
        return editing_stage.result_row(task, input_name, method, "true", 7, recognised, 0.1, 1.0)

    return [row("inpaint", "bottom half", "RePaint r=1", plain),
            row("inpaint", "bottom half", "RePaint j=5 r=4", resampled),
            row("inpaint", "centre box", "RePaint j=5 r=4", 0.0),
            row("complete", "bottom half", "guided RePaint j=5 r=4", guided),
            row("complete", "none", "guided sampling", unconstrained)]


def test_the_goals_are_judged_from_the_rows():
    results = editing_stage.goal_results(_rows(0.5, 0.6, 0.7, 0.7))
    assert [(a, b, reached) for _, a, b, reached in results] == [(0.6, 0.5, True), (0.7, 0.7, True)]
    results = editing_stage.goal_results(_rows(0.6, 0.6, 0.6, 0.7))
    assert [reached for *_, reached in results] == [False, False]
    results = editing_stage.goal_results(_rows(0.5, 0.6, 0.7, 0.7)[:1])
    assert [reached for *_, reached in results] == [None, None]
    options = dict(editing_stage.editing_defaults(), seed=0, diffusion_steps=1000)
    report = editing_stage.editing_markdown(_rows(0.5, 0.6, 0.65, 0.7), options, count=200, seconds=3)
    assert "more often than plain replacement (bottom half): 0.600 against 0.500, reached." in report
    assert "unconstrained guided sampling: 0.650 against 0.700, not reached." in report
    assert "bottom half (lower is better): RePaint with resampling 0.1000, plain replacement 0.1000." in report
    assert "1000-step diffusion respaced to 50 DDPM steps" in report and "Seed 0; took 3 s." in report


@pytest.mark.parametrize("name, value", [
    ("editing_per_class", 0), ("editing_steps", 0), ("editing_jump_length", 0), ("editing_jump_n_sample", 1.5),
    ("editing_show", -1), ("editing_random_fill", 1.0), ("editing_sdedit_strength", 0),
    ("editing_dps_scale", float("nan")), ("editing_request", "three"), ("editing_steps", 2000),
])
def test_bad_options_are_refused_by_name(name, value):
    options = dict(editing_stage.editing_defaults(), editing=True, diffusion_steps=1000, **{name: value})
    with pytest.raises(ValueError, match=f"--{name} {value}"):
        editing_stage.check_editing_options(options)
    editing_stage.check_editing_options(dict(options, editing=False))


def test_requested_labels_shift_or_fix_the_class():
    labels = np.array([0, 1, 2, 9])
    assert editing_stage.requested_labels(labels, "+1", 10).tolist() == [1, 2, 3, 0]
    assert editing_stage.requested_labels(labels, "3", 10).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="--editing_request 12: the model has 10 classes"):
        editing_stage.requested_labels(labels, "12", 10)


def test_inputs_hide_nothing_of_the_kept_pixels():
    images = np.full((2, 8, 8, 3), 200, np.uint8)
    images[:, 4:] = 10
    mask = editing_stage.make_masks(2, 8, 0.7, 0)["bottom half"]
    guide = editing_stage.masked_guide(images, mask)
    assert (guide[:, :4] == 200).all() and (guide[:, 4:] == 200).all()
    low = editing_stage.downsampled(np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1).repeat(3, -1), 2)
    assert low[0, 0, 0, 0] == low[0, 1, 1, 0] == 4  # (0 + 1 + 8 + 9) / 4 = 4.5, rounded to even
