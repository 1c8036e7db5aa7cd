"""
Tests for guided_diffusion.classifier_train_util: top-k accuracy, and classifier
training that logs loss and accuracy per quartile and resumes bit for bit.
"""

import os

import pytest
import torch as th

from guided_diffusion import logger
from guided_diffusion.classifier_train_util import ClassifierTrainLoop, compute_top_k
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import (
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from test_train_util import _same_tensors


@pytest.fixture(autouse=True)
def _one_thread_and_own_logger(torch_single_thread, isolated_logger):
    yield


def test_top_k_accuracy():
    logits = th.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05]])
    labels = th.tensor([1, 1])
    assert compute_top_k(logits, labels, k=1) == 0.5
    assert compute_top_k(logits, labels, k=2, reduction="none").tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="reduction='sum': expected 'mean' or 'none'"):
        compute_top_k(logits, labels, k=1, reduction="sum")


def _train_classifier(logdir, image_dir, iterations, resume=""):
    logger.configure(str(logdir), ["log", "csv"])
    flags = dict(
        classifier_and_diffusion_defaults(), image_size=8, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="4", num_classes=3,
    )
    th.manual_seed(0)
    model, diffusion = create_classifier_and_diffusion(**flags)
    data_flags = dict(data_dir=image_dir, batch_size=4, image_size=8, class_cond=True, num_workers=0)
    loop = ClassifierTrainLoop(
        model=model, diffusion=diffusion, data=load_data(random_crop=True, seed=1, **data_flags),
        val_data=load_data(seed=2, **data_flags), iterations=iterations, anneal_lr=False,
        eval_interval=1, batch_size=4, microbatch=2, lr=1e-3, log_interval=1, save_interval=2,
        resume_checkpoint=resume, seed=4, flags=flags,
    )
    loop.run_loop()
    return loop


def test_classifier_training_logs_accuracy_and_resumes_exactly(tmp_path, tiny_image_dir):
    full = _train_classifier(tmp_path / "full", tiny_image_dir, 3)
    _train_classifier(tmp_path / "part", tiny_image_dir, 2)
    resume = str(tmp_path / "part" / "model000002.pt")
    resumed = _train_classifier(tmp_path / "part", tiny_image_dir, 3, resume=resume)
    assert _same_tensors(list(full.model.state_dict().values()), list(resumed.model.state_dict().values()))
    header = (tmp_path / "full" / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1", "val_acc@5"):
        assert key in header
    assert any(key.startswith("val_loss_q") for key in header)
    assert sorted(os.listdir(tmp_path / "full")) == [
        "log.txt", "model000002.json", "model000002.pt", "model000003.json", "model000003.pt",
        "opt000002.pt", "opt000003.pt", "progress.csv",
    ]


@pytest.mark.parametrize("microbatch, sizes", [(0, [4]), (-1, [4]), (3, [3, 1]), (8, [4])])
def test_microbatch_zero_or_negative_takes_the_whole_batch(tmp_path, tiny_image_dir, microbatch, sizes):
    logger.configure(str(tmp_path), ["log"])
    model, diffusion = create_classifier_and_diffusion(**dict(
        classifier_and_diffusion_defaults(), image_size=8, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="4", num_classes=3,
    ))
    data = load_data(data_dir=tiny_image_dir, batch_size=4, image_size=8, class_cond=True, num_workers=0)
    loop = ClassifierTrainLoop(model=model, diffusion=diffusion, data=data, batch_size=4,
                               microbatch=microbatch, lr=1e-3, log_interval=1, save_interval=10,
                               resume_checkpoint="")
    batch, cond = next(data)
    assert [micro.shape[0] for micro, _, _ in loop._microbatches(batch, cond)] == sizes


@pytest.mark.slow
def test_classifier_train_refuses_batch_size_zero_without_a_traceback(tmp_path, tiny_image_dir):
    from test_sample_scripts import run_script

    result = run_script("classifier_train.py", [
        "--data_dir", tiny_image_dir, "--image_size", "8", "--classifier_width", "32",
        "--classifier_depth", "1", "--classifier_attention_resolutions", "4", "--num_classes", "3",
        "--batch_size", "0", "--iterations", "1", "--num_workers", "0", "--log_dir", tmp_path / "log",
    ], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "classifier_train.py: --batch_size 0: expected a positive integer" in result.stderr
