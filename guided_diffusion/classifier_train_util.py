"""
Classifier training: ClassifierTrainLoop trains the noised-image classifier of
classifier guidance (scripts/classifier_train.py) with cross-entropy on top of
train_util.TrainLoop, and compute_top_k measures its accuracy.

Per microbatch the random draws are: the schedule sampler's timesteps (numpy's
global generator), then the q_sample noise and the model's dropout (torch's
global generator); with noised=False only the dropout. A validation batch
(every eval_interval steps, after the step) draws its timesteps and noise the
same way.
"""

import torch as th
import torch.nn.functional as F

from .train_util import TrainLoop


def compute_top_k(logits, labels, k, reduction="mean"):
    """
    :param logits: [N x classes] scores.
    :param labels: [N] true classes.
    :param k: count a hit when the label is among the k highest scores.
    :param reduction: "mean" for a float accuracy, "none" for the [N] hits as floats.
    """
    _, top_ks = th.topk(logits, k, dim=-1)
    hits = (top_ks == labels[:, None]).float().sum(dim=-1)
    if reduction == "mean":
        return hits.mean().item()
    if reduction == "none":
        return hits
    raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none'")


class ClassifierTrainLoop(TrainLoop):
    """
    Trains a (noise-aware) classifier with cross-entropy, as scripts/classifier_train.py:
    the same microbatching, checkpoints and resumption as TrainLoop, no EMA, and
    loss and top-1/top-5 accuracy logged per quartile of timesteps, on training and
    (every eval_interval steps) validation batches.
    """

    def __init__(
        self,
        *,
        model,                      # an EncoderUNetModel, on its device (batches follow it)
        diffusion,                  # gives q_sample and num_timesteps
        data,                       # iterator of (images, {"y": labels}) batches
        val_data=None,              # same for validation, or None
        noised=True,                # train on q_sample(x, t) with t from schedule_sampler
        iterations=150000,          # stop after this many steps
        anneal_lr=False,            # decay lr linearly to 0 at `iterations`
        eval_interval=5,            # validate every this many steps
        batch_size,
        microbatch,
        lr,
        log_interval,
        save_interval,
        resume_checkpoint,
        **kwargs,                   # use_fp16, use_bf16, schedule_sampler, weight_decay, seed,
                                    # flags, init_checkpoint, compile, channels_last,
                                    # recompute_attention, overwrite_log_dir, as TrainLoop
    ):
        """
        See the argument comments.
        """
        self.val_data = val_data
        self.noised = noised
        self.eval_interval = eval_interval
        kwargs.setdefault("initial_lg_loss_scale", 16.0)
        super().__init__(
            model=model, diffusion=diffusion, data=data, batch_size=batch_size,
            microbatch=microbatch, lr=lr, ema_rate="", log_interval=log_interval,
            save_interval=save_interval, resume_checkpoint=resume_checkpoint,
            lr_anneal_steps=iterations if anneal_lr else 0, max_steps=iterations, **kwargs,
        )

    def _loaders(self):
        loaders = super()._loaders()
        if self.val_data is not None:
            loaders["val_data"] = self.val_data
        return loaders

    def run_step(self, batch, cond):
        super().run_step(batch, cond)
        if self.val_data is not None and self.step % self.eval_interval == 0:
            self.evaluate()

    def compute_loss(self, micro, micro_cond):
        return self._classifier_loss(self.ddp_model, micro, micro_cond, prefix="train")

    def evaluate(self):
        """Log loss and accuracy on one validation batch, without gradients."""
        batch, cond = next(self.val_data)
        self.model.eval()
        with th.no_grad():
            for micro, micro_cond, _ in self._microbatches(batch, cond):
                self._classifier_loss(self.model, micro, micro_cond, prefix="val")
        self.model.train()

    def _classifier_loss(self, model, micro, micro_cond, prefix):
        """
        :param model: the module to call (DDP-wrapped for training).
        :param micro: clean images; noised at timesteps from the schedule sampler if noised.
        :param micro_cond: {"y": labels}.
        :param prefix: "train" or "val", prefixed to the logged keys.
        :return: the mean cross-entropy.
        """
        labels = micro_cond["y"]
        if self.noised:
            t, _ = self.schedule_sampler.sample(micro.shape[0], self.device)
            micro = self.diffusion.q_sample(micro, t)
        else:
            t = th.zeros(micro.shape[0], dtype=th.long, device=self.device)
        with self.mp_trainer.autocast():
            logits = model(micro, timesteps=t)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        top5 = min(5, logits.shape[-1])
        self.loss_log.add(self.diffusion, t, {
            f"{prefix}_loss": losses.detach(),
            f"{prefix}_acc@1": compute_top_k(logits, labels, k=1, reduction="none"),
            f"{prefix}_acc@5": compute_top_k(logits, labels, k=top5, reduction="none"),
        })
        return losses.mean()
