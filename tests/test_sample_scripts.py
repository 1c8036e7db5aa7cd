"""
End-to-end tests of scripts/image_sample.py, classifier_sample.py,
super_res_sample.py and image_nll.py on tiny checkpoints made here, in one
process and in two (mpiexec -n 2, torchrun --nproc_per_node 2), each run with a
timeout; and their errors on bad input.
"""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th
from PIL import Image

from test_sampling import NUM_CLASSES, tiny_classifier_flags, tiny_flags, tiny_model, tiny_sr_flags
from guided_diffusion.command_line import in_flag_terms
from guided_diffusion.script_util import create_classifier
from launchers import find_mpiexec, run_python_script

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 180


def command_line(flags):
    """Flags dict -> ["--name", "value", ...]."""
    return [part for name, value in flags.items() for part in (f"--{name}", str(value))]


MODEL_FLAGS = command_line({
    name: value for name, value in tiny_flags().items()
    if name in ("image_size", "num_channels", "num_res_blocks", "attention_resolutions",
                "diffusion_steps", "timestep_respacing", "learn_sigma", "num_classes")
})
SR_FLAGS = command_line({
    name: value for name, value in tiny_sr_flags().items()
    if name in ("large_size", "small_size", "num_channels", "num_res_blocks", "attention_resolutions",
                "diffusion_steps", "timestep_respacing", "learn_sigma", "num_classes", "class_cond")
}) + ["--class_cond", "True"]
CLASSIFIER_FLAGS = command_line({
    name: value for name, value in tiny_classifier_flags().items()
    if name.startswith("classifier_") and name != "classifier_use_fp16"
})
COND = ["--class_cond", "True", "--class_dropout_prob", "0.1"]


def run_script(script, args, processes=1, launcher="mpiexec", check=True):
    """Run a script (with a timeout), in one process or in two; return the finished process."""
    if processes == 1:
        prefix = [sys.executable]
    elif launcher == "mpiexec":
        prefix = [find_mpiexec() or "mpiexec", "-n", str(processes), sys.executable]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={processes}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("OPENAI_LOGDIR", None)
    if processes == 1:
        result = run_python_script(REPO / "scripts" / script, args, env, REPO, TIMEOUT)
    else:
        result = subprocess.run(
            prefix + [str(REPO / "scripts" / script), *map(str, args)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT,
        )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_samples(folder, count, side=8):
    """The arrays of samples_{count}x{side}x{side}x3.npz, with its grid checked."""
    stem = Path(folder) / f"samples_{count}x{side}x{side}x3"
    with np.load(f"{stem}.npz") as data:
        arrays = {name: data[name] for name in data.files}
    images = arrays["arr_0"]
    assert images.shape == (count, side, side, 3) and images.dtype == np.uint8
    assert 0 < images.std()
    grid = np.array(Image.open(f"{stem}.png"))
    per_row = int(np.ceil(np.sqrt(min(count, 64))))
    assert grid.shape[1] == 2 + per_row * (side + 2) and grid.dtype == np.uint8
    assert np.array_equal(grid[2 : 2 + side, 2 : 2 + side], images[0])
    return images, arrays.get("arr_1")


def assert_same_images(first, second):
    """Equal up to an occasional rounding flip of one level (batched float arithmetic)."""
    assert np.abs(first.astype(int) - second.astype(int)).max() <= 1
    assert (first == second).mean() > 0.99


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random checkpoints (plain state dicts), base samples and a data folder."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, kwargs in {
        "cond": dict(class_cond=True, class_dropout_prob=0.1),
        "uncond": dict(class_cond=False),
        "sr": dict(super_res=True, class_cond=True),
    }.items():
        model, _ = tiny_model(**kwargs)
        paths[name] = folder / f"{name}.pt"
        th.save(model.state_dict(), paths[name])
    th.manual_seed(0)
    paths["classifier"] = folder / "classifier.pt"
    th.save(create_classifier(**tiny_classifier_flags()).state_dict(), paths["classifier"])
    paths["classifier16"] = folder / "classifier16.pt"
    th.save(create_classifier(**tiny_classifier_flags(image_size=16)).state_dict(), paths["classifier16"])
    rng = np.random.default_rng(0)
    paths["base"] = folder / "base.npz"
    base_labels = np.array([3, 1, 0])
    np.savez(paths["base"], rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8), base_labels)
    paths["data"] = folder / "data"
    paths["data"].mkdir()
    for index, name in enumerate(["cat_1.png", "dog_2.png", "cat_3.png"]):
        pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(paths["data"] / name)
    return paths


@pytest.mark.slow
def test_image_sample_same_seed_same_images_for_one_and_two_processes(checkpoints, tmp_path):
    common = MODEL_FLAGS + COND + ["--model_path", checkpoints["cond"], "--num_samples", 5, "--seed", 3,
                                   "--cfg_scale", 2.0]
    run_script("image_sample.py", common + ["--batch_size", 4, "--save_png", "--log_dir", tmp_path / "one"])
    run_script("image_sample.py", common + ["--batch_size", 2, "--log_dir", tmp_path / "two"], processes=2)
    one, one_labels = read_samples(tmp_path / "one", 5)
    two, two_labels = read_samples(tmp_path / "two", 5)
    assert one_labels.tolist() == two_labels.tolist()
    assert one_labels.min() >= 0 and one_labels.max() < NUM_CLASSES
    assert_same_images(one, two)
    pngs = sorted((tmp_path / "one" / "samples_5x8x8x3").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.array(Image.open(pngs[3])), one[3])
    assert not (tmp_path / "two" / "samples_5x8x8x3").exists()
    for folder in ("one", "two"):
        assert not (tmp_path / folder / "partial_samples").exists()  # removed once the npz is written


CRASH_AFTER_FIRST_ROUND = """
import os, runpy, sys
from guided_diffusion import sampling_state
save = sampling_state.PartialSamples.save

def save_then_crash(self, *args):
    save(self, *args)
    os._exit(9)  # as a killed job: no cleanup, no exception handling

sampling_state.PartialSamples.save = save_then_crash
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
def test_a_killed_seeded_image_sample_continues_with_the_same_images(checkpoints, tmp_path):
    # Killed under mpiexec (where installed), continued under torchrun: the partial samples
    # do not depend on the launcher, so one sequence covers both.
    crash_launcher = "torchrun" if find_mpiexec() is None else "mpiexec"
    common = MODEL_FLAGS + COND + ["--model_path", checkpoints["cond"], "--num_samples", 7, "--seed", 5,
                                   "--batch_size", 2]
    run_script("image_sample.py", common + ["--log_dir", tmp_path / "whole"])
    wrapper = tmp_path / "crash_after_first_round.py"
    wrapper.write_text(CRASH_AFTER_FIRST_ROUND)
    folder = tmp_path / "continued"
    args = [str(REPO / "scripts" / "image_sample.py"), *common, "--log_dir", folder, "--save_png"]
    crashed = run_script(wrapper, args, processes=2, launcher=crash_launcher, check=False)
    assert crashed.returncode != 0
    rounds = sorted(p.name for p in (folder / "partial_samples").iterdir())
    assert rounds == ["000000000-000000004.npz", "record.json"]
    run_script("image_sample.py", common + ["--log_dir", folder, "--save_png"], processes=2,
               launcher="torchrun")
    whole, whole_labels = read_samples(tmp_path / "whole", 7)
    continued, continued_labels = read_samples(folder, 7)
    assert continued_labels.tolist() == whole_labels.tolist()
    assert_same_images(whole, continued)
    assert len(list((folder / "samples_7x8x8x3").iterdir())) == 7
    assert not (folder / "partial_samples").exists()


@pytest.mark.slow
def test_fast_guided_sampler_same_seed_same_images_for_one_and_two_processes(checkpoints, tmp_path):
    # The stochastic dpmpp_2m_sde (fresh noise per step and sample) in one and two processes;
    # unipc, deterministic like ddim (whose process test is image_sample's), in one.
    common = MODEL_FLAGS + CLASSIFIER_FLAGS + [
        "--model_path", checkpoints["uncond"], "--classifier_path", checkpoints["classifier"],
        "--classifier_scale", 2.0, "--num_samples", 5, "--seed", 2, "--steps", 4, "--batch_size", 5,
    ]
    run_script("classifier_sample.py", common + ["--sampler", "dpmpp_2m_sde", "--log_dir", tmp_path / "one"])
    run_script("classifier_sample.py", common + ["--sampler", "dpmpp_2m_sde", "--batch_size", 2,
                                                 "--log_dir", tmp_path / "two"], processes=2, launcher="torchrun")
    run_script("classifier_sample.py", common + ["--sampler", "unipc", "--log_dir", tmp_path / "unipc"])
    one, one_labels = read_samples(tmp_path / "one", 5)
    two, two_labels = read_samples(tmp_path / "two", 5)
    assert one_labels.tolist() == two_labels.tolist()
    assert_same_images(one, two)
    for sampler, folder in (("dpmpp_2m_sde", "one"), ("unipc", "unipc")):
        log = (tmp_path / folder / "log.txt").read_text()
        assert f"sampler {sampler}: 4 model evaluations per sample" in log
        assert "--timestep_respacing 6 is not used with --sampler" in log  # MODEL_FLAGS respace
    unipc, unipc_labels = read_samples(tmp_path / "unipc", 5)
    assert unipc_labels.tolist() == one_labels.tolist() and not np.array_equal(unipc, one)  # another sampler


@pytest.mark.parametrize("args, message", [
    (["--sampler", "euler"], "--sampler 'euler': expected one of ddim, ddpm, dpmpp_2m"),
    (["--steps", 4], "--steps 4 without a sampler: pass --sampler"),
    (["--sampler", "dpmpp_2m", "--use_ddim", "True"], "--use_ddim True and --sampler dpmpp_2m: choose one"),
    (["--sampler", "heun", "--steps", 0, "--num_samples", 1], None),  # 0: the default 15
])
@pytest.mark.slow
def test_fast_sampler_flag_errors(checkpoints, tmp_path, args, message):
    result = run_script("image_sample.py", MODEL_FLAGS + COND + [
        "--model_path", checkpoints["cond"], "--num_samples", 2, "--log_dir", tmp_path, *args,
    ], check=message is None)
    if message is None:
        assert "sampler heun: 15 model evaluations per sample" in (tmp_path / "log.txt").read_text()
        return
    assert result.returncode == 1
    assert re.search(message, result.stderr), result.stderr[-3000:]


@pytest.mark.slow
def test_image_sample_from_a_config_file_unconditional_ddim(checkpoints, tmp_path):
    preset = tmp_path / "tiny.json"
    preset.write_text(
        '{"kind": "diffusion", "flags": {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, '
        '"attention_resolutions": "4", "diffusion_steps": 40, "learn_sigma": true}, '
        f'"sample_flags": {{"model_path": "{checkpoints["uncond"]}", "timestep_respacing": "6"}}}}'
    )
    run_script("image_sample.py", ["--config", preset, "--num_samples", 3, "--batch_size", 2,
                                   "--use_ddim", "True", "--log_dir", tmp_path])
    assert read_samples(tmp_path, 3)[1] is None
    assert "an interrupted run cannot be continued" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_classifier_sample_class_balanced_one_and_two_processes(checkpoints, tmp_path):
    common = MODEL_FLAGS + CLASSIFIER_FLAGS + [
        "--model_path", checkpoints["uncond"], "--classifier_path", checkpoints["classifier"],
        "--classifier_scale", 5.0, "--num_samples", 6, "--batch_size", 2, "--seed", 1,
        "--class_balanced", "True",
    ]
    run_script("classifier_sample.py", common + ["--log_dir", tmp_path / "one"])
    run_script("classifier_sample.py", common + ["--log_dir", tmp_path / "two"], processes=2, launcher="torchrun")
    one, one_labels = read_samples(tmp_path / "one", 6)
    two, two_labels = read_samples(tmp_path / "two", 6)
    assert np.bincount(one_labels, minlength=NUM_CLASSES).tolist() == [2, 1, 2, 1]
    assert one_labels.tolist() == two_labels.tolist()
    assert_same_images(one, two)


@pytest.mark.slow
def test_super_res_sample_cycles_base_samples_one_and_two_processes(checkpoints, tmp_path):
    common = SR_FLAGS + ["--model_path", checkpoints["sr"], "--base_samples", checkpoints["base"],
                         "--num_samples", 5, "--batch_size", 2, "--seed", 2]
    run_script("super_res_sample.py", common + ["--log_dir", tmp_path / "one"])
    run_script("super_res_sample.py", common + ["--log_dir", tmp_path / "two"], processes=2)
    one, one_labels = read_samples(tmp_path / "one", 5)
    two, two_labels = read_samples(tmp_path / "two", 5)
    assert one_labels.tolist() == [3, 1, 0, 3, 1] == two_labels.tolist()
    assert_same_images(one, two)


def read_bpd(folder):
    lines = (Path(folder) / "progress.csv").read_text().splitlines()
    row = dict(zip(lines[0].split(","), lines[-1].split(",")))
    return float(row["bpd"]), int(float(row["samples"]))


@pytest.mark.slow
def test_image_nll_one_and_two_processes(checkpoints, tmp_path):
    common = MODEL_FLAGS + COND + ["--model_path", checkpoints["cond"], "--data_dir", checkpoints["data"],
                                   "--num_samples", 4, "--batch_size", 2, "--seed", 5]
    run_script("image_nll.py", common + ["--log_dir", tmp_path / "one"])
    run_script("image_nll.py", common + ["--log_dir", tmp_path / "two"], processes=2)
    one, two = read_bpd(tmp_path / "one"), read_bpd(tmp_path / "two")
    assert one[1] == two[1] == 4
    assert one[0] == pytest.approx(two[0], rel=1e-5) and 0 < one[0] < float("inf")
    for name in ("vb", "mse", "xstart_mse"):
        with np.load(tmp_path / "one" / f"{name}_terms.npz") as data:
            assert data["arr_0"].shape == (6,) and np.isfinite(data["arr_0"]).all()
    before = (tmp_path / "one" / "vb_terms.npz").read_bytes()
    refused = run_script("image_nll.py", common + ["--log_dir", tmp_path / "one", "--num_samples", 2],
                         check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (f"--log_dir {tmp_path / 'one'} already holds the outputs of another run (vb_terms.npz, "
            "mse_terms.npz, xstart_mse_terms.npz): write into another log_dir, or pass --overwrite True"
            ) in refused.stderr
    assert (tmp_path / "one" / "vb_terms.npz").read_bytes() == before
    run_script("image_nll.py", common + ["--log_dir", tmp_path / "one", "--num_samples", 2, "--overwrite"])


def run_main(script, args, monkeypatch):
    """Run a script's main() in this process (for errors raised before any process group),
    raising its error with the message in flag terms, as the script prints it."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    namespace = runpy.run_path(str(REPO / "scripts" / script), run_name="not_main")
    names = [action.dest for action in namespace["create_argparser"]()._actions]
    try:
        namespace["main"]()
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(in_flag_terms(str(error), names)) from error


@pytest.mark.parametrize("script, args, error, message", [
    ("image_sample.py", ["--num_samples", 0], ValueError, "--num_samples 0: expected a positive integer"),
    ("image_sample.py", ["--batch_size", -2], ValueError, "--batch_size -2"),
    ("image_sample.py", ["--use_fp16", "True", "--use_bf16", "True"], ValueError, "exclusive"),
    ("classifier_sample.py", ["--classifier_scale", 3.0], ValueError, "--classifier_path is empty"),
    ("super_res_sample.py", ["--base_samples", "BASE", "--small_size", 8], ValueError,
     r"expected uint8 \[N x 8 x 8 x 3\]"),
    ("super_res_sample.py", ["--base_samples", "MISSING"], FileNotFoundError, "does not exist"),
])
def test_script_errors_before_sampling(checkpoints, monkeypatch, script, args, error, message):
    args = [checkpoints["base"] if arg == "BASE" else arg for arg in args]
    args = [str(checkpoints["base"]) + ".missing" if arg == "MISSING" else arg for arg in args]
    with pytest.raises(error, match=message):
        run_main(script, args, monkeypatch)


@pytest.mark.parametrize("script, args, message", [
    ("image_sample.py", ["--model_path", "CHECKPOINTS/none.pt"], "none.pt' does not exist"),
    ("classifier_sample.py", ["--model_path", "CHECKPOINTS/uncond.pt", "--classifier_path",
                              "CHECKPOINTS/classifier16.pt"],
     "classifier16.pt' does not fit the model built from the flags.*image_size"),
])
@pytest.mark.slow
def test_script_errors_on_checkpoints(checkpoints, tmp_path, script, args, message):
    folder = str(checkpoints["cond"].parent)
    args = MODEL_FLAGS + CLASSIFIER_FLAGS * (script == "classifier_sample.py") + [
        arg.replace("CHECKPOINTS", folder) for arg in args
    ]
    result = run_script(script, args + ["--num_samples", 1, "--log_dir", tmp_path], check=False)
    assert result.returncode != 0
    assert re.search(message, result.stderr, re.DOTALL), result.stderr[-3000:]


@pytest.mark.slow
def test_sampling_into_a_log_dir_holding_another_runs_samples_is_refused(checkpoints, tmp_path):
    common = MODEL_FLAGS + COND + ["--model_path", checkpoints["cond"], "--num_samples", 2,
                                   "--batch_size", 2, "--log_dir", tmp_path]
    run_script("image_sample.py", common + ["--seed", 1])
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.suffix in (".npz", ".png")}
    assert sorted(before) == ["samples_2x8x8x3.npz", "samples_2x8x8x3.png"]
    refused = run_script("image_sample.py", common + ["--seed", 2], check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (f"--log_dir {tmp_path} already holds the outputs of another run (samples_2x8x8x3.npz, "
            "samples_2x8x8x3.png): write into another log_dir, or pass --overwrite True") in refused.stderr
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    run_script("image_sample.py", common + ["--seed", 2, "--overwrite"])
    assert (tmp_path / "samples_2x8x8x3.npz").read_bytes() != before["samples_2x8x8x3.npz"]


@pytest.mark.slow
def test_a_killed_seeded_run_refuses_to_continue_with_a_changed_checkpoint(checkpoints, tmp_path):
    model_path = tmp_path / "model.pt"
    model_path.write_bytes(checkpoints["cond"].read_bytes())
    common = MODEL_FLAGS + COND + ["--model_path", model_path, "--num_samples", 4, "--seed", 5,
                                   "--batch_size", 2, "--log_dir", tmp_path / "out"]
    wrapper = tmp_path / "crash_after_first_round.py"
    wrapper.write_text(CRASH_AFTER_FIRST_ROUND)
    crashed = run_script(wrapper, [REPO / "scripts" / "image_sample.py", *common], check=False)
    assert crashed.returncode != 0 and (tmp_path / "out" / "partial_samples" / "record.json").exists()
    weights = th.load(model_path, weights_only=True)
    th.save({name: value + 0.01 for name, value in weights.items()}, model_path)  # retrained in place
    refused = run_script("image_sample.py", common, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert re.search(r"holds the finished samples of a run with other flags or checkpoint files "
                     r"\(model_path file: partial '\d+ bytes, modified [^']+', now '\d+ bytes, modified",
                     refused.stderr), refused.stderr
    assert not (tmp_path / "out" / "samples_4x8x8x3.npz").exists()
