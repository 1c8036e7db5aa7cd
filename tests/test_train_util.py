"""Tests for guided_diffusion.train_util: steps, EMA, lr, checkpoints, exact resume, errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import dist_util, logger, train_util
from guided_diffusion.attention import AttentionBlock
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (
    TrainLoop,
    log_loss_dict,
    parse_ema_rates,
)

FLAGS = dict(
    model_and_diffusion_defaults(),
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1",
    attention_resolutions="8",
    num_head_channels=32,
    learn_sigma=True,
    dropout=0.1,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_single_thread):
    yield


@pytest.fixture(autouse=True)
def _logger_and_short_previews(isolated_logger, monkeypatch):
    monkeypatch.setattr(train_util, "PREVIEW_STEPS", 3)  # sample grids with 3 DDIM steps
    yield


def _build(flags=FLAGS):
    th.manual_seed(0)
    return create_model_and_diffusion(**flags)


def _train(logdir, image_dir, max_steps, model_and_diffusion=None, **overrides):
    """Configure the logger to logdir, build the tiny model and run TrainLoop."""
    logger.configure(str(logdir), ["log", "csv"])
    model, diffusion = model_and_diffusion or _build()
    data = load_data(data_dir=image_dir, batch_size=4, image_size=8, num_workers=0, seed=1)
    options = dict(
        model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=2, lr=1e-3,
        ema_rate="0.9,0.99", log_interval=1, save_interval=2, resume_checkpoint="",
        max_steps=max_steps, seed=3, flags=FLAGS,
    )
    options.update(overrides)
    loop = TrainLoop(**options)
    loop.run_loop()
    return loop


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, tiny_image_dir):
    """The log directory of a 2-step run of _train (checkpoints of step 2); do not modify."""
    from guided_diffusion import logger as module_logger

    previous = module_logger.Logger.CURRENT
    logdir = tmp_path_factory.mktemp("two_step_run")
    _train(logdir, tiny_image_dir, 2)
    module_logger.Logger.CURRENT.close()
    module_logger.Logger.CURRENT = previous
    return logdir


def _copy_run(run_dir, destination):
    shutil.copytree(run_dir, destination)
    return destination


def _same_tensors(first, second):
    return len(first) == len(second) and all(th.equal(a, b) for a, b in zip(first, second))


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, tiny_image_dir, two_step_run):
    # The uninterrupted run also writes sample grids, which must not disturb the RNG streams.
    full = _train(tmp_path / "full", tiny_image_dir, 4, sample_interval=2)
    part = _copy_run(two_step_run, tmp_path / "part")
    resumed = _train(part, tiny_image_dir, 4, resume_checkpoint=str(part / "model000002.pt"))
    assert resumed.resume_step == 2 and resumed.step == full.step == 4
    assert _same_tensors(list(full.model.state_dict().values()), list(resumed.model.state_dict().values()))
    for full_ema, resumed_ema in zip(full.ema_params, resumed.ema_params):
        assert _same_tensors(full_ema, resumed_ema)
    full_opt, resumed_opt = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(th.equal(full_opt[k]["exp_avg_sq"], resumed_opt[k]["exp_avg_sq"]) for k in full_opt)
    assert (tmp_path / "full" / "samples_000002.png").exists()


def test_checkpoints_are_plain_state_dicts_with_sidecars_and_a_training_state(two_step_run):
    tmp_path = two_step_run
    names = sorted(os.listdir(tmp_path))
    for name in ("model000002", "ema_0.9_000002", "ema_0.99_000002"):
        assert f"{name}.pt" in names and f"{name}.json" in names
    assert "opt000002.pt" in names and not any(".tmp-" in name for name in names)

    sidecar = json.loads((tmp_path / "ema_0.99_000002.json").read_text())
    assert {k: sidecar[k] for k in ("format", "kind", "ema_rate", "step")} == dict(
        format="guided_diffusion/1", kind="ema", ema_rate=0.99, step=2
    )
    model_sidecar = json.loads((tmp_path / "model000002.json").read_text())
    assert model_sidecar["kind"] == "model" and model_sidecar["ema_rate"] is None
    model, _ = create_model_and_diffusion(**{k: model_sidecar["flags"][k] for k in FLAGS})
    state_dict = th.load(tmp_path / "model000002.pt", weights_only=True)
    assert all(th.is_tensor(value) for value in state_dict.values())
    model.load_state_dict(state_dict, strict=True)

    training_state = th.load(tmp_path / "opt000002.pt", weights_only=True)
    assert training_state["step"] == 2 and training_state["lg_loss_scale"] is None
    assert set(training_state["rng"]) == {0}
    assert set(training_state["rng"][0]) == {"torch", "numpy", "python"}
    # 8 images, batch 4: two batches per epoch, so after 2 steps epoch 1 is about to start.
    assert training_state["data_state"][0]["data"]["epoch"] == 0
    assert training_state["data_state"][0]["data"]["batch_index"] == 2
    assert training_state["flags"]["image_size"] == 8


def test_max_steps_ends_with_a_save_and_resuming_past_it_trains_nothing(
    tmp_path, tiny_image_dir, two_step_run
):
    run = _copy_run(two_step_run, tmp_path / "run")
    loop = _train(run, tiny_image_dir, 3, resume_checkpoint=str(run / "model000002.pt"))
    assert loop.step == 3  # 3 is not a multiple of save_interval=2: saved because it is the last
    assert {"model000003.pt", "ema_0.9_000003.pt", "opt000003.pt"} <= set(os.listdir(run))
    before = sorted(os.listdir(run))
    again = _train(run, tiny_image_dir, 3, resume_checkpoint=str(run / "model000003.pt"))
    assert again.step == 3 and sorted(os.listdir(run)) == before


def test_lr_anneals_linearly_and_stops_at_lr_anneal_steps(tmp_path, tiny_image_dir):
    loop = _train(tmp_path, tiny_image_dir, 0, lr_anneal_steps=2)
    assert loop.step == 2
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 1 / 2))  # the lr of step 1
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    assert len(rows) == 1 + 2


def test_every_ema_rate_follows_its_closed_form(tmp_path, tiny_image_dir):
    model, diffusion = _build()
    initial = [p.detach().clone() for p in model.parameters()]
    loop = _train(tmp_path, tiny_image_dir, 1, model_and_diffusion=(model, diffusion), ema_rate="0.5,0.9")
    assert loop.ema_rate == [0.5, 0.9]
    for rate, ema in zip(loop.ema_rate, loop.ema_params):
        for start, trained, averaged in zip(initial, model.parameters(), ema):
            assert th.allclose(averaged, rate * start + (1 - rate) * trained.detach(), atol=1e-6)


class _FixedSampler:
    """Always timestep 7 with weight 1: makes batches and microbatches draw nothing."""

    def sample(self, batch_size, device):
        return th.full((batch_size,), 7, dtype=th.long), th.ones(batch_size)


class _SquaredError:
    """A diffusion stand-in whose loss is deterministic: mean((model(x, t) - x)^2)."""

    num_timesteps = 100

    def training_losses(self, model, x, t, model_kwargs=None):
        return {"loss": ((model(x, t) - x) ** 2).mean(dim=(1, 2, 3))}


def test_microbatches_accumulate_the_gradient_of_the_whole_batch(tmp_path, tiny_model):
    logger.configure(str(tmp_path), ["log"])
    batch = th.randn(4, 3, 8, 8)
    grads = []
    for microbatch in (-1, 1, 3):
        model = tiny_model()
        loop = TrainLoop(
            model=model, diffusion=_SquaredError(), data=None, batch_size=4, microbatch=microbatch,
            lr=0.1, ema_rate="", log_interval=1, save_interval=10, resume_checkpoint="",
            schedule_sampler=_FixedSampler(),
        )
        loop.forward_backward(batch, {})
        grads.append([p.grad.clone() for p in model.parameters()])
    for other in grads[1:]:
        assert all(th.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], other))


def test_resuming_needs_the_model_file_its_step_and_its_opt_file(tmp_path, tiny_image_dir, two_step_run):
    run = _copy_run(two_step_run, tmp_path / "run")
    with pytest.raises(ValueError, match="is not a model checkpoint: pass the model000002.pt"):
        _train(run, tiny_image_dir, 4, resume_checkpoint=str(run / "ema_0.9_000002.pt"))
    plain = run / "weights.pt"
    shutil.copy(run / "model000002.pt", plain)
    with pytest.raises(ValueError, match="has no step .*init_checkpoint=.*weights.pt"):
        _train(run, tiny_image_dir, 4, resume_checkpoint=str(plain))
    lonely = tmp_path / "alone"
    lonely.mkdir()
    shutil.copy(run / "model000002.pt", lonely / "model000002.pt")
    with pytest.raises(FileNotFoundError, match="opt000002.pt is missing"):
        _train(run, tiny_image_dir, 4, resume_checkpoint=str(lonely / "model000002.pt"))
    with pytest.raises(ValueError, match="pass one"):
        _train(
            run, tiny_image_dir, 4, resume_checkpoint=str(run / "model000002.pt"),
            init_checkpoint=str(plain),
        )


def test_a_renamed_checkpoint_resumes_through_its_sidecar(tmp_path, tiny_image_dir, two_step_run):
    run = _copy_run(two_step_run, tmp_path / "run")
    shutil.move(run / "model000002.pt", run / "best.pt")
    shutil.move(run / "model000002.json", run / "best.json")
    loop = _train(tmp_path / "next", tiny_image_dir, 3, resume_checkpoint=str(run / "best.pt"))
    assert loop.resume_step == 2 and loop.step == 3


def test_init_checkpoint_starts_a_new_run_from_the_weights(tmp_path, two_step_run):
    plain = tmp_path / "pretrained.pt"
    shutil.copy(two_step_run / "model000002.pt", plain)
    logger.configure(str(tmp_path / "fine_tune"), ["log"])
    model, diffusion = _build()
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=None, batch_size=4, microbatch=-1, lr=1e-3,
        ema_rate="0.9", log_interval=1, save_interval=2, resume_checkpoint="",
        init_checkpoint=str(plain),
    )
    saved = th.load(plain, weights_only=True)
    assert loop.step == 0 and not loop.opt.state
    assert all(th.equal(saved[name], value) for name, value in model.state_dict().items())
    names = [name for name, _ in model.named_parameters()]
    assert all(th.equal(saved[name], ema) for name, ema in zip(names, loop.ema_params[0]))


def test_an_original_plain_optimizer_file_resumes_with_a_warning(tmp_path, tiny_image_dir, two_step_run):
    run = _copy_run(two_step_run, tmp_path / "run")
    state = th.load(run / "opt000002.pt", weights_only=True)
    th.save(state["optimizer"], run / "opt000002.pt")
    (run / "model000002.json").unlink()
    loop = _train(run, tiny_image_dir, 3, resume_checkpoint=str(run / "model000002.pt"))
    assert loop.step == 3
    assert "plain optimizer state (original ADM format)" in (run / "log.txt").read_text()


def test_sample_grid_holds_one_tile_per_sample(tmp_path, tiny_image_dir):
    _train(tmp_path, tiny_image_dir, 1, sample_interval=1)
    grid = Image.open(tmp_path / "samples_000001.png")
    assert grid.size == (2 + 2 * (8 + 2), 2 + 2 * (8 + 2))  # 4 samples in 2 rows of 2
    assert np.array(grid)[2:10, 2:10].std() > 0


def test_log_loss_dict_splits_losses_by_quarter_of_the_timesteps(tmp_path):
    logger.configure(str(tmp_path), ["log"])

    class Diffusion:
        num_timesteps = 1000

    log_loss_dict(Diffusion(), th.tensor([0, 249, 250, 999]), {"loss": th.tensor([1.0, 3.0, 5.0, 7.0])})
    values = logger.getkvs()
    assert values["loss"] == 4.0
    assert (values["loss_q0"], values["loss_q1"], values["loss_q3"]) == (2.0, 5.0, 7.0)
    assert "loss_q2" not in values


def test_training_logs_the_losses_at_the_log_step_not_at_every_microbatch(tmp_path, monkeypatch):
    logger.configure(str(tmp_path), ["log"])
    model, diffusion = _build(dict(FLAGS, dropout=0.0))
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=None, batch_size=4, microbatch=2, lr=0.1,
        ema_rate="", log_interval=1, save_interval=10, resume_checkpoint="",
    )
    copies = []
    item = th.Tensor.item
    monkeypatch.setattr(th.Tensor, "item", lambda tensor: copies.append(1) or item(tensor))
    th.manual_seed(5)
    loop.forward_backward(th.randn(4, 3, 8, 8), {})
    assert not copies and "loss" not in logger.getkvs()  # nothing waited for the device
    pending = [(ts.clone(), {k: v.clone() for k, v in values.items()})
               for _, ts, _, values in loop.loss_log._pending]
    loop.loss_log.flush()
    deferred = dict(logger.getkvs())
    assert len(pending) == 2 and len(copies) == 2 * len(pending[0][1])
    # Independently: "loss" is the mean of the microbatch means, "loss_qK" the mean of the
    # per-sample losses whose timestep falls in quarter K.
    ts = th.cat([ts for ts, _ in pending])
    losses = th.cat([values["loss"] for _, values in pending])
    assert deferred["loss"] == pytest.approx(np.mean([v["loss"].mean().item() for _, v in pending]))
    for quarter in range(4):
        chosen = (4 * ts // diffusion.num_timesteps) == quarter
        if chosen.any():
            assert deferred[f"loss_q{quarter}"] == pytest.approx(losses[chosen].mean().item(), rel=1e-6)
        else:
            assert f"loss_q{quarter}" not in deferred
    logger.configure(str(tmp_path / "at_once"), ["log"])
    for ts, values in pending:
        log_loss_dict(diffusion, ts, values)
    assert deferred == logger.getkvs()


def test_ema_rate_parsing():
    assert parse_ema_rates("0.9999,0.9999432") == [0.9999, 0.9999432]
    assert parse_ema_rates(0.99) == [0.99] and parse_ema_rates("") == []
    with pytest.raises(ValueError, match='ema_rate="0.9;0.99"'):
        parse_ema_rates("0.9;0.99")


def test_label_dropout_uses_the_null_label(tmp_path):
    flags = dict(FLAGS, class_cond=True, num_classes=3, class_dropout_prob=0.5)
    logger.configure(str(tmp_path), ["log"])
    model, diffusion = _build(flags)
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=None, batch_size=4, microbatch=-1, lr=1e-3,
        ema_rate="", log_interval=1, save_interval=2, resume_checkpoint="", class_dropout_prob=0.5,
    )
    th.manual_seed(0)
    labels = loop._drop_labels(th.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))
    th.manual_seed(0)
    dropped = th.rand(10) < 0.5
    assert labels[dropped].tolist() == [3] * int(dropped.sum())
    assert labels[~dropped].tolist() == th.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])[~dropped].tolist()


def test_intervals_must_be_positive(tmp_path, tiny_model):
    logger.configure(str(tmp_path), ["log"])
    with pytest.raises(ValueError, match="save_interval=0: expected a positive number of steps"):
        TrainLoop(
            model=tiny_model(), diffusion=_SquaredError(), data=None, batch_size=1, microbatch=-1,
            lr=0.1, ema_rate="", log_interval=1, save_interval=0, resume_checkpoint="",
        )


def test_training_needs_a_configured_log_directory(tiny_model):
    logger.reset()
    with pytest.raises(ValueError, match="call logger.configure"):
        TrainLoop(
            model=tiny_model(), diffusion=_SquaredError(), data=None, batch_size=1, microbatch=-1,
            lr=0.1, ema_rate="", log_interval=1, save_interval=1, resume_checkpoint="",
        )


@pytest.mark.slow
def test_compile_channels_last_and_kept_attention_keep_the_training_gradients(tmp_path,
                                                                              monkeypatch):
    from guided_diffusion import acceleration

    logger.configure(str(tmp_path), ["log"])
    real_compile = th.compile
    monkeypatch.setattr(acceleration.th, "compile",
                        lambda model, **kwargs: real_compile(model, backend="eager", **kwargs))
    batch = th.randn(4, 3, 8, 8)
    grads = []
    for switches in ({}, dict(compile=True, channels_last=True, recompute_attention=False)):
        model, diffusion = _build(dict(FLAGS, dropout=0.0))
        loop = TrainLoop(
            model=model, diffusion=diffusion, data=None, batch_size=4, microbatch=-1, lr=0.1,
            ema_rate="", log_interval=1, save_interval=10, resume_checkpoint="", **switches,
        )
        th.manual_seed(5)
        np.random.seed(5)  # the timesteps
        loop.forward_backward(batch, {})
        grads.append([p.grad.clone() for p in model.parameters()])
    assert isinstance(loop.ddp_model, acceleration.CompiledModel)
    assert loop.ddp_model.compiled is not None
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=th.channels_last)
    blocks = [module for module in model.modules() if isinstance(module, AttentionBlock)]
    assert blocks and not any(block.recompute for block in blocks)
    assert all(th.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))


def test_a_new_run_into_a_log_dir_holding_a_run_is_refused(tmp_path, tiny_image_dir, two_step_run):
    # The messages of each case: tests/test_training_state.py (prepare_log_dir).
    run = _copy_run(two_step_run, tmp_path / "run")
    before = sorted(os.listdir(run))
    with pytest.raises(ValueError, match=(
        f"log_dir={run} already holds a run .*resume_checkpoint={run / 'model000002.pt'}, "
        "start a new run in another log directory, or pass overwrite_log_dir=True"
    )):
        _train(run, tiny_image_dir, 2)
    assert sorted(os.listdir(run)) == before
    loop = _train(run, tiny_image_dir, 1, overwrite_log_dir=True)
    assert loop.step == 1 and "model000001.pt" in os.listdir(run)


def test_a_run_removes_stale_temporaries_of_its_saves_at_start(tmp_path, tiny_image_dir):
    stale = ["model000010.pt.tmp-" + "0" * 32, "ema_0.9_000010.json.tmp-" + "ab" * 16]
    kept = ["notes.txt.tmp-" + "0" * 32, "model000010.pt.tmp-partial", "notes.txt"]
    tmp_path.mkdir(exist_ok=True)
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    _train(tmp_path, tiny_image_dir, 1, save_interval=10)
    names = os.listdir(tmp_path)
    assert all(name in names for name in kept) and not any(name in names for name in stale)
    assert "removed 2 temporaries of interrupted saves" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("argument, value, message", [
    ("lr_anneal_steps", -5, "lr_anneal_steps=-5: expected a positive number of steps"),
    ("batch_size", 0, "batch_size=0: expected a positive number of images"),
    ("batch_size", -2, "batch_size=-2: expected a positive number of images"),
])
def test_negative_anneal_steps_and_empty_batches_are_refused(tmp_path, tiny_model, argument,
                                                             value, message):
    logger.configure(str(tmp_path), ["log"])
    options = dict(
        model=tiny_model(), diffusion=_SquaredError(), data=None, batch_size=1, microbatch=-1,
        lr=0.1, ema_rate="", log_interval=1, save_interval=1, resume_checkpoint="",
    )
    with pytest.raises(ValueError, match=message):
        TrainLoop(**dict(options, **{argument: value}))


def test_the_loop_follows_the_models_device_not_the_process_default(tmp_path, tiny_image_dir,
                                                                    monkeypatch):
    # E.g. benchmark.py --device cpu on a CUDA host: dist_util.dev() is cuda:0, the model
    # is on the CPU. A meta device stands in for the other device.
    monkeypatch.setattr(dist_util, "dev", lambda: th.device("meta"))
    loop = _train(tmp_path, tiny_image_dir, 2, sample_interval=2)
    assert loop.device == th.device("cpu") and loop.step == 2
    assert (tmp_path / "model000002.pt").exists() and (tmp_path / "samples_000002.png").exists()


@pytest.mark.parametrize("precision", [{}, dict(use_bf16=True)])
def test_emas_and_optimizer_state_share_the_channels_last_weights_memory_format(tmp_path, precision):
    logger.configure(str(tmp_path), ["log"])
    model, diffusion = _build(dict(FLAGS, dropout=0.0))
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=None, batch_size=2, microbatch=-1, lr=0.1,
        ema_rate="0.9,0.99", log_interval=1, save_interval=10, resume_checkpoint="",
        channels_last=True, **precision,
    )
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=th.channels_last) for p in weights)
    for params in [loop.mp_trainer.master_params, *loop.ema_params]:
        four_d = [p for p in params if p.dim() == 4]
        assert [p.stride() for p in four_d] == [p.stride() for p in weights]


def test_the_originals_blob_helpers_point_at_the_log_dir(tmp_path):
    logger.configure(str(tmp_path / "run"), ["log"])
    assert train_util.get_blob_logdir() == str(tmp_path / "run")
    assert train_util.find_resume_checkpoint() is None  # resume_checkpoint names the file
