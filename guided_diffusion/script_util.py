"""
Flag defaults and factories that turn flat flag dicts into models and diffusions,
with the original code base's names, arguments and defaults.
"""

import argparse
import inspect

from . import gaussian_diffusion as gd
from .checkpoint import NON_ARCHITECTURE_FLAGS, load_for_inference
from .download import fetch_and_load
from .flag_checks import CLASSIFIER_HEAD_CHANNELS, check_classifier_width, check_image_size
from .presets import load_config, read_preset  # noqa: F401
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

# Channel multipliers of the released models, by image side.
_RELEASED_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
_RELEASED_SR_CHANNEL_MULT = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
}

# Flags that a builder's argument names differently (see _build).
_BUILDER_ARGUMENT_NAMES = {"diffusion_steps": "steps"}


def diffusion_defaults():
    """
    Defaults for the Gaussian diffusion flags.
    """
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    """
    Defaults for the noised-image classifier flags.
    """
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # 16
        classifier_use_scale_shift_norm=True,  # False
        classifier_resblock_updown=True,  # False
        classifier_pool="attention",
        num_classes=NUM_CLASSES,
    )


def model_and_diffusion_defaults():
    """
    Defaults for image training: the UNet flags plus the diffusion flags.
    """
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        class_dropout_prob=0.0,
        num_classes=NUM_CLASSES,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults():
    """
    Defaults for classifier training: the classifier flags plus the diffusion flags.
    """
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def sr_model_and_diffusion_defaults():
    """
    Defaults for super-resolution: the UNet and diffusion flags that
    sr_create_model_and_diffusion takes, with large_size and small_size instead of
    image_size.
    """
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    accepted = inspect.getfullargspec(sr_create_model_and_diffusion).args
    return {name: value for name, value in res.items() if name in accepted}


def default_channel_mult(image_size):
    """
    The channel multipliers for an image side: the released models' for 32, 64,
    128, 256 and 512; otherwise one level per halving down to a side of 4 to 8
    pixels (at most 7 levels), doubling the width every other level.

    :param image_size: side of the images.
    """
    if image_size in _RELEASED_CHANNEL_MULT:
        return _RELEASED_CHANNEL_MULT[image_size]
    side, levels = image_size, 1
    while side % 2 == 0 and side // 2 >= 4 and levels < 7:
        side //= 2
        levels += 1
    return tuple(min(2 ** ((level + 1) // 2), 8) for level in range(levels))


def parse_channel_mult(channel_mult, image_size):
    """
    Turn a --channel_mult value into a tuple of multipliers.

    :param channel_mult: "" for the default of `image_size`, a comma-separated
                         string such as "0.5,1,1,2,2,4,4", or a sequence.
    :param image_size: side of the images, for the default.
    """
    if isinstance(channel_mult, (tuple, list)):
        return tuple(channel_mult)
    if not channel_mult:
        return default_channel_mult(image_size)
    try:
        mults = tuple(float(part) for part in channel_mult.split(","))
    except ValueError:
        raise ValueError(
            f'--channel_mult "{channel_mult}": expected comma-separated numbers such as '
            '"1,2,3,4" or "0.5,1,1,2,2,4,4"'
        ) from None
    if any(mult <= 0 for mult in mults):
        raise ValueError(f'--channel_mult "{channel_mult}": every multiplier must be positive')
    return tuple(int(mult) if mult.is_integer() else mult for mult in mults)


def parse_attention_resolutions(attention_resolutions, image_size):
    """
    Turn a --attention_resolutions value (image sides, e.g. "32,16,8") into the
    downsampling rates the networks take (image_size // side).

    :param attention_resolutions: comma-separated sides, or "" for none.
    :param image_size: side of the images.
    """
    if not attention_resolutions:
        return ()
    rates = []
    for part in str(attention_resolutions).split(","):
        try:
            side = int(part)
        except ValueError:
            raise ValueError(
                f'--attention_resolutions "{attention_resolutions}": expected comma-separated '
                'integer resolutions such as "32,16,8"'
            ) from None
        if side <= 0 or image_size % side:
            raise ValueError(
                f"--attention_resolutions: {side} does not divide image_size={image_size}; "
                "each entry is the side of a feature map (image_size, image_size/2, ...)"
            )
        rates.append(image_size // side)
    return tuple(rates)


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    class_dropout_prob=0.0,
    num_classes=NUM_CLASSES,
):
    """
    Build a UNetModel and its diffusion from flags (see model_and_diffusion_defaults).

    :return: a (model, diffusion) pair.
    """
    flags = locals()
    diffusion = _build(create_gaussian_diffusion, flags)
    return _build(create_model, flags), diffusion


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    class_dropout_prob=0.0,
    num_classes=NUM_CLASSES,
):
    """
    Build the diffusion UNet from flags.

    :param image_size: side of the images.
    :param num_channels: base channel count.
    :param channel_mult: "" (default for image_size) or comma-separated multipliers.
    :param learn_sigma: output 6 channels (mean and variance interpolation).
    :param class_cond: add a class embedding for NUM_CLASSES classes.
    :param attention_resolutions: comma-separated feature-map sides with attention.
    :param class_dropout_prob: for classifier-free guidance, the probability with
                               which training replaces a label by the extra "null"
                               class NUM_CLASSES (the embedding then has
                               NUM_CLASSES + 1 rows); 0 keeps the released layout.
    :return: a UNetModel.
    """
    check_image_size(image_size)
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=num_label_embeddings(class_cond, class_dropout_prob, num_classes),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def num_label_embeddings(class_cond, class_dropout_prob=0.0, num_classes=NUM_CLASSES):
    """
    The number of rows of the class embedding: None for an unconditional model,
    num_classes, or num_classes + 1 when training with label dropout for
    classifier-free guidance (the last row is the "null" label, id num_classes).

    :param class_cond: whether the model is class-conditional.
    :param class_dropout_prob: the label dropout probability, in [0, 1).
    :param num_classes: the number of real classes.
    """
    if num_classes < 1:
        raise ValueError(f"--num_classes {num_classes}: expected a positive number of classes")
    if not 0.0 <= class_dropout_prob < 1.0:
        raise ValueError(f"--class_dropout_prob {class_dropout_prob}: expected a value in [0, 1)")
    if not class_cond:
        if class_dropout_prob:
            raise ValueError("--class_dropout_prob needs --class_cond True")
        return None
    return num_classes + 1 if class_dropout_prob > 0 else num_classes


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    num_classes=NUM_CLASSES,
):
    """
    Build a noised-image classifier and the diffusion it is trained on
    (see classifier_and_diffusion_defaults).

    :return: a (classifier, diffusion) pair.
    """
    flags = locals()
    diffusion = _build(create_gaussian_diffusion, flags)
    return _build(create_classifier, flags), diffusion


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
):
    """
    Build the noised-image classifier (an EncoderUNetModel over NUM_CLASSES
    classes, CLASSIFIER_HEAD_CHANNELS channels per attention head) from flags.

    :return: an EncoderUNetModel.
    """
    check_image_size(image_size)
    channel_mult = default_channel_mult(image_size)
    attention_rates = parse_attention_resolutions(classifier_attention_resolutions, image_size)
    check_classifier_width(classifier_width, classifier_depth, channel_mult, attention_rates)
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_rates,
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=CLASSIFIER_HEAD_CHANNELS,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
):
    """
    Build a super-resolution model and its diffusion from flags
    (see sr_model_and_diffusion_defaults).

    :return: a (model, diffusion) pair.
    """
    flags = locals()
    diffusion = _build(create_gaussian_diffusion, flags)
    return _build(sr_create_model, flags), diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
):
    """
    Build the super-resolution UNet (ADM-U) from flags.

    :param large_size: side of the output images.
    :param small_size: side of the conditioning images (upsampled inside the model).
    :return: a SuperResModel.
    """
    if small_size <= 0 or small_size > large_size:
        raise ValueError(
            f"small_size={small_size} must be positive and at most large_size={large_size}"
        )
    channel_mult = _RELEASED_SR_CHANNEL_MULT.get(large_size) or default_channel_mult(large_size)
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=num_label_embeddings(class_cond, 0.0, num_classes),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def _build(builder, flags):
    """
    Call a builder with the flags it takes: those of `flags` named in its signature,
    --diffusion_steps as create_gaussian_diffusion's `steps` (_BUILDER_ARGUMENT_NAMES).
    The model-and-diffusion factories forward their flags through this one place.

    :param builder: create_model, create_classifier, sr_create_model or
                    create_gaussian_diffusion.
    :param flags: a factory's arguments, by flag name.
    :return: what the builder returns.
    """
    accepted = inspect.signature(builder).parameters
    kwargs = {_BUILDER_ARGUMENT_NAMES.get(name, name): value for name, value in flags.items()}
    return builder(**{name: value for name, value in kwargs.items() if name in accepted})


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """
    Build the (possibly respaced) Gaussian diffusion from flags.

    :param steps: number of diffusion steps T of the training process.
    :param learn_sigma: the model predicts variances (LEARNED_RANGE); the loss then
                        adds the variational bound term (the hybrid objective).
    :param sigma_small: with fixed variances, use the posterior variance
                        (FIXED_SMALL) rather than beta (FIXED_LARGE).
    :param noise_schedule: "linear" or "cosine".
    :param use_kl: train on the variational bound alone (RESCALED_KL).
    :param predict_xstart: the model predicts x_0 rather than the noise.
    :param rescale_timesteps: feed the model timesteps scaled to [0, 1000).
    :param rescale_learned_sigmas: RESCALED_MSE (the vb term times T / 1000).
    :param timestep_respacing: "" (every step), "ddimN" or comma-separated counts.
    :return: a SpacedDiffusion.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(
            gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON
        ),
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def architecture_flags(flags):
    """
    Pick the flags that shape a network and its diffusion: the arguments of the three
    model-and-diffusion factories less checkpoint.NON_ARCHITECTURE_FLAGS. A checkpoint's
    recorded flags are compared with these; others (lr, log_dir, ...) may change.

    :param flags: a dict of any script's flags.
    :return: the dict of those of its flags that are architecture flags.
    """
    factories = (create_model_and_diffusion, create_classifier_and_diffusion,
                 sr_create_model_and_diffusion)
    names = set().union(*(inspect.signature(factory).parameters for factory in factories))
    names -= set(NON_ARCHITECTURE_FLAGS)
    return {name: value for name, value in flags.items() if name in names}


def build_preset(name, use_fp16=None, **overrides):
    """
    :return: (a preset's factory result with random weights, built for the precision it
        is to be converted to; the network in it; its flags; whether to convert to fp16).
    """
    preset = read_preset(name)
    kind = preset.get("kind")
    builders = {
        "diffusion": (model_and_diffusion_defaults(), create_model_and_diffusion, "use_fp16"),
        "super_res": (sr_model_and_diffusion_defaults(), sr_create_model_and_diffusion, "use_fp16"),
        "classifier": (classifier_defaults(), create_classifier, "classifier_use_fp16"),
    }
    if kind not in builders:
        raise ValueError(f"preset {name!r} has kind {kind!r}; expected one of {sorted(builders)}")
    defaults, factory, fp16_flag = builders[kind]
    args = {**defaults, **preset.get("flags", {}), **overrides}
    if use_fp16 is not None:
        args[fp16_flag] = use_fp16
    built = factory(**{flag: args[flag] for flag in defaults})
    return built, built if kind == "classifier" else built[0], args, args[fp16_flag]


def create_pretrained(name, path=None, device="cpu", use_fp16=None, **overrides):
    """
    Build a released model from its preset (build_preset) and load its weights for
    inference (checkpoint.load_for_inference: strict, eval mode).

    :param name: a preset name or JSON path (e.g. "256x256_diffusion").
    :param path: the checkpoint file, or None (the default): the preset's checkpoint_url,
        downloaded into the cache the first time (download.py).
    :param device: where to put the model.
    :param use_fp16: convert the torso to float16; None follows the preset.
    :param overrides: flags that replace the preset's (e.g. timestep_respacing="250").
    :return: (model, diffusion), or the classifier alone for a classifier preset.
    """
    built, network, args, fp16 = build_preset(name, use_fp16, **overrides)

    def load(checkpoint):
        load_for_inference(network, checkpoint, flags=architecture_flags(args), use_fp16=fp16,
                           device=device)

    if path is None:
        fetch_and_load(read_preset(name).get("checkpoint_url"), load, name)
    else:
        load(path)
    return built


def add_dict_to_argparser(parser, default_dict):
    """
    Add one --flag per entry of a dict of defaults; booleans parse with str2bool and
    None defaults parse as strings.

    :param parser: an argparse.ArgumentParser.
    :param default_dict: flag names to default values.
    """
    for name, value in default_dict.items():
        value_type = str if value is None else str2bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", default=value, type=value_type)


def args_to_dict(args, keys):
    """
    Pick the given attributes of a parsed argparse namespace into a dict.

    :param args: an argparse.Namespace.
    :param keys: attribute names.
    """
    return {name: getattr(args, name) for name in keys}


def str2bool(v):
    """
    Parse a boolean flag value ("yes"/"no", "true"/"false", "t"/"f", "y"/"n", "1"/"0").

    :param v: the flag's text, or a bool.
    """
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false, yes/no, 1/0), got {v!r}")
