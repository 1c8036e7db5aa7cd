"""
Generate a large batch of image samples from a model and save them as a large
numpy array (the evaluator's input), with a PNG grid of the first samples.

Single process:  python scripts/image_sample.py $MODEL_FLAGS --model_path MODEL.pt --num_samples 100
Several:         mpiexec -n 8 python scripts/image_sample.py ...   (or torchrun --nproc_per_node 8)
"""

from guided_diffusion import dist_util, logger, sampling, script_util


def main():
    args = script_util.parse_args_with_config(create_argparser(), purpose="sample")
    sampling.start_sampling(args)
    partial = sampling.partial_samples(args)
    logger.log("creating model and diffusion...")
    model, diffusion = sampling.load_model_and_diffusion(
        args, script_util.create_model_and_diffusion, script_util.model_and_diffusion_defaults()
    )
    logger.log("sampling...")
    images, labels = sampling.sample(
        model, diffusion, device=dist_util.dev(), partial=partial,
        **script_util.flags_for(sampling.sample, args)
    )
    sampling.finish_sampling(images, labels, args.save_png, partial)


def create_argparser():
    defaults = dict(sampling.sampling_defaults(), **script_util.model_and_diffusion_defaults())
    return sampling.sampling_argparser(__doc__, defaults)


if __name__ == "__main__":
    main()
