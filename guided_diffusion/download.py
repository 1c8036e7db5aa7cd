"""
Downloading released checkpoints into a cache folder: `~/.cache/guided_diffusion`, or
$GUIDED_DIFFUSION_CACHE. A file is fetched once: into `NAME.partial`, continued with an
HTTP Range request when an earlier download stopped, and renamed to NAME only when all
its bytes arrived; a cached NAME is used without any request.
"""

import contextlib
import http.client
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm.auto import tqdm

CACHE_VARIABLE = "GUIDED_DIFFUSION_CACHE"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
LOCK_POLL_S = 1.0


def cache_dir():
    """:return: the cache folder ($GUIDED_DIFFUSION_CACHE, else ~/.cache/guided_diffusion)."""
    return os.environ.get(CACHE_VARIABLE) or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "guided_diffusion")


def cached_path(url):
    """:return: where the file of url lives in the cache."""
    return os.path.join(cache_dir(), os.path.basename(urllib.parse.urlparse(url).path))


def fetch(url, progress=True):
    """
    The cached file of url, downloaded first if it is not in the cache.

    :param url: an http(s) URL of a file.
    :param progress: show a tqdm bar.
    :return: the local path.
    """
    path = cached_path(url)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _exclusive(path + ".lock"):  # the processes of one job: one downloads, the others wait
        if os.path.exists(path):
            return path
        return _download(url, path, progress)


@contextlib.contextmanager
def _exclusive(lock):
    """
    Hold a lock file (holding this process's id) for the block; wait while another
    living process on this machine holds it, and take over one whose process is gone.
    """
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if not _holder_alive(lock):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock)
                continue
            time.sleep(LOCK_POLL_S)
    try:
        os.write(descriptor, str(os.getpid()).encode())
        os.close(descriptor)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def _holder_alive(lock):
    """:return: whether the process whose id the lock file holds still runs."""
    try:
        with open(lock) as f:
            pid = int(f.read() or 0)
    except (FileNotFoundError, ValueError):
        return True  # being written: its holder has just created it
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _download(url, path, progress):
    """Download url to path through path.partial (see the module docstring)."""
    partial = path + ".partial"
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(partial, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, disable=not progress,
                desc=os.path.basename(path),
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise OSError(
            f"could not download {url} ({getattr(error, 'reason', error)}); offline, download it "
            f"by hand and put it at {path} (or pass its path); a rerun continues the {have} bytes "
            f"already in {partial}"
        ) from error
    received = os.path.getsize(partial)
    if total is not None and received != total:
        raise OSError(f"the download of {url} stopped after {received} of {total} bytes; rerun to "
                      f"continue it from {partial}")
    shutil.move(partial, path)
    return path


def fetch_and_load(url, load, name):
    """
    Fetch url into the cache and load it; a file that does not load is removed from the
    cache (the next call downloads it again) and refused, naming the file and the URL.

    :param url: the checkpoint's URL (a preset's checkpoint_url).
    :param load: a function of the local path that raises ValueError for a bad file.
    :param name: what the URL is for (e.g. the preset's name), for the messages.
    """
    if not url:
        raise ValueError(f"preset {name!r} has no checkpoint_url: pass the checkpoint's path")
    path = fetch(url)
    try:
        load(path)
    except ValueError as error:
        os.remove(path)
        raise ValueError(f"the download of {url} ({path}, now removed from the cache) does not "
                         f"load into {name}: {error}") from None
