"""
Tests for guided_diffusion/file_writing.py: atomic writes, npz and PNG files, and the
sampling outputs in the evaluator's layout.
"""

import os

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import file_writing
from guided_diffusion.file_writing import save_samples
from guided_diffusion.image_grid import make_image_grid


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "opt000001.pt")
    file_writing.atomic_write(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        file_writing.atomic_write(path, fail)
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["opt000001.pt"]


def test_saved_png_holds_the_grid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    path = str(tmp_path / "grid.png")
    file_writing.save_image_grid(images, path, nrow=3)
    assert np.array_equal(np.array(Image.open(path)), make_image_grid(images, nrow=3))
    file_writing.save_image_grid(images, path)  # ceil(sqrt(5)) = 3 per row by default
    assert np.array_equal(np.array(Image.open(path)), make_image_grid(images, nrow=3))


def test_npz_keeps_positional_and_named_arrays(tmp_path):
    path = str(tmp_path / "arrays.npz")
    file_writing.write_npz(path, np.arange(3), np.ones(2))
    with np.load(path) as data:
        assert data.files == ["arr_0", "arr_1"] and data["arr_0"].tolist() == [0, 1, 2]
    file_writing.write_npz(path, mu=np.zeros(2), sigma=np.eye(2))
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"] and np.array_equal(data["sigma"], np.eye(2))
    assert os.listdir(tmp_path) == ["arrays.npz"]


def test_save_samples_writes_npz_grid_and_pngs(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 0])
    path = save_samples(images, labels, str(tmp_path), save_png=True)
    assert path == str(tmp_path / "samples_5x8x8x3.npz")
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    grid = np.array(Image.open(tmp_path / "samples_5x8x8x3.png"))
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10, 3)  # 3 per row, 2 px padding
    assert np.array_equal(grid[2:10, 12:20], images[1])
    pngs = sorted(p.name for p in (tmp_path / "samples_5x8x8x3").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.array(Image.open(tmp_path / "samples_5x8x8x3" / "000004.png")), images[4])
    unlabelled = save_samples(images[:2], None, str(tmp_path))
    with np.load(unlabelled) as data:
        assert data.files == ["arr_0"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_png_folder_appears_only_when_complete(tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    write_png, written = file_writing.write_png, []

    def interrupted_after_two(image, path):
        if ".partial" in path:  # the grid next to the npz is written first
            if len(written) == 2:
                raise KeyboardInterrupt
            written.append(path)
        write_png(image, path)

    monkeypatch.setattr(file_writing, "write_png", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        save_samples(images, None, str(tmp_path), save_png=True)
    assert not (tmp_path / "samples_4x8x8x3").exists()  # no folder that looks finished
    assert len(list((tmp_path / "samples_4x8x8x3.partial").iterdir())) == 2
    monkeypatch.setattr(file_writing, "write_png", write_png)
    save_samples(images, None, str(tmp_path), save_png=True)  # the rerun replaces the partial one
    assert len(list((tmp_path / "samples_4x8x8x3").iterdir())) == 4
    assert not (tmp_path / "samples_4x8x8x3.partial").exists()
