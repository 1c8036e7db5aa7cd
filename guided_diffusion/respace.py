"""
Timestep respacing: sample with a subset of a trained diffusion's steps
(Nichol & Dhariwal 2021, section 4), for example 250 evenly spaced steps of a
1000-step model, or DDIM's integer-stride schedules ("ddim25").
"""

import numpy as np
import torch as th

from .gaussian_diffusion import GaussianDiffusion

_DDIM_PREFIX = "ddim"
_VALID_FORMS = 'expected "ddimN" (e.g. "ddim25") or comma-separated integers (e.g. "10,15,20")'


def space_timesteps(num_timesteps, section_counts):
    """
    Choose which steps of a process to keep.

    The process is cut into len(section_counts) sections of nearly equal size
    (earlier sections get the remainder) and each section keeps the given
    number of steps, evenly spaced and including its first and last step.
    For example, 300 steps with [10, 15, 20] keep 10 of steps 0-99, 15 of
    100-199 and 20 of 200-299.

    "ddimN" keeps range(0, num_timesteps, stride) for the smallest integer
    stride that gives exactly N steps, as in the DDIM paper.

    :param num_timesteps: the number of steps of the original process.
    :param section_counts: a list of integers, a string of comma-separated
        integers, or "ddimN".
    :return: the set of kept step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith(_DDIM_PREFIX):
            return _ddim_timesteps(num_timesteps, section_counts)
        try:
            section_counts = [int(count) for count in section_counts.split(",")]
        except ValueError:
            raise ValueError(f'timestep_respacing="{section_counts}": {_VALID_FORMS}') from None
    section_counts = list(section_counts)
    if not section_counts or any(
        not isinstance(count, (int, np.integer)) or count < 0 for count in section_counts
    ):
        raise ValueError(f"section counts {section_counts}: expected non-negative integers")
    if sum(section_counts) > num_timesteps:
        raise ValueError(
            f"section counts {section_counts} ask for {sum(section_counts)} steps, "
            f"but the diffusion has only {num_timesteps}"
        )

    size_per_section, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept = []
    for i, count in enumerate(section_counts):
        size = size_per_section + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"section {i} (steps {start}..{start + size - 1}) has {size} steps, "
                f"cannot keep {count} of them; use fewer steps there or fewer sections"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index (not stride * j) so rounding matches the original code.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def _ddim_timesteps(num_timesteps, spec):
    """
    The steps of "ddimN": range(0, num_timesteps, stride) with exactly N elements.
    """
    digits = spec[len(_DDIM_PREFIX):]
    if not digits.isdigit():
        raise ValueError(f'timestep_respacing="{spec}": {_VALID_FORMS}')
    desired_count = int(digits)
    if desired_count > num_timesteps:
        raise ValueError(
            f'timestep_respacing="{spec}" asks for {desired_count} steps, '
            f"but the diffusion has only {num_timesteps}"
        )
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f'timestep_respacing="{spec}": no integer stride gives exactly {desired_count} of '
        f"{num_timesteps} steps; pick another N or use comma-separated section counts"
    )


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion that keeps only some steps of a base diffusion.

    Its betas are recomputed so that its alphas_cumprod equal the base's at the
    kept steps: beta_i = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}]. Models and
    cond_fns are wrapped so they always see the base process's timesteps.

    :param use_timesteps: the base steps to keep (any iterable of integers).
    :param kwargs: the keyword arguments of the base GaussianDiffusion.
    """

    def __init__(self, use_timesteps, **kwargs):
        base_diffusion = GaussianDiffusion(**kwargs)
        self.original_num_steps = base_diffusion.num_timesteps
        self.use_timesteps = set(use_timesteps)
        outside = sorted(t for t in self.use_timesteps if t not in range(self.original_num_steps))
        if outside:
            raise ValueError(
                f"use_timesteps {outside}: steps must lie in [0, {self.original_num_steps - 1}]"
            )
        self.timestep_map = sorted(self.use_timesteps)
        kept_alphas_cumprod = base_diffusion.alphas_cumprod[self.timestep_map]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        kwargs["betas"] = np.array(1 - kept_alphas_cumprod / previous)
        super().__init__(**kwargs)
        self._map_tensors = {}  # the timestep map on each device (see _WrappedModel)

    def p_mean_variance(self, model, *args, **kwargs):
        """
        GaussianDiffusion.p_mean_variance with the model seeing base timesteps.
        """
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        """
        GaussianDiffusion.training_losses with the model seeing base timesteps.
        """
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        """
        GaussianDiffusion.condition_mean with cond_fn seeing base timesteps.
        """
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        """
        GaussianDiffusion.condition_score with cond_fn seeing base timesteps.
        """
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model, self.timestep_map, self.rescale_timesteps, self.original_num_steps,
            map_tensors=self._map_tensors,
        )

    def _scale_timesteps(self, t):
        # The wrapper maps to base timesteps and scales those.
        return t


def respace_diffusion(diffusion, section_counts):
    """
    Keep fewer steps of a diffusion, e.g. to sample previews of its model in a few DDIM
    steps. A SpacedDiffusion is spaced again: the kept steps are steps of its own
    process, and the model still sees the base process's timesteps.

    :param diffusion: a GaussianDiffusion or SpacedDiffusion.
    :param section_counts: which of its diffusion.num_timesteps steps to keep, in any
        form space_timesteps takes.
    :return: a SpacedDiffusion whose loops take the model that diffusion's loops take.
    """
    respaced = SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion.num_timesteps, section_counts),
        betas=diffusion.betas,
        model_mean_type=diffusion.model_mean_type,
        model_var_type=diffusion.model_var_type,
        loss_type=diffusion.loss_type,
        rescale_timesteps=diffusion.rescale_timesteps,
    )
    if isinstance(diffusion, SpacedDiffusion):
        # Its kept steps, and the timesteps the model sees, in the base process's time.
        respaced.timestep_map = [diffusion.timestep_map[t] for t in respaced.timestep_map]
        respaced.use_timesteps = set(respaced.timestep_map)
        respaced.original_num_steps = diffusion.original_num_steps
    return respaced


class _WrappedModel:
    """
    Calls a model (or cond_fn) with spaced timesteps mapped to base timesteps,
    scaled to [0, 1000) when rescale_timesteps is set.

    :param map_tensors: a dict the timestep map's tensor per (device, dtype) is kept
                        in (the diffusion's, so that it is copied to a device once);
                        None makes it at every call.
    """

    def __init__(
        self, model, timestep_map, rescale_timesteps, original_num_steps, map_tensors=None
    ):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self.map_tensors = {} if map_tensors is None else map_tensors

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        if key not in self.map_tensors:
            self.map_tensors[key] = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = self.map_tensors[key][ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
