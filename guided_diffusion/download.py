"""
Downloading released checkpoints into a cache folder: `~/.cache/guided_diffusion`, or
$GUIDED_DIFFUSION_CACHE. The file of a URL lives at `HOST-HASH/NAME`, HASH the start of
the whole URL's SHA-256 and NAME its file name, so URLs that differ only in their folder
never share a file. A file is fetched once: into `NAME.partial`, continued with an HTTP
Range request when an earlier download stopped, and renamed to NAME only when it holds
as many bytes as the server announced; a cached NAME is used without any request.
"""

import contextlib
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm.auto import tqdm

CACHE_VARIABLE = "GUIDED_DIFFUSION_CACHE"
URL_HASH_CHARS = 12
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
LOCK_POLL_S = 1.0


def cache_dir():
    """:return: the cache folder ($GUIDED_DIFFUSION_CACHE, else ~/.cache/guided_diffusion)."""
    return os.environ.get(CACHE_VARIABLE) or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "guided_diffusion")


def cached_path(url):
    """:return: where the file of url lives in the cache (see the module docstring)."""
    parsed = urllib.parse.urlparse(url)
    name = os.path.basename(parsed.path)
    if not name:
        raise ValueError(f"url={url!r}: expected the URL of a file (a path ending in its name)")
    host = re.sub(r"[^A-Za-z0-9.-]", "_", parsed.hostname or "")
    digest = hashlib.sha256(url.encode()).hexdigest()[:URL_HASH_CHARS]
    return os.path.join(cache_dir(), f"{host}-{digest}", name)


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
    _make_writable_folder(os.path.dirname(path), url)
    with _exclusive(path + ".lock"):  # the processes of one job: one downloads, the others wait
        if os.path.exists(path):
            return path
        return _download(url, path, progress)


def _make_writable_folder(folder, url):
    """Create folder in the cache, or raise a ValueError naming the cache and the ways out."""
    try:
        os.makedirs(folder, exist_ok=True)
        problem = None if os.access(folder, os.W_OK | os.X_OK) else "not writable"
    except OSError as error:
        problem = error.strerror or str(error)
    if problem:
        raise ValueError(
            f"the download cache {cache_dir()} (${CACHE_VARIABLE}, else ~/.cache/guided_diffusion) "
            f"cannot hold {folder} ({problem}): set {CACHE_VARIABLE} to a writable directory, or "
            f"download {url} by hand and pass its path"
        )


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
            total = _announced_total(response.headers, have)
            with open(partial, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, disable=not progress,
                desc=os.path.basename(path),
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        if have and error.code == 416:  # nothing from byte `have` on: complete, or not this file
            return _finish_whole_partial(url, path, partial, _announced_total(error.headers, None),
                                         progress)
        raise _download_error(url, path, partial, have, error) from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _download_error(url, path, partial, have, error) from error
    received = os.path.getsize(partial)
    if total is not None and received != total:
        raise OSError(f"the download of {url} stopped after {received} of {total} bytes; rerun to "
                      f"continue it from {partial}")
    os.replace(partial, path)
    return path


def _announced_total(headers, have):
    """
    :return: the file's size as the server gives it: the total of Content-Range, else
        have + Content-Length (have None: only Content-Range counts); None if unknown.
    """
    content_range = re.fullmatch(r"bytes [-\d*]+/(\d+)", headers.get("Content-Range") or "")
    if content_range:
        return int(content_range.group(1))
    length = headers.get("Content-Length")
    return have + int(length) if have is not None and length is not None else None


def _finish_whole_partial(url, path, partial, total, progress):
    """
    After a 416 answer to `Range: bytes=N-`: the partial file is complete if the server
    says the file has N bytes; otherwise (longer than the file, or no size given) it is
    removed and the download starts over.
    """
    if total == os.path.getsize(partial):
        os.replace(partial, path)
        return path
    os.remove(partial)
    return _download(url, path, progress)


def _download_error(url, path, partial, have, error):
    """:return: the OSError of a failed request, naming the URL and where the file goes."""
    return OSError(
        f"could not download {url} ({getattr(error, 'reason', error)}); offline, download it "
        f"by hand and put it at {path} (or pass its path); a rerun continues the {have} bytes "
        f"already in {partial}"
    )


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
