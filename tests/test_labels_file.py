"""
Tests for guided_diffusion.labels_file and --labels_file: reading and writing the CSV,
its errors, labels through load_data, and the three training scripts recording the
file's classes (a resume with another class set refused).
"""

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.checkpoint import read_sidecar
from guided_diffusion.image_datasets import list_image_files, load_data
from guided_diffusion.labels_file import class_names_from_file, read_labels_file, write_labels_file
from test_sample_scripts import run_script

TINY_MODEL = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
              "--channel_mult", "1", "--attention_resolutions", "8", "--num_head_channels", "32",
              "--diffusion_steps", "50"]
TRAIN = ["--batch_size", "4", "--save_interval", "2", "--seed", "0", "--num_workers", "0",
         "--max_steps", "2"]


def write_two_tone_images(folder, count=8, side=8):
    """
    Write count PNGs, dark_<i>.png (values below 64) and light_<i>.png (above 192),
    alternating, with a few in a sub-folder: two classes any features tell apart.

    :return: the folder.
    """
    rng = np.random.default_rng(0)
    for index in range(count):
        light = index % 2
        pixels = rng.integers(0, 64, size=(side, side, 3), dtype=np.uint8) + 192 * light
        name = f"{'light' if light else 'dark'}_{index}.png"
        path = folder / ("more" if index >= count - 2 else "") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
    return folder


def write_csv(path, rows, header="path,class"):
    path.write_text("\n".join([header, *(f"{name},{label}" for name, label in rows)]) + "\n")
    return path


@pytest.fixture
def images(tmp_path):
    return write_two_tone_images(tmp_path / "images")


def true_rows(folder):
    """(relative path, "tone_" + prefix) of every image of write_two_tone_images."""
    return [(path.relative_to(folder).as_posix(), "tone_" + path.name.split("_")[0])
            for path in sorted(folder.rglob("*.png"))]


def test_write_then_read_round_trips(tmp_path):
    path = tmp_path / "labels.csv"
    write_labels_file(str(path), ["a.png", "sub/b.png"], ["cluster_01", "cluster_00"])
    assert path.read_text() == "path,class\na.png,cluster_01\nsub/b.png,cluster_00\n"
    assert read_labels_file(str(path)) == {"a.png": "cluster_01", "sub/b.png": "cluster_00"}


def test_load_data_labels_number_the_sorted_class_names(images, tmp_path):
    labels_file = write_csv(tmp_path / "labels.csv", true_rows(images))
    data = load_data(data_dir=str(images), batch_size=8, image_size=8, class_cond=True,
                     labels_file=str(labels_file), deterministic=True, num_workers=0, seed=0)
    assert data.class_names == ["tone_dark", "tone_light"]
    batch, kwargs = next(data)
    listed = [path for path, _ in list_image_files(str(images))]
    assert kwargs["y"].tolist() == [int("light_" in path) for path in listed]
    assert (batch.mean(dim=(1, 2, 3)) > 0).tolist() == ["light_" in path for path in listed]


def test_an_image_missing_from_the_file_names_the_file_and_the_images(images, tmp_path):
    rows = true_rows(images)
    labels_file = write_csv(tmp_path / "labels.csv", rows[2:4])
    with pytest.raises(ValueError) as error:
        class_names_from_file(list_image_files(str(images)), str(labels_file))
    assert str(error.value) == (
        f"labels_file={labels_file} has no row for 6 images of the data folder: dark_0.png, "
        "dark_2.png, light_3.png, light_5.png, more/dark_6.png and 1 more; expected one row per "
        "image, each path relative to data_dir")


def test_a_row_without_an_image_names_the_file_and_the_path(images, tmp_path):
    labels_file = write_csv(tmp_path / "labels.csv", [*true_rows(images), ("gone.png", "tone_dark")])
    with pytest.raises(ValueError, match=rf"labels_file={labels_file} lists 1 paths with no image "
                                         r"in the data folder: gone.png;"):
        class_names_from_file(list_image_files(str(images)), str(labels_file))


@pytest.mark.parametrize("rows, header, expected", [
    ([("a.png", "x"), ("b.png", "x")], "path,class", "has 1 class (x): guidance needs at least two"),
    ([("a.png", "x")], "file,label", "expected the header 'path,class'"),
    ([("a.png", "x"), ("./a.png", "y")], "path,class", "line 3: a.png is listed twice"),
    ([("a.png", "")], "path,class", "line 2: expected 'path,class' with both filled"),
])
def test_bad_files_are_refused(tmp_path, rows, header, expected):
    labels_file = write_csv(tmp_path / "labels.csv", rows, header)
    with pytest.raises(ValueError) as error:
        read_labels_file(str(labels_file))
    assert str(error.value).startswith(f"labels_file={labels_file}") and expected in str(error.value)


def test_a_missing_file_and_an_unused_file_are_refused(images, tmp_path):
    with pytest.raises(FileNotFoundError, match="labels_file=.*nothing.csv does not exist"):
        read_labels_file(str(tmp_path / "nothing.csv"))
    labels_file = write_csv(tmp_path / "labels.csv", true_rows(images))
    with pytest.raises(ValueError, match="with class_cond=False: the labels would not be used"):
        load_data(data_dir=str(images), batch_size=2, image_size=8, labels_file=str(labels_file))
    with pytest.raises(ValueError, match="class_from='folder' and labels_file=.* are two sources"):
        load_data(data_dir=str(images), batch_size=2, image_size=8, class_cond=True,
                  class_from="folder", labels_file=str(labels_file))


@pytest.mark.slow
def test_the_training_scripts_record_the_files_classes(images, tmp_path):
    labels_file = write_csv(tmp_path / "labels.csv", true_rows(images))
    classifier = ["--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1",
                  "--classifier_attention_resolutions", "4", "--num_classes", "2",
                  "--diffusion_steps", "50", "--batch_size", "4", "--save_interval", "1", "--seed", "0",
                  "--num_workers", "0", "--iterations", "1"]
    run_script("classifier_train.py", ["--data_dir", images, "--labels_file", labels_file, *classifier,
                                       "--log_dir", tmp_path / "classifier"])
    assert read_sidecar(str(tmp_path / "classifier" / "model000001.pt"))["class_names"] == [
        "tone_dark", "tone_light"]
    refused = run_script("classifier_train.py", ["--data_dir", images, "--labels_file", labels_file,
                                                 "--val_data_dir", images, *classifier], check=False)
    assert refused.returncode == 1 and "drop --val_data_dir" in refused.stderr
    super_res = ["--large_size", "16", "--small_size", "8", "--num_channels", "32", "--num_res_blocks",
                 "1", "--attention_resolutions", "8", "--num_head_channels", "32", "--diffusion_steps",
                 "50", "--class_cond", "True", "--num_classes", "2", *TRAIN, "--max_steps", "1",
                 "--save_interval", "1"]
    run_script("super_res_train.py", ["--data_dir", images, "--labels_file", labels_file, *super_res,
                                      "--log_dir", tmp_path / "super_res"])
    assert read_sidecar(str(tmp_path / "super_res" / "model000001.pt"))["class_names"] == [
        "tone_dark", "tone_light"]
