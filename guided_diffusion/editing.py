"""
Editing and inverse problems with a trained diffusion model, on its DDPM and DDIM
loops: RePaint inpainting (Lugmayr et al. 2022), SDEdit (Meng et al. 2022), ILVR (Choi
et al. 2021) and diffusion posterior sampling, DPS (Chung et al. 2023), with DPS's
measurement operators (mask, downsampling, Gaussian blur).

Each method holds one input per sample (float images [N x C x H x W] in [-1, 1], masks
with 1 = keep and 0 = fill); method.sample(diffusion, model, shape, ...) samples the rows
`indices` of them with the keyword arguments of the diffusion's loops (cond_fn,
model_kwargs, noise_fn, callback), so classifier guidance and a classifier-free model
function compose unchanged.

Noise levels: level n in T .. 0 is the sample held before the step at timestep n - 1
(level T: x_T, pure noise; level 0: the output). A reverse step takes level n to n - 1
(p_sample or ddim_sample at timestep n - 1); q_sample at timestep n - 1 noises data to
level n; a forward step q(x_{n+1} | x_n) takes level n to n + 1 with beta of timestep n.

Random draws (noise_fn: with a seed, per-sample generators): the start (x_T, or SDEdit's
noise of its guide), then per reverse step the step's own draw and, where a method noises
its input to the new level n - 1 > 0 (RePaint, SDEdit with a mask, ILVR), one draw for
that; each of RePaint's forward steps draws once.
"""

import functools
import math

import torch as th
import torch.nn.functional as F

from .diffusion_sampling import progress_bar
from .solvers import report_step

PIXEL_NUDGE = 1e-6  # added to u / 127.5 - 1, so that image_grid.to_uint8_nhwc's round-down gives u back


def from_uint8(images):
    """
    :param images: uint8 images [N x H x W x C] (numpy or tensor).
    :return: float32 [N x C x H x W] in [-1, 1]: u / 127.5 - 1 (+ PIXEL_NUDGE).
    """
    images = th.as_tensor(images)
    if images.dtype != th.uint8 or images.dim() != 4:
        raise ValueError(f"images of shape {tuple(images.shape)} and dtype {images.dtype}: "
                         "expected uint8 [N x H x W x C]")
    return (images.float() / 127.5 - 1.0 + PIXEL_NUDGE).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------ masks


def check_mask(mask, images_shape, name="mask"):
    """
    Refuse a mask that is not of the images' size, not binary, or keeps all or no pixels.

    :param mask: [H x W], [1 x H x W], or [1 or N x 1 x H x W] numbers (1 = keep, 0 = fill).
    :param images_shape: the images' (N, C, H, W).
    :param name: the argument named in errors.
    :return: the mask as a float32 tensor [1 or N x 1 x H x W].
    """
    mask = th.as_tensor(mask).float()
    if mask.dim() in (2, 3):
        mask = mask.view(-1, 1, *mask.shape[-2:])
    count, _, height, width = images_shape
    if mask.dim() != 4 or mask.shape[1] != 1 or len(mask) not in (1, count) or \
            tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"{name} of shape {tuple(mask.shape)}: expected the images' size "
                         f"{height}x{width}, one mask for all {count} images or one each")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} is not binary: expected 1 (keep) and 0 (fill) only")
    kept = mask.flatten(1).mean(1)
    if (kept == 0).any() or (kept == 1).any():
        raise ValueError(f"{name} keeps {'no' if (kept == 0).any() else 'every'} pixel: expected "
                         "some pixels to keep (1) and some to fill (0)")
    return mask


def half_mask(size):
    """
    :param size: the image side.
    :return: a [1 x 1 x size x size] mask keeping the left half and filling the right.
    """
    mask = th.ones(1, 1, size, size)
    mask[..., size // 2:] = 0
    return mask


def box_mask(size):
    """
    :param size: the image side.
    :return: a [1 x 1 x size x size] mask filling a centred square of half the side.
    """
    mask = th.ones(1, 1, size, size)
    start = size // 4
    mask[..., start:start + size // 2, start:start + size // 2] = 0
    return mask


def random_mask(size, generator, fill_fraction=0.5):
    """
    :param size: the image side.
    :param generator: the torch.Generator of the draw.
    :param fill_fraction: the probability of each pixel to be filled.
    :return: a [1 x 1 x size x size] mask of pixels kept or filled at random.
    """
    return (th.rand(1, 1, size, size, generator=generator) >= fill_fraction).float()


# ------------------------------------------------------------------ operators


class MaskOperator:
    """
    DPS's inpainting operator A(x) = mask * x (1 = observed).

    :param mask: a mask for check_mask, one for all samples or one per sample.
    """

    def __init__(self, mask):
        self.mask = th.as_tensor(mask).float()

    def select(self, indices, device):
        """
        :return: the operator of the samples `indices` (a shared mask: unchanged), on device.
        """
        mask = self.mask if len(self.mask) == 1 else self.mask[list(indices)]
        return MaskOperator(mask.to(device))

    def __call__(self, x):
        return x * self.mask.to(x.device)


class DownsampleOperator:
    """
    DPS's super-resolution operator: average pooling by `factor`.
    """

    def __init__(self, factor):
        self.factor = _check_factor(factor, "operator_factor")

    def __call__(self, x):
        return F.avg_pool2d(x, self.factor)


class BlurOperator:
    """
    DPS's deblurring operator: a Gaussian blur of each channel, reflected at the borders.

    :param kernel_size: the kernel's side, an odd positive integer.
    :param sigma: the Gaussian's standard deviation in pixels (> 0).
    """

    def __init__(self, kernel_size=9, sigma=3.0):
        if kernel_size < 1 or kernel_size % 2 == 0 or not sigma > 0:
            raise ValueError(f"blur kernel_size={kernel_size}, sigma={sigma}: expected an odd "
                             "positive kernel size and sigma > 0")
        offsets = th.arange(kernel_size, dtype=th.float32) - kernel_size // 2
        weights = th.exp(-0.5 * (offsets / sigma) ** 2)
        weights = weights / weights.sum()
        self.kernel = weights[:, None] * weights[None, :]

    def __call__(self, x):
        channels, pad = x.shape[1], self.kernel.shape[0] // 2
        kernel = self.kernel.to(x.device, x.dtype).expand(channels, 1, *self.kernel.shape)
        return F.conv2d(F.pad(x, [pad] * 4, mode="reflect"), kernel, groups=channels)


def low_pass(x, factor):
    """
    ILVR's phi_N: area (average) downsampling by `factor`, then bicubic upsampling.

    :param x: [N x C x H x W] images, H and W divisible by factor.
    :param factor: N, a positive integer.
    :return: the low-pass images, x's shape.
    """
    small = F.avg_pool2d(x, factor)
    return F.interpolate(small, scale_factor=factor, mode="bicubic", align_corners=False)


def _check_factor(factor, name, size=None):
    """
    :return: factor, refused unless a positive integer (dividing size, when given).
    """
    if isinstance(factor, bool) or int(factor) != factor or factor < 1:
        raise ValueError(f"{name}={factor}: expected a positive integer")
    if size is not None and size % factor:
        raise ValueError(f"{name}={factor} does not divide the image size {size}")
    return int(factor)


# ------------------------------------------------------------------ the loop


def repaint_levels(num_timesteps, jump_length, jump_n_sample):
    """
    RePaint's resampling schedule (Lugmayr et al. 2022, section 4.2): the levels after T,
    down to 0, where at levels j, 2j, ... <= T - j the sampler goes j levels back up
    (forward noising), r - 1 times each, before going on down.

    :param num_timesteps: T.
    :param jump_length: j.
    :param jump_n_sample: r, the times each stretch is sampled (1: no jumps).
    :return: the list of levels; T + (r - 1) * j * (floor(T / j) - 1) reverse steps.
    """
    _check_factor(jump_length, "jump_length")
    _check_factor(jump_n_sample, "jump_n_sample")
    jumps = {level: jump_n_sample - 1 for level in range(jump_length, num_timesteps - jump_length + 1,
                                                         jump_length)}
    levels, level = [], num_timesteps
    while level > 0:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            levels.extend(range(level + 1, level + jump_length + 1))
            level += jump_length
    return levels


def noised(diffusion, x_start, level, noise_fn):
    """
    :return: x_start noised to `level` (q_sample at timestep level - 1, drawing once), or
        x_start itself at level 0.
    """
    if level == 0:
        return x_start
    t = th.full((len(x_start),), level - 1, dtype=th.long, device=x_start.device)
    return diffusion.q_sample(x_start, t, noise=noise_fn(x_start))


def forward_step(diffusion, x, level, noise_fn):
    """
    One step of the forward process q(x_{n+1} | x_n) = N(sqrt(1 - beta) x_n, beta I) with
    beta of timestep `level` (RePaint's way back up); draws once.

    :return: x at level + 1.
    """
    beta = float(diffusion.betas[level])
    return math.sqrt(1.0 - beta) * x + math.sqrt(beta) * noise_fn(x)


class EditMethod:
    """
    What the editing methods share: their per-sample inputs (the attributes named in
    `per_sample`), and the loop over levels with a hook after each reverse step.
    """

    per_sample = ()

    def __len__(self):
        return len(getattr(self, self.per_sample[0]))

    def select(self, indices, device):
        """
        :return: a copy holding the samples `indices` on device (inputs of one row are shared).
        """
        chosen = self
        for name in self.per_sample:
            chosen = chosen._with(name, indices, device)
        return chosen

    def _with(self, name, indices, device):
        """
        :return: a copy whose input `name` holds the samples `indices` on device.
        """
        value = getattr(self, name)
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        if th.is_tensor(value):
            setattr(copy, name, (value if len(value) == 1 else value[list(indices)]).to(device))
        elif hasattr(value, "select"):  # an operator with one row per sample
            setattr(copy, name, value.select(indices, device))
        return copy

    def check_shape(self, image_shape):
        """
        Refuse inputs that are not of the model's image shape (C, H, W).
        """
        found = tuple(getattr(self, self.per_sample[0]).shape[1:])
        if found != tuple(image_shape):
            raise ValueError(f"input images of shape {found} (C, H, W): the model makes "
                             f"{tuple(image_shape)}; resize the inputs to the model's image_size")

    def num_steps(self, num_timesteps):
        """
        :return: the reverse steps (model evaluations) of one batch.
        """
        return num_timesteps

    def levels(self, num_timesteps):
        """
        :return: (the start level, the list of the levels after it).
        """
        return num_timesteps, list(range(num_timesteps - 1, -1, -1))

    def start(self, diffusion, shape, device, noise_fn):
        """
        :return: the sample at the start level: x_T, drawn.
        """
        return noise_fn(th.empty(*shape, device=device))

    def after_step(self, diffusion, x, level, noise_fn):
        """
        :return: the sample of a reverse step to `level`, corrected by the method.
        """
        return x

    def reverse_step(self, step, x, t):
        """
        :return: the step's dict ('sample', 'pred_xstart'), without gradients.
        """
        with th.no_grad():
            return step(x, t)

    def sample(self, diffusion, model, shape, use_ddim=False, eta=0.0, clip_denoised=True,
               cond_fn=None, model_kwargs=None, device=None, noise_fn=None, callback=None,
               progress=False, indices=None):
        """
        Edit the samples `indices` on the DDPM (or DDIM) loop.

        :param diffusion: the GaussianDiffusion or SpacedDiffusion.
        :param model: the model function, as the loops take it.
        :param shape: the batch's (N, C, H, W).
        :param use_ddim: DDIM steps (with eta) instead of ancestral ones.
        :param indices: the batch's sample indices (default range(N)).
        :return: the edited samples, without gradients.

        Other arguments as diffusion.p_sample_loop.
        """
        device = device or next(model.parameters()).device
        batch = self.select(range(shape[0]) if indices is None else indices, device)
        noise_fn = noise_fn or th.randn_like
        options = dict(clip_denoised=clip_denoised, cond_fn=cond_fn, model_kwargs=model_kwargs,
                       noise_fn=noise_fn)
        step = functools.partial(diffusion.ddim_sample, model, eta=eta, **options) if use_ddim \
            else functools.partial(diffusion.p_sample, model, **options)
        level, path = batch.levels(diffusion.num_timesteps)
        x = batch.start(diffusion, shape, device, noise_fn)
        step_index = 0
        for new_level in progress_bar(path, progress):
            if new_level > level:
                x = forward_step(diffusion, x, level, noise_fn)
            else:
                t = th.full((shape[0],), level - 1, dtype=th.long, device=device)
                out = batch.reverse_step(step, x, t)
                report_step(callback, step_index, t, x, out["pred_xstart"])
                x = batch.after_step(diffusion, out["sample"], new_level, noise_fn)
                step_index += 1
            level = new_level
        return x


def _keep_known(diffusion, x, known, mask, level, noise_fn):
    """
    :return: x with its kept pixels (mask 1) replaced by `known` noised to `level`.
    """
    return mask * noised(diffusion, known, level, noise_fn) + (1 - mask) * x


class RePaint(EditMethod):
    """
    RePaint inpainting (Lugmayr et al. 2022): known pixels from the noised input, the
    others from the model, with resampling by jumps back up the schedule.

    :param known: the images [N x C x H x W] in [-1, 1].
    :param mask: 1 = keep, 0 = fill (check_mask's shapes).
    :param jump_length: j, levels per jump back up.
    :param jump_n_sample: r, resamplings (1: plain replacement, no jumps).
    """

    per_sample = ("known", "mask")

    def __init__(self, known, mask, jump_length=10, jump_n_sample=10):
        self.known, self.mask = known, check_mask(mask, known.shape)
        self.jump_length, self.jump_n_sample = jump_length, jump_n_sample
        repaint_levels(1, jump_length, jump_n_sample)  # checks j and r

    def num_steps(self, num_timesteps):
        path = repaint_levels(num_timesteps, self.jump_length, self.jump_n_sample)
        return sum(later < earlier for earlier, later in zip([num_timesteps] + path, path))

    def levels(self, num_timesteps):
        return num_timesteps, repaint_levels(num_timesteps, self.jump_length, self.jump_n_sample)

    def after_step(self, diffusion, x, level, noise_fn):
        return _keep_known(diffusion, x, self.known, self.mask, level, noise_fn)


class SDEdit(EditMethod):
    """
    SDEdit (Meng et al. 2022): noise a guide image to t0 = strength * T and denoise it;
    with a mask, the kept pixels come from the noised guide at every step.

    :param guide: the guide images [N x C x H x W] in [-1, 1].
    :param strength: in (0, 1]; 1 starts from pure noise (unguided sampling).
    :param mask: None (edit everything) or 1 = keep, 0 = edit.
    """

    per_sample = ("guide", "mask")

    def __init__(self, guide, strength, mask=None):
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength}: expected a number in (0, 1]")
        self.guide, self.strength = guide, strength
        self.mask = None if mask is None else check_mask(mask, guide.shape)

    def _start_level(self, num_timesteps):
        return max(1, round(self.strength * num_timesteps))

    def num_steps(self, num_timesteps):
        return self._start_level(num_timesteps)

    def levels(self, num_timesteps):
        start = self._start_level(num_timesteps)
        return start, list(range(start - 1, -1, -1))

    def start(self, diffusion, shape, device, noise_fn):
        start = self._start_level(diffusion.num_timesteps)
        if start == diffusion.num_timesteps:  # the prior, as sampling from noise
            return super().start(diffusion, shape, device, noise_fn)
        return noised(diffusion, self.guide, start, noise_fn)

    def after_step(self, diffusion, x, level, noise_fn):
        if self.mask is None:
            return x
        return _keep_known(diffusion, x, self.guide, self.mask, level, noise_fn)


class ILVR(EditMethod):
    """
    ILVR (Choi et al. 2021): x_{t-1} <- x'_{t-1} - phi_N(x'_{t-1}) + phi_N(y_{t-1}), with
    y_{t-1} the reference noised to t - 1 and phi_N = low_pass.

    :param reference: the reference images [N x C x H x W] in [-1, 1].
    :param factor: N, the downsampling factor (dividing the image size).
    :param level_range: (lo, hi) fractions of T: refine where the new level is in [lo T, hi T].
    """

    per_sample = ("reference",)

    def __init__(self, reference, factor, level_range=(0.0, 1.0)):
        self.reference = reference
        self.factor = _check_factor(factor, "ilvr_factor", reference.shape[-1])
        _check_factor(self.factor, "ilvr_factor", reference.shape[-2])
        low, high = level_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"level_range={level_range}: expected 0 <= lo <= hi <= 1")
        self.level_range = (low, high)

    def after_step(self, diffusion, x, level, noise_fn):
        low, high = (fraction * diffusion.num_timesteps for fraction in self.level_range)
        if not low <= level <= high:
            return x
        target = noised(diffusion, self.reference, level, noise_fn)
        return x - low_pass(x, self.factor) + low_pass(target, self.factor)


class DPS(EditMethod):
    """
    Diffusion posterior sampling (Chung et al. 2023, algorithm 1): after each step,
    x_{t-1} <- x'_{t-1} - zeta_t grad_{x_t} ||y - A(x0_hat(x_t))||^2 with
    zeta_t = scale / ||y - A(x0_hat(x_t))||, per sample (= 2 scale grad ||y - A(x0_hat)||).

    :param operator: A, a differentiable callable of [N x C x H x W] images (MaskOperator,
        DownsampleOperator, BlurOperator, ...); one with select(indices, device) holds one
        row per sample.
    :param measurement: y, [N x ...] of A's output shape.
    :param scale: zeta' (the paper's step size).
    """

    per_sample = ("measurement", "operator")

    def __init__(self, operator, measurement, scale=1.0):
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"dps_scale={scale}: expected a finite number >= 0")
        self.operator, self.measurement, self.scale = operator, measurement, scale

    def check_shape(self, image_shape):
        first = self.select([0], self.measurement.device)
        found = tuple(first.operator(th.zeros(1, *image_shape, device=self.measurement.device)).shape)
        if found[1:] != tuple(self.measurement.shape[1:]):
            raise ValueError(f"the operator's output of shape {found[1:]} differs from the "
                             f"measurement y's {tuple(self.measurement.shape[1:])}")

    def reverse_step(self, step, x, t):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = step(x_in, t)
            residual = self.measurement - self.operator(out["pred_xstart"].float())
            distance = residual.flatten(1).norm(dim=1)
            gradient = th.autograd.grad(distance.sum(), x_in)[0]
        sample = out["sample"].detach() - 2 * self.scale * gradient
        return {"sample": sample, "pred_xstart": out["pred_xstart"].detach()}
