"""
Tests of guided_diffusion.diffusers_export and scripts/export_diffusers.py: the
exported UNet2DModel gives our UNet's outputs for each layout diffusers can express,
the scheduler has our betas and takes our sampling step, the folder loads and runs as a
DDPMPipeline, diffusers' DDIM is ours only with use_clipped_model_output=True, and the
configurations diffusers cannot express are refused.
"""

import json

import numpy as np
import pytest
import torch as th

diffusers = pytest.importorskip("diffusers")

from test_sample_scripts import MODEL_FLAGS, run_script  # noqa: E402
from test_sampling import NUM_CLASSES, randomize_zero_weights, tiny_classifier_flags, tiny_model  # noqa: E402
from guided_diffusion.acceleration import configure_runtime  # noqa: E402
from guided_diffusion.diffusers_export import (  # noqa: E402
    convert_state_dict, export_to_diffusers, scheduler_config, unet2d_config,
)
from guided_diffusion.gaussian_diffusion import (  # noqa: E402
    GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule,
)
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion  # noqa: E402
from guided_diffusion.unet import UNetModel  # noqa: E402

TOLERANCE = 1e-5
# 16x16 over two levels of 32 and 64 channels, attention at both.
TWO_WIDTHS = dict(image_size=16, channel_mult="1,2", attention_resolutions="16,8")
LAYOUTS = {
    "uncond, legacy order, 4 heads, learned sigma, scale-shift": {},
    "class-conditional with a null label, resblock up/down": dict(
        class_cond=True, class_dropout_prob=0.1, resblock_updown=True),
    "fixed sigma, no scale-shift": dict(learn_sigma=False, use_scale_shift_norm=False),
    "new order, 4 heads": dict(use_new_attention_order=True),
    "legacy order, num_head_channels over two widths, resblock up/down": dict(
        TWO_WIDTHS, num_head_channels=8, resblock_updown=True, class_cond=True),
    "new order, num_head_channels, no scale-shift": dict(
        TWO_WIDTHS, num_head_channels=16, use_new_attention_order=True, use_scale_shift_norm=False),
    "one head over two widths": dict(TWO_WIDTHS, num_heads=1),
    "three levels, attention in the middle one only": dict(
        image_size=16, channel_mult="1,1,2", attention_resolutions="8", num_head_channels=16),
}


def batch(model, seed=1):
    """Inputs, timesteps and (for a class-conditional model) labels for both models."""
    generator = th.Generator().manual_seed(seed)
    x = th.randn(3, 3, model.image_size, model.image_size, generator=generator)
    t = th.tensor([0, 17, 39])
    y = th.tensor([0, NUM_CLASSES - 1, 2]) if model.num_classes is not None else None
    return x, t, y


def relative_error(model, unet):
    """max |diffusers - ours| / max |ours| on one batch."""
    x, t, y = batch(model)
    with th.no_grad():
        ours = model(x, t, y=y) if y is not None else model(x, t)
        theirs = unet(x, t, class_labels=y).sample
    assert theirs.shape == ours.shape
    return ((theirs - ours).abs().max() / ours.abs().max()).item()


def to_unet(model):
    unet = diffusers.UNet2DModel(**unet2d_config(model))
    unet.load_state_dict(convert_state_dict(model), strict=True)
    return unet.eval()


@pytest.mark.parametrize("overrides", LAYOUTS.values(), ids=list(LAYOUTS))
def test_unet_outputs_match(overrides):
    model, _ = tiny_model(**overrides)
    assert relative_error(model, to_unet(model)) < TOLERANCE


def test_channels_last_weights_export():
    model, _ = tiny_model(resblock_updown=True)
    configure_runtime(model, channels_last=True)
    assert relative_error(model, to_unet(model)) < TOLERANCE


def test_legacy_order_needs_the_permutation(monkeypatch):
    model, _ = tiny_model()
    assert not model.use_new_attention_order and model.middle_block[1].num_heads == 4
    monkeypatch.setattr(model, "use_new_attention_order", True)  # split as if new order
    assert relative_error(model, to_unet(model)) > 1e-2


def test_one_head_legacy_and_new_order_agree(monkeypatch):
    model, _ = tiny_model(num_heads=1)
    legacy = convert_state_dict(model)
    monkeypatch.setattr(model, "use_new_attention_order", True)
    new = convert_state_dict(model)
    assert legacy.keys() == new.keys()
    assert all(th.equal(legacy[key], new[key]) for key in legacy)


def test_scheduler_has_our_betas():
    _, diffusion = tiny_model(timestep_respacing="")
    config = scheduler_config(diffusion)
    assert config["trained_betas"] == diffusion.betas.tolist()
    assert config["num_train_timesteps"] == diffusion.num_timesteps == 40
    scheduler = diffusers.DDPMScheduler(**config)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), diffusion.alphas_cumprod, rtol=1e-5)


@pytest.mark.parametrize("overrides, variance_type, prediction_type", [
    ({}, "learned_range", "epsilon"),
    (dict(learn_sigma=False, predict_xstart=True), "fixed_large", "sample"),
])
def test_scheduler_step_is_our_p_sample(overrides, variance_type, prediction_type):
    model, diffusion = tiny_model(timestep_respacing="", **overrides)
    config = scheduler_config(diffusion)
    assert (config["variance_type"], config["prediction_type"]) == (variance_type, prediction_type)
    scheduler = diffusers.DDPMScheduler(**config)
    x, _, _ = batch(model)
    step = 17
    t = th.full((x.shape[0],), step)
    with th.no_grad():
        output = model(x, t)
        ours = diffusion.p_mean_variance(model, x, t, clip_denoised=True)
    theirs = scheduler.step(output, step, x, generator=th.Generator().manual_seed(5)).prev_sample
    noise = th.randn(x.shape, generator=th.Generator().manual_seed(5))
    expected = ours["mean"] + th.exp(0.5 * ours["log_variance"]) * noise
    assert ((theirs - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_export_writes_what_from_pretrained_reads(tmp_path):
    model, diffusion = tiny_model(timestep_respacing="", class_cond=True)
    unet_dir, scheduler_dir = export_to_diffusers(model, diffusion, str(tmp_path))
    assert sorted(path.name for path in (tmp_path / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert json.loads((tmp_path / "model_index.json").read_text()) == {
        "_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    assert relative_error(model, diffusers.UNet2DModel.from_pretrained(unet_dir).eval()) < TOLERANCE
    scheduler = diffusers.DDPMScheduler.from_pretrained(scheduler_dir)
    np.testing.assert_allclose(scheduler.betas.numpy(), diffusion.betas, rtol=1e-6)
    with pytest.raises(ValueError, match="already holds .*overwrite=True"):
        export_to_diffusers(model, diffusion, str(tmp_path))
    export_to_diffusers(model, diffusion, str(tmp_path), overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model_index.json", "scheduler", "unet"]


def exported_pipeline(tmp_path):
    """An unconditional tiny model with learned sigmas over 40 steps, and its DDPMPipeline."""
    model, diffusion = tiny_model(timestep_respacing="")
    export_to_diffusers(model, diffusion, str(tmp_path))
    pipeline = diffusers.DDPMPipeline.from_pretrained(str(tmp_path))
    pipeline.set_progress_bar_config(disable=True)
    return model, pipeline


def test_the_folder_runs_as_a_ddpm_pipeline_with_our_steps(tmp_path):
    model, pipeline = exported_pipeline(tmp_path)
    assert isinstance(pipeline.unet, diffusers.UNet2DModel)
    assert isinstance(pipeline.scheduler, diffusers.DDPMScheduler)
    images = pipeline(batch_size=2, num_inference_steps=2, generator=th.Generator().manual_seed(3),
                      output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    # The same two steps (t = 20, 0) with our sampler and the pipeline's draws: x_T, then one noise.
    respaced = create_gaussian_diffusion(steps=40, learn_sigma=True, timestep_respacing="ddim2")
    assert pipeline.scheduler.timesteps.tolist() == respaced.timestep_map[::-1] == [20, 0]
    generator = th.Generator().manual_seed(3)
    noise = th.randn(2, 3, 8, 8, generator=generator)
    with th.no_grad():
        ours = respaced.p_sample_loop(model, noise.shape, noise=noise,
                                      noise_fn=lambda x: th.randn(x.shape, generator=generator))
    expected = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-4)


def ddim_difference(model, pipeline, steps, use_clipped):
    """max |diffusers' DDIM - ours| from one x_T over `steps` steps (eta=0, x_0 clipped)."""
    scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config)
    assert (scheduler.config.clip_sample, scheduler.config.clip_sample_range) == (True, 1.0)
    assert not scheduler.config.thresholding and scheduler.config.timestep_spacing == "leading"
    scheduler.set_timesteps(steps)
    respaced = create_gaussian_diffusion(steps=40, learn_sigma=True, timestep_respacing=f"ddim{steps}")
    assert scheduler.timesteps.tolist() == respaced.timestep_map[::-1]
    x = noise = th.randn(2, 3, 8, 8, generator=th.Generator().manual_seed(4))
    with th.no_grad():
        for t in scheduler.timesteps:
            epsilon = pipeline.unet(x, t).sample[:, :3]  # DDIMScheduler does not split off the variance
            x = scheduler.step(epsilon, t, x, eta=0.0, use_clipped_model_output=use_clipped).prev_sample
        ours = respaced.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=True, eta=0.0)
    return (x - ours).abs().max().item()


def test_diffusers_ddim_is_ours_with_use_clipped_model_output(tmp_path):
    model, pipeline = exported_pipeline(tmp_path)
    clipped = ddim_difference(model, pipeline, 5, use_clipped=True)
    unclipped = ddim_difference(model, pipeline, 5, use_clipped=False)
    assert clipped < 1e-3 and unclipped > 0.5  # measured: 4e-5 and 2.0 (samples lie in [-1, 1])


@pytest.mark.slow
def test_script_exports_a_checkpoint(tmp_path):
    model, _ = tiny_model()
    th.save(model.state_dict(), tmp_path / "model.pt")
    out_dir = tmp_path / "exported"
    args = [*MODEL_FLAGS, "--model_path", tmp_path / "model.pt", "--out_dir", out_dir]
    result = run_script("export_diffusers.py", args)
    assert "--timestep_respacing 6 is not exported" in result.stdout
    assert f"wrote {out_dir / 'unet'}, {out_dir / 'scheduler'} and {out_dir / 'model_index.json'}" in result.stdout
    unet = diffusers.UNet2DModel.from_pretrained(str(out_dir / "unet")).eval()
    assert relative_error(model, unet) < TOLERANCE
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(out_dir / "scheduler"))
    assert scheduler.config.num_train_timesteps == 40
    assert scheduler.config.variance_type == "learned_range"
    again = run_script("export_diffusers.py", args, check=False)
    assert again.returncode == 1
    assert "already holds" in again.stderr and "--overwrite True" in again.stderr


def unet(**overrides):
    """A tiny UNetModel built directly, for the options the flags do not reach."""
    arguments = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3,
                     num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2))
    return randomize_zero_weights(UNetModel(**dict(arguments, **overrides)))


MODEL_REFUSALS = {
    "super-resolution": (lambda: tiny_model(super_res=True)[0], "SuperResModel: diffusers"),
    "classifier": (lambda: create_classifier(**tiny_classifier_flags()), "EncoderUNetModel"),
    "dims": (lambda: unet(dims=1), "dims=1"),
    "channel_mult": (lambda: tiny_model(channel_mult="2,2")[0], r"channel_mult=\(2, 2\)"),
    "conv_resample": (lambda: unet(conv_resample=False), "conv_resample=False"),
    "num_heads over widths": (lambda: tiny_model(**TWO_WIDTHS, num_heads=2)[0],
                              r"num_heads=2 over attention widths \[32, 64\]"),
    "num_heads_upsample": (lambda: tiny_model(num_heads=2, num_heads_upsample=4)[0],
                           "num_heads_upsample=4 differs from num_heads=2"),
}


@pytest.mark.parametrize("build, message", MODEL_REFUSALS.values(), ids=list(MODEL_REFUSALS))
def test_refuses_what_diffusers_cannot_express(build, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        unet2d_config(model)
    with pytest.raises(ValueError, match=message):
        convert_state_dict(model)


def diffusion(**overrides):
    arguments = dict(betas=get_named_beta_schedule("linear", 40), model_mean_type=ModelMeanType.EPSILON,
                     model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)
    return GaussianDiffusion(**dict(arguments, **overrides))


DIFFUSION_REFUSALS = {
    "respaced": (lambda: tiny_model()[1], 'keeps 6 of its 40 steps.*timestep_respacing=""'),
    "rescale_timesteps": (lambda: diffusion(rescale_timesteps=True),
                          "rescale_timesteps=True with 40 steps"),
    "learned log-variance": (lambda: diffusion(model_var_type=ModelVarType.LEARNED),
                             "model_var_type=LEARNED:"),
    "x_{t-1} prediction": (lambda: diffusion(model_mean_type=ModelMeanType.PREVIOUS_X),
                           "model_mean_type=PREVIOUS_X"),
}


@pytest.mark.parametrize("build, message", DIFFUSION_REFUSALS.values(), ids=list(DIFFUSION_REFUSALS))
def test_refuses_schedules_diffusers_cannot_express(build, message):
    with pytest.raises(ValueError, match=message):
        scheduler_config(build())


def test_refuses_a_model_and_diffusion_that_disagree_on_sigma(tmp_path):
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="6 output channels.*needs 3: .*same learn_sigma"):
        export_to_diffusers(model, diffusion(), str(tmp_path))
    assert not any(tmp_path.iterdir())
