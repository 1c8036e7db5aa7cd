"""
Tests of evaluations.make_reference: reference batches from image folders and npz files.
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from evaluations import make_reference
from evaluations.inception import POOL_FEATURES, SPATIAL_FEATURES
from guided_diffusion.image_datasets import center_crop_arr
from test_inception import random_state_dict


class FeaturesFromPixels:
    """An Evaluator stand-in whose features are a fixed function of each image."""

    device = "cpu"

    def __init__(self):
        self.pool, self.spatial = [], []

    def iter_activations(self, batches):
        for batch in batches:
            seeds = [int(image.astype(np.int64).sum()) for image in batch]
            pool = np.stack([np.random.RandomState(s).randn(POOL_FEATURES) for s in seeds])
            spatial = np.stack([np.random.RandomState(s + 1).rand(SPATIAL_FEATURES) for s in seeds])
            self.pool.append(pool)
            self.spatial.append(spatial)
            yield pool.astype(np.float32), spatial.astype(np.float32)


def _write_images(folder):
    """Images of several shapes and modes, in a nested folder, plus a file to skip."""
    rng = np.random.RandomState(0)
    shapes = {"a.png": (30, 40), "b.jpg": (40, 30), "sub/c.png": (20, 20), "sub/d.png": (48, 64)}
    for name, (height, width) in shapes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=95)
    Image.fromarray(rng.randint(0, 256, (33, 35, 4), dtype=np.uint8), "RGBA").save(folder / "e.png")
    (folder / "notes.txt").write_text("not an image")
    return ["a.png", "b.jpg", "e.png", "sub/c.png", "sub/d.png"]  # sorted, depth first


def test_reference_holds_statistics_of_all_and_a_seeded_subset(tmp_path):
    names = _write_images(tmp_path)
    paths = [str(tmp_path / name) for name in names]
    evaluator = FeaturesFromPixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 5 samples for 2048 features
        reference = make_reference.make_reference(
            evaluator, make_reference.folder_batches(paths, 16, batch_size=2), total=5,
            num_pr_images=3, seed=0,
        )
    keep = np.sort(np.random.default_rng(0).choice(5, 3, replace=False))
    expected_images = [center_crop_arr(Image.open(paths[i]).convert("RGB"), 16) for i in keep]
    np.testing.assert_array_equal(reference["arr_0"], np.stack(expected_images))
    pool = np.concatenate(evaluator.pool).astype(np.float32)
    spatial = np.concatenate(evaluator.spatial).astype(np.float32)
    np.testing.assert_allclose(reference["mu"], pool.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reference["sigma"], np.cov(pool, rowvar=False), atol=1e-5)
    np.testing.assert_allclose(reference["sigma_s"], np.cov(spatial, rowvar=False), atol=1e-6)
    assert reference["mu_s"].shape == (SPATIAL_FEATURES,)


class NaNFeaturesForTheSecondBatch(FeaturesFromPixels):
    """Features with a NaN in the second batch, as from damaged weights."""

    def iter_activations(self, batches):
        for index, (pool, spatial) in enumerate(super().iter_activations(batches)):
            if index == 1:
                spatial[0, 3] = np.nan
            yield pool, spatial


def test_features_that_are_not_finite_stop_the_reference(tmp_path):
    names = _write_images(tmp_path)
    batches = make_reference.folder_batches([str(tmp_path / name) for name in names], 16, 2)
    with pytest.raises(ValueError, match="input images 2 to 3: Inception spatial output holds 1 NaN"):
        make_reference.make_reference(NaNFeaturesForTheSecondBatch(), batches, total=5)


def test_npz_input_is_resized_only_when_sizes_differ(tmp_path):
    images = np.random.RandomState(1).randint(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    path = str(tmp_path / "images.npz")
    np.savez(path, images)
    assert make_reference.npz_image_count(path) == 5
    resized = np.concatenate(list(make_reference.npz_batches(path, 16, batch_size=2)))
    expected = np.stack([center_crop_arr(Image.fromarray(image), 16) for image in images])
    np.testing.assert_array_equal(resized, expected)
    kept = np.concatenate(list(make_reference.npz_batches(path, None, batch_size=2)))
    np.testing.assert_array_equal(kept, images)


@pytest.mark.slow
def test_command_line_writes_a_reference_batch(tmp_path):
    _write_images(tmp_path / "images")
    weights = tmp_path / "inception-2015-12-05.pt"
    torch.save(random_state_dict(seed=4), weights)
    output = tmp_path / "ref.npz"
    argv = [str(tmp_path / "images"), str(output), "--image_size", "16", "--num_pr_images", "4",
            "--inception_path", str(weights), "--batch_size", "2", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_reference.main(argv)
    with np.load(output) as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert data["sigma"].shape == (2048, 2048) and data["sigma_s"].shape == (2023, 2023)
        assert np.isfinite(data["sigma"]).all() and data["mu"].std() > 0


def test_command_line_errors(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="--image_size is required"):
        make_reference.main([str(tmp_path / "images"), str(tmp_path / "ref.npz")])
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        make_reference.main([str(tmp_path / "nothing.npz"), str(tmp_path / "ref.npz")])
