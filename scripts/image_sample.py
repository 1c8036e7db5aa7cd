"""
Generate a large batch of image samples from a model and save them as a large
numpy array (the evaluator's input), with a PNG grid of the first samples.

Single process:  python scripts/image_sample.py $MODEL_FLAGS --model_path MODEL.pt --num_samples 100
Autoguidance:    ... --guide_model_path GUIDE.pt --guide_scale 2.0 [--guidance_interval LO,HI]
Several:         mpiexec -n 8 python scripts/image_sample.py ...   (or torchrun --nproc_per_node 8)
"""

from guided_diffusion import command_line, dist_util, logger, sampling, script_util


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="sample", argv=argv)
    command_line.start_sampling(args)
    partial = command_line.partial_samples(args)
    logger.log("creating model and diffusion...")
    respacing = command_line.sampling_respacing(args.timestep_respacing, args.sampler)
    factory, defaults = script_util.create_model_and_diffusion, script_util.model_and_diffusion_defaults()
    model, diffusion = command_line.load_model_and_diffusion(args, factory, defaults, respacing, args.sampler)
    guide = command_line.load_guide(args, factory, defaults, model)
    logger.log("sampling...")
    run = sampling.SamplingRun(
        model, diffusion, guide=guide, device=dist_util.dev(), partial=partial,
        **command_line.sample_kwargs(args)
    )
    command_line.write_samples(run, args.save_png, args.overwrite)


def create_argparser():
    defaults = dict(command_line.sampling_defaults(), **script_util.model_and_diffusion_defaults())
    return command_line.sampling_argparser(__doc__, defaults)


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
