"""
Upsample low-resolution samples (ADM-U): every image of --base_samples (a
samples_NxHxWx3.npz with the labels as arr_1 for a class-conditional model)
conditions one high-resolution sample; with more --num_samples than base
images the base images are used again in order.

Single process:  python scripts/super_res_sample.py $MODEL_FLAGS --model_path 64_256_upsampler.pt \\
                     --base_samples samples_100x64x64x3.npz --num_samples 100
Several:         mpiexec -n 8 python scripts/super_res_sample.py ...   (or torchrun)
"""

import numpy as np

from guided_diffusion import dist_util, logger
from guided_diffusion.sampling import (
    finish_sampling,
    load_for_sampling,
    read_base_samples,
    sample,
    sampling_argparser,
    sampling_defaults,
    start_sampling,
)
from guided_diffusion.script_util import (
    args_to_dict,
    flags_for,
    parse_args_with_config,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


def main():
    args = parse_args_with_config(create_argparser(), purpose="sample")
    base_images, base_labels = read_base_samples(args.base_samples, args.small_size, args.class_cond)
    start_sampling(args)

    logger.log("creating model...")
    model_flags = args_to_dict(args, sr_model_and_diffusion_defaults().keys())
    model, diffusion = sr_create_model_and_diffusion(**model_flags)
    load_for_sampling(
        model, args.model_path, model_flags, use_fp16=args.use_fp16, channels_last=args.channels_last
    )

    logger.log(f"upsampling {len(base_images)} base samples...")
    order = np.arange(args.num_samples) % len(base_images)
    images, labels = sample(
        model,
        diffusion,
        low_res=base_images[order],
        labels=None if base_labels is None else base_labels[order],
        device=dist_util.dev(),
        **flags_for(sample, args),
    )
    finish_sampling(images, labels, args.save_png)


def create_argparser():
    defaults = dict(sampling_defaults(), base_samples="")
    defaults.update(sr_model_and_diffusion_defaults())
    return sampling_argparser(__doc__, defaults, guidance=False)


if __name__ == "__main__":
    main()
