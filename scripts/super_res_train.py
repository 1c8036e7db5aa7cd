"""
Train a super-resolution diffusion model: the low-resolution input is the
high-resolution batch area-downsampled to --small_size.

python scripts/super_res_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS
(with mpiexec -n N or torchrun --nproc_per_node N for several processes)
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_superres_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    parse_args_with_config,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.train_util import TrainLoop, set_seed, training_defaults


def main():
    args = parse_args_with_config(create_argparser(), purpose="train")

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None, comm=logger.TorchDistComm())
    if args.seed is not None:
        set_seed(args.seed)

    logger.log("creating model...")
    model, diffusion = sr_create_model_and_diffusion(
        **args_to_dict(args, sr_model_and_diffusion_defaults().keys())
    )
    model.to(dist_util.dev())
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = load_superres_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        large_size=args.large_size,
        small_size=args.small_size,
        class_cond=args.class_cond,
        class_from=args.class_from,
        num_classes=args.num_classes,
        seed=args.seed,
        num_workers=args.num_workers,
    )

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        use_bf16=args.use_bf16,
        max_steps=args.max_steps,
        seed=args.seed,
        sample_interval=args.sample_interval,
        flags=vars(args),
        init_checkpoint=args.init_checkpoint,
    ).run_loop()


def create_argparser():
    defaults = training_defaults()
    defaults.update(sr_model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    parser.add_argument("--seed", type=int, default=None, help="seed all draws (default: none)")
    return parser


if __name__ == "__main__":
    main()
