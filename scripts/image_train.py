"""
Train a diffusion model on images.

One process: python scripts/image_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS
Several:     mpiexec -n 8 python scripts/image_train.py ...
             torchrun --nproc_per_node 8 scripts/image_train.py ...
"""

from guided_diffusion import logger, script_util, train_util
from guided_diffusion.image_datasets import load_data


def main():
    args = script_util.parse_args_with_config(create_argparser(), purpose="train")
    train_util.start_training(args)
    logger.log("creating model and diffusion...")
    model, diffusion = script_util.create_model_and_diffusion(
        **script_util.args_to_dict(args, script_util.model_and_diffusion_defaults().keys())
    )
    logger.log("creating data loader...")
    data = load_data(**script_util.flags_for(load_data, args))
    train_util.run_training(args, model, diffusion, data)


def create_argparser():
    defaults = dict(train_util.training_defaults(), **script_util.model_and_diffusion_defaults())
    return train_util.training_argparser(__doc__, defaults)


if __name__ == "__main__":
    main()
