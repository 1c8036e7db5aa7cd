"""
Tests for guided_diffusion/command_line.py: errors in flag terms, base samples, loading
a checkpoint named by a flag, and the translation of flags into library arguments.
"""

import argparse
import inspect
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th

from launchers import run_command
from test_sampling import tiny_flags, tiny_model
from guided_diffusion import logger
from guided_diffusion.attention import AttentionBlock
from guided_diffusion.command_line import (
    check_checkpoint_kind,
    diffusion_loop_kwargs,
    in_flag_terms,
    load_for_sampling,
    read_base_samples,
    sample_kwargs,
    sampling_respacing,
    training_argparser,
    training_defaults,
    training_loop_kwargs,
)
from guided_diffusion.sampling import SamplingRun
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainLoop

REPO = Path(__file__).resolve().parent.parent


def test_library_argument_names_become_flags():
    names = ["batch_size", "model_path", "timestep_respacing", "lr", "num_samples"]
    message = ('batch_size=0: expected a positive integer; pass it as model_path=) with '
               'timestep_respacing="ddim7", not lr=3 or my_lr=4 or x.lr=5')
    assert in_flag_terms(message, names) == (
        '--batch_size 0: expected a positive integer; pass it as --model_path) with '
        '--timestep_respacing "ddim7", not --lr 3 or my_lr=4 or x.lr=5'
    )
    assert in_flag_terms("num_samples=3", []) == "num_samples=3"


@pytest.mark.slow
def test_a_script_reports_a_library_error_in_flag_terms_without_a_traceback(tmp_path):
    run = run_command([sys.executable, str(REPO / "scripts" / "image_sample.py"), "--batch_size", "0",
                       "--model_path", "x.pt", "--log_dir", str(tmp_path)], os.environ, os.getcwd(), 120)
    assert run.returncode == 1
    assert run.stderr.strip() == "image_sample.py: --batch_size 0: expected a positive integer"


def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_read_base_samples(tmp_path):
    images = np.zeros((3, 4, 4, 3), np.uint8)
    good = _npz(tmp_path, "good.npz", arr_0=images, arr_1=np.array([0, 1, 2]))
    read_images, read_labels = read_base_samples(good, 4, class_cond=True)
    assert np.array_equal(read_images, images) and read_labels.tolist() == [0, 1, 2]
    assert read_base_samples(good, 4, class_cond=False)[1] is None
    cases = [
        (_npz(tmp_path, "float.npz", arr_0=images.astype(np.float32)), False, "dtype float32"),
        (_npz(tmp_path, "size.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8)), False,
         "expected uint8 \\[N x 4 x 4 x 3\\]"),
        (_npz(tmp_path, "nchw.npz", arr_0=np.zeros((3, 3, 4, 4), np.uint8)), False, "shape \\(3, 3, 4, 4\\)"),
        (_npz(tmp_path, "nolabels.npz", arr_0=images), True, "needs arr_1 with 3 integer labels, found no arr_1"),
        (_npz(tmp_path, "badlabels.npz", arr_0=images, arr_1=np.zeros(2)), True, "arr_1 of shape \\(2,\\)"),
    ]
    for path, class_cond, message in cases:
        with pytest.raises(ValueError, match=message):
            read_base_samples(path, 4, class_cond=class_cond)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a readable .npz"):
        read_base_samples(str(tmp_path / "text.npz"), 4, class_cond=False)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_base_samples(str(tmp_path / "missing.npz"), 4, class_cond=False)
    with pytest.raises(ValueError, match="--base_samples is empty"):
        read_base_samples("", 4, class_cond=False)


def _sampling_args(path, **flags):
    values = dict(tiny_flags(class_cond=True), model_path=path, channels_last=True,
                  fast_attention=False)
    return argparse.Namespace(**dict(values, **flags))


def _load(model, args):
    flags = {name: getattr(args, name) for name in model_and_diffusion_defaults() if hasattr(args, name)}
    return load_for_sampling(model, args.model_path, "model_path", flags, args)


def test_load_for_sampling(tmp_path):
    model, _ = tiny_model(class_cond=True)
    path = str(tmp_path / "model.pt")
    th.save(model.state_dict(), path)
    fresh, _ = create_model_and_diffusion(**tiny_flags(class_cond=True))
    args = _sampling_args(path)
    _load(fresh, args)
    assert not fresh.training
    assert not any(p.requires_grad for p in fresh.parameters())  # no weight gradients in guidance
    blocks = [module for module in fresh.modules() if isinstance(module, AttentionBlock)]
    assert blocks and not any(block.recompute for block in blocks)  # guidance gradients: faster
    assert not any(block.attention.fast for block in blocks)  # --fast_attention False
    assert fresh.input_blocks[0][0].weight.is_contiguous(memory_format=th.channels_last)
    assert all(th.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="--model_path is empty"):
        _load(fresh, _sampling_args(""))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        _load(fresh, _sampling_args(str(tmp_path / "nothing.pt")))
    unconditional, _ = create_model_and_diffusion(**tiny_flags())
    with pytest.raises(ValueError, match="class_cond"):
        _load(unconditional, _sampling_args(path, class_cond=False))


def test_every_sampling_flag_reaches_the_sampling_run():
    parser = runpy.run_path(str(REPO / "scripts" / "classifier_sample.py"))["create_argparser"]()
    args = parser.parse_args([])
    kwargs = dict(sample_kwargs(args), classifier_scale=args.classifier_scale)  # as the script
    accepted = set(inspect.signature(SamplingRun).parameters)
    assert set(kwargs) <= accepted
    assert set(kwargs) == accepted & {action.dest for action in parser._actions}


def test_a_fast_sampler_decides_the_respacing(monkeypatch):
    warnings = []
    monkeypatch.setattr(logger, "warn", warnings.append)
    assert sampling_respacing("250", "") == "250"
    assert sampling_respacing("", "dpmpp_2m") == ""
    assert not warnings
    assert sampling_respacing("ddim25", "dpmpp_2m") == ""
    assert warnings == ["--timestep_respacing ddim25 is not used with --sampler dpmpp_2m: the "
                        "sampler chooses its own times of the full schedule (--steps)"]


def test_training_flags_become_loop_arguments():
    args = training_argparser("Train.", dict(
        training_defaults(), **model_and_diffusion_defaults()
    )).parse_args(["--lr", "0.5", "--schedule_sampler", "loss-second-moment", "--compile", "True"])
    _, diffusion = create_model_and_diffusion(**dict(model_and_diffusion_defaults(), image_size=8,
                                                      num_channels=32, num_res_blocks=1,
                                                      attention_resolutions="4"))
    kwargs = dict(training_loop_kwargs(args, diffusion), **diffusion_loop_kwargs(args),
                  class_dropout_prob=args.class_dropout_prob)  # as image_train.py
    assert kwargs["lr"] == 0.5 and kwargs["compile"] is True and kwargs["channels_last"] is True
    assert kwargs["recompute_attention"] is True  # the original's memory use
    assert type(kwargs["schedule_sampler"]).__name__ == "LossSecondMomentResampler"
    assert kwargs["flags"]["lr"] == 0.5 and kwargs["class_dropout_prob"] == 0.0
    assert "data_dir" not in kwargs and "image_size" not in kwargs
    accepted = set(inspect.signature(TrainLoop).parameters)
    assert set(kwargs) <= accepted


def test_a_consistency_student_and_a_diffusion_model_each_need_their_sampler(tmp_path):
    student, model = tmp_path / "student.pt", tmp_path / "model.pt"
    for path, flags in ((student, {"consistency_student": True}), (model, {"image_size": 8})):
        path.write_bytes(b"")
        path.with_suffix(".json").write_text(json.dumps({"format": 1, "kind": "model", "flags": flags}))
    check_checkpoint_kind(str(student), "model_path", "consistency")
    check_checkpoint_kind(str(model), "model_path", "dpmpp_2m")
    check_checkpoint_kind(str(tmp_path / "no_record.pt"), "model_path", "")
    with pytest.raises(ValueError, match=f"--model_path {student} is a consistency student .*"
                                         "--sampler consistency --steps 1"):
        check_checkpoint_kind(str(student), "model_path", "")
    with pytest.raises(ValueError, match=f"--sampler consistency samples a consistency student, and "
                                         f"--model_path {model} is not one"):
        check_checkpoint_kind(str(model), "model_path", "consistency")
