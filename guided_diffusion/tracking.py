"""
Experiment tracking outputs of the logger: TensorBoard event files (through
torch.utils.tensorboard, no TensorFlow) and Weights & Biases runs. Each takes the
key-values of every dumpkvs at the logged "step" (the training step), the run's flags
once (write_config) and images (write_image, e.g. the preview grids).

Resuming continues them: TensorBoard drops events at or after the resumed step
(purge_step), so the resumed run's steps replace those an interrupted run wrote after
its last checkpoint; W&B continues the run whose id is kept in WANDB_ID_FILE in the
log directory (or beside the checkpoint resumed from).
"""

import json
import numbers
import os
import uuid

TENSORBOARD_DIR = "tb"  # inside the log directory
WANDB_ID_FILE = "wandb_run_id.txt"


def _missing(package, extra):
    return ImportError(f"the {package} log format needs the {package} package: "
                       f'pip install -e ".[{extra}]" (or pip install {package})')


def file_in_the_way(folder):
    """
    :param folder: a local folder that is to be written in.
    :return: folder, or the nearest of the folders above it, when it exists but is not a
        folder (a file, or a broken link), so that the folder cannot be made; else None.
    """
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def _scalars(kvs):
    """:return: the numeric entries of kvs as floats (bools and text left out)."""
    return {key: float(value) for key, value in kvs.items()
            if isinstance(value, numbers.Number) and not isinstance(value, bool)}


class TensorBoardOutputFormat:
    """
    TensorBoard event files in log_dir/tb.

    :param log_dir: the run's log directory.
    :param purge_step: when resuming, the step resumed at (events from it on are dropped).
    """

    def __init__(self, log_dir, purge_step=None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        folder = os.path.join(log_dir, TENSORBOARD_DIR)
        blocking = file_in_the_way(folder)
        if blocking:
            raise ValueError(f"{blocking} is not a folder: the tensorboard log format writes its "
                             f"event files in {folder}; move it away, or choose another log_dir=")
        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        self.next_step = purge_step or 0

    def writekvs(self, kvs):
        step = int(kvs.get("step", self.next_step))
        for key, value in _scalars(kvs).items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.next_step = step + 1

    def write_image(self, key, image, step):
        """
        :param image: a uint8 [H x W x 3] array.
        """
        self.writer.add_image(key, image, step, dataformats="HWC")
        self.writer.flush()

    def write_config(self, config):
        """
        :param config: a JSON-serialisable dict (the run's flags).
        """
        self.writer.add_text("flags", "```\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbOutputFormat:
    """
    A Weights & Biases run (WANDB_MODE=offline / disabled and WANDB_DIR are honoured; files
    go to WANDB_DIR, else the log directory).

    :param log_dir: the run's log directory, where the run's id is kept.
    :param project: the W&B project.
    :param name: the run's display name (None: W&B's).
    :param entity: the W&B entity (None: the default).
    :param resume_dir: another folder whose WANDB_ID_FILE names the run to continue (the
        resumed checkpoint's), looked at when log_dir has none.
    """

    def __init__(self, log_dir, project, name=None, entity=None, resume_dir=None):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self.wandb = wandb
        files = os.environ.get("WANDB_DIR") or log_dir
        blocking = file_in_the_way(os.path.join(files, "wandb"))  # where W&B writes its runs
        if blocking:
            raise ValueError(f"{blocking} is not a folder: the wandb log format writes its run files "
                             f"in {os.path.join(files, 'wandb')} (in WANDB_DIR, else the log "
                             "directory); move it away, or set WANDB_DIR to another folder")
        id_file = os.path.join(log_dir, WANDB_ID_FILE)
        if os.path.isdir(id_file):
            raise ValueError(f"{id_file} is a folder: the wandb log format keeps its run id in a file "
                             "there; move the folder away")
        run_id = next((_read(os.path.join(folder, WANDB_ID_FILE)) for folder in (log_dir, resume_dir)
                       if folder and os.path.exists(os.path.join(folder, WANDB_ID_FILE))), None)
        run_id = run_id or uuid.uuid4().hex[:12]
        with open(id_file, "w") as f:
            f.write(run_id)
        self.run = wandb.init(project=project, name=name, entity=entity, id=run_id, resume="allow",
                              dir=files)

    def writekvs(self, kvs):
        values = {key: value for key, value in _scalars(kvs).items() if key != "step"}
        step = kvs.get("step")
        self.run.log(values, step=None if step is None else int(step))

    def write_image(self, key, image, step):
        """
        :param image: a uint8 [H x W x 3] array.
        """
        self.run.log({key: self.wandb.Image(image)}, step=int(step))

    def write_config(self, config):
        """
        :param config: a JSON-serialisable dict (the run's flags).
        """
        self.run.config.update(config, allow_val_change=True)

    def close(self):
        self.run.finish()


def _read(path):
    with open(path) as f:
        return f.read().strip()
