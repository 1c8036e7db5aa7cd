"""
Like image_sample.py, but guided by a noised-image classifier (ADM-G): the
gradient of log p(y | x_t), times --classifier_scale, steers every step towards
the target labels. The model may be class-conditional or unconditional.

Single process:  python scripts/classifier_sample.py $MODEL_FLAGS --classifier_scale 1.0 \\
                     --classifier_path CLASSIFIER.pt --model_path MODEL.pt --num_samples 100
Several:         mpiexec -n 8 python scripts/classifier_sample.py ...   (or torchrun)
"""

from guided_diffusion import command_line, dist_util, logger, sampling, script_util


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="sample", argv=argv)
    if not args.classifier_path:
        raise ValueError(
            "--classifier_path is empty: classifier guidance needs the noised-image classifier "
            "(e.g. models/256x256_classifier.pt); to sample without it use image_sample.py"
        )
    command_line.start_sampling(args)
    partial = command_line.partial_samples(args)
    logger.log("creating model and diffusion...")
    respacing = command_line.sampling_respacing(args.timestep_respacing, args.sampler)
    factory, defaults = script_util.create_model_and_diffusion, script_util.model_and_diffusion_defaults()
    model, diffusion = command_line.load_model_and_diffusion(args, factory, defaults, respacing, args.sampler)
    guide = command_line.load_guide(args, factory, defaults, model)
    logger.log("loading classifier...")
    classifier_flags = script_util.args_to_dict(args, script_util.classifier_defaults().keys())
    classifier = command_line.load_for_sampling(
        script_util.create_classifier(**classifier_flags), args.classifier_path, "classifier_path",
        classifier_flags, args, use_fp16=args.classifier_use_fp16,
    )
    logger.log("sampling...")
    run = sampling.SamplingRun(
        model, diffusion, classifier=classifier, classifier_scale=args.classifier_scale, guide=guide,
        device=dist_util.dev(), partial=partial, **command_line.sample_kwargs(args),
    )
    command_line.write_samples(run, args.save_png, args.overwrite)


def create_argparser():
    defaults = dict(command_line.sampling_defaults(), classifier_path="", classifier_scale=1.0)
    defaults.update(script_util.model_and_diffusion_defaults())
    defaults.update(script_util.classifier_defaults())
    return command_line.sampling_argparser(__doc__, defaults)


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
