"""
Tests for autoguidance (Karras et al. 2024) in guided_diffusion/guidance.py and its use by
sample() and the sampling scripts' --guide_model_path, --guide_scale and
--guidance_interval: the mix in closed form, w = 1 and an identical guide giving the main
model, every loop, classifier guidance on top, the refusals, and a 1-D mixture whose
blurred version sharpens it without dropping a mode.
"""

import copy
import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch as th

from test_guidance_interval import MIDDLE, alpha_bar_of, mixture_eps
from test_sample_scripts import MODEL_FLAGS, REPO, read_samples, run_script
from test_sampling import (  # conditional and one_thread: fixtures
    NUM_CLASSES, conditional, one_thread, randomize_zero_weights, tiny_classifier_flags, tiny_flags, tiny_model,
    tiny_sr_flags,
)
from guided_diffusion.checkpoint import sidecar_path
from guided_diffusion.command_line import load_guide, parse_guidance_interval
from guided_diffusion.guidance import GuidanceInterval, autoguided_model, check_guide
from guided_diffusion.sampling import sample
from guided_diffusion.script_util import (
    create_classifier,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


class Shift(th.nn.Module):
    """output = [x + shift (+ label) (+ low_res), x * shift (variance channels)], recording calls."""

    def __init__(self, shift, num_classes=None):
        super().__init__()
        self.shift, self.num_classes, self.calls = shift, num_classes, []

    def forward(self, x, t, y=None, low_res=None):
        self.calls.append({"y": y, "low_res": low_res})
        shift = th.full_like(x, self.shift)
        if y is not None:
            shift = shift + y.float()[:, None, None, None]
        if low_res is not None:
            shift = shift + low_res
        return th.cat([x + shift, x * shift], dim=1)


# ---------------------------------------------------------------- the mix


def test_autoguidance_mixes_eps_and_keeps_the_main_models_variance():
    main, guide = Shift(1.0, num_classes=4), Shift(-2.0, num_classes=4)
    x, t, y = th.randn(3, 3, 4, 4), th.zeros(3, dtype=th.long), th.tensor([0, 2, 3])
    low_res = th.randn(3, 3, 4, 4)
    out = autoguided_model(main, guide, 2.5)(x, t, y=y, low_res=low_res)
    label = y.float()[:, None, None, None]
    eps_main, eps_guide = x + 1 + label + low_res, x - 2 + label + low_res
    assert th.allclose(out[:, :3], eps_guide + 2.5 * (eps_main - eps_guide), atol=1e-5)
    assert th.equal(out[:, 3:], x * (1 + label + low_res))
    assert th.equal(guide.calls[0]["y"], y) and th.equal(guide.calls[0]["low_res"], low_res)


def test_an_unconditional_guide_of_a_conditional_model_gets_no_labels():
    main, guide = Shift(1.0, num_classes=4), Shift(-2.0)
    x, t, y = th.randn(2, 3, 4, 4), th.zeros(2, dtype=th.long), th.tensor([1, 3])
    out = autoguided_model(main, guide, 3.0, guide_conditional=False)(x, t, y=y)
    assert guide.calls[0]["y"] is None and th.equal(main.calls[0]["y"], y)
    eps_main, eps_guide = x + 1 + y.float()[:, None, None, None], x - 2
    assert th.allclose(out[:, :3], eps_guide + 3.0 * (eps_main - eps_guide), atol=1e-5)


def test_scale_one_is_exactly_the_main_model_and_never_calls_the_guide():
    main, guide = Shift(1.0, num_classes=4), Shift(-2.0, num_classes=4)
    x, t, y = th.randn(2, 3, 4, 4), th.zeros(2, dtype=th.long), th.tensor([1, 3])
    assert th.equal(autoguided_model(main, guide, 1.0)(x, t, y=y), main(x, t, y=y))
    assert not guide.calls
    zero = autoguided_model(main, guide, 0.0)(x, t, y=y)
    assert th.allclose(zero[:, :3], guide(x, t, y=y)[:, :3], atol=1e-6)  # w = 0: the guide alone


@pytest.mark.parametrize("scale", [math.nan, math.inf, -0.5])
def test_bad_guide_scales_are_refused(scale):
    with pytest.raises(ValueError, match=f"guide_scale={scale}: expected a finite weight >= 0"):
        autoguided_model(Shift(1.0), Shift(2.0), scale)


def test_check_guide_refuses_guides_of_other_images_or_classes(conditional):
    model, _ = conditional
    assert check_guide(model, tiny_model(class_cond=True, num_channels=64)[0], NUM_CLASSES)
    assert not check_guide(model, tiny_model(class_cond=False)[0], NUM_CLASSES)
    cases = [
        (tiny_model(class_cond=True, image_size=16)[0], "image_size 16 but the model 8"),
        (tiny_model(class_cond=True, learn_sigma=False)[0], "out_channels 3 but the model 6"),
        (tiny_model(class_cond=True, num_classes=7)[0], "7 rows but labels are drawn from 4 classes"),
    ]
    for guide, message in cases:
        with pytest.raises(ValueError, match=message):
            check_guide(model, guide, NUM_CLASSES)
    unconditional, _ = tiny_model(class_cond=False)
    with pytest.raises(ValueError, match="guide is class-conditional .* the model is unconditional"):
        check_guide(unconditional, model, NUM_CLASSES)
    cfg_guide, _ = tiny_model(class_cond=True, class_dropout_prob=0.1)  # its null row is fine
    assert check_guide(model, cfg_guide, NUM_CLASSES)


# ---------------------------------------------------------------- through sample()


def counted(module):
    """The module, with a list of the batch sizes of its calls as `module.calls`."""
    module.calls = []
    module.register_forward_pre_hook(lambda _, inputs: module.calls.append(len(inputs[0])))
    return module


LOOPS = {"ddpm": {}, "ddim": dict(use_ddim=True), "dpmpp_2m": dict(sampler="dpmpp_2m", steps=4),
         "heun": dict(sampler="heun", steps=5)}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_scale_one_samples_the_main_model_alone(conditional, loop):
    model, diffusion = conditional
    guide = counted(tiny_model(class_cond=True, seed=1)[0])
    common = dict(labels=[0, 3], batch_size=2, seed=7, progress=False, **LOOPS[loop])
    plain, _ = sample(model, diffusion, **common)
    same, _ = sample(model, diffusion, guide=guide, guide_scale=1.0, **common)
    assert np.array_equal(plain, same) and not guide.calls
    guided, _ = sample(model, diffusion, guide=guide, guide_scale=3.0, **common)
    assert guide.calls and (guided != plain).mean() > 0.2


@pytest.mark.parametrize("loop", ["ddpm", "ddim", "dpmpp_2m_sde"])
def test_a_guide_identical_to_the_model_gives_the_model_at_any_scale(conditional, loop):
    model, diffusion = conditional
    twin = copy.deepcopy(model)
    shape, kwargs = (2, 3, 8, 8), {"model_kwargs": {"y": th.tensor([1, 2])}, "progress": False}
    noise = th.randn(*shape, generator=th.Generator().manual_seed(3))
    outputs = []
    for network in (model, autoguided_model(model, twin, 4.0)):
        th.manual_seed(5)  # the step noise of the stochastic loops
        with th.no_grad():
            if loop == "ddpm":
                outputs.append(diffusion.p_sample_loop(network, shape, noise=noise, **kwargs))
            elif loop == "ddim":
                outputs.append(diffusion.ddim_sample_loop(network, shape, noise=noise, **kwargs))
            else:
                outputs.append(diffusion.sample_loop(network, shape, sampler=loop, steps=4, noise=noise,
                                                     **kwargs))
    assert th.allclose(outputs[0], outputs[1], atol=1e-5)


def test_guide_evaluations_are_the_steps_inside_the_interval(conditional):
    model, diffusion = conditional
    guide = counted(tiny_model(class_cond=True, seed=1)[0])
    common = dict(labels=[0, 3], batch_size=2, seed=7, progress=False, guide=guide, guide_scale=3.0)
    everywhere, _ = sample(model, diffusion, **common)
    assert len(guide.calls) == 6
    inside, _ = sample(model, diffusion, guidance_interval=MIDDLE, **common)
    assert len(guide.calls) == 6 + 2  # sigmas 7.35 and 2.41 of the six steps
    nowhere, _ = sample(model, diffusion, guidance_interval=(1000.0, 2000.0), **common)
    assert len(guide.calls) == 8
    plain, _ = sample(model, diffusion, labels=[0, 3], batch_size=2, seed=7, progress=False)
    full, _ = sample(model, diffusion, guidance_interval=(0.0, math.inf), **common)
    assert np.array_equal(nowhere, plain) and np.array_equal(full, everywhere)
    assert not np.array_equal(inside, plain) and not np.array_equal(inside, everywhere)


@pytest.mark.parametrize("loop", ["ddim", "unipc"])
def test_classifier_guidance_on_top_of_autoguidance(loop):
    model, diffusion = tiny_model(class_cond=False)
    guide = tiny_model(class_cond=False, seed=1)[0]
    classifier = create_classifier(**tiny_classifier_flags())
    common = dict(batch_size=2, seed=3, progress=False, guide=guide, guide_scale=2.0,
                  **(dict(use_ddim=True) if loop == "ddim" else dict(sampler=loop, steps=4)))
    autoguided, _ = sample(model, diffusion, num_samples=2, **common)  # same x_T: seeded per sample
    zero, labels = sample(model, diffusion, classifier=classifier, classifier_scale=0.0, labels=[1, 2],
                          **common)
    assert labels.tolist() == [1, 2]
    both, _ = sample(model, diffusion, classifier=classifier, classifier_scale=40.0, labels=[1, 2], **common)
    assert np.abs(zero.astype(int) - autoguided.astype(int)).max() <= 1
    assert (both != autoguided).mean() > 0.2


def test_super_resolution_guide_gets_the_low_res_images():
    model, diffusion = tiny_model(super_res=True, class_cond=True)
    guide = tiny_model(super_res=True, class_cond=True, seed=1)[0]
    low_res = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    common = dict(low_res=low_res, labels=[0, 1], batch_size=2, seed=1, progress=False)
    plain, _ = sample(model, diffusion, **common)
    guided, _ = sample(model, diffusion, guide=guide, guide_scale=2.0, **common)
    assert guided.shape == (2, 8, 8, 3) and not np.array_equal(plain, guided)


@pytest.mark.parametrize("kwargs, message", [
    (dict(guide="GUIDE", cfg_scale=2.0), "autoguidance and classifier-free guidance do not combine"),
    (dict(guide="GUIDE", guide_scale=math.nan), "guide_scale=nan: expected a finite weight >= 0"),
    (dict(guide="GUIDE", guide_scale=-1.0), "guide_scale=-1.0: expected a finite weight >= 0"),
    (dict(guide_scale=2.0), "guide_scale=2.0 without a guide"),
    (dict(guidance_interval=(0.5, 2.0)), r"guidance_interval=\(0.5, 2.0\) without guidance"),
    (dict(guide="GUIDE", guidance_interval=(2.0, 0.5)), "0 <= sigma_lo < sigma_hi"),
    (dict(guide="GUIDE", guidance_interval=(1.0,)), "expected a pair"),
    (dict(guide="GUIDE", sampler="consistency"), "sampler=consistency with a classifier or cfg_scale, or a guide"),
])
def test_sampling_refusals(kwargs, message):
    model, diffusion = tiny_model(class_cond=True, class_dropout_prob=0.1)
    if kwargs.get("guide") == "GUIDE":
        kwargs["guide"] = tiny_model(class_cond=True, seed=1)[0]
    with pytest.raises(ValueError, match=message):
        sample(model, diffusion, num_samples=1, num_classes=NUM_CLASSES, progress=False, **kwargs)


# ---------------------------------------------------------------- a 1-D mixture


def test_a_blurred_guide_sharpens_the_modes_without_dropping_one():
    base = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear", timestep_respacing="ddim25")
    alpha_bar = alpha_bar_of(base)
    main = mixture_eps([-1.0, 1.0], [0.5, 0.5], 0.1, alpha_bar)
    blurred = mixture_eps([-1.0, 1.0], [0.5, 0.5], 0.3, alpha_bar)  # wider components
    noise = th.randn(400, 1, 1, 1, generator=th.Generator().manual_seed(0))

    def modes(scale, interval=None):
        guided = autoguided_model(lambda x, t, y=None: main(x, t), blurred, scale, interval=interval)
        x = diffusion.ddim_sample_loop(guided, noise.shape, noise=noise, clip_denoised=False).flatten()
        positive, negative = x[x > 0], x[x < 0]
        assert (positive - 1).abs().max() < 0.5 and (negative + 1).abs().max() < 0.5
        return len(positive) / len(x), max(float(positive.std()), float(negative.std()))

    mass, spread = modes(1.0)
    assert 0.4 < mass < 0.6 and 0.05 < spread < 0.12
    sharp_mass, sharp_spread = modes(2.0)
    assert 0.4 < sharp_mass < 0.6 and sharp_spread < 0.5 * spread
    interval_mass, interval_spread = modes(2.0, GuidanceInterval(diffusion, 0.05, 1.0))
    assert 0.4 < interval_mass < 0.6 and sharp_spread < interval_spread < spread


# ---------------------------------------------------------------- the scripts


def write_checkpoint(folder, name, flags, seed=1, super_res=False, record=True):
    """A tiny checkpoint with random weights (no zero output layer), and a sidecar record of its
    flags unless not record."""
    th.manual_seed(seed)
    factory = sr_create_model_and_diffusion if super_res else create_model_and_diffusion
    model = randomize_zero_weights(factory(**flags)[0], seed)
    path = Path(folder) / f"{name}.pt"
    th.save(model.state_dict(), path)
    if record:
        Path(sidecar_path(str(path))).write_text(json.dumps({"flags": flags}))
    return str(path)


def parsed(script, argv):
    """The script's parsed flags (argv after the tiny model's flags)."""
    parser = runpy.run_path(str(REPO / "scripts" / script), run_name="not_main")["create_argparser"]()
    return parser.parse_args([str(arg) for arg in argv])


@pytest.mark.parametrize("text, expected", [("", None), ("0.28,5.42", (0.28, 5.42)), ("0,inf", (0.0, math.inf))])
def test_guidance_interval_flag(text, expected):
    assert parse_guidance_interval(text) == expected


@pytest.mark.parametrize("text", ["2,1", "1,1", "-1,2", "1", "a,b", "1,2,3", "nan,1"])
def test_bad_guidance_interval_flags_are_refused(text):
    with pytest.raises(ValueError, match=f"--guidance_interval {text}: expected LO,HI with 0 <= LO < HI"):
        parse_guidance_interval(text)


def test_load_guide_reads_the_architecture_from_the_record(tmp_path):
    model, _ = tiny_model(class_cond=True)
    small = dict(tiny_flags(class_cond=True, num_channels=64), timestep_respacing="")
    path = write_checkpoint(tmp_path, "small", small)
    args = parsed("image_sample.py", MODEL_FLAGS + ["--class_cond", "True", "--guide_model_path", path,
                                                    "--guide_scale", 2.0, "--use_fp16", "False"])
    guide = load_guide(args, create_model_and_diffusion, model_and_diffusion_defaults(), model)
    assert guide.model_channels == 64 and guide.num_classes == NUM_CLASSES
    assert not any(parameter.requires_grad for parameter in guide.parameters())
    none = parsed("image_sample.py", MODEL_FLAGS)
    assert load_guide(none, create_model_and_diffusion, model_and_diffusion_defaults(), model) is None


def test_load_guide_from_a_preset_when_the_checkpoint_has_no_record(tmp_path):
    model, _ = tiny_model(class_cond=True)
    flags = dict(tiny_flags(class_cond=True, num_channels=64), timestep_respacing="")
    path = write_checkpoint(tmp_path, "released", flags, record=False)
    preset = tmp_path / "guide_preset.json"
    preset.write_text(json.dumps({"kind": "diffusion", "flags": flags}))
    args = parsed("image_sample.py", MODEL_FLAGS + ["--class_cond", "True", "--guide_model_path", path,
                                                    "--guide_config", preset])
    guide = load_guide(args, create_model_and_diffusion, model_and_diffusion_defaults(), model)
    assert guide.model_channels == 64
    args.guide_config = str(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="--guide_config .*nothing.json"):
        load_guide(args, create_model_and_diffusion, model_and_diffusion_defaults(), model)


GUIDE_ERRORS = [
    (dict(record=False), [], r"--guide_model_path \S+: no record of the flags .*--guide_config PRESET"),
    (dict(image_size=16), [], r"--guide_model_path \S+: the guide has image_size 16 but the model 8"),
    (dict(learn_sigma=False), [], r"--guide_model_path \S+: the guide has out_channels 3 but the model 6"),
    (dict(num_classes=7), [], r"--guide_model_path \S+: the guide's class embedding has 7 rows"),
    (dict(noise_schedule="cosine"), [], r"--guide_model_path \S+ has another diffusion schedule .*"
                                        "noise_schedule: guide 'cosine', model 'linear'"),
    (None, ["--guide_config", "ADM_diffusion_64_conditioned"],
     "--guide_config ADM_diffusion_64_conditioned without --guide_model_path"),
]


@pytest.mark.parametrize("overrides, argv, message", GUIDE_ERRORS)
def test_load_guide_refusals(tmp_path, overrides, argv, message):
    model, _ = tiny_model(class_cond=True)
    guide_args = []
    if overrides is not None:
        overrides = dict(overrides)
        record = overrides.pop("record", True)
        flags = dict(tiny_flags(class_cond=True, **overrides), timestep_respacing="")
        guide_args = ["--guide_model_path", write_checkpoint(tmp_path, "guide", flags, record=record)]
    args = parsed("image_sample.py", MODEL_FLAGS + ["--class_cond", "True", *guide_args, *map(str, argv)])
    with pytest.raises(ValueError, match=message):
        load_guide(args, create_model_and_diffusion, model_and_diffusion_defaults(), model)


def test_load_guide_of_a_super_resolution_model(tmp_path):
    model, _ = tiny_model(super_res=True, class_cond=True)
    flags = dict(tiny_sr_flags(class_cond=True), timestep_respacing="")
    path = write_checkpoint(tmp_path, "sr_guide", flags, super_res=True)
    args = parsed("super_res_sample.py", ["--large_size", 8, "--small_size", 4, "--class_cond", "True",
                                          "--learn_sigma", "True", "--num_classes", NUM_CLASSES,
                                          "--diffusion_steps", 40, "--guide_model_path", path])
    guide = load_guide(args, sr_create_model_and_diffusion, sr_model_and_diffusion_defaults(), model)
    assert guide.in_channels == 6 and guide.image_size == 8


@pytest.mark.slow
def test_image_sample_with_a_guide_and_a_guidance_interval(tmp_path):
    main_flags = dict(tiny_flags(class_cond=True), timestep_respacing="")
    main = write_checkpoint(tmp_path, "main", main_flags, seed=0)
    guide = write_checkpoint(tmp_path, "guide", dict(main_flags, num_channels=64), seed=1)
    common = MODEL_FLAGS + ["--class_cond", "True", "--model_path", main, "--num_samples", 3,
                            "--batch_size", 3, "--seed", 4]
    run_script("image_sample.py", common + ["--log_dir", tmp_path / "plain"])
    run_script("image_sample.py", common + ["--guide_model_path", guide, "--guide_scale", 1.0,
                                            "--log_dir", tmp_path / "one"])
    run_script("image_sample.py", common + ["--guide_model_path", guide, "--guide_scale", 3.0,
                                            "--guidance_interval", "1,10", "--log_dir", tmp_path / "guided"])
    plain, plain_labels = read_samples(tmp_path / "plain", 3)
    one, one_labels = read_samples(tmp_path / "one", 3)
    guided, guided_labels = read_samples(tmp_path / "guided", 3)
    assert np.array_equal(plain, one) and plain_labels.tolist() == one_labels.tolist() == guided_labels.tolist()
    assert not np.array_equal(plain, guided)
    for bad, message in [
        (["--guide_model_path", guide, "--guidance_interval", "5,1"],
         "--guidance_interval 5,1: expected LO,HI with 0 <= LO < HI"),
        (["--guide_model_path", guide, "--guide_scale", "nan"], "--guide_scale nan: expected a finite weight >= 0"),
        (["--guide_model_path", guide, "--guide_scale", -1], "--guide_scale -1.0: expected a finite weight >= 0"),
        (["--guide_scale", 2], "--guide_scale 2.0 without a guide"),
        (["--guide_model_path", main.replace("main", "missing")], "missing.pt: no record of the flags"),
    ]:
        refused = run_script("image_sample.py", common + bad + ["--log_dir", tmp_path / "bad"], check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert message in refused.stderr, refused.stderr[-3000:]
