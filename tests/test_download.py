"""
Downloading checkpoints (guided_diffusion/download.py) against an HTTP server of the
test's own on 127.0.0.1: an interrupted download continued with a Range request, a
complete partial file finished after a 416 answer, a cached file used without a request,
URLs differing only in folder cached apart, a bad file refused and removed, the offline
and unusable-cache errors, create_pretrained(name) and a sampling script's --config
fetching a missing checkpoint.
"""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch as th

from test_sample_scripts import run_script
from test_sampling import tiny_flags, tiny_model
from guided_diffusion import download
from guided_diffusion.script_util import create_pretrained


class Files(BaseHTTPRequestHandler):
    """
    Serves FILES[path]; honours "Range: bytes=N-" (416 with the size in Content-Range when
    N is past the last byte); CUT[path] bytes then hangs up once.
    """

    FILES, CUT, REQUESTS = {}, {}, []

    def do_GET(self):
        self.REQUESTS.append((self.path, self.headers.get("Range")))
        data = self.FILES.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"][len("bytes="):].rstrip("-")) if self.headers.get("Range") else 0
        if start and start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = self.CUT.pop(self.path, None)
        self.wfile.write(data[start:cut])  # a cut response ends early: the client sees it short

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    monkeypatch.setenv(download.CACHE_VARIABLE, str(tmp_path / "cache"))
    Files.FILES.clear(), Files.CUT.clear(), Files.REQUESTS.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_an_interrupted_download_continues_and_a_cached_file_needs_no_request(server):
    data = bytes(range(256)) * 4000
    Files.FILES["/w.pt"], Files.CUT["/w.pt"] = data, 300_000
    url = f"{server}/w.pt"
    partial = download.cached_path(url) + ".partial"
    with pytest.raises(OSError, match=r"stopped after 300000 of 1024000 bytes; rerun to continue"):
        download.fetch(url, progress=False)
    assert os.path.getsize(partial) == 300_000 and not os.path.exists(download.cached_path(url))
    path = download.fetch(url, progress=False)
    assert Files.REQUESTS[-1] == ("/w.pt", "bytes=300000-")
    assert Path(path).read_bytes() == data and not os.path.exists(partial)
    count = len(Files.REQUESTS)
    assert download.fetch(url, progress=False) == path and len(Files.REQUESTS) == count


@pytest.mark.parametrize("extra", [b"", b"stale tail"], ids=["complete", "longer than the file"])
def test_a_partial_file_past_the_last_byte_is_finished_or_fetched_again(server, extra):
    data = bytes(range(256)) * 40
    Files.FILES["/w.pt"] = data
    url = f"{server}/w.pt"
    os.makedirs(os.path.dirname(download.cached_path(url)))
    with open(download.cached_path(url) + ".partial", "wb") as f:
        f.write(data + extra)
    path = download.fetch(url, progress=False)
    assert Path(path).read_bytes() == data and not os.path.exists(path + ".partial")
    asked = [("/w.pt", f"bytes={len(data + extra)}-")] + ([("/w.pt", None)] if extra else [])
    assert Files.REQUESTS == asked


def test_urls_differing_only_in_folder_are_cached_apart(server, tmp_path):
    Files.FILES["/jul-2021/w.pt"], Files.FILES["/aug-2021/w.pt"] = b"july" * 100, b"august" * 100
    july = download.fetch(f"{server}/jul-2021/w.pt", progress=False)
    august = download.fetch(f"{server}/aug-2021/w.pt", progress=False)
    assert july != august and os.path.basename(july) == os.path.basename(august) == "w.pt"
    assert os.path.dirname(os.path.dirname(july)) == str(tmp_path / "cache")
    assert Path(july).read_bytes() == b"july" * 100 and Path(august).read_bytes() == b"august" * 100
    count = len(Files.REQUESTS)
    assert download.fetch(f"{server}/jul-2021/w.pt", progress=False) == july and len(Files.REQUESTS) == count


def test_offline_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(download.CACHE_VARIABLE, str(tmp_path / "cache"))
    with pytest.raises(OSError, match=r"could not download http://127.0.0.1:9/x.pt .*put it at "
                                      r".*cache/127\.0\.0\.1-[0-9a-f]{12}/x.pt"):
        download.fetch("http://127.0.0.1:9/x.pt", progress=False)


def test_an_unusable_cache_names_the_variable_and_the_ways_out(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    for cache in (tmp_path / "file", tmp_path / "file" / "cache"):
        monkeypatch.setenv(download.CACHE_VARIABLE, str(cache))
        with pytest.raises(ValueError, match=rf"download cache {cache} \(\$GUIDED_DIFFUSION_CACHE.*"
                                             r"\(Not a directory\): set GUIDED_DIFFUSION_CACHE to a "
                                             r"writable directory, or download http://h/x.pt by hand"):
            download.fetch("http://h/x.pt", progress=False)
    # Root writes into a read-only folder, so os.access answers as for another user.
    monkeypatch.setenv(download.CACHE_VARIABLE, str(tmp_path / "read-only"))
    monkeypatch.setattr(os, "access", lambda path, mode: not path.startswith(str(tmp_path)))
    with pytest.raises(ValueError, match=r"read-only/h-[0-9a-f]{12} \(not writable\): set GUIDED"):
        download.fetch("http://h/x.pt", progress=False)


def tiny_preset(tmp_path, url, model_path="models/missing.pt"):
    flags = {name: value for name, value in tiny_flags(class_cond=True, class_dropout_prob=0.1).items()
             if name in ("image_size", "num_channels", "num_res_blocks", "attention_resolutions",
                         "diffusion_steps", "timestep_respacing", "learn_sigma", "num_classes",
                         "class_cond", "class_dropout_prob")}
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({"kind": "diffusion", "flags": flags, "checkpoint_url": url,
                                  "sample_flags": {"model_path": model_path}}))
    return str(preset)


def checkpoint_bytes(model, path):
    th.save(model.state_dict(), path)
    return path.read_bytes()


def test_create_pretrained_downloads_loads_and_refuses_a_bad_file(server, tmp_path):
    model, _ = tiny_model(class_cond=True, class_dropout_prob=0.1)
    Files.FILES["/tiny.pt"] = checkpoint_bytes(model, tmp_path / "tiny.pt")
    loaded, _ = create_pretrained(tiny_preset(tmp_path, f"{server}/tiny.pt"))  # no path: download
    assert all(th.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    other, _ = tiny_model(num_channels=64)
    Files.FILES["/other.pt"] = checkpoint_bytes(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"download of .*/other.pt \(.*cache/127.*/other.pt, now removed "
                                         r"from the cache\) does not load (?s:.*)num_channels"):
        create_pretrained(tiny_preset(tmp_path, f"{server}/other.pt"), None)
    assert not os.path.exists(download.cached_path(f"{server}/other.pt"))
    Files.FILES["/cut.pt"] = Files.FILES["/tiny.pt"][:5000]  # complete as served, but truncated
    with pytest.raises(ValueError, match=r"download of .*/cut.pt .*now removed(?s:.*)truncated"):
        create_pretrained(tiny_preset(tmp_path, f"{server}/cut.pt"), None)
    assert not os.path.exists(download.cached_path(f"{server}/cut.pt"))


@pytest.mark.slow
def test_sampling_with_a_config_fetches_the_missing_checkpoint(server, tmp_path):
    model, _ = tiny_model(class_cond=True, class_dropout_prob=0.1)
    Files.FILES["/tiny.pt"] = checkpoint_bytes(model, tmp_path / "tiny.pt")
    preset = tiny_preset(tmp_path, f"{server}/tiny.pt", model_path=str(tmp_path / "models" / "tiny.pt"))
    run_script("image_sample.py", ["--config", preset, "--num_samples", 2, "--batch_size", 2,
                                   "--log_dir", tmp_path / "samples"])
    assert os.path.exists(download.cached_path(f"{server}/tiny.pt"))
    assert [p for p, _ in Files.REQUESTS] == ["/tiny.pt"]
    with np.load(tmp_path / "samples" / "samples_2x8x8x3.npz") as data:
        assert data["arr_0"].shape == (2, 8, 8, 3) and data["arr_1"].shape == (2,)
