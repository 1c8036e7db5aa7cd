"""
Tests for guided_diffusion/file_writing.py: atomic writes, npz and PNG files, and the
sampling outputs in the evaluator's layout.
"""

import os
import tracemalloc

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


def test_samples_writer_holds_one_round_and_writes_pngs_as_rounds_arrive(tmp_path):
    rng = np.random.default_rng(2)
    rounds = [rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8) for _ in range(40)]
    labels = [rng.integers(0, 10, len(r)) for r in rounds]
    folder = tmp_path / "samples_2000x32x32x3.partial"
    tracemalloc.start()
    with file_writing.SamplesWriter(str(tmp_path), 2000, (32, 32, 3), True, save_png=True) as writer:
        for number, (images, round_labels) in enumerate(zip(rounds, labels)):
            writer.add(images, round_labels)
            if number in (0, 39):
                assert len(list(folder.iterdir())) == 50 * (number + 1)
                assert not (tmp_path / "samples_2000x32x32x3.npz").exists()  # published once complete
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    all_bytes = sum(r.nbytes for r in rounds)
    assert peak < all_bytes / 3  # one copy of every sample would need all_bytes
    with np.load(writer.path) as data:
        assert np.array_equal(data["arr_0"], np.concatenate(rounds))
        assert np.array_equal(data["arr_1"], np.concatenate(labels))
    grid = np.array(Image.open(tmp_path / "samples_2000x32x32x3.png"))
    assert np.array_equal(grid, make_image_grid(np.concatenate(rounds)[:64], nrow=8))
    assert len(list((tmp_path / "samples_2000x32x32x3").iterdir())) == 2000


def test_samples_writer_publishes_nothing_when_incomplete_or_interrupted(tmp_path):
    images = np.zeros((3, 4, 4, 3), np.uint8)
    old = save_samples(np.ones((4, 4, 4, 3), np.uint8), None, str(tmp_path))
    with pytest.raises(ValueError, match=r"3 of 4 samples were added to .*samples_4x4x4x3.npz"):
        with file_writing.SamplesWriter(str(tmp_path), 4, (4, 4, 3), False) as writer:
            writer.add(images)
    with pytest.raises(KeyboardInterrupt):
        with file_writing.SamplesWriter(str(tmp_path), 4, (4, 4, 3), False) as writer:
            writer.add(images)
            raise KeyboardInterrupt
    with np.load(old) as data:
        assert np.array_equal(data["arr_0"], np.ones((4, 4, 4, 3), np.uint8))  # unchanged
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    with file_writing.SamplesWriter(str(tmp_path), 4, (4, 4, 3), True) as writer:
        with pytest.raises(ValueError, match="3 samples with no labels: expected one label per sample"):
            writer.add(images)
        with pytest.raises(ValueError, match=r"expected uint8 \[n x 4 x 4 x 3\]"):
            writer.add(images.astype(np.float32), np.zeros(3))
        with pytest.raises(ValueError, match="5 samples for a file of 4"):
            writer.add(np.zeros((5, 4, 4, 3), np.uint8), np.zeros(5))
        writer.add(np.zeros((4, 4, 4, 3), np.uint8), np.zeros(4, np.int64))
