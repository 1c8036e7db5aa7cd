"""
Export of this library's diffusion UNets and their noise schedules to Hugging Face
diffusers: a `UNet2DModel` config and state dict with the same outputs as our
`UNetModel`, a `DDPMScheduler` config with the same betas, and both written in the
folder layout that `from_pretrained` reads, with a `model_index.json` that makes the
folder a `DDPMPipeline`.

Our DDIM (clip_denoised=True) re-derives eps from the clipped x_0; diffusers'
`DDIMScheduler.step` does so only with `use_clipped_model_output=True`. The exported
schedule's "leading" spacing gives `set_timesteps(K)` the timesteps range(0, T, T // K),
the grid of our "ddimK" respacing when K divides T.

Only configurations diffusers can express are exported; the others are refused with
a ValueError naming the option (see `check_exportable`).
"""

import os
import shutil
import uuid

import torch as th
import torch.nn as nn

from .file_writing import TEMPORARY_MARK, atomic_write, is_local
from .diffusion_types import ModelMeanType, ModelVarType
from .nn import GROUPNORM_GROUPS
from .respace import SpacedDiffusion
from .unet import AttentionBlock, Downsample, ResBlock, SuperResModel, UNetModel, Upsample

INSTALL_HINT = 'pip install -e ".[diffusers]"'
UNET_FOLDER = "unet"
SCHEDULER_FOLDER = "scheduler"
PIPELINE_INDEX = "model_index.json"

# Our ResBlock's layers and their names in diffusers' ResnetBlock2D.
_RESNET_LAYERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VARIANCE_TYPES = {
    ModelVarType.LEARNED_RANGE: "learned_range",
    ModelVarType.FIXED_SMALL: "fixed_small",
    ModelVarType.FIXED_LARGE: "fixed_large",
}
_PREDICTION_TYPES = {ModelMeanType.EPSILON: "epsilon", ModelMeanType.START_X: "sample"}


def _diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(f"exporting to diffusers needs the diffusers package: {INSTALL_HINT}") from error
    return diffusers


def check_exportable(model):
    """
    Raise a ValueError naming the option if diffusers' UNet2DModel cannot express the
    model.

    :param model: a guided_diffusion.unet.UNetModel.
    """
    if isinstance(model, SuperResModel):
        raise ValueError(
            "model is a SuperResModel: diffusers' UNet2DModel has no built-in upsampling "
            "of low_res; only the diffusion UNet (UNetModel) exports"
        )
    if not isinstance(model, UNetModel):
        raise ValueError(
            f"model is a {type(model).__name__}: expected a guided_diffusion.unet.UNetModel "
            "(classifiers, EncoderUNetModel, have no diffusers UNet2DModel counterpart)"
        )
    if model.dims != 2:
        raise ValueError(f"dims={model.dims}: diffusers' UNet2DModel is 2-D; only dims=2 exports")
    if model.channel_mult[0] != 1:
        raise ValueError(
            f"channel_mult={model.channel_mult}: diffusers' UNet2DModel embeds the timestep "
            "with as many sinusoids as the first level has channels, this model with "
            "model_channels; only channel_mult[0] == 1 exports"
        )
    if not model.conv_resample and not model.resblock_updown:
        raise ValueError(
            "conv_resample=False: diffusers' DownBlock2D and UpBlock2D always resample with "
            "convolutions; export a model with conv_resample=True or resblock_updown=True"
        )
    _attention_head_dim(model)


def _attention_head_dim(model):
    """
    :return: diffusers' attention_head_dim: the channels per head, one value for every
        attention block (None: one head per block, as wide as its block).
    """
    blocks = [module for module in model.modules() if isinstance(module, AttentionBlock)]
    head_dims = sorted({block.channels // block.num_heads for block in blocks})
    if len(head_dims) == 1:
        return head_dims[0]
    if all(block.num_heads == 1 for block in blocks):
        return None
    if model.num_head_channels == -1 and model.num_heads_upsample != model.num_heads:
        raise ValueError(
            f"num_heads_upsample={model.num_heads_upsample} differs from num_heads="
            f"{model.num_heads}: diffusers' UNet2DModel has one attention_head_dim for the "
            "whole network; export a model with num_heads_upsample=-1 or num_head_channels set"
        )
    widths = sorted({block.channels for block in blocks})
    raise ValueError(
        f"num_heads={model.num_heads} over attention widths {widths} gives heads of "
        f"{head_dims} channels: diffusers' UNet2DModel has one attention_head_dim; export "
        "a model with num_head_channels set (e.g. 64) or num_heads=1"
    )


def unet2d_config(model):
    """
    The diffusers UNet2DModel config of one of our UNets.

    :param model: a guided_diffusion.unet.UNetModel (see check_exportable).
    :return: a dict of UNet2DModel constructor arguments.
    """
    check_exportable(model)
    levels = range(len(model.channel_mult))
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if model.resblock_updown
        else ("DownBlock2D", "UpBlock2D")
    )
    attends = [2**level in model.attention_resolutions for level in levels]
    resample = "resnet" if model.resblock_updown else "conv"
    return dict(
        sample_size=model.image_size,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        block_out_channels=[int(mult * model.model_channels) for mult in model.channel_mult],
        layers_per_block=model.num_res_blocks,
        down_block_types=["AttnDownBlock2D" if attend else plain_down for attend in attends],
        mid_block_type="UNetMidBlock2D",
        up_block_types=["AttnUpBlock2D" if attend else plain_up for attend in reversed(attends)],
        downsample_type=resample,
        upsample_type=resample,
        downsample_padding=1,
        mid_block_scale_factor=1,
        attention_head_dim=_attention_head_dim(model),
        norm_num_groups=GROUPNORM_GROUPS,
        # Without it the middle block's attention has no group norm when scale_shift is set.
        attn_norm_num_groups=GROUPNORM_GROUPS,
        norm_eps=1e-5,
        act_fn="silu",
        resnet_time_scale_shift="scale_shift" if model.use_scale_shift_norm else "default",
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        class_embed_type=None,
        num_class_embeds=model.num_classes,
        dropout=float(model.dropout),
    )


def _module_names(model):
    """
    :return: (our module, its diffusers name) for every module of the model that holds
        weights, in the order of the network.
    """
    pairs = [
        (model.time_embed[0], "time_embedding.linear_1"),
        (model.time_embed[2], "time_embedding.linear_2"),
        (model.input_blocks[0][0], "conv_in"),
    ]
    if model.num_classes is not None:
        pairs.append((model.label_emb, "class_embedding"))
    last_level = len(model.channel_mult) - 1
    input_blocks = iter(model.input_blocks[1:])
    for level in range(last_level + 1):
        for index in range(model.num_res_blocks):
            pairs += _resnet_and_attention(next(input_blocks), f"down_blocks.{level}", index)
        if level != last_level:
            (downsample,) = next(input_blocks)
            pairs.append((downsample, f"down_blocks.{level}.downsamplers.0"))
    first, attention, second = model.middle_block
    pairs += [
        (first, "mid_block.resnets.0"),
        (attention, "mid_block.attentions.0"),
        (second, "mid_block.resnets.1"),
    ]
    output_blocks = iter(model.output_blocks)
    for up_index in range(last_level + 1):
        for index in range(model.num_res_blocks + 1):
            layers = next(output_blocks)
            pairs += _resnet_and_attention(layers, f"up_blocks.{up_index}", index)
            if up_index != last_level and index == model.num_res_blocks:
                pairs.append((layers[-1], f"up_blocks.{up_index}.upsamplers.0"))
    pairs += [(model.out[0], "conv_norm_out"), (model.out[2], "conv_out")]
    return pairs


def _resnet_and_attention(layers, block_name, index):
    pairs = [(layers[0], f"{block_name}.resnets.{index}")]
    if len(layers) > 1 and isinstance(layers[1], AttentionBlock):
        pairs.append((layers[1], f"{block_name}.attentions.{index}"))
    return pairs


def _copy(tensor):
    """An own, contiguous float32 copy (the fp16 torso and channels_last weights too)."""
    return tensor.detach().to(dtype=th.float32, memory_format=th.contiguous_format, copy=True)


def _plain_tensors(module, name):
    return {f"{name}.{key}": _copy(tensor) for key, tensor in module.state_dict().items()}


def _resnet_tensors(block, name):
    tensors = {}
    for ours, theirs in _RESNET_LAYERS.items():
        tensors.update(_plain_tensors(block.get_submodule(ours), f"{name}.{theirs}"))
    return tensors


def _attention_tensors(block, name, legacy):
    """
    Split the packed qkv 1x1 convolution into diffusers' to_q, to_k, to_v linears.
    The legacy layout packs its rows as (head, q/k/v, channel) and the new one as
    (q/k/v, head, channel); diffusers' three projections each hold (head, channel).
    """
    weight = block.qkv.weight[:, :, 0]
    bias = block.qkv.bias
    if legacy:
        heads, channels = block.num_heads, block.channels
        head_dim = channels // heads
        weight = weight.reshape(heads, 3, head_dim, channels).transpose(0, 1).reshape(3 * channels, channels)
        bias = bias.reshape(heads, 3, head_dim).transpose(0, 1).reshape(3 * channels)
    tensors = _plain_tensors(block.norm, f"{name}.group_norm")
    for projection, part_weight, part_bias in zip(("to_q", "to_k", "to_v"), weight.chunk(3), bias.chunk(3)):
        tensors[f"{name}.{projection}.weight"] = _copy(part_weight)
        tensors[f"{name}.{projection}.bias"] = _copy(part_bias)
    tensors[f"{name}.to_out.0.weight"] = _copy(block.proj_out.weight[:, :, 0])
    tensors[f"{name}.to_out.0.bias"] = _copy(block.proj_out.bias)
    return tensors


def convert_state_dict(model):
    """
    Our UNet's weights under the names of diffusers' UNet2DModel (built from
    unet2d_config(model)), as float32 tensors.

    :param model: a guided_diffusion.unet.UNetModel (see check_exportable).
    :return: a dict of diffusers parameter names to tensors.
    """
    check_exportable(model)
    legacy = not model.use_new_attention_order
    converted = {}
    for module, name in _module_names(model):
        if isinstance(module, ResBlock):
            converted.update(_resnet_tensors(module, name))
        elif isinstance(module, AttentionBlock):
            converted.update(_attention_tensors(module, name, legacy))
        elif isinstance(module, Downsample):
            converted.update(_plain_tensors(module.op, f"{name}.conv"))
        elif isinstance(module, Upsample):
            converted.update(_plain_tensors(module.conv, f"{name}.conv"))
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.Embedding)):
            converted.update(_plain_tensors(module, name))
        else:
            raise ValueError(f"model: no diffusers counterpart for its {type(module).__name__} at {name}")
    return converted


def scheduler_config(diffusion):
    """
    The diffusers DDPMScheduler config of our diffusion: its betas, the model's
    prediction and its variance, with x_0 clipped to [-1, 1] as our sampling does.

    :param diffusion: a GaussianDiffusion (a SpacedDiffusion only if it keeps every step).
    :return: a dict of DDPMScheduler constructor arguments.
    """
    if isinstance(diffusion, SpacedDiffusion) and diffusion.timestep_map != list(
        range(diffusion.original_num_steps)
    ):
        raise ValueError(
            f"diffusion keeps {diffusion.num_timesteps} of its {diffusion.original_num_steps} "
            "steps: diffusers' schedulers respace the full process themselves "
            '(num_inference_steps); export the diffusion built with timestep_respacing=""'
        )
    if diffusion.rescale_timesteps and diffusion.num_timesteps != 1000:
        raise ValueError(
            f"rescale_timesteps=True with {diffusion.num_timesteps} steps: the model sees "
            f"t * 1000 / {diffusion.num_timesteps}, diffusers passes it t itself; export a "
            "model trained with rescale_timesteps=False (or 1000 steps)"
        )
    if diffusion.model_var_type not in _VARIANCE_TYPES:
        raise ValueError(
            f"model_var_type={diffusion.model_var_type.name}: the model outputs a log-variance, "
            "which diffusers' DDPMScheduler (\"learned\": a variance) reads differently; "
            "LEARNED_RANGE, FIXED_SMALL and FIXED_LARGE export"
        )
    if diffusion.model_mean_type not in _PREDICTION_TYPES:
        raise ValueError(
            f"model_mean_type={diffusion.model_mean_type.name}: diffusers' DDPMScheduler "
            "takes an epsilon or x_0 prediction (EPSILON, START_X), not x_{t-1}"
        )
    return dict(
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=[float(beta) for beta in diffusion.betas],
        variance_type=_VARIANCE_TYPES[diffusion.model_var_type],
        prediction_type=_PREDICTION_TYPES[diffusion.model_mean_type],
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="leading",  # set_timesteps(K): range(0, T, T // K), our "ddimK"
        steps_offset=0,
    )


def _check_pair(model, diffusion):
    learns_sigma = diffusion.model_var_type.is_learned()
    expected = model.in_channels * (2 if learns_sigma else 1)
    if model.out_channels != expected:
        raise ValueError(
            f"model has {model.out_channels} output channels, but its diffusion "
            f"(model_var_type={diffusion.model_var_type.name}) needs {expected}: build both "
            "with the same learn_sigma"
        )


def export_to_diffusers(model, diffusion, out_dir, overwrite=False):
    """
    Write a model and its diffusion as a diffusers DDPMPipeline: `out_dir/unet/`
    (config.json, diffusion_pytorch_model.safetensors: UNet2DModel.from_pretrained
    gives our model's outputs), `out_dir/scheduler/scheduler_config.json`
    (DDPMScheduler) and, last, `out_dir/model_index.json`, so that
    DDPMPipeline.from_pretrained(out_dir) loads both. Each folder and the index is
    written under a temporary name and renamed.

    :param model: a guided_diffusion.unet.UNetModel (see check_exportable).
    :param diffusion: its GaussianDiffusion (see scheduler_config).
    :param out_dir: a local folder; created if missing.
    :param overwrite: replace unet/, scheduler/ and model_index.json if out_dir has them.
    :return: (the unet folder, the scheduler folder).
    """
    diffusers = _diffusers()
    if not is_local(out_dir):
        raise ValueError(f"out_dir={out_dir!r}: diffusers writes local folders; give a local path")
    _check_pair(model, diffusion)
    unet = diffusers.UNet2DModel(**unet2d_config(model))
    unet.load_state_dict(convert_state_dict(model), strict=True)
    scheduler = diffusers.DDPMScheduler(**scheduler_config(diffusion))
    targets = [os.path.join(out_dir, name) for name in (UNET_FOLDER, SCHEDULER_FOLDER)]
    index = os.path.join(out_dir, PIPELINE_INDEX)
    existing = [path for path in targets + [index] if os.path.exists(path)]
    if existing and not overwrite:
        raise ValueError(
            f"out_dir={out_dir!r} already holds {existing}: choose another folder, remove "
            "them, or pass overwrite=True"
        )
    os.makedirs(out_dir, exist_ok=True)
    for component, target in zip((unet, scheduler), targets):
        temporary = f"{target}{TEMPORARY_MARK}{uuid.uuid4().hex}"
        try:
            component.save_pretrained(temporary, safe_serialization=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(temporary, target)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    atomic_write(index, lambda f: f.write(pipeline.to_json_string().encode()))
    return tuple(targets)
