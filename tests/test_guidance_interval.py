"""
Tests for the guidance interval (Kynkäänniemi et al. 2024) of guided_diffusion/guidance.py:
the map from the network's timesteps to sigma, every guidance limited to the interval
(and its second network not evaluated outside it), through sample() with every kind of
loop, and the paper's 1-D example of a mode dropped by guidance at high noise.
"""

import math

import numpy as np
import pytest
import torch as th

from test_sampling import NUM_CLASSES, tiny_classifier_flags, tiny_model
from guided_diffusion.denoiser import CallCounter
from guided_diffusion.guidance import (
    GuidanceInterval,
    check_interval,
    classifier_cond_fn,
    classifier_free_model,
    within_interval,
)
from guided_diffusion.sampling import sample
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion

# The tiny diffusion (40 linear steps respaced to 6) samples at these sigmas, step 0 first:
# 487, 42.6, 7.35, 2.41, 0.806, 0.0501. MIDDLE holds the two steps of 7.35 and 2.41.
TINY_SIGMAS = [486.88, 42.585, 7.3524, 2.4111, 0.80600, 0.050063]
MIDDLE = (1.0, 10.0)
EMPTY = (1000.0, 2000.0)
FULL = (0.0, math.inf)


@pytest.fixture(autouse=True, scope="module")
def one_thread(torch_single_thread):
    yield


@pytest.fixture(scope="module")
def cfg_model():
    return tiny_model(class_cond=True, class_dropout_prob=0.1)


def edm_sigmas(alphas_cumprod):
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


# ---------------------------------------------------------------- timesteps -> sigma


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sigmas_of_the_timesteps_the_network_receives(schedule):
    base = create_gaussian_diffusion(steps=1000, noise_schedule=schedule)
    expected = edm_sigmas(base.alphas_cumprod)
    t = th.tensor([0, 10, 499, 999])
    assert np.allclose(GuidanceInterval(base).sigmas(t), expected[[0, 10, 499, 999]], rtol=1e-12)
    # A respaced diffusion's network gets the base process's timesteps.
    spaced = create_gaussian_diffusion(steps=1000, noise_schedule=schedule, timestep_respacing="ddim50")
    kept = th.tensor(spaced.timestep_map)
    assert np.allclose(GuidanceInterval(spaced).sigmas(kept), expected[spaced.timestep_map], rtol=1e-12)
    # rescale_timesteps: the network gets t * 1000 / T.
    short = create_gaussian_diffusion(steps=40, noise_schedule=schedule, rescale_timesteps=True)
    scaled = th.arange(40).float() * (1000.0 / 40)
    assert np.allclose(GuidanceInterval(short).sigmas(scaled), edm_sigmas(short.alphas_cumprod), rtol=1e-6)


def test_documented_sigmas_of_adm_timesteps():
    # The numbers docs/guidance.md quotes.
    linear = edm_sigmas(create_gaussian_diffusion(steps=1000, noise_schedule="linear").alphas_cumprod)
    cosine = edm_sigmas(create_gaussian_diffusion(steps=1000, noise_schedule="cosine").alphas_cumprod)
    assert [round(float(linear[t]), 2) for t in (0, 100, 250, 500, 750, 900, 999)] == [
        0.01, 0.34, 0.96, 3.44, 17.38, 60.82, 157.41]
    assert [round(float(cosine[t]), 2) for t in (0, 100, 250, 500, 750, 900)] == [
        0.01, 0.17, 0.43, 1.02, 2.45, 6.43]
    assert round(float(cosine[999])) == 20291
    # The interval (0.28, 5.42] in timesteps: 82 to 578 (linear), 167 to 881 (cosine).
    for sigmas, first, last in ((linear, 82, 578), (cosine, 167, 881)):
        inside = np.flatnonzero((sigmas > 0.28) & (sigmas <= 5.42))
        assert (inside[0], inside[-1], len(inside)) == (first, last, last - first + 1)


def test_contains_excludes_the_low_end_and_includes_the_high_end():
    diffusion = tiny_model(class_cond=False)[1]
    kept = th.tensor(diffusion.timestep_map)
    sigmas = GuidanceInterval(diffusion).sigmas(kept)
    assert np.allclose(sigmas, TINY_SIGMAS[::-1], rtol=1e-4)
    interval = GuidanceInterval(diffusion, float(sigmas[1]), float(sigmas[3]))
    assert interval.contains(kept).tolist() == [False, False, True, True, False, False]
    assert GuidanceInterval(diffusion, *MIDDLE).contains(kept).tolist() == [
        False, False, True, True, False, False]
    assert not GuidanceInterval(diffusion, *EMPTY).contains(kept).any()
    assert GuidanceInterval(diffusion, *FULL).contains(kept).all()


@pytest.mark.parametrize("low, high", [(1.0, 1.0), (2.0, 1.0), (-0.5, 1.0), (math.nan, 1.0),
                                       (0.0, math.nan)])
def test_bad_intervals_are_refused(low, high):
    with pytest.raises(ValueError, match="guidance_interval=.*0 <= sigma_lo < sigma_hi"):
        check_interval(low, high)
    diffusion = tiny_model(class_cond=False)[1]
    with pytest.raises(ValueError, match="guidance_interval"):
        GuidanceInterval(diffusion, low, high)


def test_within_interval_splits_a_batch_of_mixed_timesteps():
    diffusion = create_gaussian_diffusion(steps=1000)
    interval = GuidanceInterval(diffusion, 0.28, 5.42)  # timesteps 82 .. 578
    calls = []

    def branch(offset):
        def function(x, t, y=None):
            calls.append((offset, t.tolist(), y.tolist()))
            return x + offset
        return function

    mixed = within_interval(interval, branch(1.0), branch(-1.0))
    x, t, y = th.zeros(4, 1), th.tensor([10, 100, 578, 900]), th.tensor([0, 1, 2, 3])
    assert mixed(x, t, y=y).flatten().tolist() == [-1.0, 1.0, 1.0, -1.0]
    assert calls == [(1.0, [100, 578], [1, 2]), (-1.0, [10, 900], [0, 3])]
    calls.clear()
    mixed(x, th.tensor([100, 100, 100, 100]), y=y)
    assert [call[0] for call in calls] == [1.0]  # one call when the batch is inside
    assert within_interval(None, branch(1.0), branch(-1.0))(x, t, y=y).flatten().tolist() == [1.0] * 4


# ---------------------------------------------------------------- each guidance in an interval


def test_classifier_gradient_is_zero_outside_without_a_classifier_call():
    diffusion = create_gaussian_diffusion(steps=1000)
    classifier = CallCounter(create_classifier(**tiny_classifier_flags()))
    cond_fn = classifier_cond_fn(classifier, 3.0, GuidanceInterval(diffusion, 0.28, 5.42))
    x, y = th.randn(2, 3, 8, 8), th.tensor([0, 1])
    assert th.equal(cond_fn(x, th.tensor([900, 900]), y=y), th.zeros_like(x))
    assert classifier.calls == 0
    inside = cond_fn(x, th.tensor([300, 300]), y=y)
    everywhere = classifier_cond_fn(classifier, 3.0)(x, th.tensor([300, 300]), y=y)
    assert classifier.calls == 2 and th.equal(inside, everywhere) and inside.abs().sum() > 0


def test_classifier_free_outside_the_interval_is_one_conditional_pass(cfg_model):
    model, diffusion = cfg_model
    counted = CallCounter(model)
    guided = classifier_free_model(counted, 3.0, NUM_CLASSES, GuidanceInterval(diffusion, *MIDDLE))
    x, y = th.randn(2, 3, 8, 8), th.tensor([0, 3])
    outside = th.tensor([39, 39])  # sigma 487
    with th.no_grad():
        assert th.equal(guided(x, outside, y=y), model(x, outside, y=y))
        assert counted.calls == 1
        inside = th.tensor([16, 16])  # sigma 2.41
        assert th.equal(guided(x, inside, y=y), classifier_free_model(model, 3.0, NUM_CLASSES)(x, inside, y=y))


# ---------------------------------------------------------------- through sample()

LOOPS = {"ddpm": {}, "ddim": dict(use_ddim=True), "dpmpp_2m": dict(sampler="dpmpp_2m", steps=4)}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_empty_interval_is_unguided_and_full_interval_is_todays_guidance(cfg_model, loop):
    model, diffusion = cfg_model
    common = dict(labels=[0, 1, 3], batch_size=3, seed=4, num_classes=NUM_CLASSES, progress=False,
                  **LOOPS[loop])
    unguided, _ = sample(model, diffusion, **common)
    guided, _ = sample(model, diffusion, cfg_scale=3.0, **common)
    assert not np.array_equal(unguided, guided)
    empty, _ = sample(model, diffusion, cfg_scale=3.0, guidance_interval=EMPTY, **common)
    full, _ = sample(model, diffusion, cfg_scale=3.0, guidance_interval=FULL, **common)
    assert np.array_equal(empty, unguided)
    assert np.array_equal(full, guided)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_classifier_guidance_full_and_empty_intervals(loop):
    model, diffusion = tiny_model(class_cond=False)
    classifier = create_classifier(**tiny_classifier_flags())
    common = dict(labels=[0, 2], batch_size=2, seed=1, progress=False, classifier=classifier,
                  **LOOPS[loop])
    guided, _ = sample(model, diffusion, classifier_scale=20.0, **common)
    full, _ = sample(model, diffusion, classifier_scale=20.0, guidance_interval=FULL, **common)
    assert np.array_equal(full, guided)
    unguided, _ = sample(model, diffusion, classifier_scale=0.0, **common)
    empty, _ = sample(model, diffusion, classifier_scale=20.0, guidance_interval=EMPTY, **common)
    assert np.array_equal(empty, unguided)  # both guide with a zero gradient
    assert not np.array_equal(guided, unguided)


@pytest.mark.parametrize("use_ddim", [False, True])
def test_classifier_guidance_in_an_interval_changes_only_the_steps_inside(use_ddim):
    model, diffusion = tiny_model(class_cond=False)
    classifier = CallCounter(create_classifier(**tiny_classifier_flags()))
    states = {}
    for name, scale in (("unguided", 0.0), ("guided", 30.0)):
        steps = []
        sample(model, diffusion, classifier=classifier, classifier_scale=scale, labels=[1, 2],
               num_classes=NUM_CLASSES, batch_size=2, seed=0, use_ddim=use_ddim, progress=False, guidance_interval=MIDDLE,
               callback=lambda state, steps=steps: steps.append(state["x"].clone()))
        states[name] = steps
    assert classifier.calls == 2 * 2  # two steps inside, twice
    unguided, guided = states["unguided"], states["guided"]
    assert len(unguided) == len(guided) == 6
    # Steps 0 and 1 (sigma 487, 42.6) are outside: x reaches step 2 unchanged; the guidance of
    # step 2 (inside) changes the x that step 3 starts from.
    for step in range(3):
        assert th.equal(unguided[step], guided[step])
    assert not th.allclose(unguided[3], guided[3], atol=1e-3)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_the_unconditional_pass_runs_only_inside_the_interval(cfg_model, loop):
    model, diffusion = cfg_model
    calls = []

    class Recorder(th.nn.Module):
        num_classes, image_size, in_channels = model.num_classes, model.image_size, model.in_channels

        def forward(self, x, t, y=None):
            calls.append((len(x), t[:1]))
            return model(x, t, y=y)

    sample(Recorder(), diffusion, cfg_scale=3.0, labels=[0, 1], batch_size=2, seed=0, device="cpu",
           num_classes=NUM_CLASSES, progress=False, guidance_interval=MIDDLE, **LOOPS[loop])
    interval = GuidanceInterval(diffusion, *MIDDLE)
    inside = [bool(interval.contains(t)) for _, t in calls]
    assert [size for size, _ in calls] == [4 if within else 2 for within in inside]  # 4: doubled
    assert 0 < sum(inside) < len(calls)
    if loop != "dpmpp_2m":
        assert sum(inside) == 2 and len(calls) == 6


# ---------------------------------------------------------------- the paper's 1-D example

def mixture_eps(means, weights, std, alpha_bar):
    """
    The exact eps-prediction of x_t for x_0 ~ sum_k weights_k N(means_k, std^2):
    eps = -sqrt(1 - alpha_bar) * grad log p(x_t).
    """
    means, log_weights = th.tensor(means, dtype=th.float64), th.log(th.tensor(weights, dtype=th.float64))

    def eps(x, t):
        ab = alpha_bar(t).view(-1, 1)
        flat = x.double().view(len(x), 1)
        variance = ab * std**2 + (1 - ab)
        log_p = log_weights - 0.5 * (flat - ab.sqrt() * means) ** 2 / variance - 0.5 * th.log(variance)
        score = (th.softmax(log_p, dim=1) * (ab.sqrt() * means - flat) / variance).sum(1)
        return (-(1 - ab.view(-1)).sqrt() * score).float().view_as(x)

    return eps


def alpha_bar_of(diffusion):
    """alpha_bar at the (possibly fractional) base timesteps the network receives."""
    log_alpha_bars = th.log(th.tensor(diffusion.alphas_cumprod, dtype=th.float64))
    last = len(log_alpha_bars) - 1

    def alpha_bar(t):
        t = t.double()
        low = t.floor().long().clamp(0, last)
        fraction = t - low
        high = (low + 1).clamp(max=last)
        return th.exp(log_alpha_bars[low] * (1 - fraction) + log_alpha_bars[high] * fraction)

    return alpha_bar


def two_class_model(alpha_bar):
    """
    Class 0: modes at -1 and +1 (weights 1/2); class 1: a mode at +3, beside class 0's +1;
    label 2 is the null label: the unconditional mixture. Components have std 0.1.
    """
    classes = [mixture_eps([-1.0, 1.0], [0.5, 0.5], 0.1, alpha_bar),
               mixture_eps([3.0], [1.0], 0.1, alpha_bar),
               mixture_eps([-1.0, 1.0, 3.0], [0.25, 0.25, 0.5], 0.1, alpha_bar)]

    def model(x, t, y=None):
        output = th.empty_like(x)
        for label, eps in enumerate(classes):
            rows = y == label
            output[rows] = eps(x[rows], t[rows])
        return output

    return model


def test_guidance_at_high_noise_drops_a_mode_and_a_middle_interval_keeps_both():
    base = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear", timestep_respacing="ddim25")
    model = two_class_model(alpha_bar_of(base))
    noise = th.randn(400, 1, 1, 1, generator=th.Generator().manual_seed(0))
    labels = {"y": th.zeros(400, dtype=th.long)}

    def positive_mass(scale, interval):
        guided = classifier_free_model(model, scale, 2, interval)
        x = diffusion.ddim_sample_loop(guided, noise.shape, noise=noise, model_kwargs=labels,
                                       clip_denoised=False)
        assert ((x.abs() - 1).abs() < 0.5).float().mean() > 0.99  # on class 0's modes
        return float((x > 0).float().mean())

    assert 0.4 < positive_mass(1.0, None) < 0.6
    # At high noise the +1 mode is near class 1's +3: strong guidance there pushes away from it.
    assert positive_mass(4.0, None) < 0.05
    assert 0.4 < positive_mass(4.0, GuidanceInterval(diffusion, 0.05, 1.0)) < 0.6
