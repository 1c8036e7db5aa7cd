"""
Train a diffusion model on images.

One process: python scripts/image_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS
Several:     mpiexec -n 8 python scripts/image_train.py ...
             torchrun --nproc_per_node 8 scripts/image_train.py ...
"""

from guided_diffusion import logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import (
    args_to_dict,
    create_model_and_diffusion,
    flags_for,
    model_and_diffusion_defaults,
    parse_args_with_config,
)
from guided_diffusion.train_util import run_training, start_training, training_argparser, training_defaults


def main():
    args = parse_args_with_config(create_argparser(), purpose="train")
    start_training(args)
    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, model_and_diffusion_defaults().keys())
    )
    logger.log("creating data loader...")
    data = load_data(**flags_for(load_data, args))
    run_training(args, model, diffusion, data)


def create_argparser():
    return training_argparser(__doc__, {**training_defaults(), **model_and_diffusion_defaults()})


if __name__ == "__main__":
    main()
