"""
Tests for guided_diffusion/adm.py: the paper's systems by preset name, and ADM-G's
one-call guided sampling through the fast samplers.
"""

import numpy as np
import pytest
import torch as th

from guided_diffusion.adm import ADM, ADM_G, ADM_U, ADM_classifier
from guided_diffusion.sampling import sample

# The 64x64 presets' families at a tiny width, so that the tests build them in a moment.
SMALL = dict(num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=32,
             diffusion_steps=40, timestep_respacing="", use_fp16=False)
SMALL_CLASSIFIER = dict(classifier_width=64, classifier_depth=1, classifier_attention_resolutions="8",
                        classifier_use_fp16=False)


@pytest.fixture(scope="module")
def guided():
    th.manual_seed(0)
    model, diffusion = ADM("ADM_diffusion_64_conditioned", **SMALL)
    classifier = ADM_classifier("ADM_classifier_64", **SMALL_CLASSIFIER)
    return model, diffusion, classifier


def test_presets_build_by_the_papers_names_with_random_or_saved_weights(guided, tmp_path):
    model, diffusion, classifier = guided
    assert model.image_size == 64 and model.num_classes == 1000 and diffusion.num_timesteps == 40
    assert classifier.out_channels == 1000
    path = tmp_path / "model.pt"
    th.save(model.state_dict(), path)
    loaded, _ = ADM("ADM_diffusion_64_conditioned", str(path), **SMALL)
    assert not loaded.training
    assert all(th.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    upsampler, _ = ADM_U("ADM_U_64_256", **dict(SMALL, attention_resolutions="32"))
    assert upsampler.image_size == 256 and upsampler.in_channels == 6


def test_a_preset_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="'ADM_classifier_64' is a classifier preset; expected a "
                                         "diffusion preset .e.g. ADM_diffusion_256_conditioned"):
        ADM("ADM_classifier_64")


def test_adm_g_samples_guided_images_in_one_call(guided):
    model, diffusion, classifier = guided
    system = ADM_G(model, diffusion, classifier, classifier_scale=2.0)
    images = system.sample(labels=[3, 7], sampler="dpmpp_2m", steps=2, seed=0, progress=False)
    expected, _ = sample(model, diffusion, classifier=classifier, classifier_scale=2.0, labels=[3, 7],
                         sampler="dpmpp_2m", steps=2, seed=0, progress=False)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, expected)
