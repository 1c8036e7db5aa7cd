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

from guided_diffusion import command_line, dist_util, logger, sampling, script_util


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="sample", argv=argv)
    base_images, base_labels = command_line.read_base_samples(
        args.base_samples, args.small_size, args.class_cond
    )
    command_line.start_sampling(args)
    partial = command_line.partial_samples(args)
    logger.log("creating model...")
    respacing = command_line.sampling_respacing(args.timestep_respacing, args.sampler)
    factory, defaults = script_util.sr_create_model_and_diffusion, script_util.sr_model_and_diffusion_defaults()
    model, diffusion = command_line.load_model_and_diffusion(args, factory, defaults, respacing, args.sampler)
    guide = command_line.load_guide(args, factory, defaults, model)
    logger.log(f"upsampling {len(base_images)} base samples...")
    order = np.arange(args.num_samples) % len(base_images)
    run = sampling.SamplingRun(
        model,
        diffusion,
        low_res=base_images[order],
        labels=None if base_labels is None else base_labels[order],
        guide=guide,
        device=dist_util.dev(),
        partial=partial,
        **command_line.sample_kwargs(args, guidance=False),
    )
    command_line.write_samples(run, args.save_png, args.overwrite)


def create_argparser():
    defaults = dict(command_line.sampling_defaults(), base_samples="")
    defaults.update(script_util.sr_model_and_diffusion_defaults())
    return command_line.sampling_argparser(__doc__, defaults, guidance=False)


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
