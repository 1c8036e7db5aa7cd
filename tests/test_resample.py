import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch as th
import torch.distributed as dist
import torch.multiprocessing as mp

from guided_diffusion.resample import (
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)


def fake_diffusion(num_timesteps):
    return SimpleNamespace(num_timesteps=num_timesteps)


def test_create_named_schedule_sampler():
    diffusion = fake_diffusion(8)
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(sampler, LossSecondMomentResampler)
    assert (sampler.history_per_term, sampler.uniform_prob) == (10, 0.001)
    with pytest.raises(
        ValueError, match='"importance": expected one of loss-second-moment, uniform'
    ):
        create_named_schedule_sampler("importance", diffusion)


def test_uniform_sampler_draws_with_numpy_and_unit_weights():
    sampler = UniformSampler(fake_diffusion(6))
    np.random.seed(3)
    indices, weights = sampler.sample(1000, "cpu")
    np.random.seed(3)
    expected = np.random.choice(6, size=(1000,), p=np.full(6, 1 / 6))
    assert indices.dtype == th.int64 and weights.dtype == th.float32
    assert indices.tolist() == expected.tolist()
    assert (weights == 1).all() and set(indices.tolist()) == set(range(6))


def test_importance_weights_are_unbiased():
    class Fixed(ScheduleSampler):
        def weights(self):
            return np.array([1.0, 3.0, 6.0])

    np.random.seed(0)
    indices, weights = Fixed().sample(4, "cpu")
    p = np.array([0.1, 0.3, 0.6])
    assert weights.tolist() == pytest.approx((1 / (3 * p[indices.numpy()])).tolist(), rel=1e-6)
    # E_p[w(t) f(t)] = mean_t f(t) for any f.
    f = np.array([2.0, -1.0, 5.0])
    assert np.sum(p * (1 / (3 * p)) * f) == pytest.approx(f.mean())


def test_second_moment_sampler_is_uniform_until_warmed_up_then_follows_rms_losses():
    sampler = LossSecondMomentResampler(fake_diffusion(3), history_per_term=2, uniform_prob=0.1)
    sampler.update_with_all_losses([0, 1, 2, 0, 1], [1.0, 2.0, 3.0, 1.0, 2.0])
    assert sampler.weights().tolist() == [1.0, 1.0, 1.0]
    sampler.update_with_all_losses([2], [4.0])
    rms = np.array([1.0, 2.0, np.sqrt((9 + 16) / 2)])
    expected = rms / rms.sum() * 0.9 + 0.1 / 3
    assert sampler.weights() == pytest.approx(expected)
    # A full history drops its oldest loss.
    sampler.update_with_all_losses([0], [5.0])
    assert sampler._loss_history[0].tolist() == [1.0, 5.0]


def test_second_moment_sampler_validates_arguments():
    with pytest.raises(ValueError, match="history_per_term=0"):
        LossSecondMomentResampler(fake_diffusion(3), history_per_term=0)
    with pytest.raises(ValueError, match="uniform_prob=1.5"):
        LossSecondMomentResampler(fake_diffusion(3), uniform_prob=1.5)
    sampler = LossSecondMomentResampler(fake_diffusion(3))
    with pytest.raises(ValueError, match="timestep 3"):
        sampler.update_with_all_losses([3], [1.0])
    with pytest.raises(ValueError, match="one loss per step"):
        sampler.update_with_local_losses(th.tensor([0, 1]), th.tensor([1.0]))


def test_local_losses_without_a_process_group():
    assert not dist.is_initialized()
    sampler = LossSecondMomentResampler(fake_diffusion(4), history_per_term=1)
    losses = th.tensor([0.5, 1.5, 2.5, 3.5], requires_grad=True)
    sampler.update_with_local_losses(th.tensor([3, 2, 1, 0]), losses * 1)
    assert sampler._loss_history[:, 0].tolist() == [3.5, 2.5, 1.5, 0.5]


def _gather_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    sampler = LossSecondMomentResampler(fake_diffusion(10), history_per_term=3)
    # Rank 0 has 2 losses, rank 1 has 5: the gather must handle ragged batches.
    ts = th.tensor([[1, 2], [3, 4, 5, 1, 1]][rank])
    losses = th.tensor([[0.25, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]][rank])
    sampler.update_with_local_losses(ts, losses)
    np.save(os.path.join(out_dir, f"history{rank}.npy"), sampler._loss_history)
    dist.destroy_process_group()


@pytest.mark.slow
def test_local_losses_are_gathered_across_ragged_ranks(tmp_path):
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    history = [np.load(tmp_path / f"history{rank}.npy") for rank in (0, 1)]
    assert np.array_equal(history[0], history[1])
    # Rank 0's losses come first, then rank 1's in order.
    assert history[0][1].tolist() == [0.25, 4.0, 5.0]
    assert history[0][2:6, 0].tolist() == [0.5, 1.0, 2.0, 3.0]


def test_loss_second_moment_state_round_trips_through_a_checkpoint(tmp_path):
    diffusion = SimpleNamespace(num_timesteps=4)
    sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
    sampler.update_with_all_losses([0, 1, 2, 3, 0, 1, 2, 3, 3], [1.0, 2.0, 3.0, 4.0] * 2 + [8.0])
    path = tmp_path / "sampler.pt"
    th.save(sampler.state_dict(), path)
    restored = LossSecondMomentResampler(diffusion, history_per_term=2)
    restored.load_state_dict(th.load(path, weights_only=True))
    assert (restored.weights() == sampler.weights()).all()
    assert restored._loss_history[3].tolist() == [4.0, 8.0]
    too_long = LossSecondMomentResampler(diffusion, history_per_term=3)
    with pytest.raises(ValueError, match="same diffusion_steps"):
        too_long.load_state_dict(sampler.state_dict())
