"""
Like image_sample.py, but guided by a noised-image classifier (ADM-G): the
gradient of log p(y | x_t), times --classifier_scale, steers every step towards
the target labels. The model may be class-conditional or unconditional.

Single process:  python scripts/classifier_sample.py $MODEL_FLAGS --classifier_scale 1.0 \\
                     --classifier_path CLASSIFIER.pt --model_path MODEL.pt --num_samples 100
Several:         mpiexec -n 8 python scripts/classifier_sample.py ...   (or torchrun)
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
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    flags_for,
    model_and_diffusion_defaults,
    parse_args_with_config,
)


def main():
    args = parse_args_with_config(create_argparser(), purpose="sample")
    if not args.classifier_path:
        raise ValueError(
            "--classifier_path is empty: classifier guidance needs the noised-image classifier "
            "(e.g. models/256x256_classifier.pt); to sample without it use image_sample.py"
        )
    start_sampling(args)

    logger.log("creating model and diffusion...")
    model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(**model_flags)
    load_for_sampling(
        model, args.model_path, model_flags, use_fp16=args.use_fp16, channels_last=args.channels_last
    )

    logger.log("loading classifier...")
    classifier_flags = args_to_dict(args, classifier_defaults().keys())
    classifier = create_classifier(**classifier_flags)
    load_for_sampling(
        classifier,
        args.classifier_path,
        classifier_flags,
        flag_name="--classifier_path",
        use_fp16=args.classifier_use_fp16,
        channels_last=args.channels_last,
    )

    logger.log("sampling...")
    images, labels = sample(
        model, diffusion, classifier=classifier, device=dist_util.dev(), **flags_for(sample, args)
    )
    finish_sampling(images, labels, args.save_png)


def create_argparser():
    defaults = dict(sampling_defaults(), classifier_path="", classifier_scale=1.0)
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    return sampling_argparser(__doc__, defaults)


if __name__ == "__main__":
    main()
