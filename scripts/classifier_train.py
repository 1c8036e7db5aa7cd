"""
Train a noised-image classifier (for classifier guidance) on labelled images.

python scripts/classifier_train.py --data_dir DIR --val_data_dir VAL $CLASSIFIER_FLAGS $TRAIN_FLAGS
(with mpiexec -n N or torchrun --nproc_per_node N for several processes)
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    parse_args_with_config,
)
from guided_diffusion.train_util import ClassifierTrainLoop, set_seed


def main():
    args = parse_args_with_config(create_argparser(), purpose="train")

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None, comm=logger.TorchDistComm())
    if args.seed is not None:
        set_seed(args.seed)

    logger.log("creating model and diffusion...")
    model, diffusion = create_classifier_and_diffusion(
        **args_to_dict(args, classifier_and_diffusion_defaults().keys())
    )
    model.to(dist_util.dev())

    logger.log("creating data loader...")
    data_flags = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        class_from=args.class_from,
        num_classes=args.num_classes,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    data = load_data(data_dir=args.data_dir, random_crop=True, **data_flags)
    val_data = load_data(data_dir=args.val_data_dir, **data_flags) if args.val_data_dir else None

    logger.log("training classifier model...")
    ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        noised=args.noised,
        iterations=args.iterations,
        anneal_lr=args.anneal_lr,
        eval_interval=args.eval_interval,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.classifier_use_fp16,
        use_bf16=args.use_bf16,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay,
        seed=args.seed,
        flags=vars(args),
        init_checkpoint=args.init_checkpoint,
    ).run_loop()


def create_argparser():
    defaults = dict(
        data_dir="",
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
        # Not in the original:
        log_dir="",  # default: $OPENAI_LOGDIR, else a new folder in the temp directory
        use_bf16=False,
        class_from="prefix",  # labels from the file-name prefix or the sub-folder ("folder")
        num_workers=1,
        init_checkpoint="",  # start a new run from these weights
    )
    defaults.update(classifier_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    parser.add_argument("--seed", type=int, default=None, help="seed all draws (default: none)")
    return parser


if __name__ == "__main__":
    main()
