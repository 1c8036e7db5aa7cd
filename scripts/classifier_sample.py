"""
Like image_sample.py, but guided by a noised-image classifier (ADM-G): the
gradient of log p(y | x_t), times --classifier_scale, steers every step towards
the target labels. The model may be class-conditional or unconditional.

Single process:  python scripts/classifier_sample.py $MODEL_FLAGS --classifier_scale 1.0 \\
                     --classifier_path CLASSIFIER.pt --model_path MODEL.pt --num_samples 100
Several:         mpiexec -n 8 python scripts/classifier_sample.py ...   (or torchrun)
"""

from guided_diffusion import dist_util, logger, sampling, script_util


def main():
    args = script_util.parse_args_with_config(create_argparser(), purpose="sample")
    if not args.classifier_path:
        raise ValueError(
            "--classifier_path is empty: classifier guidance needs the noised-image classifier "
            "(e.g. models/256x256_classifier.pt); to sample without it use image_sample.py"
        )
    sampling.start_sampling(args)
    partial = sampling.partial_samples(args)
    logger.log("creating model and diffusion...")
    model, diffusion = sampling.load_model_and_diffusion(
        args, script_util.create_model_and_diffusion, script_util.model_and_diffusion_defaults()
    )
    logger.log("loading classifier...")
    classifier_flags = script_util.args_to_dict(args, script_util.classifier_defaults().keys())
    classifier = sampling.load_for_sampling(
        script_util.create_classifier(**classifier_flags),
        args.classifier_path,
        classifier_flags,
        flag_name="--classifier_path",
        use_fp16=args.classifier_use_fp16,
        channels_last=args.channels_last,
    )
    logger.log("sampling...")
    images, labels = sampling.sample(
        model, diffusion, classifier=classifier, device=dist_util.dev(),
        partial=partial,
        **script_util.flags_for(sampling.sample, args),
    )
    sampling.finish_sampling(images, labels, args.save_png, partial)


def create_argparser():
    defaults = dict(sampling.sampling_defaults(), classifier_path="", classifier_scale=1.0)
    defaults.update(script_util.model_and_diffusion_defaults())
    defaults.update(script_util.classifier_defaults())
    return sampling.sampling_argparser(__doc__, defaults)


if __name__ == "__main__":
    main()
