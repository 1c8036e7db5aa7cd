import json
import os

import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.checkpoint import load_checkpoint, read_state_dict, sidecar_path


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
