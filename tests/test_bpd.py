"""
Tests for guided_diffusion/bpd.py: the bits-per-dimension evaluation equals
diffusion.calc_bpd_loop, and with a seed depends only on the image index.

The tiny conditional model of test_sampling.py (8x8 images, 40 diffusion steps
respaced to 6) on one CPU thread.
"""

import numpy as np
import pytest
import torch as th

from guided_diffusion.bpd import evaluate_bpd
from test_sampling import NUM_CLASSES, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def conditional():
    return tiny_model(class_cond=True)


class ImageList:
    """A dataset of (CHW image, kwargs) pairs, like image_datasets.ImageDataset."""

    def __init__(self, count, seed=0):
        generator = th.Generator().manual_seed(seed)
        self.images = th.rand((count, 3, 8, 8), generator=generator) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index].numpy(), {"y": np.array(index % NUM_CLASSES)}


def test_evaluate_bpd_matches_calc_bpd_loop(conditional):
    model, diffusion = conditional
    data = ImageList(3)
    th.manual_seed(4)
    terms = evaluate_bpd(model, diffusion, data, num_samples=3, batch_size=3, progress=False)
    th.manual_seed(4)
    expected = diffusion.calc_bpd_loop(model, data.images, model_kwargs={"y": th.tensor([0, 1, 2])})
    for name in ("total_bpd", "prior_bpd", "vb", "mse", "xstart_mse"):
        assert np.allclose(terms[name], expected[name].numpy(), rtol=1e-5), name
    assert terms["vb"].shape == (3, diffusion.num_timesteps)


def test_seeded_bpd_is_independent_of_the_batch_size_and_repeats_images(conditional):
    model, diffusion = conditional
    data = ImageList(2)
    one = evaluate_bpd(model, diffusion, data, num_samples=3, batch_size=1, seed=8, progress=False)
    three = evaluate_bpd(model, diffusion, data, num_samples=3, batch_size=3, seed=8, progress=False)
    assert np.allclose(one["total_bpd"], three["total_bpd"], rtol=1e-5)
    assert one["total_bpd"].shape == (3,)
    assert one["prior_bpd"][2] == pytest.approx(one["prior_bpd"][0])  # image 0 again, same prior
    assert one["total_bpd"][2] != pytest.approx(one["total_bpd"][0], rel=1e-6)  # other noise
