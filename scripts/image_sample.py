"""
Generate a large batch of image samples from a model and save them as a large
numpy array (the evaluator's input), with a PNG grid of the first samples.

Single process:  python scripts/image_sample.py $MODEL_FLAGS --model_path MODEL.pt --num_samples 100
Several:         mpiexec -n 8 python scripts/image_sample.py ...   (or torchrun --nproc_per_node 8)
"""

import argparse

import torch.distributed as dist

from guided_diffusion import dist_util, logger
from guided_diffusion.sampling import (
    add_sampling_flags,
    check_counts,
    check_seed,
    load_for_sampling,
    sample,
    save_samples,
)
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_config,
)


def main():
    args = parse_args_with_config(create_argparser(), purpose="sample")
    check_counts(num_samples=args.num_samples, batch_size=args.batch_size)
    check_seed(args.seed)

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None, comm=logger.TorchDistComm())

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(**model_flags)
    load_for_sampling(model, args.model_path, model_flags, use_fp16=args.use_fp16)

    logger.log("sampling...")
    images, labels = sample(
        model,
        diffusion,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        use_ddim=args.use_ddim,
        clip_denoised=args.clip_denoised,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        device=dist_util.dev(),
        num_classes=args.num_classes if args.class_cond else None,
        class_balanced=args.class_balanced,
    )
    if dist_util.get_rank() == 0:
        path = save_samples(images, labels, logger.get_dir(), save_png=args.save_png)
        logger.log(f"saved {len(images)} samples to {path}")
    dist.barrier()
    logger.log("sampling complete")


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        model_path="",
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_sampling_flags(parser)
    return parser


if __name__ == "__main__":
    main()
