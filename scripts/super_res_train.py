"""
Train a super-resolution diffusion model: the low-resolution input is the
high-resolution batch area-downsampled to --small_size.

python scripts/super_res_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS
(with mpiexec -n N or torchrun --nproc_per_node N for several processes)
"""

from guided_diffusion import logger
from guided_diffusion.image_datasets import load_data, load_superres_data
from guided_diffusion.script_util import (
    args_to_dict,
    flags_for,
    parse_args_with_config,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.train_util import run_training, start_training, training_argparser, training_defaults


def main():
    args = parse_args_with_config(create_argparser(), purpose="train")
    start_training(args)
    logger.log("creating model...")
    model, diffusion = sr_create_model_and_diffusion(
        **args_to_dict(args, sr_model_and_diffusion_defaults().keys())
    )
    logger.log("creating data loader...")
    data = load_superres_data(
        large_size=args.large_size, small_size=args.small_size, **flags_for(load_data, args)
    )
    run_training(args, model, diffusion, data)


def create_argparser():
    return training_argparser(__doc__, {**training_defaults(), **sr_model_and_diffusion_defaults()})


if __name__ == "__main__":
    main()
