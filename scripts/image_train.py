"""
Train a diffusion model on images.

One process: python scripts/image_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS
Several:     mpiexec -n 8 python scripts/image_train.py ...
             torchrun --nproc_per_node 8 scripts/image_train.py ...
"""

from guided_diffusion import command_line, logger, script_util
from guided_diffusion.image_datasets import load_data


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="train", argv=argv)
    command_line.start_training(args)
    logger.log("creating model and diffusion...")
    model, diffusion = script_util.create_model_and_diffusion(
        **script_util.args_to_dict(args, script_util.model_and_diffusion_defaults().keys())
    )
    logger.log("creating data loader...")
    data = load_data(**command_line.data_kwargs(args))
    command_line.run_training(
        args, model, diffusion, data,
        **command_line.training_loop_kwargs(args, diffusion), **command_line.diffusion_loop_kwargs(args),
        class_dropout_prob=args.class_dropout_prob,
    )


def create_argparser():
    defaults = dict(command_line.training_defaults(), **script_util.model_and_diffusion_defaults())
    return command_line.training_argparser(__doc__, defaults)


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
