"""
Timestep samplers for training: uniform, or importance sampling by the second
moment of recent losses (Nichol & Dhariwal 2021, section 3.3), which lowers the
variance of the L_vlb objective.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """
    Build a timestep sampler by name.

    :param name: "uniform" or "loss-second-moment".
    :param diffusion: the diffusion to sample timesteps for.
    :return: a ScheduleSampler.
    """
    samplers = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentResampler}
    if name not in samplers:
        raise ValueError(
            f'schedule_sampler="{name}": expected one of {", ".join(sorted(samplers))}'
        )
    return samplers[name](diffusion)


class ScheduleSampler(ABC):
    """
    A distribution over timesteps, with importance weights that keep the
    weighted loss an unbiased estimate of the uniformly weighted one.
    """

    @abstractmethod
    def weights(self):
        """
        :return: a numpy array of positive, not necessarily normalized,
            weights, one per timestep.
        """

    def sample(self, batch_size, device):
        """
        Draw timesteps for a batch with numpy's global generator
        (np.random.choice, one call per batch).

        :param batch_size: the number of timesteps.
        :param device: the torch device of the results.
        :return: (timesteps, weights): a long tensor of timesteps and a float
            tensor of importance weights 1 / (T * p(t)).
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """
    Every timestep equally likely; all importance weights are 1.

    :param diffusion: the diffusion to sample timesteps for.
    """

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        """
        :return: ones, one per timestep.
        """
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """
    A sampler whose weights follow the training losses it is told about.
    """

    def update_with_local_losses(self, local_ts, local_losses):
        """
        Record this process's losses after gathering every process's, so that
        all ranks keep identical weights. Batch sizes may differ between
        ranks. Without an initialized process group only the local losses are
        used.

        :param local_ts: an integer tensor of timesteps.
        :param local_losses: a 1-D tensor of losses, one per timestep.
        """
        if len(local_ts) != len(local_losses):
            raise ValueError(
                f"{len(local_ts)} timesteps but {len(local_losses)} losses: "
                "expected one loss per step"
            )
        local_ts, local_losses = local_ts.detach(), local_losses.detach()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            timesteps, losses = _all_gather_ragged(local_ts), _all_gather_ragged(local_losses)
        else:
            timesteps, losses = local_ts.tolist(), local_losses.tolist()
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Record losses from every process; the same call happens on every rank.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


def _all_gather_ragged(local_values):
    """
    All-gather 1-D tensors whose lengths differ between ranks: gather the
    lengths, pad to the longest, gather, then drop the padding.

    :return: a Python list of every rank's values, rank 0 first.
    """
    device = local_values.device
    sizes = [th.zeros(1, dtype=th.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, th.tensor([len(local_values)], dtype=th.int64, device=device))
    sizes = [int(size.item()) for size in sizes]
    padded = th.zeros(max(sizes), dtype=local_values.dtype, device=device)
    padded[: len(local_values)] = local_values
    buckets = [th.zeros_like(padded) for _ in sizes]
    dist.all_gather(buckets, padded)
    return [value for bucket, size in zip(buckets, sizes) for value in bucket[:size].tolist()]


class LossSecondMomentResampler(LossAwareSampler):
    """
    Sample t with probability proportional to sqrt(E[L_t^2]) over the last
    history_per_term losses of each step, mixed with a uniform distribution;
    uniform until every step has a full history.

    :param diffusion: the diffusion to sample timesteps for.
    :param history_per_term: how many recent losses to keep per timestep.
    :param uniform_prob: the weight of the uniform component.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        if history_per_term < 1:
            raise ValueError(f"history_per_term={history_per_term}: expected at least 1")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob={uniform_prob}: expected a probability in [0, 1]")
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        """
        :return: uniform weights until warmed up, then the normalized root
            mean square of each step's loss history mixed with uniform_prob of
            the uniform distribution.
        """
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        """
        Append each loss to its timestep's history, dropping the oldest once
        the history is full.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """
        for t, loss in zip(ts, losses):
            if not 0 <= t < self.diffusion.num_timesteps:
                raise ValueError(f"timestep {t}: expected 0 <= t < {self.diffusion.num_timesteps}")
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()

    def state_dict(self):
        """
        The loss history, for exact resume of a training run.

        :return: a dict of tensors (loadable with torch.load(weights_only=True)).
        """
        return {
            "loss_history": th.from_numpy(self._loss_history.copy()),
            "loss_counts": th.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state):
        """
        Restore the loss history saved by state_dict().

        :param state: the dict state_dict() returned.
        """
        history = np.asarray(state["loss_history"], dtype=np.float64)
        counts = np.asarray(state["loss_counts"], dtype=np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"schedule sampler state of shape {history.shape} does not fit "
                f"{self.diffusion.num_timesteps} timesteps x {self.history_per_term} losses; "
                "resume with the same diffusion_steps and schedule_sampler"
            )
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()
