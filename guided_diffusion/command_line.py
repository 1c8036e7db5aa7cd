"""
What the scripts in scripts/ share: their parsers (the original's flags, then this
project's), `--config` presets, the start and finish of a run, the translation of
flags into the library's plain arguments, and of the library's errors back into
flag terms.

The library names its arguments in errors (`batch_size=0: expected a positive
integer`); run_script shows such a message as `--batch_size 0: ...`, without a
traceback.
"""

import argparse
import io
import os
import re
import sys

import blobfile as bf
import numpy as np
import torch.distributed as dist

from . import dist_util, logger
from .acceleration import (
    acceleration_defaults, configure_runtime, set_cuda_math, training_acceleration_defaults,
)
from .checkpoint import load_for_inference, read_sidecar, sidecar_path
from .download import fetch_and_load
from .file_writing import SamplesWriter, samples_outputs
from .guidance import check_guide, check_interval
from .presets import load_config, read_preset
from .resample import create_named_schedule_sampler
from .run_lock import hold_log_dir
from .sampling import CONSISTENCY, DEFAULT_STEPS
from .sampling_state import PartialSamples, file_identity
from .solvers import SAMPLERS
from .script_util import add_dict_to_argparser, architecture_flags, args_to_dict, str2bool
from .train_util import PREVIEW_STEPS, TrainLoop
from .training_state import parse_resume_step_from_filename
from .work_split import check_counts, check_seed, set_seed


# ------------------------------------------------------------------ parsing


def parse_args_with_config(parser, purpose="train", argv=None):
    """
    Parse command-line flags where `--config NAME_OR_PATH` supplies defaults and
    explicit flags override them.

    :param parser: an argparse.ArgumentParser with the script's flags.
    :param purpose: "train" or "sample" (see presets.load_config).
    :param argv: the arguments (default: sys.argv[1:]).
    :return: the parsed argparse.Namespace (with a `config` attribute).
    """
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument(
            "--config", default="", help="preset name (see configs/) or path to a JSON file"
        )
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:
            flags = load_config(known.config, purpose=purpose)
            preset = read_preset(known.config)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--config {known.config}: {error}") from None
        accepted = {action.dest for action in parser._actions}
        unknown = sorted(set(preset.get("flags", {})) - accepted)
        if unknown:
            raise ValueError(
                f"--config {known.config}: flags {unknown} are not flags of this script; "
                f"it is a {preset.get('kind', 'different')} preset, use it with the matching script"
            )
        parser.set_defaults(**{k: v for k, v in flags.items() if k in accepted})
    args = parser.parse_args(argv)
    if known.config:
        note_checkpoint_urls(flags, preset)
    return args


# The preset paths of --model_path and --classifier_path and their checkpoint_url:
# load_for_sampling downloads a file that is not there (download.fetch_and_load).
_PRESET_URLS = {}


def note_checkpoint_urls(flags, preset):
    """
    Remember the checkpoint_url of the paths a preset gives --model_path and
    --classifier_path (its guiding classifier's preset gives the latter's).

    :param flags: the flags the preset set.
    :param preset: the preset read with presets.read_preset.
    """
    sources = {"model_path": preset}
    if preset.get("classifier"):
        sources["classifier_path"] = read_preset(preset["classifier"])
    for flag, source in sources.items():
        if flags.get(flag) and source.get("checkpoint_url"):
            _PRESET_URLS[flags[flag]] = source["checkpoint_url"]


def in_flag_terms(message, flag_names):
    """
    :param message: an error message of the library, naming arguments as `name=value`.
    :param flag_names: the script's flag names.
    :return: the message with each `name=value` of a flag written `--name value` (as
        typed), and a `name=` without a value `--name`.
    """
    names = sorted(flag_names, key=len, reverse=True)
    if not names:
        return message
    alternatives = "|".join(map(re.escape, names))
    bare = re.sub(r"(?<![\w.-])(" + alternatives + r")=(?=[\s,;:)]|$)", r"--\1", message)
    return re.sub(r"(?<![\w.-])(" + alternatives + r")=", r"--\1 ", bare)


def run_script(main, parser):
    """
    Run a script's main function, then leave the process group (dist_util.close_dist);
    a ValueError or FileNotFoundError (bad flags or files) ends the process with its
    message in flag terms and exit status 1, without a traceback.

    :param main: the script's main function (no arguments).
    :param parser: the script's parser, whose flag names the message is written in.
    """
    try:
        main()
        dist_util.close_dist()
    except (ValueError, FileNotFoundError, ImportError) as error:
        names = [action.dest for action in parser._actions if action.option_strings]
        sys.exit(f"{os.path.basename(sys.argv[0])}: {in_flag_terms(str(error), names)}")


def hold_requested_log_dir(log_dir):
    """
    Take the log directory that --log_dir (else $OPENAI_LOGDIR) names for this run's
    life, before any log file is opened in it (run_lock.hold_log_dir); without either, the
    logger makes a new folder that no other run uses.

    :param log_dir: the --log_dir flag's value.
    """
    requested = log_dir or os.getenv("OPENAI_LOGDIR")
    if requested:
        hold_log_dir(os.path.expanduser(requested))


def apply_runtime_flags(model, args):
    """
    Set the model's attention kernel from --fast_attention (acceleration.configure_runtime).

    :param model: a built model.
    :param args: the parsed flags.
    :return: the model.
    """
    return configure_runtime(model, fast_attention=args.fast_attention)


# ------------------------------------------------------------------ training


# The flags of training_defaults() that only diffusion training has (diffusion_loop_kwargs).
DIFFUSION_TRAINING_FLAGS = ("lr_anneal_steps", "ema_rate", "use_fp16", "fp16_scale_growth",
                            "max_steps", "sample_interval", "sampler", "steps")


def training_defaults():
    """
    :return: the flag defaults of scripts/image_train.py and super_res_train.py besides
        the model's (the original's, then the new ones); --seed is added separately.
    """
    return dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        # Not in the original:
        log_dir="",  # default: $OPENAI_LOGDIR, else a new folder in the temp directory
        max_steps=0,  # stop with a final save at this step (0: never)
        sample_interval=0,  # write an EMA sample grid every N steps (0: never)
        sampler="",  # the preview's fast sampler (default: DDIM over 25 steps)
        steps=0,  # the preview sampler's model evaluations per sample (0: 25)
        class_from="prefix",  # labels from the file-name prefix or the sub-folder ("folder")
        labels_file="",  # or from this CSV of path,class rows (docs/guidance.md)
        num_workers=1,
        init_checkpoint="",  # start a new run from these weights
        overwrite_log_dir=False,  # let a new run write over the checkpoints in --log_dir
    )


def training_argparser(doc, defaults):
    """
    The flags of a training script: one per entry of `defaults`, the speed-up flags
    (training_acceleration_defaults) and --seed.

    :param doc: the script's docstring; its first line describes the script.
    :param defaults: the script's flag defaults.
    :return: an argparse.ArgumentParser.
    """
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    add_dict_to_argparser(parser, {**defaults, **training_acceleration_defaults()})
    parser.add_argument("--seed", type=int, default=None, help="seed all draws (default: none)")
    parser.add_argument("--checkpoint_format", default="pt", choices=["pt", "safetensors"],
                        help="write the model and EMA weights as .pt or .safetensors files")
    parser.add_argument("--log_format", default="", help="comma-separated outputs: stdout, log, "
                        "csv, json, tensorboard, wandb (default: $OPENAI_LOG_FORMAT or stdout,log,csv)")
    parser.add_argument("--wandb_project", default="", help="log to this Weights & Biases project")
    parser.add_argument("--wandb_run_name", default="", help="the W&B run's name (default: W&B's)")
    parser.add_argument("--wandb_entity", default="", help="the W&B entity (default: yours)")
    return parser


def start_training(args):
    """
    Set the CUDA arithmetic (--tf32, --cudnn_benchmark), the processes, the log directory
    (--log_dir) and its outputs (--log_format, --wandb_project: continued when resuming),
    and, with --seed, the generators.

    :param args: the parsed flags.
    """
    set_cuda_math(tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    dist_util.setup_dist()
    formats = args.log_format.split(",") if args.log_format and dist_util.get_rank() == 0 else None
    resume = args.resume_checkpoint
    tracking = dict(purge_step=parse_resume_step_from_filename(resume) if resume else None,
                    resume_dir=os.path.dirname(resume) if resume else None,
                    wandb_project=args.wandb_project, wandb_run_name=args.wandb_run_name,
                    wandb_entity=args.wandb_entity)
    hold_requested_log_dir(args.log_dir)
    logger.configure(dir=args.log_dir or None, format_strs=formats, comm=logger.TorchDistComm(),
                     tracking=tracking)
    logger.log_config(vars(args))
    if args.seed is not None:
        set_seed(args.seed)


def data_kwargs(args, image_size=True, class_cond=None):
    """
    :param args: the parsed flags of a training script.
    :param image_size: include --image_size (super-resolution passes its sizes itself).
    :param class_cond: whether batches carry labels (default: --class_cond).
    :return: the image_datasets.load_data arguments the flags set.
    """
    kwargs = dict(
        data_dir=args.data_dir, batch_size=args.batch_size,
        class_cond=args.class_cond if class_cond is None else class_cond,
        class_from=args.class_from, num_classes=args.num_classes, seed=args.seed,
        num_workers=args.num_workers, labels_file=args.labels_file or None,
    )
    if image_size:
        kwargs["image_size"] = args.image_size
    return kwargs


def training_loop_kwargs(args, diffusion):
    """
    :param args: the parsed flags of any training script.
    :param diffusion: the diffusion the schedule sampler draws timesteps for.
    :return: the TrainLoop arguments that every training script's flags set, with the
        run's flags recorded in checkpoints and the architecture flags compared with a
        loaded checkpoint's.
    """
    return dict(
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        init_checkpoint=args.init_checkpoint,
        overwrite_log_dir=args.overwrite_log_dir,
        checkpoint_format=args.checkpoint_format,
        seed=args.seed,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        use_bf16=args.use_bf16,
        compile=args.compile,
        channels_last=args.channels_last,
        recompute_attention=args.recompute_attention,
        flags=vars(args),
        model_flags=architecture_flags(vars(args)),
    )


def diffusion_loop_kwargs(args):
    """
    :param args: the parsed flags of image_train.py or super_res_train.py.
    :return: the TrainLoop arguments that only diffusion training has.
    """
    return dict(
        ema_rate=args.ema_rate,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        lr_anneal_steps=args.lr_anneal_steps,
        max_steps=args.max_steps,
        sample_interval=args.sample_interval,
        preview_sampler=args.sampler or None,
        preview_steps=args.steps or PREVIEW_STEPS,
    )


def run_training(args, model, diffusion, data, loop_class=TrainLoop, **loop_kwargs):
    """
    Move the model to this process's device, set its attention kernel and train it,
    recording the data's class names in the checkpoints.

    :param args: the parsed flags.
    :param model: the network.
    :param diffusion: its diffusion.
    :param data: the batch loader (image_datasets.load_data or load_superres_data).
    :param loop_class: TrainLoop or a subclass (classifier_train_util.ClassifierTrainLoop).
    :param loop_kwargs: the loop's other arguments (training_loop_kwargs and more).
    """
    model.to(dist_util.dev())
    apply_runtime_flags(model, args)
    logger.log("training...")
    loop_class(model=model, diffusion=diffusion, data=data, class_names=data.class_names,
               **loop_kwargs).run_loop()


# ------------------------------------------------------------------ sampling


def sampling_defaults():
    """
    :return: the flag defaults the three sampling scripts share (the original's).
    """
    return dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="")


def sampling_argparser(doc, defaults, guidance=True, images=True):
    """
    The flags of a sampling script: one per entry of `defaults`, then add_sampling_flags.

    :param doc: the script's docstring; its first line describes the script.
    :param defaults: the script's flag defaults.
    :param guidance: add --cfg_scale and --class_balanced.
    :param images: add --save_png.
    :return: an argparse.ArgumentParser.
    """
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_sampling_flags(parser, guidance=guidance, images=images)
    return parser


def add_sampling_flags(parser, guidance=True, images=True):
    """
    Add the flags this project adds to the original sampling scripts: --seed,
    --log_dir, --overwrite, the speed-ups (acceleration_defaults) and those below.

    :param parser: an argparse.ArgumentParser.
    :param guidance: add --cfg_scale and --class_balanced.
    :param images: add --save_png, --sampler, --steps, autoguidance's flags (Karras et al.
        2024) and --guidance_interval (Kynkäänniemi et al. 2024).
    """
    parser.add_argument("--seed", type=int, default=None,
                        help="same seed, same images whatever the batch size and process count")
    parser.add_argument("--log_dir", default="", help="output folder (default: $OPENAI_LOGDIR)")
    parser.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                        help="replace the outputs of another run in --log_dir")
    add_dict_to_argparser(parser, acceleration_defaults())
    if images:
        parser.add_argument("--save_png", type=str2bool, nargs="?", const=True, default=False,
                            help="also write every sample as a PNG")
        parser.add_argument("--sampler", default="", help=f"a fast sampler: {', '.join(SAMPLERS)}, or "
                            f"{CONSISTENCY} for a consistency student (default: the original's DDPM / "
                            "--use_ddim loops)")
        parser.add_argument("--steps", type=int, default=0, help="the sampler's model evaluations per "
                            f"sample (default {DEFAULT_STEPS}; {CONSISTENCY}: 1)")
        parser.add_argument("--guide_model_path", default="", help="autoguidance's guide: a weaker model")
        parser.add_argument("--guide_config", default="", help="the guide's preset (default: its record's)")
        parser.add_argument("--guide_scale", type=float, default=1.0, help="autoguidance weight (1: off)")
        parser.add_argument("--guidance_interval", default="", help="LO,HI: guide at sigmas in (LO, HI] only")
    if guidance:
        parser.add_argument("--cfg_scale", type=float, default=None,
                            help="classifier-free guidance weight (needs --class_dropout_prob > 0)")
        parser.add_argument("--class_balanced", type=str2bool, nargs="?", const=True, default=False,
                            help="exactly num_samples / num_classes samples per class")


def parse_guidance_interval(text):
    """
    :param text: the --guidance_interval flag: "LO,HI" (sigmas, HI may be inf) or "".
    :return: (sigma_lo, sigma_hi), or None for "" (guidance everywhere).
    """
    try:
        return check_interval(*map(float, text.split(","))) if text else None
    except (ValueError, TypeError):
        raise ValueError(f"--guidance_interval {text}: expected LO,HI with 0 <= LO < HI, two noise "
                         "levels sigma = sqrt((1 - alpha_bar) / alpha_bar) (e.g. 0.28,5.42)") from None


def start_sampling(args):
    """
    Check --num_samples, --batch_size, --seed and the precision flags, then set the CUDA
    arithmetic (--tf32, --cudnn_benchmark), the processes and the log directory (--log_dir).

    :param args: the parsed flags.
    """
    check_counts(num_samples=args.num_samples, batch_size=args.batch_size)
    check_seed(args.seed)
    if args.use_fp16 and args.use_bf16:
        raise ValueError("--use_fp16 and --use_bf16 are exclusive: choose one precision")
    set_cuda_math(tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    dist_util.setup_dist()
    hold_requested_log_dir(args.log_dir)
    logger.configure(dir=args.log_dir or None, comm=logger.TorchDistComm())


def sampling_respacing(timestep_respacing, sampler):
    """
    Decide the respacing of the diffusion a sampling script builds (after start_sampling,
    so that the warning is logged).

    :param timestep_respacing: the --timestep_respacing flag.
    :param sampler: the --sampler flag ("" for the original's loops).
    :return: timestep_respacing, or "" (the full schedule) with a fast sampler, which
        chooses its own times of the full schedule.
    """
    if sampler and timestep_respacing:
        logger.warn(f"--timestep_respacing {timestep_respacing} is not used with --sampler "
                    f"{sampler}: the sampler chooses its own times of the full schedule (--steps)")
        return ""
    return timestep_respacing


def sample_kwargs(args, guidance=True):
    """
    :param args: the parsed flags of a sampling script (sampling_argparser with images).
    :param guidance: whether the script has the guidance flags (sampling_argparser's
        `guidance`): --cfg_scale and --class_balanced.
    :return: the sampling.SamplingRun arguments these flags set.
    """
    kwargs = dict(
        num_samples=args.num_samples, batch_size=args.batch_size, use_ddim=args.use_ddim,
        clip_denoised=args.clip_denoised, seed=args.seed, num_classes=args.num_classes,
        use_bf16=args.use_bf16, compile=args.compile, sampler=args.sampler or None,
        steps=args.steps or None, guide_scale=args.guide_scale,
        guidance_interval=parse_guidance_interval(args.guidance_interval),
    )
    if guidance:
        kwargs.update(cfg_scale=args.cfg_scale, class_balanced=args.class_balanced)
    return kwargs


def load_for_sampling(model, path, path_flag, flags, args, use_fp16=None):
    """
    Load a checkpoint into a model built from flags (checkpoint.load_for_inference, on
    this process's device, with --channels_last and --fast_attention), its parameters
    frozen: guidance differentiates with respect to the image only, and a compiled
    classifier would otherwise compute weight gradients too.

    :param model: the model built from `flags`.
    :param path: the checkpoint's path (the value of the flag `path_flag`).
    :param path_flag: the flag naming the checkpoint, e.g. "classifier_path" (for messages,
        and for the download of a preset's checkpoint that is not there).
    :param flags: the flags the model was built from: their architecture flags are
        compared with the checkpoint's record.
    :param args: the parsed flags, for --use_fp16, --channels_last and --fast_attention.
    :param use_fp16: convert to float16 (default: --use_fp16).
    :return: the model.
    """
    if not path:
        raise ValueError(
            f"--{path_flag} is empty: pass the checkpoint file (e.g. --{path_flag} models/"
            "256x256_diffusion.pt), or --config NAME, whose preset sets it"
        )

    def load(checkpoint):
        load_for_inference(
            model, checkpoint, flags=architecture_flags(flags),
            use_fp16=args.use_fp16 if use_fp16 is None else use_fp16,
            device=dist_util.dev(), channels_last=args.channels_last,
        )

    if path in _PRESET_URLS and not bf.exists(path):
        logger.log(f"--{path_flag} {path} is not there: using {_PRESET_URLS[path]} (downloaded "
                   "into the cache once)")
        fetch_and_load(_PRESET_URLS[path], load, f"the model of --{path_flag}")
    else:
        load(path)
    model.requires_grad_(False)
    return apply_runtime_flags(model, args)


def load_model_and_diffusion(args, factory, defaults, timestep_respacing, sampler=""):
    """
    Build a model and its diffusion from flags, then load --model_path into it
    (load_for_sampling), once check_checkpoint_kind has accepted it for the sampler.

    :param args: the parsed flags.
    :param factory: e.g. script_util.create_model_and_diffusion.
    :param defaults: the factory's flag defaults; the flags of these names build the model.
    :param timestep_respacing: the diffusion's respacing (in place of the flag's: the
        script decides it, e.g. with sampling_respacing).
    :param sampler: the --sampler flag ("" for the original's loops, and for the scripts
        that do not sample).
    :return: (model, diffusion).
    """
    check_checkpoint_kind(args.model_path, "model_path", sampler)
    flags = dict(args_to_dict(args, defaults.keys()), timestep_respacing=timestep_respacing)
    model, diffusion = factory(**flags)
    load_for_sampling(model, args.model_path, "model_path", flags, args)
    return model, diffusion


def load_guide(args, factory, defaults, model):
    """
    Build the guide of --guide_model_path, refuse one that cannot guide the model, then load it.

    :param args: the parsed flags (the guide's architecture: --guide_config's, else its record's).
    :param factory: the model's factory, e.g. script_util.create_model_and_diffusion.
    :param defaults: the factory's flag defaults.
    :param model: the main model.
    :return: the guide on this process's device, or None without --guide_model_path.
    """
    path, config = args.guide_model_path, args.guide_config
    if not path:
        if config:
            raise ValueError(f"--guide_config {config} without --guide_model_path: pass the guide")
        return None
    flags = _guide_flags(path, config, defaults, args.use_fp16)
    differing = [f"{name}: guide {flags[name]!r}, model {getattr(args, name)!r}"
                 for name in ("diffusion_steps", "noise_schedule", "predict_xstart", "rescale_timesteps")
                 if flags[name] != getattr(args, name)]
    if differing:
        raise ValueError(f"--guide_model_path {path} has another diffusion schedule than the model "
                         f"({'; '.join(differing)}): a guide must share the model's noise levels")
    guide, _ = factory(**flags)
    try:
        check_guide(model, guide, args.num_classes)
    except ValueError as error:
        raise ValueError(f"--guide_model_path {path}: {error}") from None
    return load_for_sampling(guide, path, "guide_model_path", flags, args)


def _guide_flags(path, config, defaults, use_fp16):
    """
    :return: the factory flags of the guide at path (not respaced: only its network is used).
    """
    try:
        recorded = load_config(config, purpose="train") if config else None
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"--guide_config {config}: {error}") from None
    recorded = recorded or (read_sidecar(path) or {}).get("flags")
    if not isinstance(recorded, dict):
        raise ValueError(f"--guide_model_path {path}: no record of the flags it was trained with "
                         f"({sidecar_path(path)}): check the path, or pass --guide_config PRESET")
    flags = dict(defaults, **{name: value for name, value in recorded.items() if name in defaults})
    return dict(flags, use_fp16=use_fp16, timestep_respacing="")


def check_checkpoint_kind(path, path_flag, sampler):
    """
    Refuse a consistency student (its record's flags hold consistency_student, written by
    scripts/consistency_distill.py) for anything but --sampler consistency, and a
    diffusion model for --sampler consistency.

    :param path: the checkpoint's path.
    :param path_flag: the flag that names it.
    :param sampler: the --sampler flag ("" for the original's loops or no sampling).
    """
    record = read_sidecar(path) if path else None
    flags = record.get("flags") if isinstance(record, dict) else None
    student = isinstance(flags, dict) and bool(flags.get("consistency_student"))
    if student and sampler != CONSISTENCY:
        raise ValueError(f"--{path_flag} {path} is a consistency student (scripts/consistency_distill.py), "
                         f"not a diffusion model: sample it with --sampler {CONSISTENCY} --steps 1 "
                         "(up to 4)")
    if sampler == CONSISTENCY and not student:
        raise ValueError(f"--sampler {CONSISTENCY} samples a consistency student, and --{path_flag} "
                         f"{path} is not one (its record has no consistency_student): choose another "
                         "--sampler, or distill the model with scripts/consistency_distill.py")


def read_base_samples(path, small_size, class_cond):
    """
    Read the low-resolution images (and labels) that super-resolution starts
    from: a .npz whose arr_0 is uint8 [N x small_size x small_size x 3] and,
    for a class-conditional model, arr_1 the N integer labels.

    :param path: the .npz path or blobfile URL (--base_samples).
    :param small_size: the side the model expects.
    :param class_cond: whether labels are needed.
    :return: (images, labels or None) as numpy arrays.
    """
    if not path:
        raise ValueError("--base_samples is empty: pass a samples_NxHxWx3.npz of low-resolution images")
    if not bf.exists(path):
        raise FileNotFoundError(f"--base_samples {path!r} does not exist")
    with bf.BlobFile(path, "rb") as f:
        data = f.read()
    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        contents = {name: arrays[name] for name in arrays.files}
    except (ValueError, OSError, AttributeError) as error:
        raise ValueError(f"--base_samples {path!r} is not a readable .npz file ({error})") from None
    if "arr_0" not in contents:
        raise ValueError(
            f"--base_samples {path!r} has arrays {sorted(contents)}; expected arr_0 (images)"
        )
    images = contents["arr_0"]
    expected = (small_size, small_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected or not len(images):
        raise ValueError(
            f"--base_samples {path!r}: arr_0 has shape {images.shape} and dtype {images.dtype}; "
            f"expected uint8 [N x {small_size} x {small_size} x 3] with N > 0 "
            f"(--small_size {small_size})"
        )
    if not class_cond:
        return images, None
    labels = contents.get("arr_1")
    if labels is None or labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        found = "no arr_1" if labels is None else f"arr_1 of shape {labels.shape}, dtype {labels.dtype}"
        raise ValueError(
            f"--base_samples {path!r}: a class-conditional model needs arr_1 with {len(images)} "
            f"integer labels, found {found}"
        )
    return images, labels


def partial_samples(args):
    """
    Where a seeded run keeps its finished rounds: `partial_samples/` in the log directory,
    recording every flag but --log_dir, --save_png and --overwrite, the number of
    processes, and the size and time of the checkpoint files (a rerun after a checkpoint
    changed is refused instead of mixing two models' samples).
    Without --seed, warn that an interrupted run cannot be continued.

    :param args: the parsed flags (after start_sampling).
    :return: a sampling_state.PartialSamples, or None without --seed.
    """
    if args.seed is None:
        logger.warn("no --seed: an interrupted run cannot be continued (with --seed S a rerun "
                    "with the same flags continues from the finished samples)")
        return None
    record = {name: value for name, value in vars(args).items()
              if name not in ("log_dir", "save_png", "overwrite")}
    record["world_size"] = dist_util.get_world_size()
    for flag in ("model_path", "classifier_path", "guide_model_path"):
        if record.get(flag):
            record[f"{flag} file"] = file_identity(record[flag])
    return PartialSamples(bf.join(logger.get_dir(), "partial_samples"), record)


def write_samples(run, save_png=False, overwrite=False):
    """
    Sample every round of a run and write the samples on rank 0 as they arrive
    (file_writing.SamplesWriter: one round in memory, PNGs written per round, so that
    no rank waits long while rank 0 writes alone), remove the partial samples, then
    wait for every process.

    :param run: a sampling.SamplingRun.
    :param save_png: also write one PNG per sample.
    :param overwrite: replace the samples of another run of the same name in the log
        directory (else they are refused, unless this run continues from partial samples).
    """
    continuing = run.partial is not None and run.partial.finished()
    refuse_to_replace([] if continuing else samples_outputs(logger.get_dir(), run.num_samples,
                                                            run.image_shape), overwrite)
    if dist_util.get_rank() > 0:
        for _ in run.new_rounds():
            pass
    else:
        writer = SamplesWriter(logger.get_dir(), run.num_samples, run.image_shape, run.labelled, save_png)
        with writer:
            for images, labels in run.rounds():
                writer.add(images.numpy(), None if labels is None else labels.numpy())
        logger.log(f"saved {run.num_samples} samples to {writer.path}")
        if run.partial is not None:
            run.partial.remove()
    dist.barrier()
    logger.log("sampling complete")


def refuse_to_replace(outputs, overwrite):
    """
    Raise a ValueError on every rank when some of a run's outputs already exist (rank 0
    looks; a collective: every rank calls it), unless overwrite.

    :param outputs: the paths this run will write.
    :param overwrite: whether replacing them was asked for.
    """
    if overwrite:
        return
    found = dist_util.on_rank_zero(lambda: [path for path in outputs if bf.exists(path)])
    if found:
        raise ValueError(
            f"log_dir={logger.get_dir()} already holds the outputs of another run "
            f"({', '.join(bf.basename(path) for path in found)}): write into another log_dir, "
            "or pass overwrite=True to replace them"
        )
