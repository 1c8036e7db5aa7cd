import numpy as np
import pytest
import torch as th

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from guided_diffusion.respace import SpacedDiffusion, respace_diffusion, space_timesteps


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def diffusion_kwargs(
    steps=100, schedule="linear", var_type=ModelVarType.LEARNED_RANGE, **overrides
):
    return dict(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=LossType.RESCALED_MSE,
        **overrides,
    )


# ----------------------------------------------------------------------------- space_timesteps


def test_section_counts_space_each_section_evenly():
    assert space_timesteps(100, "10") == set(range(0, 100, 11))
    steps = space_timesteps(300, [10, 15, 20])
    assert len(steps) == 45
    assert sorted(steps)[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert {0, 99, 100, 199, 200, 299} <= steps
    assert space_timesteps(300, "10,15,20") == steps
    assert space_timesteps(10, "1,0") == {0}


def test_sections_share_the_remainder_from_the_front():
    # 10 steps in 3 sections: sizes 4, 3, 3 starting at 0, 4, 7.
    assert sorted(space_timesteps(10, [4, 3, 3])) == list(range(10))
    assert sorted(space_timesteps(10, [2, 2, 2])) == [0, 3, 4, 6, 7, 9]


def test_fractional_strides_round_like_the_original():
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert steps[:6] == [0, 4, 8, 12, 16, 20] and steps[-3:] == [991, 995, 999]
    assert sorted(space_timesteps(1000, "25")) == [round(i * 999 / 24) for i in range(25)]


def test_ddim_strings_use_an_exact_integer_stride():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    assert space_timesteps(10, "ddim4") == {0, 3, 6, 9}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ddim7x", 'timestep_respacing="ddim7x": expected "ddimN"'),
        ("ddim", '"ddim": expected "ddimN"'),
        ("10,,5", r'"10,,5": expected "ddimN" .* or comma-separated integers'),
        ("fast", '"fast": expected'),
        ("2000", r"ask for 2000 steps, but the diffusion has only 1000"),
        ("ddim2000", r"asks for 2000 steps, but the diffusion has only 1000"),
        ("600,300", r"section 0 \(steps 0..499\) has 500 steps, cannot keep 600"),
        ("-5", "non-negative integers"),
    ],
)
def test_bad_respacing_raises_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, spec)


def test_ddim_count_without_an_integer_stride_raises():
    # Strides 1..9 of 10 steps give 10, 5, 4, 3, 2, 2, 2, 2, 2 steps.
    with pytest.raises(ValueError, match="no integer stride gives exactly 6 of 10 steps"):
        space_timesteps(10, "ddim6")


# ----------------------------------------------------------------------------- SpacedDiffusion


def test_spaced_alphas_cumprod_equal_the_base_at_kept_steps():
    base = GaussianDiffusion(**diffusion_kwargs(1000, "cosine"))
    kept = space_timesteps(1000, "ddim10")
    spaced = SpacedDiffusion(kept, **diffusion_kwargs(1000, "cosine"))
    assert spaced.timestep_map == sorted(kept) and spaced.num_timesteps == 10
    assert spaced.original_num_steps == 1000
    assert np.allclose(spaced.alphas_cumprod, base.alphas_cumprod[sorted(kept)], rtol=1e-12)
    assert spaced.betas[0] == base.betas[0]


def test_spacing_with_every_step_equals_the_base_process(tiny_model):
    base = GaussianDiffusion(**diffusion_kwargs(50))
    spaced = SpacedDiffusion(range(50), **diffusion_kwargs(50))
    assert np.allclose(spaced.betas, base.betas, rtol=1e-12, atol=0)
    model = tiny_model(3, 6)
    x_start, t = th.rand(2, 3, 4, 4) * 2 - 1, th.tensor([0, 33])
    noise = th.randn_like(x_start)
    for key in ("loss", "mse", "vb"):
        assert th.allclose(
            spaced.training_losses(model, x_start, t, noise=noise)[key],
            base.training_losses(model, x_start, t, noise=noise)[key],
            rtol=1e-5,
        )
    samples = []
    for diffusion in (base, spaced):
        th.manual_seed(0)
        samples.append(diffusion.p_sample_loop(model, (2, 3, 4, 4)))
    assert th.allclose(samples[0], samples[1], rtol=1e-5, atol=1e-5)


def test_model_and_cond_fn_see_original_timesteps(tiny_model):
    spaced = SpacedDiffusion(
        [0, 40, 80], **diffusion_kwargs(100, var_type=ModelVarType.FIXED_LARGE)
    )
    model = tiny_model()
    cond_timesteps = []

    def cond_fn(x, t, **kwargs):
        cond_timesteps.append(t.tolist())
        return th.zeros_like(x)

    spaced.p_sample_loop(model, (1, 3, 2, 2), cond_fn=cond_fn)
    assert [t.tolist() for t in model.calls] == [[80], [40], [0]]
    assert cond_timesteps == [[80], [40], [0]]
    spaced.ddim_sample_loop(model, (1, 3, 2, 2), cond_fn=cond_fn)
    assert cond_timesteps[3:] == [[80], [40], [0]]


def test_rescaled_timesteps_are_scaled_by_the_original_step_count(tiny_model):
    spaced = SpacedDiffusion(
        [0, 50, 199],
        **diffusion_kwargs(200, var_type=ModelVarType.FIXED_SMALL, rescale_timesteps=True),
    )
    model = tiny_model()
    spaced.p_mean_variance(model, th.randn(3, 3, 2, 2), th.tensor([0, 1, 2]))
    assert model.calls[-1].dtype == th.float32
    assert model.calls[-1].tolist() == [0.0, 250.0, 995.0]


def test_spaced_diffusion_rejects_steps_outside_the_base():
    with pytest.raises(ValueError, match=r"use_timesteps \[100\]: steps must lie in \[0, 99\]"):
        SpacedDiffusion([0, 50, 100], **diffusion_kwargs(100))


# ----------------------------------------------------------------------------- respace_diffusion


def test_respacing_keeps_the_timesteps_the_model_was_trained_with(tiny_model):
    kwargs = diffusion_kwargs(200, var_type=ModelVarType.FIXED_SMALL, rescale_timesteps=True)
    base = GaussianDiffusion(**kwargs)
    model = tiny_model()
    fewer = respace_diffusion(base, [3])
    assert fewer.timestep_map == [0, 100, 199] and fewer.original_num_steps == 200
    fewer.ddim_sample_loop(model, (1, 3, 2, 2))
    assert [t.tolist() for t in model.calls] == [[995.0], [500.0], [0.0]]  # scaled to [0, 1000)

    # A SpacedDiffusion spaced again: steps 0 and 3 of its own four, base steps 0 and 199.
    spaced = SpacedDiffusion([0, 50, 100, 199], **kwargs)
    again = respace_diffusion(spaced, [2])
    assert again.timestep_map == [0, 199] and again.num_timesteps == 2
    assert np.allclose(again.alphas_cumprod, base.alphas_cumprod[[0, 199]], rtol=1e-12)
    model.calls.clear()
    again.ddim_sample_loop(model, (1, 3, 2, 2))
    assert [t.tolist() for t in model.calls] == [[995.0], [0.0]]
