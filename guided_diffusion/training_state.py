"""
Writing training checkpoints and resuming from them: file names, sidecar records, RNG
states, the checks that decide how a run resumes and what a log directory may hold
(reading and strict loading of weights live in checkpoint.py).

A save at step N (N optimizer steps done) writes, in the log directory:

- `modelNNNNNN.pt`: the model's float32 state dict (plain, like the released models);
- `ema_RATE_NNNNNN.pt`: the same for each EMA rate;
- `modelNNNNNN.json`, `ema_RATE_NNNNNN.json`: {"format", "kind" ("model"/"ema"),
  "ema_rate", "step", "flags"} (the flags of the run, enough to rebuild the model);
- `optNNNNNN.pt`: {"format", "optimizer", "step", "lg_loss_scale", "rng" (rank ->
  RNG states), "data_state" (rank -> loader positions), "schedule_sampler", "flags"}.
"""

import json
import os
import pickle
import random
import re

import blobfile as bf
import numpy as np
import safetensors.torch
import torch as th

from . import dist_util, logger
from .checkpoint import METADATA_KEY, SAFETENSORS_SUFFIX, SIDECAR_FORMAT, read_sidecar, sidecar_path
from .file_writing import TEMPORARY_MARK, atomic_write, is_local

_MODEL_NAME = re.compile(r"^model(\d+)\.(?:pt|safetensors)$")
# What a log directory holding a run contains: model*.pt, opt*.pt, ema_*.pt or (consistency
# distillation's target network) target_*.pt checkpoints.
_RUN_CHECKPOINT = re.compile(r"^(model|opt|ema_|target_).*\.(?:pt|safetensors)$")
# The weights files' formats (--checkpoint_format): file suffixes.
CHECKPOINT_FORMATS = {"pt": ".pt", "safetensors": SAFETENSORS_SUFFIX}
# atomic_write's temporaries of checkpoints and sidecars: model000010.pt.tmp-<32 hex digits>.
_STALE_TEMPORARY = re.compile(
    r"^(model\d+|opt\d+|ema_[^/]+_\d+|target_\d+)\.(pt|json)" + re.escape(TEMPORARY_MARK) + r"[0-9a-f]{32}$"
)


def model_filename(step, checkpoint_format="pt"):
    """
    :return: the name of the model checkpoint of a step, e.g. model001000.pt.
    """
    return f"model{step:06d}{CHECKPOINT_FORMATS[checkpoint_format]}"


def ema_filename(rate, step, checkpoint_format="pt"):
    """
    :param rate: the EMA rate as given on the command line (a float or its text).
    :return: the name of an EMA checkpoint, e.g. ema_0.9999_001000.pt.
    """
    return f"ema_{float(rate)}_{step:06d}{CHECKPOINT_FORMATS[checkpoint_format]}"


def opt_filename(step):
    """
    :return: the name of the optimizer and training-state checkpoint, e.g. opt001000.pt.
    """
    return f"opt{step:06d}.pt"


def parse_resume_step_from_filename(filename):
    """
    :param filename: a checkpoint path.
    :return: NNNNNN of a path ending in modelNNNNNN.pt, else None (the original
        returned 0, which restarted runs at step 0 silently).
    """
    match = _MODEL_NAME.match(bf.basename(filename))
    return int(match.group(1)) if match else None


def remove_stale_temporaries(logdir):
    """
    Remove the temporaries that interrupted atomic_write calls left in a log directory
    (checkpoint and sidecar names only, e.g. model000010.pt.tmp-<32 hex digits>).

    :param logdir: a local folder (blob stores leave no temporaries: nothing is done).
    :return: the sorted names of the removed files.
    """
    if not is_local(logdir) or not os.path.isdir(logdir):
        return []
    stale = sorted(name for name in os.listdir(logdir) if _STALE_TEMPORARY.match(name))
    for name in stale:
        os.remove(os.path.join(logdir, name))
    if stale:
        logger.log(f"removed {len(stale)} temporaries of interrupted saves from {logdir}: "
                   + ", ".join(stale))
    return stale


def run_checkpoints(logdir):
    """
    :param logdir: a log directory (local or blobfile URL).
    :return: the sorted names of the model*.pt, opt*.pt, ema_*.pt and target_*.pt checkpoints in it
        (empty when it holds no run or does not exist).
    """
    if not bf.isdir(logdir):
        return []
    return sorted(name for name in bf.listdir(logdir) if _RUN_CHECKPOINT.match(name))


def latest_complete_checkpoint(names):
    """
    :param names: checkpoint file names of one log directory.
    :return: the modelNNNNNN.pt (or .safetensors) of the latest step whose save finished,
        i.e. whose optNNNNNN.pt (written last) is among the names; None when no step is
        complete.
    """
    steps = {parse_resume_step_from_filename(name): name for name in names}
    steps.pop(None, None)
    complete = [step for step in steps if opt_filename(step) in names]
    return steps[max(complete)] if complete else None


def prepare_log_dir(logdir, new_run, overwrite=False):
    """
    Refuse a new run in a log directory holding another run's checkpoints (unless
    overwrite), then remove the temporaries that interrupted saves left there (rank 0).
    A collective: every rank calls it.

    :param logdir: the run's log directory (local or blobfile URL).
    :param new_run: whether the run starts afresh (False: it resumes the run there).
    :param overwrite: whether a new run may write over the checkpoints there.
    """
    if new_run and not overwrite:
        _refuse_a_log_dir_holding_a_run(logdir)
    if dist_util.get_rank() == 0:
        remove_stale_temporaries(logdir)


def _refuse_a_log_dir_holding_a_run(logdir):
    """
    Raise a ValueError on every rank when the log directory holds checkpoints, with
    what to do instead (rank 0 looks; a collective: every rank calls it).

    :param logdir: the log directory of a new (not resumed) run.
    """
    found = dist_util.on_rank_zero(lambda: run_checkpoints(logdir))
    if not found:
        return
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    latest = latest_complete_checkpoint(found)
    choices = ("start a new run in another log directory, or pass overwrite_log_dir=True to "
               "write over it")
    advice = (f"Continue it from its latest complete step with resume_checkpoint="
              f"{bf.join(logdir, latest)}, {choices}" if latest
              else f"None of its steps is complete: {choices}")
    raise ValueError(
        f"log_dir={logdir} already holds a run ({shown}): a new run would overwrite its "
        f"checkpoints. {advice}"
    )


def _resume_remedy(logdir, model_path):
    """
    :return: what to do instead of resuming from an incomplete step: resume from the
        latest complete one in logdir, or start a new run from model_path's weights.
    """
    latest = latest_complete_checkpoint(run_checkpoints(logdir))
    if latest is not None:
        return (f"The latest complete step in {logdir} is {parse_resume_step_from_filename(latest)}: "
                f"continue with resume_checkpoint={bf.join(logdir, latest)}")
    return (f"No step in {logdir} is complete: start a new run from these weights with "
            f"init_checkpoint={model_path} (the optimizer state starts afresh)")


def save_checkpoint(path, obj, sidecar=None):
    """
    Write obj with torch.save and a JSON sidecar next to it, both atomically; or, for a
    path ending in .safetensors, a safetensors file of the state dict obj with the
    sidecar in its metadata (checkpoint.METADATA_KEY).

    :param path: the checkpoint's path or URL (ending in .pt or .safetensors).
    :param obj: tensors and plain containers (loadable with weights_only=True); a state
        dict of tensors for safetensors.
    :param sidecar: a JSON-serialisable dict for sidecar_path(path), or None for none.
    """
    if path.endswith(SAFETENSORS_SUFFIX):
        metadata = None if sidecar is None else {METADATA_KEY: json.dumps(sidecar, sort_keys=True)}
        # safetensors stores each tensor's own memory: contiguous copies of shared views.
        tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in obj.items()}
        data = safetensors.torch.save(tensors, metadata=metadata)
        atomic_write(path, lambda f: f.write(data))
        return
    atomic_write(path, lambda f: th.save(obj, f))
    if sidecar is not None:
        text = json.dumps(sidecar, indent=2, sort_keys=True).encode("utf-8")
        atomic_write(sidecar_path(path), lambda f: f.write(text))


def make_sidecar(kind, step, flags, ema_rate=None, class_names=None):
    """
    :param kind: "model" or "ema".
    :param step: the number of optimizer steps the weights have seen.
    :param flags: the run's flags.
    :param ema_rate: the EMA rate for kind "ema", else None.
    :param class_names: the class each label stands for, in label order, or None.
    :return: the sidecar dict.
    """
    sidecar = dict(
        format=SIDECAR_FORMAT,
        kind=kind,
        ema_rate=None if ema_rate is None else float(ema_rate),
        step=int(step),
        flags=plain_flags(flags),
    )
    if class_names is not None:
        sidecar["class_names"] = list(class_names)
    return sidecar


def compare_class_names(recorded, current, path, resuming):
    """
    Refuse to continue a run whose labels now stand for other classes (a class folder
    added, removed or renamed renumbers the classes after it); for a new run from a
    checkpoint's weights, only log the difference.

    :param recorded: the class names a checkpoint's sidecar records, or None.
    :param current: this run's class names, or None.
    :param path: the checkpoint (named in the message).
    :param resuming: whether this run continues the checkpoint's run.
    """
    if recorded is None or current is None or list(recorded) == list(current):
        return
    differences = [f"label {label}: {old!r} -> {new!r}"
                   for label, (old, new) in enumerate(zip(recorded, current)) if old != new]
    if len(recorded) != len(current):
        differences.append(f"{len(recorded)} classes -> {len(current)}")
    summary = ", ".join(differences[:4]) + (", ..." if len(differences) > 4 else "")
    if not resuming:
        logger.log(f"the labels of {bf.basename(path)} stood for other classes ({summary}): "
                   "this new run trains them as this data's classes")
        return
    raise ValueError(
        f"resume_checkpoint={path} was trained with other classes ({summary}): its labels would "
        "stand for other images now. Resume with the data's class folders (file-name prefixes, "
        f"labels file) as they were, or start a new run from these weights with init_checkpoint={path}"
    )


def plain_flags(flags):
    """
    :param flags: a dict of flag values (or None).
    :return: a copy holding only JSON types (others become strings).
    """
    return json.loads(json.dumps(flags or {}, default=str))


def changed_flags(recorded, current):
    """
    List the flags whose values changed since a checkpoint was written, for the log of
    a resumed or initialised run (the paths that name the checkpoint itself left out).

    :param recorded: the flags a checkpoint records.
    :param current: this run's flags.
    :return: a list of "name OLD -> NEW" strings.
    """
    inherent = {"resume_checkpoint", "init_checkpoint"}
    return [
        f"{name} {recorded[name]!r} -> {current[name]!r}"
        for name in sorted((set(recorded) & set(current)) - inherent)
        if recorded[name] != current[name]
    ]


def capture_rng_state():
    """
    :return: this process's torch (CPU and current GPU), numpy and Python RNG states,
        in a form torch.load(weights_only=True) accepts.
    """
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = dict(
        torch=th.get_rng_state(),
        numpy=dict(
            keys=th.from_numpy(keys.astype(np.int64)),
            pos=int(position),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached_gaussian),
        ),
        python=random.getstate(),
    )
    if th.cuda.is_available():
        state["cuda"] = th.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    """
    :param state: a dict from capture_rng_state.
    """
    th.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        ("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"],
         saved["has_gauss"], saved["cached_gaussian"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and th.cuda.is_available():
        th.cuda.set_rng_state(state["cuda"])


def resume_plan(path):
    """
    Check a --resume_checkpoint and find the files that continue its run.

    :param path: the modelNNNNNN.pt (or a model checkpoint with a sidecar) to resume.
    :return: a dict with step, model (path), opt (path) and opt_state (loaded on the CPU).
    """
    name = bf.basename(path)
    if not bf.exists(path):
        raise FileNotFoundError(f"resume_checkpoint={path} does not exist")
    sidecar = read_sidecar(path)
    if name.startswith(("ema_", "opt")) or (sidecar is not None and sidecar.get("kind") != "model"):
        digits = re.search(r"(\d+)\.(?:pt|safetensors)$", name)
        sibling = model_filename(int(digits.group(1))) if digits else "modelNNNNNN.pt"
        raise ValueError(
            f"resume_checkpoint={path} is not a model checkpoint: pass the {sibling} of the "
            "same step; the EMA and opt files are found next to it"
        )
    step = sidecar["step"] if sidecar is not None else parse_resume_step_from_filename(path)
    if step is None:
        raise ValueError(
            f"resume_checkpoint={path} has no step (its name is not modelNNNNNN.pt and "
            f"there is no {bf.basename(sidecar_path(path))}): to continue a run pass its "
            f"modelNNNNNN.pt; to start a new run from these weights use init_checkpoint={path}"
        )
    opt_path = bf.join(bf.dirname(path), opt_filename(step))
    if not bf.exists(opt_path):
        raise FileNotFoundError(
            f"{opt_path} is missing: it holds the optimizer, step and RNG state needed to "
            f"continue from {path} (the save of step {step} was interrupted, or the file was "
            f"moved: copy it back next to the model file). {_resume_remedy(bf.dirname(path), path)}"
        )
    opt_state = _read_training_state(opt_path, path)
    if "optimizer" not in opt_state:
        logger.warn(
            f"{opt_path} is a plain optimizer state (original ADM format): resuming at step "
            f"{step} without RNG states, data position or loss scale, so the run will not "
            "be bit-identical to an uninterrupted one"
        )
        opt_state = dict(
            optimizer=opt_state, step=step, lg_loss_scale=None, rng=None, data_state=None
        )
    elif opt_state["step"] != step:
        raise ValueError(f"{opt_path} records step {opt_state['step']} but {path} is step {step}")
    return dict(step=step, model=path, opt=opt_path, opt_state=opt_state)


def _read_training_state(opt_path, model_path):
    """
    :param opt_path: an optNNNNNN.pt.
    :param model_path: the model checkpoint it continues (named in the remedy).
    :return: its contents, read with weights_only=True: a dict holding "optimizer", or the
        original ADM's plain optimizer state dict ("state", "param_groups").
    """
    remedy = (
        "Resume from an earlier step's modelNNNNNN.pt, or start a new run from these "
        f"weights with init_checkpoint={model_path}"
    )
    try:
        state = dist_util.load_state_dict(opt_path, map_location="cpu")
    except pickle.UnpicklingError as error:
        if "unsupported global" in str(error).lower():  # a class or function to call
            raise ValueError(
                f"refusing to load {opt_path}: unpickling it would execute code that is not "
                f"plain tensors and containers (training states are read with "
                f"weights_only=True). {remedy}"
            ) from None
        raise ValueError(f"{opt_path} is corrupt or not a torch file. {remedy}") from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{opt_path} is corrupt (truncated or damaged: {error}). {remedy}") from None
    if not isinstance(state, dict) or not (
        "optimizer" in state or {"state", "param_groups"} <= set(state)
    ):
        raise ValueError(
            f"{opt_path} is not a training-state file: it holds a {type(state).__name__} "
            f"without an optimizer state. {remedy}"
        )
    return state


def find_ema_checkpoint(main_checkpoint, step, rate):
    """
    :param main_checkpoint: the model checkpoint being resumed (or None).
    :param step: its step.
    :param rate: an EMA rate.
    :return: the path of the EMA checkpoint of that rate and step next to it, or None.
    """
    if main_checkpoint is None:
        return None
    checkpoint_format = "safetensors" if main_checkpoint.endswith(SAFETENSORS_SUFFIX) else "pt"
    path = bf.join(bf.dirname(main_checkpoint), ema_filename(rate, step, checkpoint_format))
    return path if bf.exists(path) else None
