"""
Train a super-resolution diffusion model: the low-resolution input is the
high-resolution batch area-downsampled to --small_size.

python scripts/super_res_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS
(with mpiexec -n N or torchrun --nproc_per_node N for several processes)
"""

from guided_diffusion import command_line, logger, script_util
from guided_diffusion.image_datasets import load_superres_data


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="train", argv=argv)
    command_line.start_training(args)
    logger.log("creating model...")
    model, diffusion = script_util.sr_create_model_and_diffusion(
        **script_util.args_to_dict(args, script_util.sr_model_and_diffusion_defaults().keys())
    )
    logger.log("creating data loader...")
    data = load_superres_data(
        large_size=args.large_size,
        small_size=args.small_size,
        **command_line.data_kwargs(args, image_size=False),
    )
    command_line.run_training(
        args, model, diffusion, data,
        **command_line.training_loop_kwargs(args, diffusion), **command_line.diffusion_loop_kwargs(args),
    )


def create_argparser():
    defaults = dict(command_line.training_defaults(), **script_util.sr_model_and_diffusion_defaults())
    return command_line.training_argparser(__doc__, defaults)


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
