"""Verified downloads against a local HTTP server on 127.0.0.1: cache, hash check, atomic write."""
import dataclasses
import hashlib
import http.server
import os
import subprocess
import sys
import threading

import pytest
import torch

from mrs_adapter import clip
from mrs_adapter.weights.download import DownloadError, download


class Server:
    """Serves `files` (url path -> bytes); `truncate` paths announce their full length, send
    half."""

    def __init__(self):
        self.files, self.truncate, self.hits = {}, set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in server.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def served_vit(server, tiny_clip, as_torchscript_archive, tmp_path, monkeypatch):
    """The tiny CLIP as an OpenAI-style archive, served where `load("ViT-B/32")` looks for it."""
    archive = tmp_path / "archive.pt"
    as_torchscript_archive(tiny_clip.state_dict(), archive)
    body = archive.read_bytes()
    sha = hashlib.sha256(body).hexdigest()
    server.files[f"/{sha}/ViT-B-32.pt"] = body
    monkeypatch.setattr(clip, "_URL", server.url + "/{}/{}")
    monkeypatch.setitem(clip._MODELS, "ViT-B/32", (sha, "ViT-B-32.pt"))
    return body


def test_right_hash_is_cached_and_loaded(server, served_vit, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    model, _ = clip.load("ViT-B/32", download_root=str(cache))
    assert os.listdir(cache) == ["ViT-B-32.pt"]
    assert (cache / "ViT-B-32.pt").read_bytes() == served_vit
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny_clip.half().float().encode_image(images)
        assert torch.equal(model.encode_image(images), expected)
    clip.load("ViT-B/32", download_root=str(cache))
    assert len(server.hits) == 1  # the second load is served from the cache


def test_environment_variable_sets_the_cache(server, served_vit, tmp_path, monkeypatch):
    monkeypatch.setenv("MRS_ADAPTER_CACHE", str(tmp_path / "env-cache"))
    clip.load("ViT-B/32")
    assert os.listdir(tmp_path / "env-cache") == ["ViT-B-32.pt"]


def test_wrong_hash_raises_and_leaves_nothing(server, tmp_path):
    server.files["/model.pt"] = b"not the expected bytes"
    with pytest.raises(RuntimeError, match="sha256.*expected " + "0" * 64):
        download(server.url + "/model.pt", "0" * 64, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_interrupted_download_leaves_nothing(server, tmp_path):
    body = os.urandom(4096)
    server.files["/model.pt"] = body
    server.truncate.add("/model.pt")
    with pytest.raises(Exception):
        download(server.url + "/model.pt", hashlib.sha256(body).hexdigest(), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_unreachable_server_gives_a_clear_error_and_leaves_nothing(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = f"could not download http://127.0.0.1:{port}/m.pt.*local file"
    with pytest.raises(DownloadError, match=refused):
        download(f"http://127.0.0.1:{port}/m.pt", "0" * 64, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_corrupt_cached_file_is_fetched_again(server, served_vit, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-B-32.pt").write_bytes(served_vit[:1000])  # e.g. a copy cut short by hand
    clip.load("ViT-B/32", download_root=str(cache))
    assert len(server.hits) == 1 and (cache / "ViT-B-32.pt").read_bytes() == served_vit


def test_official_urls_carry_their_hash():
    for name in clip._MODELS:
        sha, filename = clip._MODELS[name]
        url = f"https://openaipublic.azureedge.net/clip/models/{sha}/{filename}"
        assert clip.model_url(name) == url


def test_no_network_at_import():
    code = ("import socket\n"
            "def refuse(*a, **k): raise AssertionError('network used at import')\n"
            "socket.socket.connect = refuse\nsocket.create_connection = refuse\n"
            "import mrs_adapter.clip, mrs_adapter.tokenizer\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def served_unpinned(server, tiny_clip, tmp_path, monkeypatch):
    """The tiny CLIP served where `load("GeoRSCLIP-ViT-B/32")` looks, with no published hash."""
    path = tmp_path / "plain.pt"
    torch.save(tiny_clip.state_dict(), path)
    body = path.read_bytes()
    server.files["/RS5M_ViT-B-32.pt"] = body
    entry = clip.REMOTE_SENSING["GeoRSCLIP-ViT-B/32"]
    monkeypatch.setitem(clip.REMOTE_SENSING, "GeoRSCLIP-ViT-B/32",
                        dataclasses.replace(entry, url=server.url + "/RS5M_ViT-B-32.pt"))
    return body


def test_unpinned_backbone_keeps_its_sha256_and_checks_the_cache(server, served_unpinned, tmp_path):
    cache, sha = tmp_path / "cache", hashlib.sha256(served_unpinned).hexdigest()
    model, _ = clip.load("GeoRSCLIP-ViT-B/32", download_root=str(cache))
    assert sorted(os.listdir(cache)) == ["RS5M_ViT-B-32.pt", "RS5M_ViT-B-32.pt.sha256"]
    assert (cache / "RS5M_ViT-B-32.pt.sha256").read_text().split()[0] == sha
    assert model.backbone["sha256"] == sha
    assert model.backbone["path"] == str(cache / "RS5M_ViT-B-32.pt")
    assert model.activation == "quickgelu"
    assert model.backbone["activation_from"] == "GeoRSCLIP-ViT-B/32's own"
    clip.load("GeoRSCLIP-ViT-B/32", download_root=str(cache))
    assert len(server.hits) == 1  # verified against the kept sha256, served from the cache
    (cache / "RS5M_ViT-B-32.pt").write_bytes(served_unpinned[:-10] + b"0123456789")  # edited
    model, _ = clip.load("GeoRSCLIP-ViT-B/32", download_root=str(cache))
    assert len(server.hits) == 2 and model.backbone["sha256"] == sha  # noticed and fetched again


def test_a_user_pin_is_checked_for_unpinned_backbones_and_files(server, served_unpinned, tmp_path):
    with pytest.raises(DownloadError, match="expected " + "a" * 64):
        clip.load("GeoRSCLIP-ViT-B/32", download_root=str(tmp_path / "c"), sha256="a" * 64)
    assert os.listdir(tmp_path / "c") == []
    with pytest.raises(ValueError, match="published sha256 is 60014e39"):
        clip.load("RemoteCLIP-ViT-B/32", sha256="a" * 64)  # contradicts the publisher: no download
    local = tmp_path / "w.pt"
    local.write_bytes(served_unpinned)
    sha = hashlib.sha256(served_unpinned).hexdigest()
    with pytest.raises(ValueError, match=f"{local} has sha256 {sha}, expected {'b' * 64}"):
        clip.load(str(local), sha256="b" * 64)


def test_named_remote_sensing_backbones_point_at_their_publishers():
    for name in clip.REMOTE_SENSING:
        b = clip.REMOTE_SENSING[name]
        repo = "chendelong/RemoteCLIP" if name.startswith("RemoteCLIP") else "Zilun/GeoRSCLIP"
        assert clip.model_url(name) == b.url
        assert b.url.startswith(f"https://huggingface.co/{repo}/resolve/main/")
        assert b.url.endswith("/" + b.filename) and b.activation in clip.ACTIVATIONS
        assert b.sha256 is None or len(bytes.fromhex(b.sha256)) == 32
    files = {b.filename for b in clip.REMOTE_SENSING.values()}
    files |= {f for _, f in clip._MODELS.values()}
    assert len(files) == len(clip.REMOTE_SENSING) + len(clip._MODELS)  # no two share a cache file
