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

from guided_diffusion import dist_util, logger, sampling, script_util


def main():
    args = script_util.parse_args_with_config(create_argparser(), purpose="sample")
    base_images, base_labels = sampling.read_base_samples(
        args.base_samples, args.small_size, args.class_cond
    )
    sampling.start_sampling(args)
    partial = sampling.partial_samples(args)
    logger.log("creating model...")
    model, diffusion = sampling.load_model_and_diffusion(
        args,
        script_util.sr_create_model_and_diffusion,
        script_util.sr_model_and_diffusion_defaults(),
    )
    logger.log(f"upsampling {len(base_images)} base samples...")
    order = np.arange(args.num_samples) % len(base_images)
    images, labels = sampling.sample(
        model,
        diffusion,
        low_res=base_images[order],
        labels=None if base_labels is None else base_labels[order],
        device=dist_util.dev(),
        partial=partial,
        **script_util.flags_for(sampling.sample, args),
    )
    sampling.finish_sampling(images, labels, args.save_png, partial)


def create_argparser():
    defaults = dict(sampling.sampling_defaults(), base_samples="")
    defaults.update(script_util.sr_model_and_diffusion_defaults())
    return sampling.sampling_argparser(__doc__, defaults, guidance=False)


if __name__ == "__main__":
    main()
