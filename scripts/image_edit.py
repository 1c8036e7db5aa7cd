"""
Edit images with a diffusion model: inpainting (RePaint), SDEdit, ILVR or diffusion
posterior sampling (DPS), optionally guided by a classifier or classifier-free guidance.

Inpaint:  python scripts/image_edit.py $MODEL_FLAGS --model_path MODEL.pt --task inpaint \\
              --input_dir photos --mask box --timestep_respacing 250 --seed 0
SDEdit:   ... --task sdedit --input_dir strokes --strength 0.5
ILVR:     ... --task ilvr --input_npz refs.npz --ilvr_factor 8
DPS:      ... --task dps --operator downsample --operator_factor 4 --dps_scale 1.0
Several:  mpiexec -n 8 python scripts/image_edit.py ...   (or torchrun --nproc_per_node 8)
"""

import io

import blobfile as bf
import numpy as np
import torch as th
from PIL import Image

from guided_diffusion import command_line, dist_util, edit_sampling, editing, logger, sampling, script_util
from guided_diffusion.file_writing import samples_name, save_image_grid
from guided_diffusion.image_datasets import list_image_files, read_image
from guided_diffusion.image_grid import to_uint8_nhwc

TASKS = ("inpaint", "sdedit", "ilvr", "dps")
EDIT_DEFAULTS = dict(num_samples=0, input_dir="", input_npz="", mask="", strength=0.5, ilvr_factor=4,
                     operator="inpaint", operator_factor=4, blur_kernel_size=9, blur_sigma=3.0, dps_scale=1.0,
                     jump_length=10, jump_n_sample=10)
TASK_FLAGS = {"inpaint": ("jump_length", "jump_n_sample"), "sdedit": ("strength",), "ilvr": ("ilvr_factor",),
              "dps": ("operator", "operator_factor", "blur_kernel_size", "blur_sigma", "dps_scale")}
MASKS = ("half", "box", "random")
GRID_SAMPLES = 32  # the comparison grid shows the first ones: original, condition, result


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="sample", argv=argv)
    check_task_flags(args)
    labelled = args.class_cond or bool(args.classifier_path)
    images, labels = read_inputs(args.input_dir, args.input_npz, args.image_size, labelled)
    if args.num_samples > len(images):
        raise ValueError(f"num_samples={args.num_samples}: more than the {len(images)} input images")
    args.num_samples = args.num_samples or len(images)
    images = images[:args.num_samples]
    labels = None if labels is None else labels[:args.num_samples]
    method, condition = edit_method(args, images)
    command_line.start_sampling(args)
    logger.log("creating model and diffusion...")
    factory, defaults = script_util.create_model_and_diffusion, script_util.model_and_diffusion_defaults()
    model, diffusion = command_line.load_model_and_diffusion(args, factory, defaults, args.timestep_respacing)
    guide = command_line.load_guide(args, factory, defaults, model)
    logger.log(f"editing {len(images)} images ({args.task})...")
    run = sampling.SamplingRun(
        model, diffusion, classifier=load_classifier(args), classifier_scale=args.classifier_scale,
        guide=guide, labels=labels, editing=method, device=dist_util.dev(), **command_line.sample_kwargs(args),
    )
    command_line.write_samples(run, args.save_png, args.overwrite)
    if dist_util.get_rank() == 0:
        write_comparison(images, condition, bf.join(logger.get_dir(), samples_name(len(images), run.image_shape)))


def check_task_flags(args):
    """
    Refuse the flags of another task than --task (they would be ignored).
    """
    for task, names in TASK_FLAGS.items():
        given = [f"{name}={getattr(args, name)}" for name in names if getattr(args, name) != EDIT_DEFAULTS[name]]
        if task != args.task and given:
            raise ValueError(f"{', '.join(given)}: for task={task}, not task={args.task}")
    if args.mask and not uses_mask(args):
        raise ValueError(f"mask={args.mask}: task={args.task} takes no mask (inpaint, sdedit and dps "
                         "with operator=inpaint do)")


def uses_mask(args):
    """
    :return: whether --task takes --mask.
    """
    return args.task in ("inpaint", "sdedit") or (args.task == "dps" and args.operator == "inpaint")


def load_classifier(args):
    """
    :return: the classifier of --classifier_path, or None without one.
    """
    if not args.classifier_path:
        return None
    flags = script_util.args_to_dict(args, script_util.classifier_defaults().keys())
    return command_line.load_for_sampling(script_util.create_classifier(**flags), args.classifier_path,
                                          "classifier_path", flags, args, use_fp16=args.classifier_use_fp16)


def read_inputs(input_dir, input_npz, image_size, labelled):
    """
    :return: (uint8 images [N x S x S x 3], int64 labels [N] or None): from --input_dir
        (sorted; labels from the file-name prefix before "_": an integer, else the index of
        the sorted prefixes, as training) or --input_npz (arr_0, with arr_1 the labels).
    """
    if bool(input_dir) == bool(input_npz):
        raise ValueError("give one of input_dir= and input_npz=: the images to edit")
    if input_dir:
        paths = [path for path, _ in list_image_files(input_dir)]
        images = [np.asarray(read_image(path)) for path in paths]
        for path, image in zip(paths, images):
            _check_size(image.shape, image_size, f"input_dir={input_dir}: {path}")
        prefixes = [bf.basename(path).split("_")[0] for path in paths]
        if all(prefix.isdigit() for prefix in prefixes):
            labels = [int(prefix) for prefix in prefixes]
        else:
            labels = [sorted(set(prefixes)).index(prefix) for prefix in prefixes]
        return np.stack(images), np.array(labels, dtype=np.int64) if labelled else None
    if not bf.exists(input_npz):
        raise FileNotFoundError(f"input_npz={input_npz} does not exist")
    arrays = read_npz(input_npz)
    images, labels = arrays.get("arr_0", np.zeros(0)), arrays.get("arr_1")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"input_npz={input_npz}: arr_0 of shape {images.shape}, dtype {images.dtype}; "
                         "expected uint8 images [N x H x W x 3]")
    _check_size(images.shape[1:], image_size, f"input_npz={input_npz}")
    if labelled and (labels is None or labels.shape != (len(images),)):
        raise ValueError(f"input_npz={input_npz}: a class-conditional model or a classifier needs "
                         f"arr_1 with {len(images)} labels")
    return images, labels.astype(np.int64) if labelled else None


def read_npz(path):
    """
    :return: the arrays of a .npz (local or blobfile URL), by name.
    """
    with bf.BlobFile(path, "rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}


def _check_size(shape, image_size, source):
    if tuple(shape[:2]) != (image_size, image_size):
        raise ValueError(f"{source} is {shape[0]}x{shape[1]}: the model makes {image_size}x{image_size} "
                         "images (image_size=); resize or crop the inputs first")


def read_mask(name, image_size, seed):
    """
    :return: the --mask as a [1 x 1 x S x S] float mask (1 = keep): half, box, random (seeded by
        --seed) or a PNG (white = keep, black = fill); "" is half.
    """
    name = name or "half"
    if name == "half":
        return editing.half_mask(image_size)
    if name == "box":
        return editing.box_mask(image_size)
    if name == "random":
        return editing.random_mask(image_size, th.Generator().manual_seed(seed or 0))
    if not bf.exists(name):
        raise FileNotFoundError(f"mask={name}: expected {', '.join(MASKS)} or an existing PNG")
    with bf.BlobFile(name, "rb") as f:
        pixels = np.asarray(Image.open(f).convert("L"))
    if not np.isin(pixels, (0, 255)).all():
        raise ValueError(f"mask={name} is not binary: expected white (keep) and black (fill) pixels only")
    return th.from_numpy(pixels / 255.0).float()


def edit_method(args, images):
    """
    :return: (the editing method of --task, over the images; the uint8 images of what it is
        conditioned on, for the comparison grid).
    """
    known = editing.from_uint8(images)
    mask = None
    if uses_mask(args) and (args.mask or args.task != "sdedit"):  # SDEdit: no mask unless given
        mask = editing.check_mask(read_mask(args.mask, args.image_size, args.seed), known.shape,
                                  f"mask={args.mask}")
    if args.task == "inpaint":
        method = editing.RePaint(known, mask, args.jump_length, args.jump_n_sample)
        return method, to_uint8_nhwc(known * mask - (1 - mask)).numpy()
    if args.task == "sdedit":
        return editing.SDEdit(known, args.strength, mask), images
    if args.task == "ilvr":
        method = editing.ILVR(known, args.ilvr_factor)
        return method, to_uint8_nhwc(editing.low_pass(known, method.factor)).numpy()
    if args.task == "dps":
        operator = edit_sampling.make_operator(args.operator, mask=mask, factor=args.operator_factor,
                                               kernel_size=args.blur_kernel_size, sigma=args.blur_sigma)
        measurement = operator(known)
        shown = th.nn.functional.interpolate(measurement, size=known.shape[-2:], mode="nearest")
        return editing.DPS(operator, measurement, args.dps_scale), to_uint8_nhwc(shown).numpy()
    raise ValueError(f"task={args.task}: expected one of {', '.join(TASKS)}")


def write_comparison(originals, conditions, stem):
    """
    Write {stem}_comparison.png: per input, the original, its condition and the result.
    """
    results = read_npz(stem + ".npz")["arr_0"][:GRID_SAMPLES]
    count = len(results)
    rows = np.stack([originals[:count], conditions[:count], results], axis=1).reshape(-1, *results.shape[1:])
    save_image_grid(rows, stem + "_comparison.png", nrow=3)


def create_argparser():
    defaults = dict(command_line.sampling_defaults(), classifier_path="", classifier_scale=1.0)
    defaults.update(script_util.model_and_diffusion_defaults())
    defaults.update(script_util.classifier_defaults())
    defaults.update(EDIT_DEFAULTS)
    parser = command_line.sampling_argparser(__doc__, defaults)
    parser.add_argument("--task", required=True, choices=TASKS, help="the editing method")
    return parser


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
