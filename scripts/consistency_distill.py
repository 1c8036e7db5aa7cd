"""
Distill a diffusion model into a consistency model (consistency distillation, Song et al. 2023).

python scripts/consistency_distill.py --teacher_model_path TEACHER.pt --data_dir DIR $MODEL_FLAGS $TRAIN_FLAGS
python scripts/consistency_distill.py --teacher_config 64x64_diffusion --data_dir DIR $TRAIN_FLAGS
(with mpiexec -n N or torchrun --nproc_per_node N for several processes)

The student has the teacher's architecture (the model flags, or --teacher_config's preset,
which also gives the teacher's path) and starts from its weights. With --classifier_path and
--classifier_scale > 0 the teacher's ODE steps are classifier-guided; an unconditional
teacher then gets a class-conditional student (--class_cond is set to True: its label
embedding starts at zero) and batches carry labels. --cfg_scale guides a teacher trained with
--class_dropout_prob > 0 classifier-free. --num_scales 0 uses iCT's doubling schedule over
--max_steps. The teacher's x_0 predictions are clamped to [-1, 1] in its ODE steps, as ADM's
samplers do (--clip_denoised False: not). The checkpoints record the flags and
consistency_student=True; each save also writes target_NNNNNN.pt, the target network that
--resume_checkpoint continues with.
"""

from guided_diffusion import command_line, logger, script_util
from guided_diffusion.consistency import init_student
from guided_diffusion.consistency_train_util import (
    ConsistencyTrainLoop, check_consistency_arguments, without_labels,
)
from guided_diffusion.guidance import (
    check_classifier, check_classifier_free, classifier_cond_fn, classifier_free_model,
)
from guided_diffusion.image_datasets import load_data
from guided_diffusion.presets import load_config, read_preset

# The training flags that only a diffusion model's previews use (a student previews 1 and 2 steps).
PREVIEW_FLAGS = ("sampler", "steps")


def main(argv=None):
    args = parse_args(argv)
    check_consistency_arguments(args.num_scales, args.target_ema, args.teacher_solver, args.loss,
                                args.weighting, args.max_steps)
    command_line.start_training(args)
    guided = bool(args.classifier_path) and args.classifier_scale != 0
    logger.log("loading the teacher...")
    teacher, diffusion = load_teacher(args, class_cond=args.class_cond)
    student_class_cond = args.class_cond or guided
    if student_class_cond != args.class_cond:
        logger.log("classifier guidance of an unconditional teacher: the student is class-conditional "
                   "(--class_cond True)")
    student, _ = script_util.create_model_and_diffusion(**model_flags(args, student_class_cond))
    init_student(student, teacher.state_dict())
    data = load_data(**command_line.data_kwargs(args, class_cond=student_class_cond))
    flags = dict(vars(args), class_cond=student_class_cond, consistency_student=True)
    loop_kwargs = dict(command_line.training_loop_kwargs(args, diffusion), flags=flags,
                       model_flags=script_util.architecture_flags(flags))
    command_line.run_training(
        args, student, diffusion, data, loop_class=ConsistencyTrainLoop,
        teacher=guided_teacher(args, teacher), cond_fn=load_cond_fn(args) if guided else None,
        num_scales=args.num_scales, target_ema=args.target_ema, teacher_solver=args.teacher_solver,
        loss=args.loss, weighting=args.weighting, clip_denoised=args.clip_denoised, ema_rate=args.ema_rate,
        use_fp16=args.use_fp16, fp16_scale_growth=args.fp16_scale_growth, lr_anneal_steps=args.lr_anneal_steps,
        max_steps=args.max_steps, sample_interval=args.sample_interval, **loop_kwargs,
    )


def model_flags(args, class_cond=None):
    """:return: the model_and_diffusion flags of args (class_cond replaced if given)."""
    flags = script_util.args_to_dict(args, script_util.model_and_diffusion_defaults().keys())
    return flags if class_cond is None else dict(flags, class_cond=class_cond)


def load_teacher(args, class_cond):
    """
    :return: (the teacher built from the model flags with --teacher_model_path loaded, frozen;
        its diffusion).
    """
    flags = model_flags(args, class_cond)
    teacher, diffusion = script_util.create_model_and_diffusion(**flags)
    try:
        command_line.load_for_sampling(teacher, args.teacher_model_path, "teacher_model_path", flags, args,
                                       use_fp16=False)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"--teacher_model_path {args.teacher_model_path}: {error}") from None
    return teacher, diffusion


def guided_teacher(args, teacher):
    """
    :return: the teacher as the loss calls it: classifier-free guided with --cfg_scale, or
        without the labels a class-conditional student's batches carry when it is unconditional.
    """
    if args.cfg_scale is not None:
        return classifier_free_model(teacher, args.cfg_scale,
                                     check_classifier_free(teacher, args.cfg_scale, args.num_classes))
    return teacher if teacher.num_classes is not None else without_labels(teacher)


def load_cond_fn(args):
    """:return: the classifier guidance of --classifier_path at --classifier_scale."""
    flags = dict(script_util.args_to_dict(args, script_util.classifier_defaults().keys()),
                 num_classes=args.num_classes)
    try:
        classifier = command_line.load_for_sampling(
            script_util.create_classifier(**flags), args.classifier_path, "classifier_path", flags, args,
            use_fp16=args.classifier_use_fp16)
        check_classifier(classifier, args.image_size, args.num_classes)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"--classifier_path {args.classifier_path} does not guide this model "
                         f"(--image_size {args.image_size}, --num_classes {args.num_classes}): {error}") from None
    return classifier_cond_fn(classifier, args.classifier_scale)


def parse_args(argv=None):
    """
    :return: the parsed flags, --teacher_config's preset giving the defaults of the model
        flags and of --teacher_model_path; --teacher_model_path required.
    """
    parser = create_argparser()
    known, _ = parser.parse_known_args(argv)
    if known.teacher_config:
        try:
            preset = load_config(known.teacher_config, purpose="sample")
            # A teacher checkpoint that is not there is downloaded from the preset's URL.
            command_line.note_checkpoint_urls(preset, read_preset(known.teacher_config))
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--teacher_config {known.teacher_config}: {error}") from None
        architecture = script_util.model_and_diffusion_defaults().keys()
        parser.set_defaults(**{name: value for name, value in preset.items() if name in architecture},
                            teacher_model_path=preset.get("model_path", ""))
    args = parser.parse_args(argv)
    if not args.teacher_model_path:
        raise ValueError("--teacher_model_path is empty: pass the teacher's checkpoint (a model of "
                         "image_train.py), or --teacher_config PRESET, whose preset sets it")
    return args


def create_argparser():
    defaults = {name: value for name, value in command_line.training_defaults().items()
                if name not in PREVIEW_FLAGS}
    defaults.update(script_util.model_and_diffusion_defaults())
    defaults.update(script_util.classifier_defaults())
    defaults.update(
        teacher_model_path="",  # the teacher's checkpoint (its architecture: the model flags)
        teacher_config="",  # a preset (configs/) giving the model flags and the teacher's path
        classifier_path="",  # a noised-image classifier guiding the teacher's steps
        classifier_scale=0.0,  # its guidance scale (0: no classifier)
        num_scales=18,  # N noise levels (CM's CD: 18 on CIFAR-10, 40 on ImageNet 64); 0: iCT's schedule
        teacher_solver="heun",  # heun, ddim or dpmpp_2m
        loss="pseudo_huber",  # l2 or pseudo_huber
        target_ema=0.95,  # mu, the target network's EMA rate of the student (CM's CD: 0.95)
        weighting="uniform",  # uniform or ict
        clip_denoised=True,  # clamp the teacher's x_0 to [-1, 1] in its ODE steps, as its samplers do
    )
    parser = command_line.training_argparser(__doc__, defaults)
    parser.add_argument("--cfg_scale", type=float, default=None,
                        help="classifier-free guidance of a teacher trained with --class_dropout_prob > 0")
    return parser


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
