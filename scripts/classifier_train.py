"""
Train a noised-image classifier (for classifier guidance) on labelled images.

python scripts/classifier_train.py --data_dir DIR --val_data_dir VAL $CLASSIFIER_FLAGS $TRAIN_FLAGS
(with mpiexec -n N or torchrun --nproc_per_node N for several processes)
"""

from guided_diffusion import command_line, logger, script_util
from guided_diffusion.classifier_train_util import ClassifierTrainLoop
from guided_diffusion.image_datasets import load_data


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="train", argv=argv)
    if args.val_data_dir and args.labels_file:
        raise ValueError(f"--labels_file {args.labels_file} labels the --data_dir images only, "
                         f"not those of --val_data_dir {args.val_data_dir}: drop --val_data_dir")
    command_line.start_training(args)
    logger.log("creating model and diffusion...")
    model, diffusion = script_util.create_classifier_and_diffusion(
        **script_util.args_to_dict(args, script_util.classifier_and_diffusion_defaults().keys())
    )
    logger.log("creating data loader...")
    data_flags = command_line.data_kwargs(args, class_cond=True)
    data = load_data(**data_flags, random_crop=True)
    val_data = None
    if args.val_data_dir:
        # Validation labels index the training classes (a class missing there keeps its label).
        val_data = load_data(
            **dict(data_flags, data_dir=args.val_data_dir, class_names=data.class_names)
        )
    command_line.run_training(
        args, model, diffusion, data, loop_class=ClassifierTrainLoop, val_data=val_data,
        noised=args.noised, iterations=args.iterations, anneal_lr=args.anneal_lr,
        eval_interval=args.eval_interval, use_fp16=args.classifier_use_fp16,
        **command_line.training_loop_kwargs(args, diffusion),
    )


def create_argparser():
    defaults = {name: value for name, value in command_line.training_defaults().items()
                if name not in command_line.DIFFUSION_TRAINING_FLAGS}
    defaults.update(  # the original's classifier flags, learning rate and batch size
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        anneal_lr=False,
        batch_size=4,
        eval_interval=5,
    )
    defaults.update(script_util.classifier_and_diffusion_defaults())
    return command_line.training_argparser(__doc__, defaults)


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
