import json
import os

import numpy as np
import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.checkpoint import flag_differences, load_checkpoint, read_state_dict, sidecar_path


def tiny_flags(**overrides):
    flags = su.model_and_diffusion_defaults()
    flags.update(
        image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8",
        channel_mult="1,2", learn_sigma=True, class_cond=True, num_head_channels=16,
        diffusion_steps=40,
    )
    flags.update(overrides)
    return flags


def tiny_model(**overrides):
    return su.create_model_and_diffusion(**tiny_flags(**overrides))[0]


def saved(tmp_path, model, name="model.pt"):
    path = str(tmp_path / name)
    th.save(model.state_dict(), path)
    return path


class CodeCarrier:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_loads_plain_state_dict_and_wrapped_state_dict(tmp_path):
    source = tiny_model()
    target = tiny_model()
    assert load_checkpoint(target, saved(tmp_path, source)) is None
    assert all(th.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    wrapped = str(tmp_path / "wrapped.pt")
    th.save({"state_dict": source.state_dict(), "step": 3}, wrapped)
    assert set(read_state_dict(wrapped)) == set(source.state_dict())


def test_pickle_carrying_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    th.save({"weights": th.zeros(1), "payload": CodeCarrier()}, path)
    with pytest.raises(ValueError, match="refusing to load.*execute code"):
        read_state_dict(path)


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_state_dict(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        read_state_dict(str(garbage))


@pytest.mark.parametrize(
    "checkpoint_flags, requested_flags, named",
    [
        (dict(learn_sigma=False), dict(learn_sigma=True), "learn_sigma"),
        (dict(class_cond=False), dict(class_cond=True), "class_cond"),
        (dict(class_cond=True), dict(class_cond=False), "class_cond"),
        (dict(num_channels=64, num_head_channels=16), dict(num_channels=32), "num_channels"),
        (dict(num_res_blocks=2), dict(num_res_blocks=1), "num_res_blocks"),
        (dict(attention_resolutions="16,8"), dict(attention_resolutions="8"), "attention_resolutions"),
    ],
)
def test_mismatch_report_names_the_flag(tmp_path, checkpoint_flags, requested_flags, named):
    path = saved(tmp_path, tiny_model(**checkpoint_flags))
    with pytest.raises(ValueError, match=named) as error:
        load_checkpoint(tiny_model(**requested_flags), path)
    assert "does not fit" in str(error.value)


def test_recorded_flags_are_compared_first(tmp_path):
    path = saved(tmp_path, tiny_model(use_new_attention_order=True))
    with open(sidecar_path(path), "w") as f:
        json.dump({"format": "guided_diffusion/1", "kind": "model", "step": 5,
                   "flags": tiny_flags(use_new_attention_order=True)}, f)
    # Same shapes, different attention order: only the recorded flags can tell.
    with pytest.raises(ValueError, match="use_new_attention_order: checkpoint True, requested False"):
        load_checkpoint(tiny_model(), path, flags=tiny_flags())
    record = load_checkpoint(
        tiny_model(use_new_attention_order=True), path, flags=tiny_flags(use_new_attention_order=True)
    )
    assert record["step"] == 5


def test_only_the_architecture_flags_are_compared(tmp_path):
    trained = dict(tiny_flags(), lr=1e-4, max_steps=20, resume_checkpoint="", log_dir="runs/a",
                   seed=0, batch_size=4, use_fp16=True, dropout=0.1, use_kl=True)
    path = saved(tmp_path, tiny_model())
    with open(sidecar_path(path), "w") as f:
        json.dump({"format": "guided_diffusion/1", "kind": "model", "step": 20, "flags": trained}, f)
    continued = dict(trained, lr=5e-5, max_steps=40, resume_checkpoint=path, log_dir="runs/b",
                     seed=1, batch_size=8, use_fp16=False, dropout=0.0, use_kl=False,
                     timestep_respacing="ddim10")
    assert load_checkpoint(tiny_model(), path, flags=su.architecture_flags(continued))["step"] == 20
    # Two real culprits among many changed training flags: the message names those two only.
    with pytest.raises(ValueError) as error:
        load_checkpoint(tiny_model(), path,
                        flags=su.architecture_flags(dict(continued, learn_sigma=False, num_channels=64)))
    message = str(error.value)
    assert "learn_sigma: checkpoint True, requested False" in message
    assert "num_channels: checkpoint 32, requested 64" in message
    assert message.count(": checkpoint ") == 2
    assert not any(name in message for name in ("lr", "max_steps", "seed", "batch_size", "use_kl"))


def test_architecture_flags_come_from_the_factories():
    every_flag = {**su.model_and_diffusion_defaults(), **su.classifier_defaults(),
                  **su.sr_model_and_diffusion_defaults(), "lr": 1e-4, "max_steps": 2}
    names = set(su.architecture_flags(every_flag))
    assert {"num_channels", "learn_sigma", "diffusion_steps", "noise_schedule", "class_cond",
            "num_classes", "classifier_width", "large_size", "small_size",
            "use_new_attention_order", "rescale_timesteps"} <= names
    assert not names & {"lr", "max_steps", "use_fp16", "classifier_use_fp16", "fast_attention",
                        "use_checkpoint", "dropout", "timestep_respacing", "use_kl"}


@pytest.mark.parametrize("recorded_cond, requested_cond", [(False, False), (False, True), (True, False)])
def test_num_classes_is_compared_only_between_class_conditional_models(recorded_cond, requested_cond):
    recorded = dict(class_cond=recorded_cond, num_classes=1000, class_dropout_prob=0.0)
    requested = dict(class_cond=requested_cond, num_classes=2, class_dropout_prob=0.1)
    differences = flag_differences(recorded, requested)
    assert not any(d.startswith(("num_classes", "class_dropout_prob")) for d in differences)
    assert differences == ([] if recorded_cond == requested_cond else
                           [f"class_cond: checkpoint {recorded_cond}, requested {requested_cond}"])
    both = flag_differences(dict(recorded, class_cond=True), dict(requested, class_cond=True))
    assert both == ["class_dropout_prob: checkpoint 0.0, requested 0.1",
                    "num_classes: checkpoint 1000, requested 2"]
    # A classifier has no class_cond: its number of classes always counts.
    assert flag_differences({"num_classes": 2}, {"num_classes": 3}) == [
        "num_classes: checkpoint 2, requested 3"]


def test_random_bytes_and_truncated_files_are_named_as_corrupt(tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="random.pt' is not a checkpoint") as error:
        read_state_dict(str(random_bytes))
    assert "execute code" not in str(error.value)
    whole = saved(tmp_path, tiny_model())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(whole, "rb").read()[:3000])
    with pytest.raises(ValueError, match="truncated.pt' is not a readable torch checkpoint"):
        read_state_dict(str(truncated))


def test_non_finite_weights_are_refused_at_load(tmp_path):
    state = tiny_model().state_dict()
    state["out.2.bias"][1] = float("nan")
    state["time_embed.0.weight"][0, :3] = float("inf")
    path = str(tmp_path / "diverged.pt")
    th.save(state, path)
    with pytest.raises(ValueError, match=r"diverged.pt' holds NaN or inf weights in 2 tensors") as error:
        load_checkpoint(tiny_model(), path)
    assert "time_embed.0.weight (3 values)" in str(error.value)
    assert "out.2.bias (1 values)" in str(error.value)


def test_a_checkpoint_of_the_other_kind_is_named(tmp_path):
    classifier = su.create_classifier(**dict(
        su.classifier_defaults(), image_size=16, classifier_width=64, classifier_depth=1,
        classifier_attention_resolutions="8", num_classes=3))
    diffusion_path, classifier_path = saved(tmp_path, tiny_model(), "m.pt"), saved(tmp_path, classifier, "c.pt")
    with pytest.raises(ValueError, match=r"looks like a diffusion model, not a classifier \(pass it as model_path=\)"):
        load_checkpoint(classifier, diffusion_path)
    with pytest.raises(ValueError, match=r"looks like a classifier, not a diffusion model \(pass it as classifier_path=\)"):
        load_checkpoint(tiny_model(), classifier_path)


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    batch = tmp_path / "samples_4x8x8x3.npz"
    np.savez(batch, np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    record = tmp_path / "model000010.json"
    record.write_text(json.dumps({"format": "guided_diffusion/1", "kind": "model", "step": 10}))
    other_json = tmp_path / "settings.json"
    other_json.write_text(json.dumps({"lr": 1e-4, "batch_size": 8}))
    diffusers_config = tmp_path / "unet" / "config.json"
    diffusers_config.parent.mkdir()
    diffusers_config.write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    cases = [
        (empty, r"empty.pt' is empty \(0 bytes\).*download it again"),
        (batch, r"samples_4x8x8x3.npz' is a numpy .npz archive \(arrays \['arr_0', 'arr_1'\]\), "
                "not a checkpoint"),
        (record, "model000010.json' is the JSON record of a checkpoint .*pass the .pt or "
                 ".safetensors file of the same name"),
        (other_json, r"settings.json' is a JSON file \(keys \['batch_size', 'lr'\]\), not a checkpoint"),
        (diffusers_config, r"config.json' is a diffusers UNet2DModel config file, not an ADM "
                           r"checkpoint: load it with diffusers \(UNet2DModel.from_pretrained\("),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            read_state_dict(str(path))
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tiny_model(), str(path))


def test_a_folder_is_named_with_the_checkpoints_in_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match=r"run' is a folder, not a checkpoint file: pass a .pt or "
                                         r".safetensors file \(the file's path\)"):
        load_checkpoint(tiny_model(), str(run))
    for name in ("model000002.pt", "ema_0.9999_000002.pt", "progress.csv"):
        (run / name).write_bytes(b"x")
    with pytest.raises(ValueError, match="run' is a folder, not a checkpoint file: pass one of "
                                         "ema_0.9999_000002.pt, model000002.pt "):
        read_state_dict(str(run))
