"""
The ADM networks: the diffusion UNet, the super-resolution UNet (ADM-U) and the
encoder half used as a noised-image classifier.

Module names and registration order reproduce the original code base, so the
released checkpoints load with `strict=True`.
"""

import warnings
from abc import abstractmethod

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .attention import (  # noqa: F401  (re-exported: the original defined them here)
    AttentionBlock,
    AttentionPool2d,
    QKVAttention,
    QKVAttentionLegacy,
)
from .nn import (
    SiLU,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    float32_region,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """
    Any module whose forward() takes timestep embeddings as a second argument.
    """

    @abstractmethod
    def forward(self, x, emb):
        """
        Apply the module to `x` given `emb` timestep embeddings.
        """


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """
    A sequential module that passes timestep embeddings to the children that
    support it as an extra input.
    """

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """
    Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.
    For 3-D signals only the inner two dimensions are upsampled.

    :param channels: channels in the inputs and outputs.
    :param use_conv: whether to apply a convolution after upsampling.
    :param dims: number of spatial dimensions (1, 2 or 3).
    :param out_channels: output channels (defaults to `channels`).
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")

    def forward(self, x):
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expected {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:
            size = (x.shape[2], x.shape[3] * 2, x.shape[4] * 2)
            x = F.interpolate(x, size, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """
    2x downsampling by a strided 3x3 convolution or by average pooling.
    For 3-D signals only the inner two dimensions are downsampled.

    :param channels: channels in the inputs and outputs.
    :param use_conv: convolve (True) or average-pool (False).
    :param dims: number of spatial dimensions (1, 2 or 3).
    :param out_channels: output channels (defaults to `channels`).
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(
                dims, self.channels, self.out_channels, 3, stride=stride, padding=1
            )
        elif self.out_channels != channels:
            raise ValueError("Downsample without a convolution cannot change the channel count")
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expected {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep (and class) embedding, optionally
    resampling on the way in (BigGAN-style up/down blocks).

    :param channels: input channels.
    :param emb_channels: channels of the timestep embedding.
    :param dropout: dropout rate before the last convolution.
    :param out_channels: output channels (defaults to `channels`).
    :param use_conv: with a channel change, use a 3x3 (True) rather than 1x1
                     convolution on the skip path.
    :param use_scale_shift_norm: adaptive group norm: the embedding gives a scale
                                 and a shift applied after normalisation, instead
                                 of a bias added before it.
    :param dims: number of spatial dimensions.
    :param use_checkpoint: recompute activations in the backward pass.
    :param up: upsample 2x inside the block.
    :param down: downsample 2x inside the block.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out_channels = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(SiLU(), linear(emb_channels, emb_out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            kernel_size, padding = (3, 1) if use_conv else (1, 0)
            self.skip_connection = conv_nd(
                dims, channels, self.out_channels, kernel_size, padding=padding
            )

    def forward(self, x, emb):
        """
        Apply the block to a tensor, conditioned on a timestep embedding.

        :param x: an [N x C x ...] tensor of features.
        :param emb: an [N x emb_channels] tensor of timestep embeddings.
        :return: an [N x C' x ...] tensor of outputs.
        """
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            h = conv(self.h_upd(norm_act(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        with float32_region(emb):
            emb_out = self.emb_layers(emb)
        emb_out = emb_out.type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class _EncoderMixin:
    """
    Construction, input checks and precision conversion shared by the UNet and
    its encoder half.
    """

    def _store_config(self, constructor_args):
        for name, value in constructor_args.items():
            if name not in ("self", "__class__"):
                setattr(self, name, value)
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.num_heads_upsample == -1:
            self.num_heads_upsample = self.num_heads
        self.dtype = th.float16 if self.use_fp16 else th.float32
        self.time_embed_dim = self.model_channels * 4
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the total downsampling "
                f"factor {factor} of channel_mult={self.channel_mult}; use fewer levels or "
                "an image size that is a multiple of it"
            )
        unreached = sorted(
            set(self.attention_resolutions) - {2**i for i in range(len(self.channel_mult))}
        )
        if unreached:
            warnings.warn(
                f"attention_resolutions (downsampling rates) {unreached} are reached by no "
                f"level of channel_mult={self.channel_mult}; no attention is added there",
                stacklevel=3,
            )

    def _build_time_embed(self):
        self.time_embed = nn.Sequential(
            linear(self.model_channels, self.time_embed_dim),
            SiLU(),
            linear(self.time_embed_dim, self.time_embed_dim),
        )

    def _build_encoder(self):
        """
        Build `input_blocks` and `middle_block`.

        :return: (channel counts after each input block, channels and
                  downsampling rate at the bottom).
        """
        ch = int(self.channel_mult[0] * self.model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(self.dims, self.in_channels, ch, 3, padding=1))]
        )
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                out_ch = int(mult * self.model_channels)
                layers = [self._res_block(ch, out_ch)]
                ch = out_ch
                if ds in self.attention_resolutions:
                    layers.append(self._attention_block(ch, self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                if self.resblock_updown:
                    down = self._res_block(ch, ch, down=True)
                else:
                    down = Downsample(ch, self.conv_resample, dims=self.dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, ch),
            self._attention_block(ch, self.num_heads),
            self._res_block(ch, ch),
        )
        return input_block_chans, ch, ds

    def _res_block(self, ch, out_ch, up=False, down=False):
        return ResBlock(
            ch,
            self.time_embed_dim,
            self.dropout,
            out_channels=out_ch,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
        )

    def _attention_block(self, ch, num_heads):
        return AttentionBlock(
            ch,
            use_checkpoint=self.use_checkpoint,
            num_heads=num_heads,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
        )

    def _check_input(self, x, timesteps):
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expected {self.in_channels} input channels, "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        resampled_sides = x.shape[3:] if self.dims == 3 else x.shape[2:]
        if any(side % factor for side in resampled_sides):
            raise ValueError(
                f"input spatial shape {tuple(x.shape[2:])} is not divisible by the "
                f"downsampling factor {factor}"
            )
        if timesteps.dim() != 1 or timesteps.shape[0] != x.shape[0]:
            raise ValueError(
                f"timesteps must be a 1-D tensor of {x.shape[0]} values, got shape "
                f"{tuple(timesteps.shape)}"
            )

    def _torso(self):
        return [self.input_blocks, self.middle_block]

    def convert_to_fp16(self):
        """
        Convert the torso of the model to float16 (normalisation layers, linear
        layers, the timestep embedding and the output head stay in float32).
        """
        for module in self._torso():
            module.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """
        Convert the torso of the model back to float32.
        """
        for module in self._torso():
            module.apply(convert_module_to_f32)


class UNetModel(_EncoderMixin, nn.Module):
    """
    The full UNet of ADM with attention and timestep embedding.

    :param image_size: side of the input images.
    :param in_channels: channels in the input tensor.
    :param model_channels: base channel count of the model.
    :param out_channels: channels in the output tensor.
    :param num_res_blocks: number of residual blocks per downsample.
    :param attention_resolutions: downsampling rates (1, 2, 4, ...) at which
                                  self-attention is used; 4 means attention at a
                                  quarter of the input resolution.
    :param dropout: dropout probability.
    :param channel_mult: channel multiplier for each level of the UNet.
    :param conv_resample: use learned convolutions for up/downsampling.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: number of classes for a class-conditional model, else None.
    :param use_checkpoint: use gradient checkpointing to reduce memory usage.
    :param use_fp16: run the torso in float16 (after convert_to_fp16()).
    :param num_heads: number of attention heads in each attention layer.
    :param num_head_channels: fixed channel width per head, overriding num_heads.
    :param num_heads_upsample: heads in the decoder's attention (-1: num_heads).
    :param use_scale_shift_norm: adaptive group norm conditioning (FiLM).
    :param resblock_updown: residual blocks for up/downsampling (BigGAN).
    :param use_new_attention_order: q/k/v split before heads (64x64 model).
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self._store_config(locals())
        self._build_time_embed()
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, self.time_embed_dim)
        input_block_chans, ch, ds = self._build_encoder()

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers = [self._res_block(ch + input_block_chans.pop(), out_ch)]
                ch = out_ch
                if ds in self.attention_resolutions:
                    layers.append(self._attention_block(ch, self.num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(self._res_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def forward(self, x, timesteps, y=None):
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] tensor of labels, if class-conditional.
        :return: an [N x C x ...] tensor of outputs.
        """
        self._check_input(x, timesteps)
        if (y is not None) != (self.num_classes is not None):
            if y is None:
                raise ValueError(
                    f"this model is class-conditional ({self.num_classes} classes): pass "
                    "labels as y (model_kwargs={'y': labels})"
                )
            raise ValueError(
                "this model is unconditional (num_classes=None, class_cond=False) but "
                "labels y were passed"
            )
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        with float32_region(x):
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
            if y is not None:
                emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(th.cat([h, skips.pop()], dim=1), emb)
        with float32_region(x):
            return self.out(h.type(x.dtype))

    def _torso(self):
        return [self.input_blocks, self.middle_block, self.output_blocks]


class SuperResModel(UNetModel):
    """
    A UNet that performs super-resolution (ADM-U): the low-resolution image is
    upsampled bilinearly to the output size and concatenated on channels.

    :param image_size: side of the high-resolution output.
    :param in_channels: channels of the high-resolution image (the network sees
                        twice as many).
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        """
        :param x: an [N x C x H x W] noisy high-resolution batch.
        :param timesteps: a 1-D batch of timesteps.
        :param low_res: an [N x C x h x w] low-resolution conditioning batch.
        :param kwargs: passed to UNetModel.forward (e.g. y).
        """
        if low_res is None:
            raise ValueError("SuperResModel needs low_res (model_kwargs={'low_res': images})")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(th.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_EncoderMixin, nn.Module):
    """
    The encoder half of the UNet with a pooled head: ADM's noised-image classifier.

    Arguments as UNetModel, plus:
    :param pool: the head: "adaptive" (average pool, 1x1 conv), "attention"
                 (AttentionPool2d), "spatial" (MLP on per-level mean features)
                 or "spatial_v2" (the same with a group norm).
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        self._store_config(locals())
        self._build_time_embed()
        input_block_chans, ch, ds = self._build_encoder()
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError('pool="attention" needs num_head_channels (e.g. 64), not -1')
            self.out = nn.Sequential(
                normalization(ch),
                SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool in ("spatial", "spatial_v2"):
            feature_size = sum(input_block_chans) + ch
            if pool == "spatial":
                hidden = [nn.ReLU()]
            else:
                hidden = [normalization(2048), SiLU()]
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), *hidden, nn.Linear(2048, out_channels)
            )
        else:
            raise ValueError(
                f"pool={pool!r}: expected 'adaptive', 'attention', 'spatial' or 'spatial_v2'"
            )

    def forward(self, x, timesteps):
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :return: an [N x K] tensor of outputs.
        """
        self._check_input(x, timesteps)
        with float32_region(x):
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial = self.pool.startswith("spatial")
        spatial_means = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                spatial_means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            spatial_means.append(h.type(x.dtype).mean(dim=(2, 3)))
            h = th.cat(spatial_means, dim=-1)
        with float32_region(x):
            return self.out(h.type(x.dtype))
