"""
Tests for scripts/classifier_train.py: its flags and their defaults.
"""

import runpy
from pathlib import Path

from guided_diffusion.command_line import training_argparser
from guided_diffusion.script_util import classifier_and_diffusion_defaults

REPO = Path(__file__).resolve().parents[1]

# The script's flag defaults (beyond training_argparser's), as they were before they were
# derived from command_line.training_defaults().
_CLASSIFIER_TRAIN_DEFAULTS = dict(
    data_dir="",
    val_data_dir="",
    noised=True,
    iterations=150000,
    lr=3e-4,
    weight_decay=0.0,
    anneal_lr=False,
    batch_size=4,
    microbatch=-1,
    schedule_sampler="uniform",
    resume_checkpoint="",
    log_interval=10,
    eval_interval=5,
    save_interval=10000,
    log_dir="",
    class_from="prefix",
    labels_file="",  # new: classes from a CSV (docs/guidance.md)
    num_workers=1,
    init_checkpoint="",
    overwrite_log_dir=False,
    # The classifier's and the diffusion's (tested in test_script_util.py).
    **classifier_and_diffusion_defaults(),
)


def _typed(flags):
    return {name: (value, type(value)) for name, value in flags.items()}


def test_classifier_train_flags_and_defaults_are_unchanged():
    parser = runpy.run_path(str(REPO / "scripts" / "classifier_train.py"))["create_argparser"]()
    common = vars(training_argparser("Common flags.", {}).parse_args([]))
    parsed = vars(parser.parse_args([]))
    own = {name: value for name, value in parsed.items() if name not in common}
    assert _typed(own) == _typed(_CLASSIFIER_TRAIN_DEFAULTS)
    assert parser.parse_args(["--lr", "0.01", "--noised", "false"]).lr == 0.01
    assert parser.parse_args(["--noised", "false"]).noised is False
