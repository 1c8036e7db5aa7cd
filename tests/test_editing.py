"""
Tests for guided_diffusion/editing.py and edit_sampling.py: RePaint, SDEdit, ILVR and DPS
on tiny random UNets (exact properties: kept pixels, seeds, guidance at scale 0) and on a
closed-form model, the exact noise prediction of Gaussian data (ILVR's low frequencies,
DPS's measurement error); RePaint's schedule; the errors on bad inputs.
"""

import numpy as np
import pytest
import torch as th

from guided_diffusion import edit_sampling, editing
from guided_diffusion.adm import ADM_G
from guided_diffusion.sampling import sample
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion

from test_sampling import conditional, one_thread, tiny_classifier_flags, tiny_model  # the first two: fixtures

LABELS = [0, 1, 2, 3, 1]


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).integers(0, 256, (len(LABELS), 8, 8, 3), dtype=np.uint8)


class GaussianDataModel(th.nn.Module):
    """The exact noise prediction E[eps | x_t] of data N(0, std^2 I), an unconditional model."""

    def __init__(self, diffusion, std=0.5, image_size=8):
        super().__init__()
        self.register_buffer("alphas_cumprod", th.tensor(diffusion.alphas_cumprod, dtype=th.float32))
        self.std, self.in_channels, self.image_size = std, 3, image_size
        self.anchor = th.nn.Parameter(th.zeros(()))  # the device the sampling code looks for

    def forward(self, x, t, **kwargs):
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - alpha_bar).sqrt() * x / (alpha_bar * self.std**2 + 1 - alpha_bar)


@pytest.fixture(scope="module")
def gaussian():
    diffusion = create_gaussian_diffusion(steps=40, noise_schedule="linear")
    truth = (th.randn(4, 3, 8, 8, generator=th.Generator().manual_seed(1)) * 0.5).clamp(-1, 1)
    images = ((truth + 1) * 127.5).round().to(th.uint8).permute(0, 2, 3, 1).numpy()
    return GaussianDataModel(diffusion), diffusion, images


METHODS = {
    "inpaint": lambda images, **kw: (edit_sampling.inpaint, (images, editing.box_mask(8)),
                                     dict(jump_length=2, jump_n_sample=2, **kw)),
    "sdedit": lambda images, **kw: (edit_sampling.sdedit, (images, 0.5), dict(mask=editing.half_mask(8), **kw)),
    "ilvr": lambda images, **kw: (edit_sampling.ilvr, (images, 2), kw),
    "dps": lambda images, **kw: (edit_sampling.dps, (images, edit_sampling.make_operator("downsample", factor=2)),
                                 dict(scale=0.5, **kw)),
}


def run_method(name, model, diffusion, images, **options):
    function, args, kwargs = METHODS[name](images, **options)
    return function(model, diffusion, *args, progress=False, **kwargs)[0]


@pytest.mark.parametrize("use_ddim", [False, True])
def test_inpainting_keeps_every_known_pixel(conditional, inputs, use_ddim):
    model, diffusion = conditional
    mask = editing.random_mask(8, th.Generator().manual_seed(0))
    out, labels = edit_sampling.inpaint(model, diffusion, inputs, mask, jump_length=2, jump_n_sample=3,
                                        labels=LABELS, seed=0, use_ddim=use_ddim, progress=False)
    keep = mask[0, 0].bool().numpy()
    assert np.array_equal(out[:, keep], inputs[:, keep]) and list(labels) == LABELS
    assert not np.array_equal(out[:, ~keep], inputs[:, ~keep])


def test_sdedit_at_strength_one_equals_unguided_sampling(conditional, inputs):
    model, diffusion = conditional
    edited, _ = edit_sampling.sdedit(model, diffusion, inputs, 1.0, labels=LABELS, seed=3, batch_size=2,
                                     progress=False)
    sampled, _ = sample(model, diffusion, labels=LABELS, seed=3, batch_size=5, progress=False)
    assert np.array_equal(edited, sampled)
    weak, _ = edit_sampling.sdedit(model, diffusion, inputs, 0.2, labels=LABELS, seed=3, progress=False)
    assert np.abs(weak.astype(int) - inputs).mean() < np.abs(sampled.astype(int) - inputs).mean()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_seed_same_images_whatever_the_batch_size(conditional, inputs, name):
    model, diffusion = conditional
    one = run_method(name, model, diffusion, inputs, labels=LABELS, seed=5, batch_size=1)
    five = run_method(name, model, diffusion, inputs, labels=LABELS, seed=5, batch_size=5)
    assert np.abs(one.astype(int) - five).max() <= 1 and (one == five).mean() > 0.99


@pytest.mark.parametrize("name", sorted(METHODS))
def test_zero_classifier_scale_equals_unguided_editing(conditional, inputs, name):
    model, diffusion = conditional
    th.manual_seed(0)
    classifier = create_classifier(**tiny_classifier_flags()).eval()
    plain = run_method(name, model, diffusion, inputs, labels=LABELS, seed=1)
    guided = run_method(name, model, diffusion, inputs, labels=LABELS, seed=1, classifier=classifier,
                        classifier_scale=0.0)
    assert np.array_equal(plain, guided)
    pushed = run_method(name, model, diffusion, inputs, labels=LABELS, seed=1, classifier=classifier,
                        classifier_scale=50.0)
    assert not np.array_equal(plain, pushed)


def test_classifier_free_guidance_composes_with_editing(inputs):
    model, diffusion = tiny_model(class_cond=True, class_dropout_prob=0.1)
    plain = run_method("ilvr", model, diffusion, inputs, labels=LABELS, seed=1)
    one = run_method("ilvr", model, diffusion, inputs, labels=LABELS, seed=1, cfg_scale=1.0)
    three = run_method("ilvr", model, diffusion, inputs, labels=LABELS, seed=1, cfg_scale=3.0)
    assert np.array_equal(plain, one) and not np.array_equal(plain, three)


def test_ilvr_keeps_the_references_low_frequencies(gaussian):
    model, diffusion, images = gaussian
    reference = editing.from_uint8(images)
    method = editing.ILVR(reference, 4)
    th.manual_seed(0)
    result = method.sample(diffusion, model, tuple(reference.shape), clip_denoised=False)
    th.manual_seed(0)
    free = diffusion.p_sample_loop(model, tuple(reference.shape), clip_denoised=False)
    low = editing.low_pass(reference, 4)
    # phi_N(result) matches phi_N(reference) up to phi_N not being a projection (bicubic).
    assert (editing.low_pass(result, 4) - low).abs().max() < 0.02
    assert (editing.low_pass(free, 4) - low).abs().max() > 0.3
    high = (result - editing.low_pass(result, 4)) - (reference - low)
    assert high.abs().mean() > 0.1


@pytest.mark.parametrize("operator", [editing.DownsampleOperator(2), editing.BlurOperator(3, 1.0),
                                      editing.MaskOperator(editing.box_mask(8))])
@pytest.mark.parametrize("use_ddim", [False, True])
def test_dps_lowers_the_measurement_error(gaussian, operator, use_ddim):
    model, diffusion, images = gaussian
    guided, _ = edit_sampling.dps(model, diffusion, images, operator, scale=1.0, seed=0, use_ddim=use_ddim,
                                  progress=False)
    free, _ = edit_sampling.dps(model, diffusion, images, operator, scale=0.0, seed=0, use_ddim=use_ddim,
                                progress=False)
    y = operator(editing.from_uint8(images))

    def error(result):
        return (y - operator(editing.from_uint8(result))).flatten(1).norm(dim=1)

    assert (error(guided) < 0.35 * error(free)).all(), (error(guided), error(free))


def test_repaint_schedule_follows_the_papers_jumps():
    levels = editing.repaint_levels(6, 2, 2)
    assert levels == [5, 4, 5, 6, 5, 4, 3, 2, 3, 4, 3, 2, 1, 0]
    assert editing.repaint_levels(250, 10, 1) == list(range(249, -1, -1))
    path = [250] + editing.repaint_levels(250, 10, 10)
    down = sum(b < a for a, b in zip(path, path[1:]))
    up = sum(b > a for a, b in zip(path, path[1:]))
    assert (down, up) == (250 + 9 * 10 * 24, 9 * 10 * 24) and path[-1] == 0
    method = editing.RePaint(th.zeros(1, 3, 8, 8), editing.half_mask(8), 10, 10)
    assert method.num_steps(250) == 2410 and method.num_steps(1000) == 1000 + 9 * 10 * 99


def test_the_callback_sees_every_reverse_step(conditional, inputs):
    model, diffusion = conditional
    calls = []
    edit_sampling.inpaint(model, diffusion, inputs[:2], editing.half_mask(8), jump_length=2,
                          jump_n_sample=2, labels=LABELS[:2], seed=0, progress=False,
                          callback=lambda state: calls.append(int(state["t"][0])))
    assert calls == [5, 4, 5, 4, 3, 2, 3, 2, 1, 0]


@pytest.mark.parametrize("call, message", [
    (lambda m, d, x: edit_sampling.inpaint(m, d, x, th.ones(4, 4)),
     r"mask of shape \(1, 1, 4, 4\): expected the images' size 8x8"),
    (lambda m, d, x: edit_sampling.inpaint(m, d, x, editing.half_mask(8).repeat(2, 1, 1, 1)),
     "one mask for all 5 images or one each"),
    (lambda m, d, x: edit_sampling.inpaint(m, d, x, th.full((8, 8), 0.5)), "mask is not binary"),
    (lambda m, d, x: edit_sampling.inpaint(m, d, x, th.zeros(8, 8)), "mask keeps no pixel"),
    (lambda m, d, x: edit_sampling.inpaint(m, d, x, th.ones(8, 8)), "mask keeps every pixel"),
    (lambda m, d, x: edit_sampling.sdedit(m, d, np.zeros((1, 16, 16, 3), np.uint8), 0.5),
     r"input images of shape \(3, 16, 16\).*\(3, 8, 8\)"),
    (lambda m, d, x: edit_sampling.sdedit(m, d, x, 1.5), r"strength=1.5: expected a number in \(0, 1\]"),
    (lambda m, d, x: edit_sampling.sdedit(m, d, x, 0.0), "strength=0.0"),
    (lambda m, d, x: edit_sampling.ilvr(m, d, x, 3), "ilvr_factor=3 does not divide the image size 8"),
    (lambda m, d, x: edit_sampling.edit(m, d, editing.DPS(editing.DownsampleOperator(2), th.zeros(5, 3, 8, 8))),
     r"operator's output of shape \(3, 4, 4\) differs from the measurement y's \(3, 8, 8\)"),
    (lambda m, d, x: edit_sampling.ilvr(m, d, x, 2, sampler="dpmpp_2m"), "sampler=dpmpp_2m with an editing"),
    (lambda m, d, x: edit_sampling.inpaint(m, d, x, editing.half_mask(8), jump_length=0), "jump_length=0"),
    (lambda m, d, x: edit_sampling.make_operator("inpaint"), "operator=inpaint needs a mask"),
])
def test_bad_inputs_are_refused_naming_the_argument(conditional, inputs, call, message):
    model, diffusion = conditional
    with pytest.raises(ValueError, match=message):
        call(model, diffusion, inputs)


def test_adm_g_edits_with_its_classifier_guidance(conditional, inputs):
    model, diffusion = conditional
    th.manual_seed(0)
    classifier = create_classifier(**tiny_classifier_flags()).eval()
    system = ADM_G(model, diffusion, classifier, classifier_scale=3.0)
    mask = editing.half_mask(8)
    images = system.inpaint(inputs, mask, LABELS, jump_length=2, jump_n_sample=1, progress=False)
    expected, _ = edit_sampling.inpaint(model, diffusion, inputs, mask, jump_length=2, jump_n_sample=1,
                                        classifier=classifier, classifier_scale=3.0, labels=LABELS, seed=0,
                                        progress=False)
    assert np.array_equal(images, expected)
    operator = editing.BlurOperator(3, 1.0)
    images = system.dps(inputs, operator, LABELS, scale=0.5, seed=2, progress=False)
    expected, _ = edit_sampling.dps(model, diffusion, inputs, operator, 0.5, classifier=classifier,
                                    classifier_scale=3.0, labels=LABELS, seed=2, progress=False)
    assert np.array_equal(images, expected)
