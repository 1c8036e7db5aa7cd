"""
Approximate the bits per dimension of images under a model: the full
variational bound (diffusion.calc_bpd_loop) of --num_samples images of
--data_dir, taken in file order (repeated if there are fewer). Writes the mean
per-step terms as vb_terms.npz, mse_terms.npz and xstart_mse_terms.npz, and the
final bpd to the log.

Single process:  python scripts/image_nll.py --data_dir DIR $MODEL_FLAGS --model_path MODEL.pt
Several:         mpiexec -n 8 python scripts/image_nll.py ...   (or torchrun)
"""

import blobfile as bf
import torch.distributed as dist

from guided_diffusion import bpd, command_line, dist_util, logger, script_util
from guided_diffusion.file_writing import write_npz
from guided_diffusion.image_datasets import ImageDataset, class_labels, list_image_files

TERMS = ("vb", "mse", "xstart_mse")  # the per-step terms written as NAME_terms.npz


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="sample", argv=argv)
    dataset = evaluation_images(
        args.data_dir, args.image_size, args.class_cond, args.class_from, args.num_classes
    )
    command_line.start_sampling(args)
    outputs = [bf.join(logger.get_dir(), f"{name}_terms.npz") for name in TERMS]
    command_line.refuse_to_replace(outputs, args.overwrite)
    logger.log("creating model and diffusion...")
    model, diffusion = command_line.load_model_and_diffusion(
        args, script_util.create_model_and_diffusion, script_util.model_and_diffusion_defaults(),
        args.timestep_respacing,
    )
    logger.log("evaluating...")
    terms = bpd.evaluate_bpd(
        model, diffusion, dataset, device=dist_util.dev(),
        num_samples=args.num_samples, batch_size=args.batch_size,
        clip_denoised=args.clip_denoised, seed=args.seed, use_bf16=args.use_bf16,
        compile=args.compile,
    )
    if dist_util.get_rank() == 0:
        for name, path in zip(TERMS, outputs):
            logger.log(f"saving {name} terms to {path}")
            write_npz(path, terms[name].mean(axis=0))
    logger.logkv("bpd", float(terms["total_bpd"].mean()))
    logger.logkv("prior_bpd", float(terms["prior_bpd"].mean()))
    logger.logkv("samples", len(terms["total_bpd"]))
    logger.dumpkvs()
    dist.barrier()
    logger.log("evaluation complete")


def evaluation_images(data_dir, image_size, class_cond, class_from, num_classes):
    """
    The images of a folder in file order, center-cropped, not flipped.
    """
    entries = list_image_files(data_dir)
    classes = None
    if class_cond:
        classes, names = class_labels(entries, class_from, data_dir=data_dir)
        if len(names) > num_classes:
            raise ValueError(
                f"--data_dir {data_dir} has {len(names)} classes but the model has "
                f"--num_classes {num_classes}"
            )
    return ImageDataset(
        image_size, [path for path, _ in entries], classes=classes, random_flip=False
    )


def create_argparser():
    defaults = dict(
        data_dir="",
        clip_denoised=True,
        num_samples=1000,
        batch_size=1,
        model_path="",
        class_from="prefix",
    )
    defaults.update(script_util.model_and_diffusion_defaults())
    return command_line.sampling_argparser(__doc__, defaults, guidance=False, images=False)


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
