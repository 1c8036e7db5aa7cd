"""
One run at a time per log directory: a training or sampling run holds `LOG_DIR/run.lock`
for its whole life, and a second run started on the same folder is refused with a
message naming the first (its process id, host, start time and command line).

The lock is an exclusive `flock` on the open file, not the file's existence: the
kernel drops it when the holding process ends, however it ends (a normal exit, an
exception, a crash, `kill -9`). A `run.lock` left behind by a dead process is
therefore not held, and the next run takes it over without waiting; its text only
serves the message. On NFS, Linux maps flock to the server's byte-range locks, which
the server also drops when the holding client goes away.
"""

import atexit
import datetime
import os
import socket
import sys

from . import dist_util, logger
from .file_writing import is_local

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_NAME = "run.lock"

# Log directories this process holds (their real paths -> the open lock files).
_HELD = {}


def hold_log_dir(logdir):
    """
    Take the log directory for this job's run on rank 0, until release_log_dir or until
    the process ends (a normal exit removes the lock file) (a collective when there are several processes: every rank calls
    it, and every rank raises when rank 0 could not take it).

    :param logdir: a local folder (created if missing); a blobfile URL cannot be locked
        and is not (the caller keeps runs apart).
    :return: whether this call took the lock: False when this process already held it
        or it cannot be locked (rank 0's answer, on every rank).
    :raises ValueError: when another living process holds it, naming that process.
    """
    return dist_util.on_rank_zero(lambda: _hold(logdir))


def _hold(logdir):
    """hold_log_dir in this process alone."""
    if fcntl is None or not is_local(logdir):
        return False
    key = os.path.realpath(logdir)
    if key in _HELD:
        return False
    logger.make_log_dir(logdir)
    path = os.path.join(logdir, LOCK_NAME)
    while True:
        lock_file = open(path, "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "a process that has not written its name yet"
            lock_file.close()
            raise ValueError(
                f"log_dir={logdir} is in use by another run ({holder}): wait for it to end, "
                "or give this run another log_dir"
            ) from None
        if _same_file(lock_file, path):
            break
        lock_file.close()  # the holder removed the file as we opened it: take the new one
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(_describe_this_process())
    lock_file.flush()
    _HELD[key] = lock_file
    atexit.register(release_log_dir, logdir)  # a normal exit removes the file too
    return True


def release_log_dir(logdir):
    """
    Give the log directory up (a no-op unless this process holds it): the lock file is
    removed, then unlocked.

    :param logdir: the folder given to hold_log_dir.
    """
    lock_file = _HELD.pop(os.path.realpath(logdir), None)
    if lock_file is None:
        return
    try:
        os.remove(lock_file.name)
    except FileNotFoundError:
        pass
    lock_file.close()


def _same_file(lock_file, path):
    """:return: whether path still names the open lock_file (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(lock_file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _describe_this_process():
    """:return: the lock file's text: process id, host, start time and command line."""
    started = datetime.datetime.now().isoformat(timespec="seconds")
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n"
