"""
Multi-process training driver for tests/test_training_scripts.py (not a test itself).

    mpiexec -n 2 python tests/dist_train_driver.py IMAGE_DIR OUT_DIR full|interrupted
    torchrun --nproc_per_node 2 tests/dist_train_driver.py IMAGE_DIR OUT_DIR full|interrupted

"full" trains a tiny model for 4 steps; "interrupted" trains 2 steps, then starts
again from the step-2 checkpoint and trains to step 4, then tries a new run in the same
log directory (every rank writes the refusal to OUT_DIR/refused_rank<R>.txt). Every rank
writes its final weights to OUT_DIR/<run>_rank<R>.pt, how DDP held the gradients to
OUT_DIR/<run>_ddp_rank<R>.json, what setup_dist reported to OUT_DIR/setup_rank<R>.json
and its standard error (an abort at exit included) to OUT_DIR/stderr_rank<R>.txt.
"""

import json
import os
import sys

import torch as th

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainLoop

FLAGS = dict(
    model_and_diffusion_defaults(),
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1",
    attention_resolutions="8",
    num_head_channels=32,
    dropout=0.1,
)


def train(image_dir, logdir, max_steps, resume_checkpoint=""):
    """Train the tiny model to max_steps (2 ranks x batch 2, microbatch 1); return it."""
    logger.configure(logdir, ["log", "csv"], comm=logger.TorchDistComm())
    th.manual_seed(dist_util.get_rank())  # different initialisations: sync_params must fix them
    model, diffusion = create_model_and_diffusion(**FLAGS)
    model.to(dist_util.dev())
    data = load_data(data_dir=image_dir, batch_size=2, image_size=8, num_workers=0, seed=1)
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=1, lr=1e-3,
        ema_rate="0.9", log_interval=1, save_interval=2, resume_checkpoint=resume_checkpoint,
        max_steps=max_steps, seed=3, flags=FLAGS,
    )
    loop.run_loop()
    model.gradient_as_bucket_view = loop.ddp_model.gradient_as_bucket_view
    return model


def send_stderr_to_file(out_dir, rank):
    """Write this process's standard error, C++ runtime messages included, to a file of its rank."""
    stream = open(os.path.join(out_dir, f"stderr_rank{rank}.txt"), "w")
    os.dup2(stream.fileno(), sys.stderr.fileno())


def main():
    image_dir, out_dir, mode = sys.argv[1:4]
    setup = dist_util.setup_dist()
    rank = setup["rank"]
    send_stderr_to_file(out_dir, rank)
    with open(os.path.join(out_dir, f"setup_rank{rank}.json"), "w") as f:
        json.dump(setup, f)
    if mode == "full":
        runs = [("full", 4, "")]
    else:
        resume = os.path.join(out_dir, "interrupted", "model000002.pt")
        runs = [("part", 2, ""), ("resumed", 4, resume)]
    for name, max_steps, resume_checkpoint in runs:
        logdir = os.path.join(out_dir, "full" if name == "full" else "interrupted")
        model = train(image_dir, logdir, max_steps, resume_checkpoint)
        th.save(model.state_dict(), os.path.join(out_dir, f"{name}_rank{rank}.pt"))
        with open(os.path.join(out_dir, f"{name}_ddp_rank{rank}.json"), "w") as f:
            json.dump({"gradient_as_bucket_view": model.gradient_as_bucket_view}, f)
    if mode == "interrupted":
        try:
            train(image_dir, os.path.join(out_dir, "interrupted"), 4)
        except ValueError as error:
            with open(os.path.join(out_dir, f"refused_rank{rank}.txt"), "w") as f:
                f.write(str(error))
    dist_util.close_dist()


if __name__ == "__main__":
    main()
