"""
Like image_sample.py, but guided by a noised-image classifier (ADM-G): the
gradient of log p(y | x_t), times --classifier_scale, steers every step towards
the target labels. The model may be class-conditional or unconditional.

Single process:  python scripts/classifier_sample.py $MODEL_FLAGS --classifier_scale 1.0 \\
                     --classifier_path CLASSIFIER.pt --model_path MODEL.pt --num_samples 100
Several:         mpiexec -n 8 python scripts/classifier_sample.py ...   (or torchrun)
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
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_config,
)


def main():
    args = parse_args_with_config(create_argparser(), purpose="sample")
    check_counts(num_samples=args.num_samples, batch_size=args.batch_size)
    check_seed(args.seed)
    if not args.classifier_path:
        raise ValueError(
            "--classifier_path is empty: classifier guidance needs the noised-image classifier "
            "(e.g. models/256x256_classifier.pt); to sample without it use image_sample.py"
        )

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None, comm=logger.TorchDistComm())

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(**model_flags)
    load_for_sampling(model, args.model_path, model_flags, use_fp16=args.use_fp16)

    logger.log("loading classifier...")
    classifier_flags = args_to_dict(args, classifier_defaults().keys())
    classifier = create_classifier(**classifier_flags)
    load_for_sampling(
        classifier,
        args.classifier_path,
        classifier_flags,
        flag_name="--classifier_path",
        use_fp16=args.classifier_use_fp16,
    )

    logger.log("sampling...")
    images, labels = sample(
        model,
        diffusion,
        classifier=classifier,
        classifier_scale=args.classifier_scale,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        use_ddim=args.use_ddim,
        clip_denoised=args.clip_denoised,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        device=dist_util.dev(),
        num_classes=args.num_classes,
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
        classifier_path="",
        classifier_scale=1.0,
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_sampling_flags(parser)
    return parser


if __name__ == "__main__":
    main()
