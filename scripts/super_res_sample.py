"""
Upsample low-resolution samples (ADM-U): every image of --base_samples (a
samples_NxHxWx3.npz with the labels as arr_1 for a class-conditional model)
conditions one high-resolution sample; with more --num_samples than base
images the base images are used again in order.

Single process:  python scripts/super_res_sample.py $MODEL_FLAGS --model_path 64_256_upsampler.pt \\
                     --base_samples samples_100x64x64x3.npz --num_samples 100
Several:         mpiexec -n 8 python scripts/super_res_sample.py ...   (or torchrun)
"""

import argparse

import numpy as np
import torch.distributed as dist

from guided_diffusion import dist_util, logger
from guided_diffusion.sampling import (
    add_sampling_flags,
    check_counts,
    check_seed,
    load_for_sampling,
    read_base_samples,
    sample,
    save_samples,
)
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    parse_args_with_config,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


def main():
    args = parse_args_with_config(create_argparser(), purpose="sample")
    check_counts(num_samples=args.num_samples, batch_size=args.batch_size)
    check_seed(args.seed)
    base_images, base_labels = read_base_samples(args.base_samples, args.small_size, args.class_cond)

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None, comm=logger.TorchDistComm())

    logger.log("creating model...")
    model_flags = args_to_dict(args, sr_model_and_diffusion_defaults().keys())
    model, diffusion = sr_create_model_and_diffusion(**model_flags)
    load_for_sampling(model, args.model_path, model_flags, use_fp16=args.use_fp16)

    logger.log(f"upsampling {len(base_images)} base samples...")
    order = np.arange(args.num_samples) % len(base_images)
    images, labels = sample(
        model,
        diffusion,
        low_res=base_images[order],
        labels=None if base_labels is None else base_labels[order],
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        use_ddim=args.use_ddim,
        clip_denoised=args.clip_denoised,
        seed=args.seed,
        device=dist_util.dev(),
        num_classes=args.num_classes if args.class_cond else None,
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
        base_samples="",
        model_path="",
    )
    defaults.update(sr_model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_sampling_flags(parser, guidance=False)
    return parser


if __name__ == "__main__":
    main()
