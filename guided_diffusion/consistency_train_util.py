"""
Consistency distillation training: ConsistencyTrainLoop trains a student (the teacher's
architecture, started from its weights with consistency.init_student) with
consistency.consistency_distillation_loss against a frozen teacher and a target network,
on top of train_util.TrainLoop (scripts/consistency_distill.py).

The target network is an EMA of the student with rate target_ema (mu; 0: the student's
weights, without gradient), updated after each finite optimizer step, after the usual
sampling EMAs (ema_rate). A save at step N writes, besides TrainLoop's model, EMA and
opt files, `target_NNNNNN.pt` (or .safetensors, as --checkpoint_format) with a sidecar of
kind "target", before optNNNNNN.pt (written last: a step is complete when its opt file
exists); a resume reads the target of its step, so that it continues bit-exactly.

Per microbatch the random draws are consistency_distillation_loss's, from torch's global
generator (seeded per rank by TrainLoop): the grid index n, then the noise z; then the
teacher's, the target's and the student's dropout, in that order.
"""

import copy
from types import SimpleNamespace

import blobfile as bf
import torch as th

from . import logger, training_state
from .checkpoint import SAFETENSORS_SUFFIX, read_state_dict
from .consistency import (
    DISTANCES, TEACHER_SOLVERS, WEIGHTINGS, ConsistencyFunction, consistency_distillation_loss,
    consistency_sample, consistency_sigma_range, consistency_sigmas, ict_num_scales, karras_sigmas,
    update_target,
)
from .solver_schedule import ContinuousSchedule
from .train_util import PREVIEW_SEED, TrainLoop

ICT_NUM_SCALES = 0  # num_scales meaning iCT's doubling schedule over max_steps (ict_num_scales)
PREVIEW_EVALUATIONS = (1, 2)  # the preview grid's consistency sampling, from the same x_T


def target_filename(step, checkpoint_format="pt"):
    """
    :return: the name of the target network's checkpoint of a step, e.g. target001000.pt.
    """
    return f"target_{step:06d}{training_state.CHECKPOINT_FORMATS[checkpoint_format]}"


def without_labels(model):
    """
    :param model: an unconditional network (a teacher guided by a classifier).
    :return: model(x, timesteps, y=None, **kwargs) that drops the labels, which only the
        classifier (cond_fn) and a class-conditional student use.
    """

    def unconditional(x, timesteps, y=None, **kwargs):
        return model(x, timesteps, **kwargs)

    return unconditional


def check_consistency_arguments(num_scales, target_ema, teacher_solver, loss, weighting, max_steps):
    """
    Raise a ValueError naming the first ConsistencyTrainLoop argument out of range.
    """
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or (
            num_scales != ICT_NUM_SCALES and num_scales < 2):
        raise ValueError(f"num_scales={num_scales}: expected an integer of at least 2 noise levels, "
                         f"or {ICT_NUM_SCALES} for iCT's doubling schedule over max_steps")
    if num_scales == ICT_NUM_SCALES and max_steps < 1:
        raise ValueError(f"num_scales={num_scales} (iCT's doubling schedule) needs the length of the "
                         f"run: max_steps={max_steps}, expected a positive number of steps")
    if not 0 <= target_ema < 1:
        raise ValueError(f"target_ema={target_ema}: expected a rate in [0, 1) (0: the target is the "
                         "student's weights; CM's CD used 0.95)")
    for name, value, choices in (("teacher_solver", teacher_solver, TEACHER_SOLVERS),
                                 ("loss", loss, DISTANCES), ("weighting", weighting, WEIGHTINGS)):
        if value not in choices:
            raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")


class ConsistencyTrainLoop(TrainLoop):
    """
    Consistency distillation (Song et al. 2023, CD) of a frozen teacher into the model: the
    same microbatching, sampling EMAs, mixed precision, checkpoints and exact resumption
    as TrainLoop, plus the target network (the module docstring). The loss is logged as
    "loss", and per quarter of the noise-level grid (loss_q0 lowest .. loss_q3).
    """

    def __init__(
        self,
        *,
        teacher,                    # the frozen teacher, called as teacher(x, timesteps, **model_kwargs)
                                    # (guidance.classifier_free_model or without_labels as needed)
        diffusion,                  # the teacher's diffusion (schedule and parametrisation)
        num_scales=18,              # N noise levels of the grid (>= 2), or 0: iCT's schedule over max_steps
        target_ema=0.95,            # mu, the target network's EMA rate of the student, in [0, 1)
        teacher_solver="heun",      # the teacher's ODE step: heun, ddim or dpmpp_2m
        loss="pseudo_huber",        # the distance: l2 or pseudo_huber
        weighting="uniform",        # uniform or ict (1 / (sigma_{n+1} - sigma_n))
        cond_fn=None,               # classifier guidance of the teacher's step (guidance.classifier_cond_fn)
        clip_denoised=True,         # clamp x_0 to [-1, 1] as ADM's samplers do: the teacher's in its steps,
                                    # D in the student's and target's functions (straight through)
        max_steps=0,
        **kwargs,                   # model (the student, init_student'ed), data, batch_size, ...: as TrainLoop
    ):
        """
        See the argument comments.
        """
        check_consistency_arguments(num_scales, target_ema, teacher_solver, loss, weighting, max_steps)
        self.teacher, self.cond_fn, self.clip_denoised = teacher, cond_fn, clip_denoised
        self.num_scales, self.target_ema = num_scales, target_ema
        self.teacher_solver, self.loss, self.weighting = teacher_solver, loss, weighting
        self.schedule = ContinuousSchedule(diffusion)
        self.sigma_min, self.sigma_max = consistency_sigma_range(self.schedule)
        super().__init__(diffusion=diffusion, max_steps=max_steps, **kwargs)
        self.target_model = copy.deepcopy(self.model).requires_grad_(False)
        self.target_params = self._load_target_parameters(kwargs.get("resume_checkpoint"))
        self._copy_target_to_network()
        self.student_fn, self.target_fn = (
            ConsistencyFunction(network, self.schedule, diffusion.model_mean_type, self.sigma_min,
                                clip_denoised=clip_denoised)
            for network in (self.ddp_model, self.target_model))

    def _load_target_parameters(self, resume_checkpoint):
        """
        :param resume_checkpoint: the model checkpoint resumed, or "" / None.
        :return: the target's master parameters: target_NNNNNN beside the resumed model
            checkpoint, else a copy of the student's.
        """
        if not resume_checkpoint:
            return copy.deepcopy(self.mp_trainer.master_params)
        checkpoint_format = "safetensors" if resume_checkpoint.endswith(SAFETENSORS_SUFFIX) else "pt"
        path = bf.join(bf.dirname(resume_checkpoint), target_filename(self.step, checkpoint_format))
        if not bf.exists(path):
            raise FileNotFoundError(
                f"resume_checkpoint={resume_checkpoint}: the target network {bf.basename(path)} of step "
                f"{self.step} is not beside it (a consistency run writes one with every checkpoint); "
                f"to start a new run from these weights use init_checkpoint={resume_checkpoint}")
        logger.log(f"loading the target network from {path}...")
        return self.mp_trainer.state_dict_to_master_params(read_state_dict(path, map_location=self.device))

    def _copy_target_to_network(self):
        """Load the target's master parameters into the network that evaluates it."""
        self.target_model.load_state_dict(self.mp_trainer.master_params_to_state_dict(self.target_params))

    def grid_size(self):
        """
        :return: this step's number of noise levels: num_scales, or iCT's
            ict_num_scales(step, max_steps).
        """
        return self.num_scales or ict_num_scales(self.step, self.max_steps)

    def noise_levels(self):
        """
        :return: this step's ascending grid of grid_size() noise levels (karras_sigmas over
            the teacher's range).
        """
        return karras_sigmas(self.sigma_min, self.sigma_max, self.grid_size())

    def compute_loss(self, micro, micro_cond):
        """
        :param micro: a microbatch of images on the device.
        :param micro_cond: its model kwargs ({"y": labels} for a class-conditional student).
        :return: the mean consistency distillation loss.
        """
        sigmas = self.noise_levels()
        with self.mp_trainer.autocast():
            losses = consistency_distillation_loss(
                self.student_fn, self.target_fn, self.teacher, self.schedule, self.diffusion.model_mean_type,
                micro, sigmas, solver=self.teacher_solver, distance=self.loss, weighting=self.weighting,
                model_kwargs=micro_cond, cond_fn=self.cond_fn, clip_denoised=self.clip_denoised,
            )
        # LossLog splits the logged loss into quarters of [0, num_timesteps): of the grid here.
        grid = SimpleNamespace(num_timesteps=len(sigmas) - 1)
        self.loss_log.add(grid, losses["grid_index"], {"loss": losses["loss"]})
        return losses["loss"].mean()

    def preview_samples(self, model, shape, model_kwargs):
        """
        :return: the preview grid's images: consistency sampling at each PREVIEW_EVALUATIONS
            (one grid row block each, from the same x_T), in [-1, 1].
        """
        function = ConsistencyFunction(model, self.schedule, self.diffusion.model_mean_type, self.sigma_min,
                                       clip_denoised=self.clip_denoised)
        images = []
        for evaluations in PREVIEW_EVALUATIONS:
            th.manual_seed(PREVIEW_SEED)  # inside save_samples' forked generator
            sigmas = consistency_sigmas(self.sigma_min, self.sigma_max, evaluations)
            images.append(consistency_sample(function, self.schedule, shape, sigmas, model_kwargs=model_kwargs,
                                             device=self.device))
        return th.cat(images)

    def _update_ema(self):
        super()._update_ema()
        update_target(self.target_params, self.mp_trainer.master_params, self.target_ema)
        self._copy_target_to_network()

    def log_step(self):
        super().log_step()
        logger.logkv("num_scales", self.grid_size())

    def _write_checkpoints(self, rng_states, data_states):
        path = bf.join(logger.get_dir(), target_filename(self.step, self.checkpoint_format))
        training_state.save_checkpoint(
            path, self.mp_trainer.master_params_to_state_dict(self.target_params),
            training_state.make_sidecar("target", self.step, self.flags, ema_rate=self.target_ema,
                                        class_names=self.class_names),
        )
        super()._write_checkpoints(rng_states, data_states)  # the opt file last: the step is complete
