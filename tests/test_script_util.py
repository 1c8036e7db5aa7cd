import argparse
import functools
import inspect

import pytest
import torch as th

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.acceleration import acceleration_defaults, configure_runtime
from guided_diffusion import script_util as su


def test_defaults_are_the_originals():
    assert su.NUM_CLASSES == 1000
    assert su.diffusion_defaults() == dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )
    model = su.model_and_diffusion_defaults()
    assert model["num_channels"] == 128 and model["num_heads"] == 4
    assert model["attention_resolutions"] == "16,8" and model["use_scale_shift_norm"] is True
    assert su.classifier_defaults()["classifier_pool"] == "attention"
    assert set(su.classifier_and_diffusion_defaults()) == set(su.classifier_defaults()) | set(
        su.diffusion_defaults()
    )
    sr = su.sr_model_and_diffusion_defaults()
    assert sr["large_size"] == 256 and sr["small_size"] == 64
    assert "image_size" not in sr and "channel_mult" not in sr


@pytest.mark.parametrize(
    "size, expected",
    [
        (512, (0.5, 1, 1, 2, 2, 4, 4)),
        (256, (1, 1, 2, 2, 4, 4)),
        (128, (1, 1, 2, 3, 4)),
        (64, (1, 2, 3, 4)),
        (32, (1, 2, 2, 2)),
        (16, (1, 2, 2)),
        (8, (1, 2)),
    ],
)
def test_default_channel_mult(size, expected):
    assert su.default_channel_mult(size) == expected
    assert size % 2 ** (len(expected) - 1) == 0


def test_parse_channel_mult_accepts_halves_and_rejects_garbage():
    assert su.parse_channel_mult("0.5,1,1,2", 64) == (0.5, 1, 1, 2)
    assert su.parse_channel_mult("", 64) == (1, 2, 3, 4)
    with pytest.raises(ValueError, match='--channel_mult "1,x"'):
        su.parse_channel_mult("1,x", 64)
    with pytest.raises(ValueError, match="positive"):
        su.parse_channel_mult("1,0", 64)


def test_half_channel_mult_builds_model():
    model = su.create_model(16, 64, 1, channel_mult="0.5,1", attention_resolutions="8")
    assert model.input_blocks[0][0].out_channels == 32


def test_attention_resolutions_are_converted_to_rates():
    assert su.parse_attention_resolutions("32,16,8", 256) == (8, 16, 32)
    with pytest.raises(ValueError, match="does not divide"):
        su.parse_attention_resolutions("24", 64)
    with pytest.raises(ValueError, match="integer resolutions"):
        su.parse_attention_resolutions("a,b", 64)


def test_argparser_round_trip_and_str2bool():
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, dict(lr=1e-4, steps=10, flag=False, name=None, text="a"))
    args = parser.parse_args(["--flag", "yes", "--steps", "3", "--name", "x"])
    assert su.args_to_dict(args, ["lr", "steps", "flag", "name", "text"]) == dict(
        lr=1e-4, steps=3, flag=True, name="x", text="a"
    )
    assert su.str2bool("F") is False and su.str2bool("1") is True
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        su.str2bool("maybe")


def test_create_gaussian_diffusion_selects_loss_and_variance_as_original():
    def make(**kwargs):
        return su.create_gaussian_diffusion(steps=100, **kwargs)

    assert make().loss_type == gd.LossType.MSE
    assert make(rescale_learned_sigmas=True).loss_type == gd.LossType.RESCALED_MSE
    assert make(use_kl=True).loss_type == gd.LossType.RESCALED_KL
    assert make(learn_sigma=True).model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert make(sigma_small=True).model_var_type == gd.ModelVarType.FIXED_SMALL
    assert make().model_var_type == gd.ModelVarType.FIXED_LARGE
    assert make(predict_xstart=True).model_mean_type == gd.ModelMeanType.START_X
    assert make(timestep_respacing="25").num_timesteps == 25


def test_create_model_and_diffusion_from_defaults():
    flags = su.model_and_diffusion_defaults()
    flags.update(image_size=32, num_channels=32, num_res_blocks=1, diffusion_steps=50)
    model, diffusion = su.create_model_and_diffusion(**flags)
    assert model.out_channels == 3 and model.num_classes is None
    assert diffusion.num_timesteps == 50


def test_classifier_and_sr_factories():
    flags = su.classifier_and_diffusion_defaults()
    flags.update(image_size=32, classifier_width=64, classifier_depth=1)
    classifier, diffusion = su.create_classifier_and_diffusion(**flags)
    assert classifier.out_channels == su.NUM_CLASSES
    flags = su.sr_model_and_diffusion_defaults()
    flags.update(large_size=32, small_size=8, num_channels=32, num_res_blocks=1)
    flags.update(attention_resolutions="8")
    model, _ = su.sr_create_model_and_diffusion(**flags)
    assert model.in_channels == 6
    with pytest.raises(ValueError, match="small_size=64"):
        su.sr_create_model(
            32, 64, 32, 1, False, False, False, "8", 1, -1, -1, True, 0.0, False, False
        )


def test_num_classes_and_class_dropout_shape_the_label_embedding():
    small = dict(image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8")
    assert su.create_model(**small, class_cond=True, num_classes=10).label_emb.num_embeddings == 10
    cfg = su.create_model(**small, class_cond=True, num_classes=10, class_dropout_prob=0.1)
    assert cfg.label_emb.num_embeddings == 11  # the last row is the null label 10
    assert not hasattr(su.create_model(**small), "label_emb")
    classifier = su.create_classifier(16, False, 64, 1, "8", True, True, "attention", num_classes=7)
    assert classifier.out_channels == 7
    with pytest.raises(ValueError, match="class_dropout_prob 1.5"):
        su.num_label_embeddings(True, 1.5)
    with pytest.raises(ValueError, match="needs --class_cond True"):
        su.num_label_embeddings(False, 0.2)
    with pytest.raises(ValueError, match="num_classes 0"):
        su.num_label_embeddings(True, 0.0, 0)


def test_fast_attention_is_a_runtime_switch_not_an_architecture_flag():
    for defaults in (su.model_and_diffusion_defaults(), su.classifier_defaults(),
                     su.sr_model_and_diffusion_defaults()):
        assert "fast_attention" not in defaults
    assert acceleration_defaults()["fast_attention"] is True
    flags = dict(su.model_and_diffusion_defaults(), image_size=8, num_channels=32,
                 num_res_blocks=1, attention_resolutions="4")
    model, _ = su.create_model_and_diffusion(**flags)
    attentions = [m for m in model.modules() if hasattr(m, "fast")]
    assert attentions and all(m.fast for m in attentions)  # the networks' default
    configure_runtime(model, fast_attention=False)
    assert not any(m.fast for m in attentions)


def _tiny_classifier_flags(**changes):
    return dict(su.classifier_defaults(), image_size=8, classifier_depth=1, **changes)


def test_classifier_width_must_give_attention_multiples_of_64():
    # 8x8 images: channel_mult (1, 2); attention at side 4 and the middle block have 2 x 32.
    su.create_classifier(**_tiny_classifier_flags(
        classifier_width=32, classifier_attention_resolutions="4"))
    su.create_classifier(**_tiny_classifier_flags(
        classifier_width=64, classifier_attention_resolutions="8"))
    with pytest.raises(ValueError, match=(
        "classifier_width=32: .*64 channels per head, so classifier_width times the channel "
        "multiplier of every level with attention must be a multiple of 64, but level 0 "
        r"\(x1\): 32\. Use a classifier_width that is a multiple of 64"
    )):
        su.create_classifier(**_tiny_classifier_flags(
            classifier_width=32, classifier_attention_resolutions="8"))
    with pytest.raises(ValueError, match=r"classifier_width=48: .*the middle block \(x2\): 96"):
        su.create_classifier(**_tiny_classifier_flags(
            classifier_width=48, classifier_attention_resolutions=""))


@pytest.mark.parametrize("image_size", [0, -8])
def test_factories_refuse_image_sizes_below_one(image_size):
    with pytest.raises(ValueError, match=f"image_size={image_size}: expected a positive number"):
        su.create_model(image_size, num_channels=32, num_res_blocks=1, channel_mult="1",
                        attention_resolutions="")
    with pytest.raises(ValueError, match=f"image_size={image_size}: expected a positive number"):
        su.create_classifier(**dict(_tiny_classifier_flags(), image_size=image_size))


# The original ADM's factory signatures: (name, default) per argument, in order.
_REQUIRED = object()
_ORIGINAL_SIGNATURES = {
    "create_model_and_diffusion": [
        "image_size", "class_cond", "learn_sigma", "num_channels", "num_res_blocks",
        "channel_mult", "num_heads", "num_head_channels", "num_heads_upsample",
        "attention_resolutions", "dropout", "diffusion_steps", "noise_schedule",
        "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps",
        "rescale_learned_sigmas", "use_checkpoint", "use_scale_shift_norm", "resblock_updown",
        "use_fp16", "use_new_attention_order", ("class_dropout_prob", 0.0),
        ("num_classes", su.NUM_CLASSES),
    ],
    "create_classifier_and_diffusion": [
        "image_size", "classifier_use_fp16", "classifier_width", "classifier_depth",
        "classifier_attention_resolutions", "classifier_use_scale_shift_norm",
        "classifier_resblock_updown", "classifier_pool", "learn_sigma", "diffusion_steps",
        "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps",
        "rescale_learned_sigmas", ("num_classes", su.NUM_CLASSES),
    ],
    "sr_create_model_and_diffusion": [
        "large_size", "small_size", "class_cond", "learn_sigma", "num_channels",
        "num_res_blocks", "num_heads", "num_head_channels", "num_heads_upsample",
        "attention_resolutions", "dropout", "diffusion_steps", "noise_schedule",
        "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps",
        "rescale_learned_sigmas", "use_checkpoint", "use_scale_shift_norm", "resblock_updown",
        "use_fp16", ("num_classes", su.NUM_CLASSES),
    ],
}


@pytest.mark.parametrize("name", sorted(_ORIGINAL_SIGNATURES))
def test_factory_signatures_are_the_originals(name):
    parameters = inspect.signature(getattr(su, name)).parameters.values()
    expected = [arg if isinstance(arg, tuple) else (arg, _REQUIRED)
                for arg in _ORIGINAL_SIGNATURES[name]]
    assert [(p.name, _REQUIRED if p.default is p.empty else p.default)
            for p in parameters] == expected
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters)


# Tiny flags for each factory, and for each of its flags a value that changes what it builds.
_TINY_FLAGS = {
    "create_model_and_diffusion": dict(
        su.model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1,
        attention_resolutions="4", class_cond=True, num_classes=10, diffusion_steps=40),
    "create_classifier_and_diffusion": dict(
        su.classifier_and_diffusion_defaults(), image_size=8, classifier_width=64,
        classifier_depth=1, classifier_attention_resolutions="4", num_classes=10,
        diffusion_steps=40),
    "sr_create_model_and_diffusion": dict(
        su.sr_model_and_diffusion_defaults(), large_size=8, small_size=4, num_channels=32,
        num_res_blocks=1, attention_resolutions="4", class_cond=True, num_classes=10,
        diffusion_steps=40),
}
_CHANGED_FLAGS = dict(
    image_size=16, large_size=16, class_cond=False, learn_sigma=True, num_channels=64,
    num_res_blocks=2, channel_mult="1,1", num_heads=2, num_head_channels=16,
    num_heads_upsample=2, attention_resolutions="8", dropout=0.1, diffusion_steps=30,
    noise_schedule="cosine", timestep_respacing="5", use_kl=True, predict_xstart=True,
    rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=True,
    use_scale_shift_norm=False, resblock_updown=True, use_fp16=True,
    use_new_attention_order=True, class_dropout_prob=0.1, num_classes=7,
    classifier_use_fp16=True, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="8", classifier_use_scale_shift_norm=False,
    classifier_resblock_updown=False, classifier_pool="adaptive",
)
_SIMPLE_TYPES = (bool, int, float, str, tuple, type(None), th.dtype)


def _fingerprint(built):
    """Everything a flag can change in a (network, diffusion) pair, as comparable values."""
    network, diffusion = built
    modules = [(name, type(module).__name__,
                sorted((key, value) for key, value in vars(module).items()
                       if not key.startswith("_") and isinstance(value, _SIMPLE_TYPES)))
               for name, module in network.named_modules()]
    tensors = [(name, tuple(tensor.shape), tensor.dtype)
               for name, tensor in network.state_dict().items()]
    schedule = (diffusion.num_timesteps, diffusion.loss_type, diffusion.model_var_type,
                diffusion.model_mean_type, diffusion.rescale_timesteps,
                tuple(diffusion.betas), tuple(diffusion.timestep_map))
    return modules, tensors, schedule


@functools.lru_cache(maxsize=None)
def _tiny_fingerprint(name):
    return _fingerprint(getattr(su, name)(**_TINY_FLAGS[name]))


@pytest.mark.parametrize("name, flag", [
    (name, flag) for name in sorted(_ORIGINAL_SIGNATURES)
    for flag in inspect.signature(getattr(su, name)).parameters
])
def test_every_factory_flag_reaches_what_the_factory_builds(name, flag):
    factory, flags = getattr(su, name), _TINY_FLAGS[name]
    if flag == "small_size":  # only checked: the model upsamples any low-resolution input
        with pytest.raises(ValueError, match="small_size=16 must be positive and at most"):
            factory(**dict(flags, small_size=16))
        return
    changed = factory(**dict(flags, **{flag: _CHANGED_FLAGS[flag]}))
    assert _fingerprint(changed) != _tiny_fingerprint(name)


@pytest.mark.parametrize("name", sorted(_ORIGINAL_SIGNATURES))
def test_factories_refuse_unknown_flags(name):
    with pytest.raises(TypeError, match="fast_attention"):
        getattr(su, name)(**_TINY_FLAGS[name], fast_attention=True)
