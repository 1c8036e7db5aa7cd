"""
Tests for guided_diffusion/consistency_train_util.py (ConsistencyTrainLoop) and
scripts/consistency_distill.py: the target network (mu = 0 copies the student), its
checkpoints and bit-exact resumption, the student's start, guidance at scale 0, and the
script end to end with its refusals.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch as th

from guided_diffusion import logger
from guided_diffusion.consistency import ConsistencyFunction, init_student, predict_x0
from guided_diffusion.consistency_train_util import ConsistencyTrainLoop, target_filename, without_labels
from guided_diffusion.guidance import classifier_cond_fn
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import (
    classifier_defaults, create_classifier, create_model_and_diffusion, model_and_diffusion_defaults,
)
from launchers import run_command

FLAGS = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1",
             attention_resolutions="8", num_head_channels=32, diffusion_steps=40, num_classes=3)
TINY_UNET = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1",
             "--attention_resolutions", "8", "--num_head_channels", "32", "--diffusion_steps", "40"]
COMMON = ["--batch_size", "2", "--seed", "0", "--num_workers", "0", "--log_interval", "1", "--save_interval", "2"]
TIMEOUT = 300
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_single_thread):
    yield


@pytest.fixture(autouse=True)
def _isolated(isolated_logger):
    yield


def _teacher(class_cond=False):
    th.manual_seed(0)
    teacher, diffusion = create_model_and_diffusion(**dict(FLAGS, class_cond=class_cond))
    return teacher.requires_grad_(False).eval(), diffusion


def _student(teacher, class_cond=False):
    th.manual_seed(1)
    return init_student(create_model_and_diffusion(**dict(FLAGS, class_cond=class_cond))[0], teacher.state_dict())


def _loop(logdir, image_dir, max_steps, class_cond=False, cond_fn=None, **overrides):
    """Configure the logger to logdir and build a ConsistencyTrainLoop of the tiny teacher."""
    logger.configure(str(logdir), ["log", "csv"])
    teacher, diffusion = _teacher()
    data = load_data(data_dir=image_dir, batch_size=2, image_size=8, class_cond=class_cond, num_classes=3,
                     num_workers=0, seed=1)
    options = dict(
        model=_student(teacher, class_cond), diffusion=diffusion, data=data, teacher=without_labels(teacher),
        cond_fn=cond_fn, num_scales=3, target_ema=0.9, batch_size=2, microbatch=-1, lr=1e-3, ema_rate="0.9",
        log_interval=1, save_interval=2, resume_checkpoint="", max_steps=max_steps, seed=3,
        flags=dict(FLAGS, class_cond=class_cond, consistency_student=True),
    )
    options.update(overrides)
    return ConsistencyTrainLoop(**options)


def _weights(path):
    return th.load(path, weights_only=True)


def _identical(first, second):
    return first.keys() == second.keys() and all(th.equal(first[key], second[key]) for key in first)


def _same_tensors(first, second):
    return len(first) == len(second) and all(th.equal(a, b) for a, b in zip(first, second))


def test_a_target_rate_of_zero_makes_the_target_the_student_at_every_saved_step(tmp_path, tiny_image_dir):
    loop = _loop(tmp_path, tiny_image_dir, 2, target_ema=0.0, save_interval=1)
    start = {key: value.clone() for key, value in loop.model.state_dict().items()}
    loop.run_loop()
    for step in (1, 2):
        model = _weights(tmp_path / f"model{step:06d}.pt")
        assert _identical(_weights(tmp_path / target_filename(step)), model)
        assert (tmp_path / f"opt{step:06d}.pt").exists() and (tmp_path / f"ema_0.9_{step:06d}.pt").exists()
    assert not _identical(model, start)  # the student trained
    assert _same_tensors(loop.target_params, loop.mp_trainer.master_params)
    assert _identical(loop.target_model.state_dict(), loop.model.state_dict())
    sidecar = json.loads((tmp_path / "target_000002.json").read_text())
    assert sidecar["kind"] == "target" and sidecar["flags"]["consistency_student"] is True


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, tiny_image_dir):
    full = _loop(tmp_path / "full", tiny_image_dir, 4)
    full.run_loop()
    _loop(tmp_path / "part", tiny_image_dir, 2).run_loop()
    first_target = _weights(tmp_path / "part" / target_filename(2))
    assert not _identical(first_target, _weights(tmp_path / "part" / "model000002.pt"))  # mu = 0.9: an EMA
    resumed = _loop(tmp_path / "part", tiny_image_dir, 4,
                    resume_checkpoint=str(tmp_path / "part" / "model000002.pt"))
    assert _identical(resumed.target_model.state_dict(), first_target)
    resumed.run_loop()
    assert resumed.resume_step == 2 and resumed.step == full.step == 4
    assert _identical(full.model.state_dict(), resumed.model.state_dict())
    assert _same_tensors(full.ema_params[0], resumed.ema_params[0])
    assert _same_tensors(full.target_params, resumed.target_params)
    for name in ("model000004.pt", "ema_0.9_000004.pt", target_filename(4)):
        assert _identical(_weights(tmp_path / "full" / name), _weights(tmp_path / "part" / name))


def test_resuming_without_the_target_file_is_refused(tmp_path, tiny_image_dir):
    _loop(tmp_path, tiny_image_dir, 2).run_loop()
    (tmp_path / target_filename(2)).unlink()
    with pytest.raises(FileNotFoundError, match="target_000002.pt of step 2 is not beside it"):
        _loop(tmp_path, tiny_image_dir, 3, resume_checkpoint=str(tmp_path / "model000002.pt"))


@pytest.mark.parametrize("clip_denoised", [True, False])
def test_the_student_starts_as_the_teachers_x0_prediction_within_c_skip(tmp_path, tiny_image_dir, clip_denoised):
    loop = _loop(tmp_path, tiny_image_dir, 1, clip_denoised=clip_denoised)
    teacher, diffusion = _teacher()
    th.manual_seed(5)
    x_T, t_max = th.randn(2, 3, 8, 8), th.full((2,), loop.schedule.t_max, dtype=th.float64)
    with th.no_grad():
        x0 = predict_x0(teacher, loop.schedule, diffusion.model_mean_type, x_T, t_max)
        if clip_denoised:  # the default: the teacher's x_0 as its samplers clamp it
            assert (x0.abs() > 1).any()
            x0 = x0.clamp(-1, 1)
        gap = (loop.student_fn(x_T, t_max) - x0).abs()
        target_gap = (loop.target_fn(x_T, t_max) - x0).abs()
    bound = loop.student_fn.c_skip(loop.sigma_max)
    assert isinstance(loop.student_fn, ConsistencyFunction) and 0 < bound < 1e-2 and gap.max() > 0
    tolerance = bound * (x_T - x0).abs() + 4 * th.finfo(th.float32).eps * x0.abs()
    assert th.all(gap <= tolerance) and th.all(target_gap <= tolerance)


def test_classifier_guidance_at_scale_zero_trains_as_no_guidance(tmp_path, tiny_image_dir):
    th.manual_seed(7)
    classifier = create_classifier(**dict(classifier_defaults(), image_size=8, classifier_width=32,
                                          classifier_depth=1, classifier_attention_resolutions="4",
                                          num_classes=3)).eval()
    runs = []
    for name, cond_fn in (("plain", None), ("guided", classifier_cond_fn(classifier, 0.0))):
        loop = _loop(tmp_path / name, tiny_image_dir, 2, class_cond=True, cond_fn=cond_fn)
        assert not loop.model.label_emb.weight.any()  # a class-conditional student of an unconditional teacher
        loop.run_loop()
        runs.append(loop)
    assert _identical(runs[0].model.state_dict(), runs[1].model.state_dict())
    assert _same_tensors(runs[0].target_params, runs[1].target_params)
    assert (tmp_path / "plain" / "progress.csv").read_text() == (tmp_path / "guided" / "progress.csv").read_text()


def test_the_preview_grid_samples_one_then_two_steps_from_the_same_noise(tmp_path, tiny_image_dir):
    from guided_diffusion.consistency import consistency_sample, consistency_sigmas

    loop = _loop(tmp_path, tiny_image_dir, 1, sample_interval=1)
    loop.run_loop()
    assert (tmp_path / "samples_000001.png").exists()
    model, shape = loop.model.eval(), (2, 3, 8, 8)
    th.manual_seed(5)
    with th.no_grad():
        images = loop.preview_samples(model, shape, {})
    assert images.shape == (4, 3, 8, 8)
    for block, evaluations in ((images[:2], 1), (images[2:], 2)):
        th.manual_seed(0)  # PREVIEW_SEED
        with th.no_grad():
            expected = consistency_sample(ConsistencyFunction(
                model, loop.schedule, loop.diffusion.model_mean_type, loop.sigma_min, clip_denoised=True),
                loop.schedule, shape, consistency_sigmas(loop.sigma_min, loop.sigma_max, evaluations))
        assert th.equal(block, expected)
    assert not th.equal(images[:2], images[2:])


@pytest.mark.parametrize("clip_denoised", [True, False])
def test_the_teachers_clipping_reaches_the_loss(tmp_path, tiny_image_dir, monkeypatch, clip_denoised):
    from guided_diffusion import consistency_train_util

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["clip_denoised"])
        return consistency_train_util.consistency_distillation_loss.__wrapped__(*args, **kwargs)

    spy.__wrapped__ = consistency_train_util.consistency_distillation_loss
    monkeypatch.setattr(consistency_train_util, "consistency_distillation_loss", spy)
    loop = _loop(tmp_path, tiny_image_dir, 1, **({} if clip_denoised else {"clip_denoised": False}))
    loop.run_loop()
    assert seen == [clip_denoised]  # clipped by default, as ADM's samplers clip


@pytest.mark.parametrize("argument, value, message", [
    ("num_scales", 1, "num_scales=1: expected an integer of at least 2"),
    ("num_scales", 0, "num_scales=0 .*max_steps=0"),
    ("target_ema", 1.0, r"target_ema=1.0: expected a rate in \[0, 1\)"),
    ("teacher_solver", "euler", "teacher_solver='euler': expected one of ddim, heun, dpmpp_2m"),
    ("loss", "l1", "loss='l1': expected one of l2, pseudo_huber"),
    ("weighting", "edm", "weighting='edm': expected one of uniform, ict"),
])
def test_bad_arguments_are_refused_by_name(tmp_path, tiny_image_dir, argument, value, message):
    overrides = {argument: value, "max_steps": 0} if argument == "num_scales" else {argument: value}
    with pytest.raises(ValueError, match=message):
        _loop(tmp_path, tiny_image_dir, **dict(dict(max_steps=2), **overrides))


def test_the_ict_schedule_grows_the_grid_over_the_run(tmp_path, tiny_image_dir):
    loop = _loop(tmp_path, tiny_image_dir, 100, num_scales=0)
    assert len(loop.noise_levels()) == 11
    loop.step = 99
    assert len(loop.noise_levels()) == 1281


# ------------------------------------------------------------------ the script


def _script(args):
    """Run `python ARGS...` in the repository with one thread, the repository importable."""
    env = {key: value for key, value in os.environ.items() if key != "OPENAI_LOGDIR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return run_command([sys.executable, *args], env, REPO, TIMEOUT)


def _succeed(args):
    result = _script(args)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _refused(args, *expected):
    result = _script(args)
    assert result.returncode == 1, f"{args}: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, tiny_image_dir):
    """The model000002.pt of a 2-step image_train.py run of the tiny unconditional teacher."""
    logdir = tmp_path_factory.mktemp("teacher")
    _succeed(["scripts/image_train.py", "--data_dir", tiny_image_dir, "--max_steps", "2",
              "--log_dir", str(logdir), *TINY_UNET, *COMMON])
    return logdir / "model000002.pt"


def _distill(teacher_path, image_dir, logdir, *extra):
    return ["scripts/consistency_distill.py", "--teacher_model_path", str(teacher_path), "--data_dir", image_dir,
            "--log_dir", str(logdir), "--num_scales", "4", *TINY_UNET, *COMMON, *extra]


@pytest.mark.slow
def test_the_script_distills_records_the_student_and_resumes(tmp_path, tiny_image_dir, teacher_path):
    logdir = tmp_path / "student"
    _succeed(_distill(teacher_path, tiny_image_dir, logdir, "--max_steps", "2", "--sample_interval", "2"))
    assert (logdir / "samples_000002.png").exists()  # the student's 1- and 2-step previews
    for name in ("model000002.json", "ema_0.9999_000002.json", "target_000002.json"):
        flags = json.loads((logdir / name).read_text())["flags"]
        assert flags["consistency_student"] is True and flags["teacher_model_path"] == str(teacher_path)
    assert (logdir / "opt000002.pt").exists()
    _succeed(_distill(teacher_path, tiny_image_dir, logdir, "--max_steps", "3",
                      "--resume_checkpoint", str(logdir / "model000002.pt")))
    assert (logdir / "model000003.pt").exists() and (logdir / "target_000003.pt").exists()
    # The student samples with --sampler consistency, and only with it.
    def sample(model_path):
        return ["scripts/image_sample.py", *TINY_UNET, "--model_path", str(model_path), "--num_samples", "3",
                "--batch_size", "2", "--seed", "1"]

    student = logdir / "ema_0.9999_000003.pt"
    _succeed([*sample(student), "--sampler", "consistency", "--steps", "2", "--log_dir", str(tmp_path / "samples")])
    with np.load(tmp_path / "samples" / "samples_3x8x8x3.npz") as samples:
        assert samples["arr_0"].shape == (3, 8, 8, 3) and len(np.unique(samples["arr_0"])) > 1
    _refused([*sample(student), "--log_dir", str(tmp_path / "plain")],
             "is a consistency student (scripts/consistency_distill.py), not a diffusion model: "
             "sample it with --sampler consistency")
    _refused([*sample(teacher_path), "--sampler", "consistency", "--log_dir", str(tmp_path / "teacher")],
             "--sampler consistency samples a consistency student")


@pytest.mark.slow
def test_the_script_refuses_bad_flags_by_name(tmp_path, tiny_image_dir, teacher_path):
    _refused(_distill(teacher_path, tiny_image_dir, tmp_path / "a", "--max_steps", "1", "--num_scales", "1"),
             "--num_scales 1: expected an integer of at least 2")
    _refused(_distill(teacher_path, tiny_image_dir, tmp_path / "b", "--max_steps", "1", "--target_ema", "1.0"),
             "--target_ema 1.0: expected a rate in [0, 1)")
    _refused(_distill(teacher_path, tiny_image_dir, tmp_path / "c", "--max_steps", "1", "--num_channels", "64"),
             f"--teacher_model_path {teacher_path}", "num_channels: checkpoint 32, requested 64")
    th.manual_seed(0)
    classifier_flags = dict(classifier_defaults(), image_size=16, classifier_width=32, classifier_depth=1,
                            classifier_attention_resolutions="4", num_classes=3)
    classifier_path = tmp_path / "classifier16.pt"
    th.save(create_classifier(**classifier_flags).state_dict(), classifier_path)
    _refused(_distill(teacher_path, tiny_image_dir, tmp_path / "d", "--max_steps", "1", "--num_classes", "3",
                      "--classifier_path", str(classifier_path), "--classifier_scale", "1",
                      "--classifier_width", "32", "--classifier_depth", "1",
                      "--classifier_attention_resolutions", "4"),
             f"--classifier_path {classifier_path} does not guide this model (--image_size 8")


def test_a_teacher_preset_gives_the_architecture_and_the_teachers_path():
    import runpy

    script = runpy.run_path(os.path.join(REPO, "scripts", "consistency_distill.py"))
    args = script["parse_args"](["--teacher_config", "64x64_diffusion", "--data_dir", "images"])
    assert args.teacher_model_path == "models/64x64_diffusion.pt"
    assert (args.image_size, args.class_cond, args.learn_sigma) == (64, True, True)
    explicit = script["parse_args"](["--teacher_config", "64x64_diffusion", "--teacher_model_path", "t.pt"])
    assert explicit.teacher_model_path == "t.pt"
    with pytest.raises(ValueError, match="--teacher_model_path is empty"):
        script["parse_args"](["--data_dir", "images"])
