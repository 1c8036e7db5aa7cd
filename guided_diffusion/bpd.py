"""
Bits per dimension: the full variational bound of dataset images under a
diffusion model (diffusion.calc_bpd_loop), over all processes and gathered in
image order, as scripts/image_nll.py reports it.

The work split is work_split.py's (as sampling's): rounds of `batch_size * world_size` consecutive
image indices, rank r taking its slice of each round. With a seed, image i's
noise comes from its own generator seeded from (seed, BPD_STREAM, i), so the
terms depend only on the seed and the image index, not on the batch size or the
number of processes; without one, calc_bpd_loop draws from the global RNG.
"""

import numpy as np
import torch as th
from tqdm.auto import tqdm

from . import dist_util, logger
from .acceleration import accelerate
from .work_split import BPD_STREAM, PerSampleNoise, check_counts, gather_in_order, rounds


def evaluate_bpd(
    model,
    diffusion,
    dataset,                # indexable: dataset[i] -> (CHW float32 image in [-1, 1], kwargs dict)
    num_samples,            # evaluate dataset[i % len(dataset)] for i < num_samples
    batch_size,             # images per forward pass on each process
    clip_denoised=True,     # clamp x_0 predictions to [-1, 1]
    seed=None,              # per-image seeded noise (None: the global RNG)
    device=None,            # default: the model's device
    progress=True,          # tqdm bar (on rank 0)
    use_bf16=False,         # bfloat16 autocast for the model (other numbers)
    compile=False,          # torch.compile the model (eager if compilation fails)
):
    """
    The variational bound in bits per dimension of dataset images
    (diffusion.calc_bpd_loop), over all processes, gathered in image order.

    :return: a dict of numpy arrays: 'total_bpd' and 'prior_bpd' [N], and 'vb',
             'mse', 'xstart_mse' [N x T] (column j is timestep T-1-j).
    """
    check_counts(num_samples=num_samples, batch_size=batch_size)
    if device is None:
        device = next(model.parameters()).device
    if num_samples > len(dataset):
        logger.warn(f"num_samples={num_samples} > {len(dataset)} images: images are repeated")
    run = accelerate(model, compile=compile, use_bf16=use_bf16, device=device)
    world_size, rank = dist_util.get_world_size(), dist_util.get_rank()
    plan = rounds(num_samples, batch_size, world_size)
    steps = sum(len(work[rank]) > 0 for work in plan) * diffusion.num_timesteps
    names = ("total_bpd", "prior_bpd", "vb", "mse", "xstart_mse")
    gathered = {name: [] for name in names}
    with tqdm(total=steps, unit="step", desc="bpd", disable=not progress or rank > 0) as bar:
        for work in plan:
            indices = work[rank]
            per_step = (0, diffusion.num_timesteps)
            local = {
                name: th.zeros((0,) if name.endswith("bpd") else per_step, device=device)
                for name in names
            }
            if len(indices):
                local = _batch_bpd(diffusion, run, dataset, indices, clip_denoised, seed, device)
                bar.update(diffusion.num_timesteps)
            for name in names:
                gathered[name].append(gather_in_order(local[name].float(), work, batch_size).cpu())
            done = sum(len(part) for part in gathered["total_bpd"])
            logger.log(f"done {done} samples: bpd={th.cat(gathered['total_bpd']).mean().item()}")
    return {name: th.cat(parts).numpy() for name, parts in gathered.items()}


def _batch_bpd(diffusion, model, dataset, indices, clip_denoised, seed, device):
    """
    calc_bpd_loop on the images dataset[i % len(dataset)] for i in indices.
    """
    items = [dataset[index % len(dataset)] for index in indices]
    images = th.from_numpy(np.stack([image for image, _ in items])).to(device)
    model_kwargs = {
        name: th.from_numpy(np.stack([kwargs[name] for _, kwargs in items])).to(device)
        for name in items[0][1]
    }
    options = {}
    if seed is not None:
        options["noise_fn"] = PerSampleNoise(seed, indices, stream=BPD_STREAM)
    return diffusion.calc_bpd_loop(
        model, images, clip_denoised=clip_denoised, model_kwargs=model_kwargs, **options
    )
