"""
Key-value and text logging to stdout, log.txt, progress.csv and progress.json.

Same interface as the original ADM logger (after OpenAI baselines): `configure`,
`logkv`, `logkv_mean`, `dumpkvs`, `log`, `get_dir`, ... Values recorded with
`logkv`/`logkv_mean` during a step are written together by `dumpkvs`; with a
communicator they are first averaged over all ranks (weighted by how many values
each rank recorded) and only rank 0 writes them.
"""

import contextlib
import datetime
import json
import numbers
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch.distributed as dist

from .tracking import TensorBoardOutputFormat, WandbOutputFormat, file_in_the_way

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

# Formats written by rank 0 only, whatever the format list.
TRACKING_FORMATS = ("tensorboard", "wandb")
# Longest key or value shown in the human-readable table.
_MAX_CELL_WIDTH = 30


class KVWriter:
    """Output format that accepts dicts of key-value pairs."""

    def writekvs(self, kvs):
        """
        :param kvs: a dict from key to value for one step.
        """
        raise NotImplementedError


class SeqWriter:
    """Output format that accepts free text."""

    def writeseq(self, seq):
        """
        :param seq: a sequence of objects written as one line, separated by spaces.
        """
        raise NotImplementedError


class HumanOutputFormat(KVWriter, SeqWriter):
    """A boxed key/value table and plain lines, for terminals and log.txt."""

    def __init__(self, filename_or_file):
        """
        :param filename_or_file: a path to open for appending, or an open text stream.
        """
        if isinstance(filename_or_file, str):
            self.file = open(filename_or_file, "a")
            self.own_file = True
        else:
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs):
        rows = [
            (_truncate(key), _truncate(_format_value(value))) for key, value in sorted(kvs.items())
        ]
        if not rows:
            self.file.write("WARNING: tried to write empty key-value dict\n")
            self.file.flush()
            return
        key_width = max(len(key) for key, _ in rows)
        value_width = max(len(value) for _, value in rows)
        rule = "-" * (key_width + value_width + 7)
        lines = [rule]
        lines += [f"| {key:<{key_width}} | {value:<{value_width}} |" for key, value in rows]
        lines.append(rule)
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(str(item) for item in seq) + "\n")
        self.file.flush()

    def close(self):
        """Close the file if this object opened it."""
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dumpkvs call (JSON lines)."""

    def __init__(self, filename):
        """
        :param filename: the path to append to.
        """
        self.file = open(filename, "a")

    def writekvs(self, kvs):
        record = {key: _json_scalar(value) for key, value in sorted(kvs.items())}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        """Close the file."""
        self.file.close()


class CSVOutputFormat(KVWriter):
    """A CSV table whose columns grow when new keys appear (earlier rows padded)."""

    def __init__(self, filename):
        """
        :param filename: the path to write; rows are appended to an existing table (a
            resumed run continues its progress.csv; the original started a new one).
        """
        self.filename = filename
        self.file = open(filename, "a+t")
        self.file.seek(0)
        header = self.file.readline().strip()
        self.keys = header.split(",") if header else []

    def writekvs(self, kvs):
        new_keys = sorted(key for key in kvs if key not in self.keys)
        if new_keys:
            self._add_columns(new_keys)
        cells = ["" if kvs.get(key) is None else str(kvs[key]) for key in self.keys]
        self.file.write(",".join(cells) + "\n")
        self.file.flush()

    def _add_columns(self, new_keys):
        """
        Rewrite the file with a wider header and the old rows padded with empty cells.

        :param new_keys: keys not yet in the header, in the order to add them.
        """
        self.file.seek(0)
        old_rows = self.file.read().splitlines()[1:]
        self.keys.extend(new_keys)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(",".join(self.keys) + "\n")
        for row in old_rows:
            self.file.write(row + "," * len(new_keys) + "\n")

    def close(self):
        """Close the file."""
        self.file.close()


def _format_value(value):
    """
    :return: a short string for a table cell (integers in full, other numbers with 3
        significant digits).
    """
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if hasattr(value, "__float__"):
        return f"{float(value):<8.3g}"
    return str(value)


def _truncate(text):
    """
    :return: text, shortened to the table's cell width with "..." if longer.
    """
    return text[: _MAX_CELL_WIDTH - 3] + "..." if len(text) > _MAX_CELL_WIDTH else text


def _json_scalar(value):
    """
    :return: value as a JSON-serialisable Python scalar (numpy/torch scalars become floats).
    """
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return float(value)


def make_output_format(format, ev_dir, log_suffix="", tracking=None):
    """
    Create one output format.

    :param format: "stdout", "log" (log.txt), "json" (progress.json), "csv" (progress.csv),
        "tensorboard" (event files in tb/) or "wandb" (a Weights & Biases run); see tracking.py.
    :param ev_dir: the directory the files go in (created if missing).
    :param log_suffix: inserted before the file extension, e.g. "-rank001".
    :param tracking: options of the tracking formats: purge_step (the step a resumed run
        starts at), wandb_project, wandb_run_name, wandb_entity, resume_dir.
    :return: a KVWriter (and SeqWriter for "stdout" and "log"), or a tracking format.
    """
    os.makedirs(ev_dir, exist_ok=True)
    tracking = tracking or {}
    if format == "tensorboard":
        return TensorBoardOutputFormat(ev_dir, purge_step=tracking.get("purge_step"))
    if format == "wandb":
        project = tracking.get("wandb_project") or os.getenv("WANDB_PROJECT")
        if not project:
            raise ValueError("the wandb log format needs a project: wandb_project=NAME (or WANDB_PROJECT)")
        return WandbOutputFormat(ev_dir, project, name=tracking.get("wandb_run_name") or None,
                                 entity=tracking.get("wandb_entity") or None,
                                 resume_dir=tracking.get("resume_dir"))
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    raise ValueError(f"unknown log format {format!r}: expected stdout, log, json, csv, tensorboard "
                     "or wandb")


class TorchDistComm:
    """
    The part of an mpi4py communicator that the logger uses, over torch.distributed.

    Pass `comm=TorchDistComm()` to `configure` after `dist_util.setup_dist()` to average
    logged values over all ranks; `dumpkvs` then becomes a collective operation.
    """

    def Get_rank(self):
        """
        :return: this process's rank.
        """
        return dist.get_rank() if dist.is_initialized() else 0

    def Get_size(self):
        """
        :return: the number of processes.
        """
        return dist.get_world_size() if dist.is_initialized() else 1

    def gather(self, obj, root=0):
        """
        :param obj: a picklable object from this rank.
        :param root: the rank that receives the objects.
        :return: on root, the list of every rank's object; elsewhere None.
        """
        if self.Get_size() == 1:
            return [obj]
        # all_gather_object works on every backend (gather_object did not on older NCCL).
        received = [None] * self.Get_size()
        dist.all_gather_object(received, obj)
        return received if self.Get_rank() == root else None

    def bcast(self, obj, root=0):
        """
        :param obj: a picklable object (only root's is used).
        :param root: the rank whose object everyone receives.
        :return: root's object.
        """
        if self.Get_size() == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=root)
        return holder[0]


def weighted_mean_over_ranks(comm, name2valcount):
    """
    Average logged values over ranks, each weighted by its count.

    :param comm: a communicator with Get_rank() and gather(obj, root).
    :param name2valcount: a dict from key to (mean value, number of values) on this rank.
    :return: on rank 0, a dict from key to the weighted mean (an int when every rank
        gave integers and the mean is whole); elsewhere an empty dict.
    """
    gathered = comm.gather(name2valcount, root=0)
    if comm.Get_rank() != 0:
        return {}
    totals, counts, all_integers = defaultdict(float), defaultdict(float), defaultdict(lambda: True)
    for rank_values in gathered:
        for name, (value, count) in rank_values.items():
            all_integers[name] &= isinstance(value, numbers.Integral)
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            totals[name] += value * count
            counts[name] += count
    means = {name: totals[name] / counts[name] for name in totals}
    # Integers that agree on every rank (step, samples) stay integers.
    return {
        name: int(mean) if all_integers[name] and mean.is_integer() else mean
        for name, mean in means.items()
    }


class Logger:
    """Holds the pending key-values and writes them to a list of output formats."""

    # A logger used when configure() has not been called: stdout only.
    DEFAULT = None
    # The logger that the module-level functions use.
    CURRENT = None

    def __init__(self, dir, output_formats, comm=None):
        """
        :param dir: the log directory (returned by get_dir), or None.
        :param output_formats: a list of KVWriter/SeqWriter objects.
        :param comm: None to write this rank's values, or a communicator to average over ranks.
        """
        self.name2val = defaultdict(float)
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        """
        :param key: the name of the value.
        :param val: the value; replaces earlier values of key in this step.
        """
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        """
        :param key: the name of the value.
        :param val: a number; the written value is the mean of those given in this step.
        """
        old_value, count = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = old_value * count / (count + 1) + val / (count + 1)
        self.name2cnt[key] = count + 1

    def dumpkvs(self):
        """
        Write the pending key-values and clear them (a collective when a comm is set).

        :return: the dict that was written (empty on ranks other than 0 with a comm).
        """
        if self.comm is None:
            written = dict(self.name2val)
        else:
            counts = {
                name: (value, self.name2cnt.get(name, 1)) for name, value in self.name2val.items()
            }
            written = weighted_mean_over_ranks(self.comm, counts)
        if self.comm is None or self.comm.Get_rank() == 0:
            for fmt in self.output_formats:
                if hasattr(fmt, "writekvs"):
                    fmt.writekvs(written)
        self.name2val.clear()
        self.name2cnt.clear()
        return written

    def log_image(self, key, image, step):
        """
        Send an image to the formats that take images (tensorboard, wandb).

        :param key: its name, e.g. "samples".
        :param image: a uint8 [H x W x 3] array.
        :param step: the training step.
        """
        for fmt in self.output_formats:
            if hasattr(fmt, "write_image"):
                fmt.write_image(key, image, step)

    def log_config(self, config):
        """
        Send the run's flags to the formats that record them (tensorboard, wandb).

        :param config: a JSON-serialisable dict.
        """
        for fmt in self.output_formats:
            if hasattr(fmt, "write_config"):
                fmt.write_config(config)

    def log(self, *args, level=INFO):
        """
        :param args: objects written on one line, separated by spaces.
        :param level: written only if at least the logger's level.
        """
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(args)

    def set_level(self, level):
        """
        :param level: the lowest level that `log` writes.
        """
        self.level = level

    def set_comm(self, comm):
        """
        :param comm: None, or a communicator to average values over ranks in dumpkvs.
        """
        self.comm = comm

    def get_dir(self):
        """
        :return: the log directory, or None.
        """
        return self.dir

    def close(self):
        """Close every output format that owns a file."""
        for fmt in self.output_formats:
            if hasattr(fmt, "close"):
                fmt.close()


def get_current():
    """
    :return: the logger in use, creating the stdout-only default if none is configured.
    """
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


def logkv(key, val):
    """
    Record a value for this step; `dumpkvs` writes it.

    :param key: the name of the value.
    :param val: the value (a later call with the same key replaces it).
    """
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """
    Record a value for this step; `dumpkvs` writes the mean of all values given for key.

    :param key: the name of the value.
    :param val: a number.
    """
    get_current().logkv_mean(key, val)


def logkvs(d):
    """
    :param d: a dict of values to record with `logkv`.
    """
    for key, value in d.items():
        logkv(key, value)


def dumpkvs():
    """
    Write all values recorded in this step and start a new step.

    :return: the dict written.
    """
    return get_current().dumpkvs()


def getkvs():
    """
    :return: the values recorded so far in this step.
    """
    return get_current().name2val


def log(*args, level=INFO):
    """
    Write a line of text to stdout and log.txt (not to the CSV or JSON files).

    :param args: objects written separated by spaces.
    :param level: DEBUG, INFO, WARN or ERROR.
    """
    get_current().log(*args, level=level)


def debug(*args):
    """Write a line at DEBUG level."""
    log(*args, level=DEBUG)


def info(*args):
    """Write a line at INFO level."""
    log(*args, level=INFO)


def warn(*args):
    """Write a line at WARN level."""
    log(*args, level=WARN)


def error(*args):
    """Write a line at ERROR level."""
    log(*args, level=ERROR)


def set_level(level):
    """
    :param level: the lowest level that `log` writes.
    """
    get_current().set_level(level)


def set_comm(comm):
    """
    :param comm: None, or a communicator (mpi4py or TorchDistComm) to average values over ranks.
    """
    get_current().set_comm(comm)


def get_dir():
    """
    :return: the log directory, where training also writes checkpoints (None if unset).
    """
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextlib.contextmanager
def profile_kv(scopename):
    """
    Add the time spent inside the block to the value "wait_<scopename>".

    :param scopename: the name of the timed scope.
    """
    key = "wait_" + scopename
    start = time.time()
    try:
        yield
    finally:
        get_current().name2val[key] += time.time() - start


def profile(name):
    """
    Decorator form of `profile_kv`.

    :param name: the name of the timed scope.
    """

    def decorator(func):
        def timed(*args, **kwargs):
            with profile_kv(name):
                return func(*args, **kwargs)

        return timed

    return decorator


def _rank_from_environment():
    """
    :return: this process's rank from torch.distributed or the launcher's variables, else 0.
    """
    if dist.is_initialized():
        return dist.get_rank()
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def log_image(key, image, step):
    """Send an image to the current logger's image formats (Logger.log_image)."""
    get_current().log_image(key, image, step)


def log_config(config):
    """Send the run's flags to the current logger's tracking formats (Logger.log_config)."""
    get_current().log_config(config)


def configure(dir=None, format_strs=None, comm=None, log_suffix="", tracking=None):
    """
    Start logging to a directory.

    :param dir: the log directory; defaults to $OPENAI_LOGDIR, else a new
        timestamped folder under the system's temporary directory.
    :param format_strs: a list of formats ("stdout", "log", "json", "csv"); defaults to
        $OPENAI_LOG_FORMAT or stdout,log,csv on rank 0, $OPENAI_LOG_FORMAT_MPI or log elsewhere.
    :param comm: None, or a communicator (an mpi4py one or TorchDistComm()) used to share
        rank 0's directory and to average logged values over ranks. With a comm,
        configure and dumpkvs must be called by every rank.
    :param log_suffix: added to file names; ranks other than 0 add "-rankNNN".
    :param tracking: options of the tensorboard and wandb formats (make_output_format),
        which only rank 0 writes.
    """
    if not dir:
        dir = os.getenv("OPENAI_LOGDIR")
    if not dir:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = os.path.join(tempfile.gettempdir(), stamp)
    if comm is not None:
        dir = comm.bcast(dir, root=0)
    dir = os.path.expanduser(dir)
    make_log_dir(dir)
    rank = comm.Get_rank() if comm is not None else _rank_from_environment()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    if rank > 0:
        format_strs = [f for f in format_strs if f not in TRACKING_FORMATS]
    elif (tracking or {}).get("wandb_project") and "wandb" not in format_strs:
        format_strs = [*format_strs, "wandb"]
    output_formats = _make_output_formats(format_strs, dir, log_suffix, tracking, comm)
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log(f"Logging to {dir}")


def _make_output_formats(format_strs, dir, log_suffix, tracking, comm):
    """
    :return: the output formats of this rank; a format that rank 0 cannot start (a missing
        package, a file in the way of its folder) raises on every rank of comm, so that
        no rank goes on to wait for rank 0 in a collective.
    """
    refusal = None
    try:
        output_formats = [make_output_format(f, dir, log_suffix, tracking) for f in format_strs if f]
    except (ValueError, ImportError) as error:
        refusal = (type(error), str(error))
    if comm is not None:
        refusal = comm.bcast(refusal, root=0) or refusal
    if refusal is not None:
        raise refusal[0](refusal[1])
    return output_formats


def make_log_dir(dir):
    """
    Make a log directory and the folders above it, unless it exists.

    :param dir: a local folder.
    :raises ValueError: when it, or a folder above it, exists but is not a folder.
    """
    blocking = file_in_the_way(dir)
    if blocking == os.path.abspath(dir):
        raise ValueError(f"log_dir={dir} is a file, not a folder: give the run a folder for its "
                         "logs, new or existing (log_dir= or OPENAI_LOGDIR)")
    if blocking:
        raise ValueError(f"log_dir={dir} cannot be made: {blocking} is a file, not a folder; give "
                         "the run another log_dir= (or OPENAI_LOGDIR)")
    os.makedirs(dir, exist_ok=True)


def _configure_default_logger():
    """Install a stdout-only logger with no directory (used before configure)."""
    Logger.DEFAULT = Logger(dir=None, output_formats=[HumanOutputFormat(sys.stdout)])
    Logger.CURRENT = Logger.DEFAULT


def reset():
    """Close the configured logger and go back to the stdout-only default."""
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    _configure_default_logger()
    log("Reset logger")


@contextlib.contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """
    Log to another directory inside a with-block, then restore the previous logger.

    :param dir: as in configure.
    :param format_strs: as in configure.
    :param comm: as in configure.
    """
    previous = get_current()
    # configure() closes the current logger; detach it first so it stays open.
    Logger.CURRENT = Logger.DEFAULT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous
