"""
Every workflow the documentation (README.md and the pages in docs/) describes, run
through the scripts as a user types them (subprocesses, tiny sizes, the documented
flags): train then continue with a larger --max_steps (one process; two, started under
mpiexec and continued under torchrun), each ending bit-identical to an uninterrupted run; --init_checkpoint;
classifier and super-resolution training continued; sampling, guided sampling (own
unconditional or conditional model with own classifier), upsampling and image_nll.py
from those checkpoints; make_reference.py and the evaluator on the outputs. The
quickstart runs through its script in test_quickstart.py. Every command of README.md
and docs/*.md parses with its script's parser; the links between them are checked in
test_docs.py.
"""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion.command_line import parse_args_with_config
from launchers import find_mpiexec
from test_inception import random_state_dict
from test_sample_scripts import run_script

REPO = Path(__file__).resolve().parent.parent
# docs/training.md's "A small CPU run" model, with 50 diffusion steps to keep image_nll.py short.
TINY_MODEL = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
              "--channel_mult", "1", "--attention_resolutions", "8", "--num_head_channels", "32",
              "--diffusion_steps", "50"]
TRAIN = ["--batch_size", "4", "--save_interval", "2", "--sample_interval", "2", "--seed", "0",
         "--num_workers", "0", "--log_interval", "1"]
CONDITIONAL = ["--class_cond", "True", "--num_classes", "2"]
CLASSIFIER_MODEL = ["--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1",
                    "--classifier_attention_resolutions", "4", "--num_classes", "2",
                    "--diffusion_steps", "50"]
CLASSIFIER_TRAIN = ["--batch_size", "4", "--save_interval", "2", "--seed", "0",
                    "--num_workers", "0", "--eval_interval", "1"]
SUPER_RES_MODEL = ["--large_size", "16", "--small_size", "8", "--num_channels", "32",
                   "--num_res_blocks", "1", "--attention_resolutions", "8",
                   "--num_head_channels", "32", "--diffusion_steps", "50", *CONDITIONAL]
SAMPLE = ["--num_samples", "6", "--batch_size", "4", "--timestep_respacing", "5", "--seed", "0"]


def _weights(path):
    return th.load(path, weights_only=True)


def assert_same_checkpoints(first_dir, second_dir, names):
    """The named checkpoints of two log directories hold identical tensors."""
    for name in names:
        first, second = _weights(Path(first_dir) / name), _weights(Path(second_dir) / name)
        assert first.keys() == second.keys(), name
        different = [key for key in first if not th.equal(first[key], second[key])]
        assert not different, f"{name} differs in {different[:5]}"


def logged_steps(log_dir):
    """The "step" column of a run's progress.csv."""
    rows = (Path(log_dir) / "progress.csv").read_text().splitlines()
    column = rows[0].split(",").index("step")
    return [int(row.split(",")[column]) for row in rows[1:]]


def read_npz(path):
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def train_and_continue(script, flags, root, last_step, step_flag="--max_steps"):
    """
    Run a training script to last_step in one go and, in another folder, to half of it,
    then continue with --resume_checkpoint and the larger step count.

    :return: (uninterrupted log dir, interrupted-and-continued log dir, the continuation's output).
    """
    full, part = root / "full", root / "part"
    half = last_step // 2
    run_script(script, [*flags, step_flag, last_step, "--log_dir", full])
    run_script(script, [*flags, step_flag, half, "--log_dir", part])
    resumed = run_script(script, [*flags, step_flag, last_step, "--log_dir", part,
                                  "--resume_checkpoint", part / f"model{half:06d}.pt"])
    return full, part, resumed.stdout + resumed.stderr


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Eight 16x16 RGB images of classes c0 and c1 (file-name prefixes)."""
    folder = tmp_path_factory.mktemp("workflow_images")
    generator = np.random.default_rng(0)
    for index in range(8):
        pixels = generator.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        pixels[:, : 4 + 8 * (index % 2)] //= 4  # a darker band whose width tells the class
        Image.fromarray(pixels).save(folder / f"c{index % 2}_{index}.png")
    return folder


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory, data_dir):
    """(full, part, continuation output) of image_train.py to 4 steps, and to 2 then 4."""
    return train_and_continue("image_train.py", ["--data_dir", data_dir, *TINY_MODEL, *TRAIN],
                              tmp_path_factory.mktemp("unconditional"), last_step=4)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, data_dir):
    """Log dir of a class-conditional image_train.py run (2 classes, 2 steps)."""
    log_dir = tmp_path_factory.mktemp("conditional")
    run_script("image_train.py", ["--data_dir", data_dir, *TINY_MODEL, *CONDITIONAL, *TRAIN,
                                  "--max_steps", "2", "--log_dir", log_dir])
    return log_dir


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, data_dir):
    """(full, part, continuation output) of classifier_train.py to 4 iterations, and 2 then 4."""
    flags = ["--data_dir", data_dir, "--val_data_dir", data_dir, *CLASSIFIER_MODEL, *CLASSIFIER_TRAIN]
    return train_and_continue("classifier_train.py", flags, tmp_path_factory.mktemp("classifier"),
                              last_step=4, step_flag="--iterations")


@pytest.fixture(scope="module")
def super_res(tmp_path_factory, data_dir):
    """(full, part, continuation output) of super_res_train.py to 4 steps, and 2 then 4."""
    flags = ["--data_dir", data_dir, *SUPER_RES_MODEL, *TRAIN, "--sampler", "unipc", "--steps", "3"]
    return train_and_continue("super_res_train.py", flags, tmp_path_factory.mktemp("super_res"),
                              last_step=4)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    th.save(random_state_dict(seed=5), path)
    return path


# ---------------------------------------------------------------------- training


@pytest.mark.slow
def test_continued_training_equals_the_uninterrupted_run(unconditional):
    full, part, output = unconditional
    assert_same_checkpoints(full, part, ["model000004.pt", "ema_0.9999_000004.pt"])
    assert "flags changed since model000002.pt: max_steps 2 -> 4" in output
    assert logged_steps(part) == [0, 1, 2, 3]  # continued, no step twice
    assert (part / "samples_000004.png").exists()


def two_process_flags(data_dir):
    """image_train.py's flags for the two-process runs (no preview grids: rank 0's alone)."""
    return ["--data_dir", data_dir, *TINY_MODEL, *TRAIN, "--batch_size", "2", "--sample_interval", "0"]


@pytest.fixture(scope="module")
def two_process_uninterrupted(tmp_path_factory, data_dir):
    """Log dir of image_train.py to 4 steps in one go, 2 processes under torchrun."""
    full = tmp_path_factory.mktemp("two_process_full")
    run_script("image_train.py", [*two_process_flags(data_dir), "--max_steps", 4, "--log_dir", full],
               2, "torchrun")
    return full


@pytest.mark.slow
def test_two_process_training_continues_bit_for_bit(tmp_path, data_dir, two_process_uninterrupted):
    # Uninterrupted under torchrun; to 2 steps under mpiexec (where installed), continued to
    # 4 under torchrun: the launcher does not change the arithmetic, so one sequence starts
    # under both and continues under torchrun (test_training_scripts continues under mpiexec).
    start_launcher = "torchrun" if find_mpiexec() is None else "mpiexec"
    flags = two_process_flags(data_dir)
    run_script("image_train.py", [*flags, "--max_steps", 2, "--log_dir", tmp_path], 2, start_launcher)
    run_script("image_train.py", [*flags, "--max_steps", 4, "--log_dir", tmp_path,
                                  "--resume_checkpoint", tmp_path / "model000002.pt"], 2, "torchrun")
    assert_same_checkpoints(two_process_uninterrupted, tmp_path,
                            ["model000004.pt", "ema_0.9999_000004.pt"])
    assert sorted(_weights(tmp_path / "opt000004.pt")["rng"]) == [0, 1]


@pytest.mark.slow
def test_a_changed_batch_size_on_resume_is_refused_with_the_fix(tmp_path, unconditional, data_dir):
    _, part, _ = unconditional
    result = run_script("image_train.py", [
        "--data_dir", data_dir, *TINY_MODEL, *TRAIN, "--batch_size", "2", "--max_steps", "6",
        "--log_dir", tmp_path, "--resume_checkpoint", part / "model000004.pt"], check=False)
    assert result.returncode != 0
    assert "resume with the same data_dir, batch_size and number of processes" in result.stderr


@pytest.mark.slow
def test_a_changed_architecture_on_resume_names_only_the_culprit(tmp_path, unconditional, data_dir):
    _, part, _ = unconditional
    result = run_script("image_train.py", [
        "--data_dir", data_dir, *TINY_MODEL, *TRAIN, "--max_steps", "6", "--lr", "5e-5",
        "--learn_sigma", "True", "--log_dir", tmp_path,
        "--resume_checkpoint", part / "model000004.pt"], check=False)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "learn_sigma: checkpoint False, requested True" in message
    assert message.count(": checkpoint ") == 1


@pytest.mark.slow
def test_init_checkpoint_starts_a_new_run_from_the_weights(tmp_path, unconditional, data_dir):
    full, _, _ = unconditional
    # lr 0: the first step keeps the weights, so the new run's checkpoint is the old one's.
    result = run_script("image_train.py", [
        "--data_dir", data_dir, *TINY_MODEL, *TRAIN, "--lr", "0", "--max_steps", "1",
        "--log_dir", tmp_path, "--init_checkpoint", full / "model000004.pt"])
    changed = next(line for line in result.stdout.splitlines() if line.startswith("flags changed"))
    assert changed.startswith("flags changed since model000004.pt: log_dir ")
    assert changed.endswith(", lr 0.0001 -> 0.0, max_steps 4 -> 1")
    initial, saved = _weights(full / "model000004.pt"), _weights(tmp_path / "model000001.pt")
    assert all(th.equal(initial[key], saved[key]) for key in initial)
    assert logged_steps(tmp_path) == [0]


@pytest.mark.slow
def test_classifier_training_continues_with_more_iterations(classifier):
    full, part, output = classifier
    assert_same_checkpoints(full, part, ["model000004.pt"])
    assert "flags changed since model000002.pt: iterations 2 -> 4" in output
    header = (part / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_acc@1", "val_loss", "val_acc@1"} <= set(header)


@pytest.mark.slow
def test_super_res_training_continues(super_res):
    full, part, _ = super_res
    assert_same_checkpoints(full, part, ["model000004.pt", "ema_0.9999_000004.pt"])
    previews = [np.array(Image.open(folder / "samples_000004.png")) for folder in (full, part)]
    assert np.array_equal(*previews) and previews[0].std() > 0  # --sampler unipc --steps 3


# ---------------------------------------------------------------------- sampling


@pytest.mark.slow
def test_image_sample_from_a_trained_model(tmp_path, unconditional):
    full, _, _ = unconditional
    for name, extra in (("ancestral", []), ("ddim", ["--use_ddim", "True"])):
        run_script("image_sample.py", [*TINY_MODEL, *SAMPLE, *extra, "--log_dir", tmp_path / name,
                                       "--model_path", full / "ema_0.9999_000004.pt"])
        images = read_npz(tmp_path / name / "samples_6x8x8x3.npz")["arr_0"]
        assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
def test_own_model_guided_by_own_classifier(tmp_path, request, classifier, kind):
    # With the unconditional model, docs/guidance.md's "unconditional model, guided by the
    # classifier" recipe: the model records num_classes 1000 (unused without class_cond),
    # the classifier 2.
    if kind == "unconditional":
        model_flags, model_path = [], request.getfixturevalue(kind)[0] / "ema_0.9999_000004.pt"
    else:
        model_flags, model_path = CONDITIONAL, request.getfixturevalue(kind) / "model000002.pt"
    run_script("classifier_sample.py", [
        *TINY_MODEL, *model_flags, *CLASSIFIER_MODEL, *SAMPLE, "--classifier_scale", "10.0",
        "--model_path", model_path, "--classifier_path", classifier[0] / "model000004.pt",
        "--log_dir", tmp_path])
    arrays = read_npz(tmp_path / "samples_6x8x8x3.npz")
    assert arrays["arr_0"].shape == (6, 8, 8, 3) and set(arrays["arr_1"]) <= {0, 1}


@pytest.mark.slow
def test_upsample_the_samples_of_a_conditional_model(tmp_path, conditional, super_res):
    base_dir = tmp_path / "base"
    run_script("image_sample.py", [*TINY_MODEL, *CONDITIONAL, *SAMPLE, "--log_dir", base_dir,
                                   "--model_path", conditional / "model000002.pt"])
    base = read_npz(base_dir / "samples_6x8x8x3.npz")
    run_script("super_res_sample.py", [
        *SUPER_RES_MODEL, *SAMPLE, "--model_path", super_res[0] / "ema_0.9999_000004.pt",
        "--base_samples", base_dir / "samples_6x8x8x3.npz", "--log_dir", tmp_path / "up"])
    upsampled = read_npz(tmp_path / "up" / "samples_6x16x16x3.npz")
    assert upsampled["arr_0"].shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(upsampled["arr_1"], base["arr_1"])  # output i from base i


@pytest.mark.slow
def test_image_nll_of_the_training_images(tmp_path, unconditional, data_dir):
    full, _, _ = unconditional
    run_script("image_nll.py", ["--data_dir", data_dir, *TINY_MODEL, "--num_samples", "2",
                                "--batch_size", "2", "--model_path", full / "model000004.pt",
                                "--log_dir", tmp_path])
    vb_terms = read_npz(tmp_path / "vb_terms.npz")["arr_0"]
    assert vb_terms.shape == (50,) and np.isfinite(vb_terms).all() and (vb_terms > 0).all()
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    bpd = float(rows[-1].split(",")[rows[0].split(",").index("bpd")])
    # Uniform noise images under a 4-step model: a few bits per dimension, far below 8 * 3.
    assert 0 < bpd < 24


# ---------------------------------------------------------------------- evaluation


@pytest.mark.slow
def test_make_reference_and_evaluate_samples(tmp_path, data_dir, unconditional, inception_weights):
    full, _, _ = unconditional
    run_script("image_sample.py", [*TINY_MODEL, *SAMPLE, "--log_dir", tmp_path,
                                   "--model_path", full / "ema_0.9999_000004.pt"])
    reference = tmp_path / "ref.npz"
    run_script("../evaluations/make_reference.py", [
        data_dir, reference, "--image_size", "8", "--num_pr_images", "8",
        "--inception_path", inception_weights, "--device", "cpu"])
    assert read_npz(reference)["arr_0"].shape == (8, 8, 8, 3)
    result = run_script("../evaluations/evaluator.py", [
        reference, tmp_path / "samples_6x8x8x3.npz", "--inception_path", inception_weights,
        "--json", "--device", "cpu"])
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(scores) == ["fid", "inception_score", "precision", "recall", "sfid"]
    assert all(np.isfinite(value) for value in scores.values())
    assert scores["fid"] > 0 and 0 <= scores["precision"] <= 1 and scores["inception_score"] >= 1


# ---------------------------------------------------------------------- flags


def flag_usage_runs(tmp_path, data_dir, unconditional, classifier, super_res):
    """One tiny run of every training, sampling and evaluation script: (script, argv)."""
    model = unconditional[0] / "ema_0.9999_000004.pt"
    base = tmp_path / "base.npz"
    np.savez(base, np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]))
    short = ["--num_samples", "2", "--batch_size", "2", "--timestep_respacing", "2", "--seed", "0"]
    return [
        ("image_train.py", ["--data_dir", data_dir, *TINY_MODEL, *TRAIN, "--max_steps", "1"]),
        ("classifier_train.py", ["--data_dir", data_dir, "--val_data_dir", data_dir,
                                 *CLASSIFIER_MODEL, *CLASSIFIER_TRAIN, "--iterations", "1"]),
        ("super_res_train.py", ["--data_dir", data_dir, *SUPER_RES_MODEL, *TRAIN,
                                "--max_steps", "1"]),
        ("image_sample.py", [*TINY_MODEL, *short, "--model_path", model]),
        ("classifier_sample.py", [*TINY_MODEL, *CLASSIFIER_MODEL, *short, "--model_path", model,
                                  "--classifier_path", classifier[0] / "model000004.pt"]),
        ("super_res_sample.py", [*SUPER_RES_MODEL, *short, "--base_samples", base,
                                 "--model_path", super_res[0] / "model000004.pt"]),
        ("image_nll.py", ["--data_dir", data_dir, *TINY_MODEL, "--num_samples", "1",
                          "--model_path", model]),
    ]


@pytest.mark.slow
def test_every_parsed_flag_of_every_script_is_used(tmp_path, data_dir, unconditional, classifier,
                                                   super_res):
    # The quickstart passes all its flags to run_quickstart(**options), which refuses an
    # unknown one (test_quickstart.py); the benchmark's flags are its measurement's.
    runs = flag_usage_runs(tmp_path, data_dir, unconditional, classifier, super_res)
    unused = {}
    for index, (script, argv) in enumerate(runs):
        report = tmp_path / f"{index}.json"
        run_script("../tests/flag_usage_driver.py", [
            REPO / "scripts" / script, report, *argv, "--log_dir", tmp_path / f"run{index}"])
        usage = json.loads(report.read_text())
        assert len(usage["parsed"]) > 20, script
        if set(usage["parsed"]) - set(usage["read"]):
            unused[script] = sorted(set(usage["parsed"]) - set(usage["read"]))
    assert not unused, f"flags parsed but never read: {unused}"


# ---------------------------------------------------------------------- the README

# The documentation: the README (the front page) and the pages it links in docs/.
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The commands people type most, which the front page itself must show.
FRONT_PAGE_SCRIPTS = {"scripts/image_train.py", "scripts/image_sample.py",
                      "scripts/classifier_sample.py", "evaluations/evaluator.py"}


def readme_commands(documents=DOCUMENTS, root=REPO):
    """
    Every `python scripts/NAME.py ...` or `python evaluations/NAME.py ...` of README.md
    and docs/*.md, with the shell variables of its code block expanded:
    (the file, relative to root, script path, argv, the line).
    """
    commands = []
    for document in documents:
        text = document.read_text()
        source = document.relative_to(root).as_posix()
        blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
        for block in blocks:
            block = block.replace("\\\n", " ")
            variables = dict(re.findall(r'^(\w+)="([^"]*)"', block, flags=re.M))
            for line in block.splitlines():
                match = re.search(r"python ((?:scripts|evaluations)/\w+\.py)(.*)", line)
                if not match:
                    continue
                expanded = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), ""), match.group(2))
                argv = [part for part in shlex.split(expanded.split("#")[0]) if part != "..."]
                commands.append((source, match.group(1), argv, line.strip()))
    return commands


def parse_as_the_script_does(script, argv):
    """Parse argv with the script's own parser (and --config presets where it takes them)."""
    spec = importlib.util.spec_from_file_location(f"readme_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    purpose = re.search(r'purpose="(\w+)"', (REPO / script).read_text())
    if purpose is None:
        return module.create_argparser().parse_args(argv)
    return parse_args_with_config(module.create_argparser(), purpose=purpose.group(1), argv=argv)


def test_the_readme_has_commands_for_every_workflow():
    # Across the README and docs/*.md; the front page itself keeps the four most typed.
    scripts = {script for _, script, _, _ in readme_commands()}
    assert {"scripts/image_train.py", "scripts/classifier_train.py", "scripts/super_res_train.py",
            "scripts/image_sample.py", "scripts/classifier_sample.py", "scripts/super_res_sample.py",
            "scripts/image_nll.py", "scripts/quickstart.py", "evaluations/evaluator.py",
            "evaluations/make_reference.py"} <= scripts
    front_page = {script for _, script, _, _ in readme_commands([REPO / "README.md"])}
    assert FRONT_PAGE_SCRIPTS <= front_page, f"README.md lacks {FRONT_PAGE_SCRIPTS - front_page}"


@pytest.mark.parametrize("source, script, argv, line", readme_commands(), ids=lambda value: None)
def test_every_readme_command_parses(source, script, argv, line):
    try:
        parse_as_the_script_does(script, argv)
    except SystemExit as error:  # argparse: unknown flag or bad value
        pytest.fail(f"{source}: command does not parse ({error}): {line}")


def test_readme_commands_names_the_file_of_each_command(tmp_path):
    # A command in a docs page is found, with its code block's variables, and named by file.
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text('```bash\nFLAGS="--batch_size 4"\npython scripts/image_sample.py $FLAGS \\\n'
                    '    --num_samples 2  # a comment\n```\n')
    [(source, script, argv, _)] = readme_commands([page], root=tmp_path)
    assert (source, script, argv) == ("docs/page.md", "scripts/image_sample.py",
                                      ["--batch_size", "4", "--num_samples", "2"])
