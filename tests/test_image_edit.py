"""
Tests for scripts/image_edit.py: one end-to-end run per task on tiny checkpoints
(test_sample_scripts' flags), two processes giving the same images as one, and the
errors on bad flags and files, named in flag terms.
"""

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion.script_util import create_classifier
from test_sample_scripts import CLASSIFIER_FLAGS, COND, MODEL_FLAGS, read_samples, run_main, run_script
from test_sampling import tiny_classifier_flags, tiny_model

SIZE = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny class-conditional model (for classifier-free guidance too) and classifier."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model, _ = tiny_model(class_cond=True, class_dropout_prob=0.1)
    th.save(model.state_dict(), folder / "cond.pt")
    th.manual_seed(0)
    th.save(create_classifier(**tiny_classifier_flags()).state_dict(), folder / "classifier.pt")
    return {"cond": folder / "cond.pt", "classifier": folder / "classifier.pt"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three 8x8 inputs as a folder (labels from the prefixes) and as a .npz, and mask PNGs."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    (folder / "dir").mkdir()
    for image, name in zip(images, ["2_a.png", "0_b.png", "3_c.png"]):
        Image.fromarray(image).save(folder / "dir" / name)
    np.savez(folder / "in.npz", images, np.array([2, 0, 3]))
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    mask[2:6, 2:6] = 0
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:4, :4]).save(folder / "small_mask.png")
    Image.fromarray(np.where(mask > 0, 200, 0).astype(np.uint8)).save(folder / "grey_mask.png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / "black_mask.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "big.png")
    return dict(folder=folder, images=images, dir=folder / "dir", npz=folder / "in.npz",
                mask=folder / "mask.png")


def edit_args(checkpoints, log_dir, *flags):
    return MODEL_FLAGS + COND + ["--model_path", checkpoints["cond"], "--seed", 0, "--batch_size", 2,
                                 "--log_dir", log_dir, *flags]


@pytest.mark.slow
@pytest.mark.parametrize("task, flags", [
    ("inpaint", ["--mask", "MASK", "--jump_length", 2, "--jump_n_sample", 2]),
    ("sdedit", ["--strength", 0.5, "--cfg_scale", 2.0]),
    ("ilvr", ["--ilvr_factor", 2, "--classifier_scale", 1.0, "--classifier_path", "CLASSIFIER"]),
    ("dps", ["--operator", "downsample", "--operator_factor", 2, "--dps_scale", 0.5, "--use_ddim", True]),
])
def test_each_task_writes_its_samples_and_comparison_grid(checkpoints, inputs, tmp_path, task, flags):
    flags = [inputs["mask"] if flag == "MASK" else checkpoints["classifier"] if flag == "CLASSIFIER" else flag
             for flag in flags]
    classifier = CLASSIFIER_FLAGS if "--classifier_path" in flags else []
    run_script("image_edit.py", edit_args(checkpoints, tmp_path, "--task", task, "--input_dir", inputs["dir"],
                                          *classifier, *flags))
    images, labels = read_samples(tmp_path, 3)
    assert list(labels) == [0, 2, 3]  # sorted files: 0_b, 2_a, 3_c
    grid = np.array(Image.open(tmp_path / "samples_3x8x8x3_comparison.png"))
    assert grid.shape == (2 + 3 * (SIZE + 2), 2 + 3 * (SIZE + 2), 3)
    assert np.array_equal(grid[2:2 + SIZE, 2 + 2 * (SIZE + 2):2 + 2 * (SIZE + 2) + SIZE], images[0])
    assert np.array_equal(grid[2:2 + SIZE, 2:2 + SIZE], inputs["images"][1])
    if task == "inpaint":
        keep = np.array(Image.open(inputs["mask"])) > 0
        order = [1, 0, 2]
        assert np.array_equal(images[:, keep], inputs["images"][order][:, keep])


@pytest.mark.slow
def test_two_processes_give_the_images_of_one(checkpoints, inputs, tmp_path):
    flags = ["--task", "inpaint", "--input_npz", inputs["npz"], "--jump_length", 2, "--jump_n_sample", 2]
    run_script("image_edit.py", edit_args(checkpoints, tmp_path / "one", *flags))
    run_script("image_edit.py", edit_args(checkpoints, tmp_path / "two", *flags), processes=2)
    one, labels = read_samples(tmp_path / "one", 3)
    two, _ = read_samples(tmp_path / "two", 3)
    assert list(labels) == [2, 0, 3]
    assert np.abs(one.astype(int) - two).max() <= 1 and (one == two).mean() > 0.99


@pytest.mark.parametrize("flags, error, message", [
    (["--task", "inpaint", "--mask", "FOLDER/small_mask.png"], ValueError,
     r"--mask \S+small_mask.png of shape \(1, 1, 4, 4\): expected the images' size 8x8"),
    (["--task", "inpaint", "--mask", "FOLDER/grey_mask.png"], ValueError, "grey_mask.png is not binary"),
    (["--task", "inpaint", "--mask", "FOLDER/black_mask.png"], ValueError, "black_mask.png keeps no pixel"),
    (["--task", "inpaint", "--mask", "FOLDER/none.png"], FileNotFoundError, "none.png: expected half, box"),
    (["--task", "sdedit", "--strength", 1.5], ValueError, r"--strength 1.5: expected a number in \(0, 1\]"),
    (["--task", "ilvr", "--ilvr_factor", 3], ValueError, "--ilvr_factor 3 does not divide the image size 8"),
    (["--task", "dps", "--operator", "blur", "--blur_kernel_size", 4], ValueError, "blur kernel_size=4"),
    (["--task", "inpaint", "--num_samples", 4], ValueError, "--num_samples 4: more than the 3 input images"),
    (["--task", "inpaint", "--strength", 0.3], ValueError, "--strength 0.3: for --task sdedit, not --task inpaint"),
    (["--task", "ilvr", "--mask", "box"], ValueError, "--mask box: --task ilvr takes no mask"),
    (["--task", "dps", "--operator", "blur", "--mask", "box"], ValueError, "--mask box: --task dps takes no mask"),
])
def test_bad_flags_are_refused_in_flag_terms(checkpoints, inputs, monkeypatch, tmp_path, flags, error, message):
    flags = [str(flag).replace("FOLDER", str(inputs["folder"])) for flag in flags]
    args = edit_args(checkpoints, tmp_path, "--input_dir", inputs["dir"], *flags)
    with pytest.raises(error, match=message):
        run_main("image_edit.py", args, monkeypatch)


@pytest.mark.parametrize("flags, message", [
    (["--input_dir", "FOLDER"], r"big.png is 16x16: the model makes 8x8 images \(--image_size\)"),
    ([], "give one of --input_dir and --input_npz"),
])
def test_inputs_of_the_wrong_size_or_none_are_refused(checkpoints, inputs, monkeypatch, tmp_path, flags, message):
    big = inputs["folder"] / "big"
    big.mkdir(exist_ok=True)
    (big / "big.png").write_bytes((inputs["folder"] / "big.png").read_bytes())
    args = edit_args(checkpoints, tmp_path, "--task", "sdedit", *[str(big) if f == "FOLDER" else f for f in flags])
    with pytest.raises(ValueError, match=message):
        run_main("image_edit.py", args, monkeypatch)
