"""
Training loop: TrainLoop for diffusion models, with microbatches, EMA, mixed
precision, checkpoints and exact resumption. The classifier's loop,
ClassifierTrainLoop, builds on TrainLoop in classifier_train_util.py; the training
scripts' flags become its arguments in command_line.py.

Step semantics: `self.step` counts optimizer steps done (resumed ones included);
the checkpoint `modelNNNNNN.pt` holds the weights after NNNNNN steps, and the
logged "step" is the index of the step just taken (0 first), as in the original.
Per microbatch the random draws are: the schedule sampler's timesteps (numpy's
global generator), the label dropout if class_dropout_prob > 0, then the noise and
the model's dropout (torch's global generator).
"""

import contextlib
import copy
import inspect

import blobfile as bf
import numpy as np
import torch as th
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger, training_state
from .acceleration import accelerate, configure_runtime
# parse_resume_step_from_filename is re-exported: the original had it here.
from .training_state import find_ema_checkpoint, parse_resume_step_from_filename  # noqa: F401
from .checkpoint import load_checkpoint, read_state_dict
from .fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer
from .file_writing import save_image_grid
from .image_grid import to_uint8_nhwc
from .nn import update_ema
from .solvers import check_sampler
from .resample import LossAwareSampler, UniformSampler
from .run_lock import hold_log_dir, release_log_dir
from .respace import respace_diffusion
from .work_split import forked_torch_seed, set_seed

# Sample previews (--sample_interval): how many images, DDIM steps, and the noise seed.
PREVIEW_SAMPLES = 8
PREVIEW_STEPS = 25
PREVIEW_SEED = 0


# DDP keyword that stops buffers being broadcast from rank 0 at every forward (the
# original's broadcast_buffers=False, renamed forward_sync_buffers in newer torch).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


def parse_ema_rates(ema_rate):
    """
    :param ema_rate: a float, or comma-separated floats as text ("" for none).
    :return: a list of floats.
    """
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    try:
        rates = [float(rate) for rate in ema_rate.split(",") if rate.strip()]
    except ValueError:
        raise ValueError(
            f'ema_rate="{ema_rate}": expected comma-separated floats, e.g. 0.9999,0.9999432'
        ) from None
    bad = [rate for rate in rates if not 0.0 <= rate < 1.0]
    if bad:
        raise ValueError(f"ema_rate={bad}: rates must lie in [0, 1)")
    return rates


def _check_arguments(batch_size, log_interval, save_interval, lr_anneal_steps,
                     resume_checkpoint, init_checkpoint):
    """
    Raise a ValueError naming the first TrainLoop argument out of range.
    """
    if logger.get_dir() is None:
        raise ValueError(
            "call logger.configure() before TrainLoop: checkpoints go to the log directory"
        )
    for name, interval in (("log_interval", log_interval), ("save_interval", save_interval)):
        if interval < 1:
            raise ValueError(f"{name}={interval}: expected a positive number of steps")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive number of images")
    if lr_anneal_steps < 0:
        raise ValueError(
            f"lr_anneal_steps={lr_anneal_steps}: expected a positive number of steps "
            "(or 0 for a constant learning rate)"
        )
    if resume_checkpoint and init_checkpoint:
        raise ValueError(
            f"resume_checkpoint={resume_checkpoint} continues a run and "
            f"init_checkpoint={init_checkpoint} starts a new one: pass one"
        )


class TrainLoop:
    """
    Trains a diffusion model: every step draws a batch, computes the diffusion loss
    over microbatches, takes an AdamW step and updates the EMAs; logs, saves,
    previews samples and stops on a schedule.
    """

    def __init__(
        self,
        *,
        model,                      # the network, on its device (batches follow it)
        diffusion,                  # a GaussianDiffusion providing training_losses
        data,                       # iterator of (images, kwargs) batches (load_data)
        batch_size,                 # images per rank per step
        microbatch,                 # images per forward/backward (<= 0: the whole batch)
        lr,                         # AdamW learning rate
        ema_rate,                   # float or "r1,r2,..." EMA rates ("" for none)
        log_interval,               # write logged values every this many steps
        save_interval,              # save checkpoints every this many steps
        resume_checkpoint,          # "" or a modelNNNNNN.pt to continue
        use_fp16=False,             # float16 with loss scaling
        fp16_scale_growth=1e-3,     # loss-scale growth per finite step
        schedule_sampler=None,      # timestep sampler (default: uniform)
        weight_decay=0.0,           # AdamW weight decay
        lr_anneal_steps=0,          # linear decay of lr to 0 at this step, then stop (0: off)
        use_bf16=False,             # bfloat16 autocast, float32 weights
        max_steps=0,                # stop (with a final save) at this step (0: never)
        seed=None,                  # seed of the training draws for a fresh run (None: unseeded)
        sample_interval=0,          # write an EMA sample grid every this many steps (0: never)
        preview_sampler=None,       # the grid's fast sampler (solvers.py; None: DDIM)
        preview_steps=PREVIEW_STEPS,  # its DDIM steps or the sampler's model evaluations
        flags=None,                 # the run's flags, recorded in checkpoints
        model_flags=None,           # the flags that shaped the model and diffusion, compared
                                    # with a loaded checkpoint's record (None: not compared)
        init_checkpoint="",         # "" or weights to start a new run from (step 0)
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,  # log2 of the first fp16 loss scale
        class_dropout_prob=0.0,     # replace labels by the null label (the model's last
                                    # class row) with this probability, for classifier-free guidance
        compile=False,              # torch.compile the model (eager if compilation fails)
        channels_last=False,        # store the model's weights channels_last (in place)
        recompute_attention=True,   # attention blocks recompute activations in backward
                                    # (the original's memory use; False: faster, more memory)
        overwrite_log_dir=False,    # a new run may write over the checkpoints in the log dir
        checkpoint_format="pt",     # the model and EMA weights as "pt" or "safetensors" files
        class_names=None,           # the class each label stands for (the loader's
                                    # class_names), recorded in checkpoints; a resume whose
                                    # classes differ is refused (None: not recorded)
    ):
        """
        See the argument comments. logger.configure must have been called: checkpoints
        and previews go to logger.get_dir().
        """
        _check_arguments(batch_size, log_interval, save_interval, lr_anneal_steps,
                         resume_checkpoint, init_checkpoint)
        if checkpoint_format not in training_state.CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format={checkpoint_format}: expected one of "
                             f"{', '.join(training_state.CHECKPOINT_FORMATS)}")
        self.checkpoint_format = checkpoint_format
        training_state.prepare_log_dir(logger.get_dir(), new_run=not resume_checkpoint,
                                       overwrite=overwrite_log_dir)
        self.model = model
        self.device = next(model.parameters()).device
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.sample_interval = sample_interval
        if preview_sampler is not None:
            check_sampler(preview_sampler, preview_steps)
        self.preview_sampler, self.preview_steps = preview_sampler, preview_steps
        self.class_dropout_prob = class_dropout_prob
        self.flags = training_state.plain_flags(flags)
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        self.model_flags = training_state.plain_flags(model_flags) if model_flags else None
        self.global_batch = batch_size * dist_util.get_world_size()
        self.loss_log = LossLog()

        plan = training_state.resume_plan(resume_checkpoint) if resume_checkpoint else None
        self.resume_step = plan["step"] if plan else 0
        self.step = self.resume_step
        self._load_and_sync_parameters(plan["model"] if plan else init_checkpoint, resuming=bool(plan))
        # Before the masters and EMAs are copied, so that they share the weights' memory
        # format (the foreach EMA update and optimizer step stay on their fast path).
        configure_runtime(model, recompute_attention=recompute_attention,
                          channels_last=channels_last)
        self._build_optimizer(use_fp16, fp16_scale_growth, initial_lg_loss_scale, use_bf16)
        self.ema_params = [self._load_ema_parameters(rate, plan) for rate in self.ema_rate]
        if plan is not None:
            self._restore_training_state(plan["opt_state"], seed)
        elif seed is not None:
            set_seed(seed)
        self.last_saved_step = self.step if plan else None
        self._wrap_for_processes(compile)

    def _build_optimizer(self, use_fp16, fp16_scale_growth, initial_lg_loss_scale, use_bf16):
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            initial_lg_loss_scale=initial_lg_loss_scale,
            use_bf16=use_bf16,
        )
        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)

    def _wrap_for_processes(self, compile):
        """
        Wrap the model in DistributedDataParallel when there are several processes, then
        compile it if asked.
        """
        self.use_ddp = dist_util.get_world_size() > 1
        if self.use_ddp:
            on_gpu = self.device.type == "cuda"
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device] if on_gpu else None,
                output_device=self.device if on_gpu else None,
                bucket_cap_mb=128,
                find_unused_parameters=False,
                gradient_as_bucket_view=True,  # the gradients live in the buckets: no copy
                **_NO_BUFFER_SYNC,
            )
        else:
            self.ddp_model = self.model
        self.ddp_model = accelerate(self.ddp_model, compile=compile)

    # ------------------------------------------------------------------ loading

    def _load_and_sync_parameters(self, path, resuming):
        """
        :param path: a state dict to load into the model on every rank, or "".
        :param resuming: whether path continues its run (its classes must be this run's).
        """
        if path:
            logger.log(f"loading model from checkpoint: {path}...")
            record = load_checkpoint(self.model, path, flags=self.model_flags)
            training_state.compare_class_names((record or {}).get("class_names"), self.class_names,
                                               path, resuming)
            recorded_flags = (record or {}).get("flags")
            changed = training_state.changed_flags(recorded_flags or {}, self.flags)
            if changed:
                logger.log(f"flags changed since {bf.basename(path)}: " + ", ".join(changed))
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate, plan):
        """
        :param rate: an EMA rate.
        :param plan: the resume plan, or None for a fresh run.
        :return: the EMA's master parameters: from its checkpoint when resuming,
            else a copy of the current weights.
        """
        if plan is not None:
            path = find_ema_checkpoint(plan["model"], plan["step"], rate)
            if path is not None:
                state_dict = read_state_dict(path, map_location=self.device)
                return self.mp_trainer.state_dict_to_master_params(state_dict)
            logger.warn(
                f"no {training_state.ema_filename(rate, plan['step'])} next to {plan['model']}: "
                f"the EMA with rate {rate} restarts from the model weights"
            )
        return copy.deepcopy(self.mp_trainer.master_params)

    def _restore_training_state(self, state, seed):
        """
        Restore the optimizer, loss scale, sampler, RNG states and data positions.

        :param state: the dict loaded from optNNNNNN.pt.
        :param seed: seeds the RNGs when the checkpoint has no RNG states for this run.
        """
        self.opt.load_state_dict(state["optimizer"])
        if self.mp_trainer.use_fp16 and state["lg_loss_scale"] is not None:
            self.mp_trainer.lg_loss_scale = state["lg_loss_scale"]
        if state.get("schedule_sampler") is not None:
            self.schedule_sampler.load_state_dict(state["schedule_sampler"])
        rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
        if state["rng"] is None or len(state["rng"]) != world_size:
            if state["rng"] is not None:
                logger.warn(
                    f"the checkpoint was written by {len(state['rng'])} processes and this run has "
                    f"{world_size}: RNG states and data positions are not restored"
                )
            if seed is not None:
                set_seed(seed + self.step)
            return
        training_state.restore_rng_state(state["rng"][rank])
        for name, loader in self._loaders().items():
            saved = state["data_state"][rank].get(name)
            if saved is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(saved)

    def _loaders(self):
        """
        :return: the data iterators whose positions checkpoints record, by name.
        """
        return {"data": self.data}

    # ------------------------------------------------------------------ the loop

    def _finished(self):
        """
        :return: whether max_steps or lr_anneal_steps has been reached.
        """
        return (self.max_steps > 0 and self.step >= self.max_steps) or (
            self.lr_anneal_steps > 0 and self.step >= self.lr_anneal_steps
        )

    def run_loop(self):
        """
        Train until max_steps or lr_anneal_steps (forever if both are 0), then save,
        holding the log directory meanwhile (run_lock: a second run there is refused).
        """
        took_log_dir = hold_log_dir(logger.get_dir())
        try:
            self._train_to_the_end()
        finally:
            if took_log_dir:
                release_log_dir(logger.get_dir())

    def _train_to_the_end(self):
        if self._finished():
            logger.log(f"step {self.step} already reaches the last step: nothing to train")
            return
        while not self._finished():
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            if self.step % self.log_interval == 0:
                self.loss_log.flush()
                logger.dumpkvs()
            self.step += 1
            if self.sample_interval and self.step % self.sample_interval == 0:
                self.save_samples(batch, cond)
            if self.step % self.save_interval == 0:
                self.save()
        if self.last_saved_step != self.step:
            self.save()

    def run_step(self, batch, cond):
        """
        One optimizer step on a batch.

        :param batch: an [N x C x H x W] tensor.
        :param cond: a dict of [N x ...] tensors for the model.
        """
        self._anneal_lr()
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            self._update_ema()
        self.log_step()

    def _microbatches(self, batch, cond):
        """
        :return: an iterator of (microbatch, its kwargs, whether it is the last), on dev().
        """
        for start in range(0, batch.shape[0], self.microbatch):
            end = start + self.microbatch
            micro_cond = {key: value[start:end].to(self.device, non_blocking=True)
                          for key, value in cond.items()}
            yield batch[start:end].to(self.device, non_blocking=True), micro_cond, end >= batch.shape[0]

    def forward_backward(self, batch, cond):
        """
        Accumulate the batch's mean-loss gradient over microbatches; DDP synchronises
        gradients only during the last one.

        :param batch: an [N x C x H x W] tensor.
        :param cond: a dict of [N x ...] tensors for the model.
        """
        self.mp_trainer.zero_grad()
        for micro, micro_cond, last in self._microbatches(batch, cond):
            no_sync = self.use_ddp and not last
            with self.ddp_model.no_sync() if no_sync else contextlib.nullcontext():
                loss = self.compute_loss(micro, micro_cond)
                self.mp_trainer.backward(loss * (micro.shape[0] / batch.shape[0]))

    def compute_loss(self, micro, micro_cond):
        """
        :param micro: a microbatch of images on dev().
        :param micro_cond: its model kwargs.
        :return: the importance-weighted mean diffusion loss (logged per quartile of t).
        """
        t, weights = self.schedule_sampler.sample(micro.shape[0], self.device)
        if self.class_dropout_prob > 0:
            micro_cond = dict(micro_cond, y=self._drop_labels(micro_cond["y"]))
        with self.mp_trainer.autocast():
            losses = self.diffusion.training_losses(
                self.ddp_model, micro, t, model_kwargs=micro_cond
            )
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        self.loss_log.add(self.diffusion, t, {key: value * weights for key, value in losses.items()})
        return (losses["loss"] * weights).mean()

    def _drop_labels(self, labels):
        """
        :param labels: [N] class labels.
        :return: the labels, each replaced with probability class_dropout_prob by the null
            label model.num_classes - 1 (one torch.rand draw of N values).
        """
        null_label = self.model.num_classes - 1
        dropped = th.rand(labels.shape[0], device=labels.device) < self.class_dropout_prob
        return th.where(dropped, th.full_like(labels, null_label), labels)

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self):
        """Set the learning rate of this step: lr * (1 - step / lr_anneal_steps), or lr."""
        lr = self.lr
        if self.lr_anneal_steps:
            lr = self.lr * (1 - self.step / self.lr_anneal_steps)
        for param_group in self.opt.param_groups:
            param_group["lr"] = lr

    def log_step(self):
        """Log the index of the step just taken and the images seen so far."""
        logger.logkv("step", self.step)
        logger.logkv("samples", (self.step + 1) * self.global_batch)

    # ------------------------------------------------------------------ outputs

    def save(self):
        """
        Write model, EMA and optimizer checkpoints of the current step (a collective:
        every rank contributes its RNG states and data position; rank 0 writes).
        """
        rng_states = dist_util.gather_by_rank(training_state.capture_rng_state())
        data_states = dist_util.gather_by_rank(
            {name: loader.state_dict() for name, loader in self._loaders().items()
             if hasattr(loader, "state_dict")}
        )
        if dist_util.get_rank() == 0:
            self._write_checkpoints(rng_states, data_states)
        if dist_util.get_world_size() > 1:
            dist.barrier()
        self.last_saved_step = self.step

    def _write_checkpoints(self, rng_states, data_states):
        """
        :param rng_states: rank -> RNG states.
        :param data_states: rank -> loader positions.
        """
        logdir = logger.get_dir()
        logger.log(f"saving checkpoints of step {self.step} to {logdir}...")
        training_state.save_checkpoint(
            bf.join(logdir, training_state.model_filename(self.step, self.checkpoint_format)),
            self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params),
            training_state.make_sidecar("model", self.step, self.flags,
                                        class_names=self.class_names),
        )
        for rate, params in zip(self.ema_rate, self.ema_params):
            training_state.save_checkpoint(
                bf.join(logdir, training_state.ema_filename(rate, self.step, self.checkpoint_format)),
                self.mp_trainer.master_params_to_state_dict(params),
                training_state.make_sidecar("ema", self.step, self.flags, ema_rate=rate,
                                            class_names=self.class_names),
            )
        sampler = self.schedule_sampler
        state = dict(
            format=training_state.SIDECAR_FORMAT,
            optimizer=self.opt.state_dict(),
            step=self.step,
            lg_loss_scale=self.mp_trainer.lg_loss_scale if self.mp_trainer.use_fp16 else None,
            rng=rng_states,
            data_state=data_states,
            schedule_sampler=sampler.state_dict() if hasattr(sampler, "state_dict") else None,
            flags=self.flags,
        )
        opt_path = bf.join(logdir, training_state.opt_filename(self.step))
        training_state.save_checkpoint(opt_path, state)

    def save_samples(self, batch, cond):
        """
        Write samples_NNNNNN.png: a grid of samples from the first EMA (preview_samples;
        rank 0 only; the training RNG streams are left untouched).

        :param batch: the last batch (gives the image shape).
        :param cond: its kwargs; the first few condition the samples.
        """
        if dist_util.get_rank() != 0:
            return
        count = min(PREVIEW_SAMPLES, batch.shape[0])
        params = self.ema_params[0] if self.ema_params else self.mp_trainer.master_params
        preview_model = copy.deepcopy(self.model)
        preview_model.load_state_dict(self.mp_trainer.master_params_to_state_dict(params))
        preview_model.eval()
        model_kwargs = {key: value[:count].to(self.device) for key, value in cond.items()}
        with forked_torch_seed(PREVIEW_SEED, self.device):
            with self.mp_trainer.autocast():
                images = self.preview_samples(preview_model, (count, *batch.shape[1:]), model_kwargs)
        path = bf.join(logger.get_dir(), f"samples_{self.step:06d}.png")
        grid = np.asarray(save_image_grid(to_uint8_nhwc(images.float()).cpu(), path))
        # At the logged step of the update that made these weights (the "step" column
        # counts from 0), so that a resumed run's purge keeps the grid of its checkpoint.
        logger.log_image("samples", np.repeat(grid, 3, axis=-1) if grid.shape[-1] == 1 else grid,
                         self.step - 1)
        logger.log(f"wrote {path}")

    def preview_samples(self, model, shape, model_kwargs):
        """
        :param model: the network to sample (a copy holding the first EMA's weights).
        :param shape: the [N x C x H x W] shape of the samples.
        :param model_kwargs: e.g. {"y": labels}.
        :return: the preview grid's images in [-1, 1] (sample_preview, in torch's
            generator seeded by save_samples).
        """
        return sample_preview(model, self.diffusion, shape, model_kwargs, steps=self.preview_steps,
                              sampler=self.preview_sampler)


def sample_preview(model, diffusion, shape, model_kwargs=None, steps=PREVIEW_STEPS, sampler=None):
    """
    Deterministic DDIM samples (eta = 0) over `steps` evenly spaced steps of a diffusion,
    or a fast sampler's (GaussianDiffusion.sample_loop) in `steps` model evaluations.

    :param model: the denoising model.
    :param diffusion: the (training) diffusion; may itself be a SpacedDiffusion.
    :param shape: the [N x C x H x W] shape of the samples.
    :param model_kwargs: extra model inputs, e.g. {"y": labels}.
    :param steps: the number of DDIM steps (or the sampler's evaluations).
    :param sampler: None (DDIM), or a solvers.py sampler.
    :return: an [N x C x H x W] tensor in [-1, 1].
    """
    noise = th.randn(*shape, device=next(model.parameters()).device)
    if sampler is not None:
        return diffusion.sample_loop(model, shape, sampler=sampler, steps=steps, noise=noise,
                                     model_kwargs=model_kwargs)
    preview_diffusion = respace_diffusion(diffusion, [min(steps, diffusion.num_timesteps)])
    return preview_diffusion.ddim_sample_loop(model, shape, noise=noise, model_kwargs=model_kwargs)


def get_blob_logdir():
    """
    :return: the folder checkpoints are written to: the logger's (as in the original).
    """
    return logger.get_dir()


def find_resume_checkpoint():
    """
    The original's hook for finding a checkpoint on blob storage to resume from.

    :return: None: resume from --resume_checkpoint (training_state.resume_plan).
    """
    return None


def log_loss_dict(diffusion, ts, losses):
    """
    Log the mean of each loss, and its mean in each quarter of the timesteps (key_q0..q3).

    :param diffusion: gives num_timesteps.
    :param ts: the [N] timesteps.
    :param losses: a dict of [N] tensors.
    """
    LossLog().add(diffusion, ts, losses).flush()


class LossLog:
    """
    Losses to log as log_loss_dict does, kept on their device until flush(), so that
    training does not wait for the GPU to log every microbatch: the values and the order
    of the logger's running means are those of logging at once.
    """

    MAX_PENDING = 256  # microbatches held before a flush regardless (bounded memory)

    def __init__(self):
        self._pending = []

    def add(self, diffusion, ts, losses):
        """
        Take one microbatch's losses (arguments as log_loss_dict).

        :return: self.
        """
        means = {key: values.detach().mean() for key, values in losses.items()}
        values = {key: values.detach().float() for key, values in losses.items()}
        self._pending.append((diffusion.num_timesteps, ts.detach(), means, values))
        if len(self._pending) >= self.MAX_PENDING:
            self.flush()
        return self

    def flush(self):
        """Copy the pending losses to the host and log them in the order they came."""
        pending, self._pending = self._pending, []
        for num_timesteps, ts, means, values in pending:
            quartiles = (4 * ts.cpu().numpy() / num_timesteps).astype(int)
            for key in means:
                logger.logkv_mean(key, means[key].item())
                for quartile, sub_loss in zip(quartiles, values[key].cpu().numpy()):
                    logger.logkv_mean(f"{key}_q{quartile}", sub_loss)
