"""
Editing and inverse problems in one call: editing.py's methods (RePaint, SDEdit, ILVR,
DPS) run through sampling.SamplingRun, from uint8 images to uint8 images, with its
labels, classifier and classifier-free guidance, batches, processes and seeds (the same
seed gives the same images whatever the batch size and process count).

    images, labels = inpaint(model, diffusion, images, half_mask(256), seed=0, batch_size=4)
"""

from .editing import (
    DPS, ILVR, BlurOperator, DownsampleOperator, MaskOperator, RePaint, SDEdit, from_uint8,
)
from .sampling import sample

OPERATORS = ("inpaint", "downsample", "blur")  # DPS's built-in measurement operators


def edit(model, diffusion, method, **options):
    """
    Run an editing method over its inputs, one sample each (sampling.sample).

    :param model: the diffusion model.
    :param diffusion: its diffusion (the DDPM loop, or DDIM with use_ddim=True).
    :param method: an editing.EditMethod holding the inputs.
    :param options: sampling.SamplingRun's keyword arguments (labels, classifier,
        classifier_scale, cfg_scale, batch_size, seed, use_ddim, ...).
    :return: (uint8 images [N x H x W x 3] in input order, labels or None).
    """
    return sample(model, diffusion, editing=method, **options)


def inpaint(model, diffusion, images, mask, jump_length=10, jump_n_sample=10, **options):
    """
    RePaint inpainting (Lugmayr et al. 2022) of uint8 images.

    :param images: uint8 [N x H x W x 3], the model's size.
    :param mask: 1 = keep, 0 = fill: [H x W] for all or [N x 1 x H x W].
    :param jump_length: j, levels per jump back up.
    :param jump_n_sample: r, resamplings (1: no jumps).
    :param options: as edit.
    :return: as edit; the kept pixels are the input's.
    """
    method = RePaint(from_uint8(images), mask, jump_length=jump_length, jump_n_sample=jump_n_sample)
    return edit(model, diffusion, method, **options)


def sdedit(model, diffusion, images, strength, mask=None, **options):
    """
    SDEdit (Meng et al. 2022) of uint8 guide images.

    :param images: uint8 guides [N x H x W x 3].
    :param strength: in (0, 1]; 1 is unguided sampling.
    :param mask: None, or 1 = keep, 0 = edit (a local edit).
    :param options: as edit.
    :return: as edit.
    """
    return edit(model, diffusion, SDEdit(from_uint8(images), strength, mask=mask), **options)


def ilvr(model, diffusion, images, factor, level_range=(0.0, 1.0), **options):
    """
    ILVR (Choi et al. 2021) conditioned on uint8 reference images.

    :param images: uint8 references [N x H x W x 3].
    :param factor: the low-pass filter's downsampling factor N.
    :param level_range: (lo, hi) fractions of the steps where ILVR refines.
    :param options: as edit.
    :return: as edit.
    """
    return edit(model, diffusion, ILVR(from_uint8(images), factor, level_range), **options)


def dps(model, diffusion, images, operator, scale=1.0, **options):
    """
    Diffusion posterior sampling (Chung et al. 2023) from the measurements y = A(images).

    :param images: uint8 images [N x H x W x 3] to measure.
    :param operator: A (make_operator, or any differentiable callable).
    :param scale: the step size zeta'.
    :param options: as edit.
    :return: as edit.
    """
    measurement = operator(from_uint8(images))
    return edit(model, diffusion, DPS(operator, measurement, scale), **options)


def make_operator(name, mask=None, factor=4, kernel_size=9, sigma=3.0):
    """
    :param name: one of OPERATORS.
    :param mask: inpaint's mask (1 = observed).
    :param factor: downsample's factor.
    :param kernel_size: blur's kernel side (odd).
    :param sigma: blur's standard deviation in pixels.
    :return: the operator.
    """
    if name == "inpaint":
        if mask is None:
            raise ValueError("operator=inpaint needs a mask")
        return MaskOperator(mask)
    if name == "downsample":
        return DownsampleOperator(factor)
    if name == "blur":
        return BlurOperator(kernel_size, sigma)
    raise ValueError(f"operator={name}: expected one of {', '.join(OPERATORS)}")
