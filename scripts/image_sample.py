"""
Generate a large batch of image samples from a model and save them as a large
numpy array (the evaluator's input), with a PNG grid of the first samples.

Single process:  python scripts/image_sample.py $MODEL_FLAGS --model_path MODEL.pt --num_samples 100
Several:         mpiexec -n 8 python scripts/image_sample.py ...   (or torchrun --nproc_per_node 8)
"""

from guided_diffusion import dist_util, logger
from guided_diffusion.sampling import (
    finish_sampling,
    load_for_sampling,
    sample,
    sampling_argparser,
    sampling_defaults,
    start_sampling,
)
from guided_diffusion.script_util import (
    args_to_dict,
    create_model_and_diffusion,
    flags_for,
    model_and_diffusion_defaults,
    parse_args_with_config,
)


def main():
    args = parse_args_with_config(create_argparser(), purpose="sample")
    start_sampling(args)

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(**model_flags)
    load_for_sampling(
        model, args.model_path, model_flags, use_fp16=args.use_fp16, channels_last=args.channels_last
    )

    logger.log("sampling...")
    images, labels = sample(model, diffusion, device=dist_util.dev(), **flags_for(sample, args))
    finish_sampling(images, labels, args.save_png)


def create_argparser():
    return sampling_argparser(__doc__, {**sampling_defaults(), **model_and_diffusion_defaults()})


if __name__ == "__main__":
    main()
