"""
Tests for guided_diffusion/sampling.py: the one-call sampling API (seeds, labels,
guidance, super-resolution, continuation, speed-ups).

Tiny models (8x8 images, 32 channels, 40 diffusion steps respaced to 6) on one
CPU thread; the builders here are shared with test_sample_scripts.py.
"""


import copy
import numpy as np
import pytest
import torch as th
import torch.nn.functional as F

from guided_diffusion.image_grid import to_uint8_nhwc
from guided_diffusion.sampling import sample
from guided_diffusion.sampling_state import PartialSamples
from guided_diffusion.work_split import PerSampleNoise
from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

NUM_CLASSES = 4
# Constant colours of the synthetic classes the guidance test trains on.
CLASS_COLOURS = th.tensor([[0.8, -0.8, -0.8], [-0.8, 0.8, -0.8], [-0.8, -0.8, 0.8], [0.8, 0.8, 0.8]])


def tiny_flags(**overrides):
    """The flags of a tiny 8x8 diffusion model with learned sigmas, 40 steps respaced to 6."""
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4",
        diffusion_steps=40, timestep_respacing="6", learn_sigma=True, num_classes=NUM_CLASSES,
    )
    flags.update(overrides)
    return flags


def tiny_sr_flags(**overrides):
    """The flags of a tiny 4 -> 8 super-resolution model."""
    flags = sr_model_and_diffusion_defaults()
    flags.update(
        large_size=8, small_size=4, num_channels=32, num_res_blocks=1, attention_resolutions="4",
        diffusion_steps=40, timestep_respacing="6", learn_sigma=True, num_classes=NUM_CLASSES,
    )
    flags.update(overrides)
    return flags


def tiny_classifier_flags(**overrides):
    """The flags of a tiny 8x8 noised-image classifier over NUM_CLASSES classes."""
    flags = classifier_defaults()
    flags.update(
        image_size=8, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="",
        num_classes=NUM_CLASSES,
    )
    flags.update(overrides)
    return flags


def randomize_zero_weights(model, seed=0):
    """Give the zero-initialised layers (output convolutions) small random weights,
    so that the untrained model's output depends on its inputs and labels."""
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(th.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def tiny_model(super_res=False, seed=0, **overrides):
    """A seeded tiny (model, diffusion) with random weights."""
    th.manual_seed(seed)
    if super_res:
        model, diffusion = sr_create_model_and_diffusion(**tiny_sr_flags(**overrides))
    else:
        model, diffusion = create_model_and_diffusion(**tiny_flags(**overrides))
    return randomize_zero_weights(model, seed), diffusion


def train_colour_classifier(steps=40, seed=0, **overrides):
    """A tiny classifier trained for a few steps to tell CLASS_COLOURS apart under noise."""
    th.manual_seed(seed)
    classifier = create_classifier(**tiny_classifier_flags(**overrides))
    _, base = create_model_and_diffusion(**tiny_flags(timestep_respacing=""))
    optimizer = th.optim.Adam(classifier.parameters(), lr=2e-3)
    for _ in range(steps):
        labels = th.randint(0, NUM_CLASSES, (32,))
        clean = CLASS_COLOURS[labels][:, :, None, None] + 0.1 * th.randn(32, 3, 8, 8)
        t = th.randint(0, base.num_timesteps, (32,))
        loss = F.cross_entropy(classifier(base.q_sample(clean, t), t), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


def classifier_accuracy(classifier, images, labels):
    """The classifier's accuracy on uint8 NHWC images at t = 0."""
    x = th.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with th.no_grad():
        predicted = classifier(x, th.zeros(len(x), dtype=th.long)).argmax(dim=-1)
    return float((predicted.numpy() == labels).mean())


@pytest.fixture(autouse=True, scope="module")
def one_thread(torch_single_thread):
    yield


@pytest.fixture(scope="module")
def conditional():
    return tiny_model(class_cond=True)


@pytest.fixture(scope="module")
def unconditional():
    return tiny_model(class_cond=False)


# ---------------------------------------------------------------- sample()


def test_unseeded_sampling_follows_the_original_draw_order(conditional):
    model, diffusion = conditional
    th.manual_seed(11)
    images, labels = sample(model, diffusion, num_samples=4, batch_size=2, progress=False)
    th.manual_seed(11)
    expected_images, expected_labels = [], []
    for _ in range(2):
        classes = th.randint(0, NUM_CLASSES, (2,))
        batch = diffusion.p_sample_loop(model, (2, 3, 8, 8), model_kwargs={"y": classes})
        expected_images.append(to_uint8_nhwc(batch))
        expected_labels.append(classes)
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 3)
    assert np.array_equal(images, th.cat(expected_images).numpy())
    assert np.array_equal(labels, th.cat(expected_labels).numpy())


@pytest.mark.parametrize("use_ddim", [False, True])
def test_same_seed_same_images_whatever_the_batch_size(conditional, use_ddim):
    model, diffusion = conditional
    runs = [
        sample(model, diffusion, num_samples=5, batch_size=size, seed=3, use_ddim=use_ddim, progress=False)
        for size in (2, 4, 5)
    ]
    for images, labels in runs[1:]:
        assert np.array_equal(labels, runs[0][1])
        assert np.abs(images.astype(int) - runs[0][0].astype(int)).max() <= 1
        assert (images == runs[0][0]).mean() > 0.99
    other, _ = sample(model, diffusion, num_samples=5, batch_size=2, seed=4, use_ddim=use_ddim, progress=False)
    assert (other != runs[0][0]).mean() > 0.5


def test_seeded_sample_draws_initial_and_step_noise_from_the_sample_generator(conditional):
    model, diffusion = conditional
    images, labels = sample(model, diffusion, num_samples=1, batch_size=1, seed=9, progress=False)
    noise = PerSampleNoise(9, [0])
    y = th.as_tensor(labels)
    x_t = noise.draw((1, 3, 8, 8), "cpu")
    expected = diffusion.p_sample_loop(model, (1, 3, 8, 8), noise=x_t, noise_fn=noise, model_kwargs={"y": y})
    assert np.array_equal(images, to_uint8_nhwc(expected).numpy())


def test_zero_classifier_scale_equals_unguided_sampling(conditional):
    model, diffusion = conditional
    classifier = create_classifier(**tiny_classifier_flags())
    labels = [0, 1, 2, 3]
    plain, _ = sample(model, diffusion, labels=labels, batch_size=4, seed=2, progress=False)
    guided, guided_labels = sample(
        model, diffusion, classifier=classifier, classifier_scale=0.0, labels=labels, batch_size=4,
        seed=2, progress=False,
    )
    assert np.array_equal(plain, guided) and guided_labels.tolist() == labels
    ddim_plain, _ = sample(model, diffusion, labels=labels, batch_size=4, seed=2, use_ddim=True, progress=False)
    ddim_guided, _ = sample(
        model, diffusion, classifier=classifier, classifier_scale=0.0, labels=labels, batch_size=4,
        seed=2, use_ddim=True, progress=False,
    )
    assert np.abs(ddim_plain.astype(int) - ddim_guided.astype(int)).max() <= 1


@pytest.mark.slow
def test_classifier_guidance_raises_the_classifiers_accuracy(unconditional):
    model, diffusion = unconditional
    classifier = train_colour_classifier()
    accuracies = {}
    for scale in (0.0, 20.0):
        images, labels = sample(
            model, diffusion, classifier=classifier, classifier_scale=scale, num_samples=32,
            batch_size=32, seed=1, class_balanced=True, progress=False,
        )
        assert th.bincount(th.as_tensor(labels)).tolist() == [8] * NUM_CLASSES
        accuracies[scale] = classifier_accuracy(classifier, images, labels)
    assert accuracies[0.0] < 0.5 < 0.8 < accuracies[20.0], accuracies


def test_cfg_scale_one_equals_conditional_sampling():
    model, diffusion = tiny_model(class_cond=True, class_dropout_prob=0.1)
    labels = [0, 1, 2, 3, 3]
    plain, _ = sample(model, diffusion, labels=labels, batch_size=5, seed=5, num_classes=NUM_CLASSES, progress=False)
    guided, _ = sample(
        model, diffusion, labels=labels, batch_size=5, seed=5, cfg_scale=1.0, num_classes=NUM_CLASSES,
        progress=False,
    )
    assert np.abs(plain.astype(int) - guided.astype(int)).max() <= 1
    assert (plain == guided).mean() > 0.99
    strong, _ = sample(
        model, diffusion, labels=labels, batch_size=5, seed=5, cfg_scale=4.0, num_classes=NUM_CLASSES,
        progress=False,
    )
    assert (strong != plain).mean() > 0.2


def test_classifier_and_classifier_free_guidance_combine():
    model, diffusion = tiny_model(class_cond=True, class_dropout_prob=0.1)
    classifier = create_classifier(**tiny_classifier_flags())
    common = dict(labels=[1, 2], batch_size=2, seed=5, cfg_scale=3.0, num_classes=NUM_CLASSES, progress=False)
    cfg_only, _ = sample(model, diffusion, **common)
    unguided_classifier, _ = sample(model, diffusion, classifier=classifier, classifier_scale=0.0, **common)
    both, _ = sample(model, diffusion, classifier=classifier, classifier_scale=50.0, **common)
    assert np.array_equal(cfg_only, unguided_classifier)
    assert not np.array_equal(cfg_only, both)


def test_class_balanced_sampling_gives_exact_counts(conditional):
    model, diffusion = conditional
    _, labels = sample(model, diffusion, num_samples=10, batch_size=4, class_balanced=True, progress=False)
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [3, 2, 3, 2]


def test_unconditional_sampling_has_no_labels(unconditional):
    model, diffusion = unconditional
    images, labels = sample(model, diffusion, num_samples=3, batch_size=2, seed=0, progress=False)
    assert images.shape == (3, 8, 8, 3) and labels is None


def test_super_resolution_conditions_on_low_res_and_passes_labels():
    model, diffusion = tiny_model(super_res=True, class_cond=True)
    low_res = np.stack([np.full((4, 4, 3), value, np.uint8) for value in (0, 255, 128)])
    images, labels = sample(model, diffusion, low_res=low_res, labels=[1, 2, 1], batch_size=2, seed=0, progress=False)
    assert images.shape == (3, 8, 8, 3) and labels.tolist() == [1, 2, 1]
    again, _ = sample(model, diffusion, low_res=low_res[::-1], labels=[1, 2, 1], batch_size=2, seed=0, progress=False)
    assert np.array_equal(again[1], images[1]) and not np.array_equal(again[0], images[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=0), "num_samples=0"),
    (dict(num_samples=2, batch_size=-1), "batch_size=-1"),
    (dict(num_samples=2, seed=-3), "seed=-3"),
    (dict(), "num_samples is required"),
    (dict(num_samples=2, classifier_scale=3.0), "without a classifier"),
    (dict(num_samples=2, cfg_scale=2.0), "unconditional"),
    (dict(labels=[1, 2]), "unconditional and there is no classifier"),
    (dict(num_samples=2, class_balanced=True), "class_balanced needs labels"),
    (dict(num_samples=2, low_res=np.zeros((2, 4, 4, 3), np.uint8)), "not a super-resolution model"),
])
def test_unconditional_sampling_errors(unconditional, kwargs, message):
    model, diffusion = unconditional
    with pytest.raises(ValueError, match=message):
        sample(model, diffusion, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=[0, 4]), r"labels range from 0 to 4: expected class ids in \[0, 3\]"),
    (dict(labels=[0, 1], num_samples=3), "labels has 2 entries for num_samples=3"),
    (dict(num_samples=2, cfg_scale=2.0, num_classes=NUM_CLASSES), "4 rows for num_classes=4"),
    (dict(num_samples=2, classifier="16"), "16x16 images but the model samples 8x8"),
])
def test_conditional_sampling_errors(conditional, kwargs, message):
    model, diffusion = conditional
    if kwargs.get("classifier") == "16":
        kwargs["classifier"] = create_classifier(**tiny_classifier_flags(image_size=16))
    with pytest.raises(ValueError, match=message):
        sample(model, diffusion, progress=False, **kwargs)


class Interrupted(Exception):
    pass


class InterruptedAfterOneRound(PartialSamples):
    """Partial samples whose run stops right after its first round is saved."""

    def save(self, start, images, labels):
        super().save(start, images, labels)
        raise Interrupted


def test_interrupted_seeded_sampling_continues_bit_identically(conditional, tmp_path):
    model, diffusion = conditional
    options = dict(num_samples=5, batch_size=2, seed=7, progress=False)
    expected_images, expected_labels = sample(model, diffusion, **options)
    folder = str(tmp_path / "partial_samples")
    record = {"seed": 7, "num_samples": 5}
    with pytest.raises(Interrupted):
        sample(model, diffusion, partial=InterruptedAfterOneRound(folder, record), **options)
    assert sorted(p.name for p in (tmp_path / "partial_samples").iterdir()) == ["000000000-000000002.npz", "record.json"]
    with pytest.raises(ValueError, match=r"other flags or checkpoint files \(seed: partial 7, now 8\).*same flags"):
        sample(model, diffusion, partial=PartialSamples(folder, dict(record, seed=8)), **options)
    images, labels = sample(model, diffusion, partial=PartialSamples(folder, record), **options)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    with pytest.raises(ValueError, match="partial samples need a seed"):
        sample(model, diffusion, partial=PartialSamples(folder, record), num_samples=2, progress=False)


def test_super_resolution_errors():
    model, diffusion = tiny_model(super_res=True)
    with pytest.raises(ValueError, match="needs low_res"):
        sample(model, diffusion, num_samples=2, progress=False)
    with pytest.raises(ValueError, match="expected uint8 images"):
        sample(model, diffusion, low_res=np.zeros((2, 4, 4, 3), np.float32), progress=False)


# ----------------------------------------------------------------------------- speed-ups


def eager_compile(monkeypatch):
    """Make the acceleration module's torch.compile use the cheap "eager" backend."""
    from guided_diffusion import acceleration

    real_compile = th.compile
    monkeypatch.setattr(acceleration.th, "compile",
                        lambda model, **kwargs: real_compile(model, backend="eager", **kwargs))


@pytest.mark.slow
def test_compiled_sampling_gives_the_same_images(conditional, monkeypatch):
    model, diffusion = conditional
    plain = sample(model, diffusion, num_samples=2, batch_size=2, seed=3, progress=False)
    eager_compile(monkeypatch)
    compiled = sample(model, diffusion, num_samples=2, batch_size=2, seed=3, progress=False,
                      compile=True)
    assert np.array_equal(plain[0], compiled[0]) and np.array_equal(plain[1], compiled[1])


def test_bf16_sampling_runs_the_model_and_classifier_under_autocast(conditional):
    model, diffusion = conditional
    classifier = create_classifier(**tiny_classifier_flags()).eval()
    seen = []
    hooks = [net.register_forward_pre_hook(lambda module, args: seen.append(
        (type(module).__name__, th.is_autocast_enabled("cpu")))) for net in (model, classifier)]
    try:
        low, labels = sample(model, diffusion, classifier=classifier, num_samples=2, batch_size=2,
                             seed=3, progress=False, use_bf16=True)
    finally:
        for hook in hooks:
            hook.remove()
    full, _ = sample(model, diffusion, classifier=classifier, num_samples=2, batch_size=2, seed=3,
                     progress=False)
    assert {name for name, _ in seen} == {"UNetModel", "EncoderUNetModel"}
    assert all(autocast for _, autocast in seen)
    assert low.dtype == np.uint8 and labels.shape == (2,)
    # bfloat16 changes the numbers a little, not the images' content.
    assert np.abs(low.astype(int) - full.astype(int)).mean() < 20


@pytest.mark.parametrize("name", ["classifier_scale", "cfg_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_scales_are_refused(conditional, name, value):
    model, diffusion = conditional
    classifier = create_classifier(**tiny_classifier_flags())
    with pytest.raises(ValueError, match=f"{name}={value}: expected a finite number"):
        sample(model, diffusion, classifier=classifier, labels=[0, 1], batch_size=2, seed=0,
               progress=False, **{name: value})


def test_non_finite_samples_raise_instead_of_black_images(conditional):
    model, diffusion = copy.deepcopy(conditional[0]), conditional[1]
    with th.no_grad():
        model.out[-1].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"samples \[0, 1\] hold NaN or inf values"):
        sample(model, diffusion, labels=[0, 1, 2], batch_size=2, seed=0, progress=False)


def test_low_res_images_on_a_device_are_copied_to_the_host():
    from test_image_grid import DeviceTensor
    from guided_diffusion.sampling import _check_low_res

    images = th.randint(0, 256, (2, 4, 4, 3), dtype=th.uint8)
    assert np.array_equal(_check_low_res(images.as_subclass(DeviceTensor)), images.numpy())


@pytest.mark.parametrize("sampler, steps, calls", [(None, None, 6), ("heun", 5, 3), ("dpmpp_2m", 4, 4)])
def test_the_callback_sees_every_step_of_every_batch(sampler, steps, calls):
    model, diffusion = tiny_model(class_cond=True)
    options = dict(num_samples=5, batch_size=2, seed=4, progress=False, sampler=sampler, steps=steps)
    seen = []
    images, labels = sample(model, diffusion, callback=seen.append, **options)
    assert [list(state["indices"]) for state in seen] == (
        [[0, 1]] * calls + [[2, 3]] * calls + [[4]] * calls)
    assert [state["i"] for state in seen] == list(range(calls)) * 3
    assert all(state["x"].shape == state["denoised"].shape == (len(state["indices"]), 3, 8, 8)
               for state in seen)
    plain_images, plain_labels = sample(model, diffusion, **options)
    assert np.array_equal(images, plain_images) and np.array_equal(labels, plain_labels)


def test_consistency_sampling_of_a_student_is_the_cores_multistep_sampler():
    from guided_diffusion.consistency import (
        ConsistencyFunction, consistency_sample, consistency_sigma_range, consistency_sigmas,
    )
    from guided_diffusion.solver_schedule import ContinuousSchedule

    model, diffusion = tiny_model(class_cond=True, timestep_respacing="")
    seen = []
    images, labels = sample(model, diffusion, num_samples=3, batch_size=2, seed=6, progress=False,
                            sampler="consistency", steps=2, callback=seen.append)
    assert [state["i"] for state in seen] == [0, 1, 0, 1]  # two evaluations per sample
    same, _ = sample(model, diffusion, num_samples=3, batch_size=3, seed=6, progress=False,
                     sampler="consistency", steps=2)
    assert np.array_equal(images, same)  # seeded: independent of the batch size
    schedule = ContinuousSchedule(diffusion)
    sigma_min, sigma_max = consistency_sigma_range(schedule)
    function = ConsistencyFunction(model, schedule, diffusion.model_mean_type, sigma_min, clip_denoised=True)
    direct = consistency_sample(function, schedule, (3, 3, 8, 8), consistency_sigmas(sigma_min, sigma_max, 2),
                                noise_fn=PerSampleNoise(6, range(3)),
                                model_kwargs={"y": th.from_numpy(labels)})
    assert np.array_equal(images, to_uint8_nhwc(direct).numpy())
    one, _ = sample(model, diffusion, num_samples=3, batch_size=3, seed=6, progress=False,
                    sampler="consistency")
    assert not np.array_equal(one, images)  # one evaluation by default


def test_consistency_sampling_refuses_guidance_and_other_options():
    model, diffusion = tiny_model(class_cond=True, class_dropout_prob=0.1)
    with pytest.raises(ValueError, match="sampler=consistency with a classifier or cfg_scale"):
        sample(model, diffusion, num_samples=1, sampler="consistency", cfg_scale=2.0)
    with pytest.raises(ValueError, match="time_grid=karras: not options of sampler=consistency"):
        sample(model, diffusion, num_samples=1, sampler="consistency", time_grid="karras")
    with pytest.raises(ValueError, match="use_ddim=True and sampler=consistency"):
        sample(model, diffusion, num_samples=1, sampler="consistency", use_ddim=True)
