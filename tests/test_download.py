"""Offline tests of utils.download against a local HTTP server on 127.0.0.1 and tiny hand-made archives."""

import hashlib
import io
import os
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils import download as dl
from utils.constants import MVTEC_ARCHIVE_NAME, MVTEC_URL, MVTEC_URL_ENV

PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
# Known answer from FIPS 180-2, appendix B.1.
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


class _Handler(BaseHTTPRequestHandler):
    """Serves server.payload; honours 'Range: bytes=N-' unless told not to; may cut the first reply."""

    def do_GET(self) -> None:
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append(range_header)
        data, start = srv.payload, 0
        if range_header and not srv.ignore_range:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None and len(srv.requests) == 1:
            body = body[: srv.cut_after]  # announce the full length, send less, close: a cut transfer
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A ThreadingHTTPServer on 127.0.0.1 with a free port; tests set payload / cut_after / ignore_range."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.payload, srv.requests, srv.cut_after, srv.ignore_range = b"", [], None, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/{MVTEC_ARCHIVE_NAME}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _png_bytes(value: int) -> bytes:
    """An 8x8 grey PNG whose every pixel equals value."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


BOTTLE_FILES = {
    "train/good/000.png": 10,
    "test/broken_large/000.png": 200,
    "ground_truth/broken_large/000_mask.png": 255,
}


def make_archive(path: Path, prefix: str = "./", extra=()) -> Path:
    """Tiny MVTec-format tar.xz: bottle (3 PNGs), cable (1 PNG), a top-level readme, then extra TarInfos."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:xz") as tar:
        _add_bytes(tar, prefix + "readme.txt", b"MVTec AD test readme\n")
        for rel, value in BOTTLE_FILES.items():
            _add_bytes(tar, f"{prefix}bottle/{rel}", _png_bytes(value))
        _add_bytes(tar, prefix + "cable/train/good/000.png", _png_bytes(50))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_sha256_of_known_answer(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")
    assert dl.sha256_of(path, chunk_size=1) == SHA256_ABC


def test_resolve_url_order(monkeypatch):
    monkeypatch.delenv(MVTEC_URL_ENV, raising=False)
    assert dl.resolve_url() == MVTEC_URL
    monkeypatch.setenv(MVTEC_URL_ENV, "http://127.0.0.1:1/env.tar.xz")
    assert dl.resolve_url() == "http://127.0.0.1:1/env.tar.xz"
    assert dl.resolve_url("http://127.0.0.1:1/arg.tar.xz") == "http://127.0.0.1:1/arg.tar.xz"


@pytest.mark.parametrize("prefix", ["", "./", "mvtec_anomaly_detection/", "./mvtec_anomaly_detection/"])
def test_download_and_extract_success(server, tmp_path, prefix):
    src = make_archive(tmp_path / "src.tar.xz", prefix=prefix)
    server.payload = src.read_bytes()
    data_dir = tmp_path / "data" / "mvtec"
    out = dl.ensure_subset(data_dir, "bottle", download=True, url=server.url,
                           expected_sha256=hashlib.sha256(server.payload).hexdigest())
    assert out == data_dir / "bottle"
    assert _files_under(out) == set(BOTTLE_FILES)
    for rel, value in BOTTLE_FILES.items():
        pixels = np.asarray(Image.open(out / rel))
        assert pixels.shape == (8, 8) and (pixels == value).all()
    assert sorted(os.listdir(data_dir)) == ["bottle"]  # no cable, no readme, no temporary folder
    assert (tmp_path / "data" / MVTEC_ARCHIVE_NAME).read_bytes() == server.payload
    assert server.requests == [None]
    # A second call finds the folder and asks nothing of the server.
    assert dl.ensure_subset(data_dir, "bottle", download=True, url=server.url) == out
    assert server.requests == [None]


def test_hash_mismatch_leaves_nothing(server, tmp_path):
    server.payload = make_archive(tmp_path / "src.tar.xz").read_bytes()
    data_dir = tmp_path / "data" / "mvtec"
    wrong = "0" * 64
    with pytest.raises(ValueError, match=wrong) as info:
        dl.ensure_subset(data_dir, "bottle", download=True, url=server.url, expected_sha256=wrong)
    assert hashlib.sha256(server.payload).hexdigest() in str(info.value)
    assert MVTEC_ARCHIVE_NAME + ".part" in str(info.value)
    assert sorted(os.listdir(tmp_path / "data")) == []  # no .part, no archive, no data_dir/bottle


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.payload = make_archive(tmp_path / "src.tar.xz").read_bytes()
    server.cut_after = len(server.payload) // 2
    dest = tmp_path / "dl" / MVTEC_ARCHIVE_NAME
    part = dest.with_name(dest.name + ".part")
    expected = hashlib.sha256(server.payload).hexdigest()
    with pytest.raises(dl.DownloadError):
        dl.download_file(server.url, dest, expected, progress=False, timeout=5)
    assert part.read_bytes() == server.payload[: server.cut_after]
    assert not dest.exists()
    assert dl.download_file(server.url, dest, expected, progress=False, timeout=5) == dest
    assert server.requests == [None, f"bytes={server.cut_after}-"]
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == expected
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.payload = make_archive(tmp_path / "src.tar.xz").read_bytes()
    server.cut_after, server.ignore_range = 100, True
    dest = tmp_path / "dl" / MVTEC_ARCHIVE_NAME
    expected = hashlib.sha256(server.payload).hexdigest()
    with pytest.raises(dl.DownloadError):
        dl.download_file(server.url, dest, expected, progress=False, timeout=5)
    dl.download_file(server.url, dest, expected, progress=False, timeout=5)
    assert server.requests == [None, "bytes=100-"]
    assert dest.read_bytes() == server.payload


def test_complete_part_file_answered_416_is_verified(server, tmp_path):
    server.payload = b"0123456789" * 10
    dest = tmp_path / MVTEC_ARCHIVE_NAME
    dest.with_name(dest.name + ".part").write_bytes(server.payload)
    dl.download_file(server.url, dest, hashlib.sha256(server.payload).hexdigest(), progress=False, timeout=5)
    assert server.requests == ["bytes=100-"]
    assert dest.read_bytes() == server.payload


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b"evil\n"):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("kind", ["dotdot", "dotdot_in_category", "absolute", "symlink", "hardlink", "device"])
def test_malicious_archive_refused(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    extra = {
        "dotdot": _member("../evil.txt"),
        "dotdot_in_category": _member("bottle/../../evil.txt"),
        "absolute": _member(str(outside / "evil.txt")),
        "symlink": _member("bottle/train/link", tarfile.SYMTYPE, linkname="../../../outside"),
        "hardlink": _member("bottle/train/hard", tarfile.LNKTYPE, linkname=str(outside / "target")),
        "device": _member("bottle/train/dev", tarfile.CHRTYPE),
    }[kind]
    archive = make_archive(tmp_path / "evil.tar.xz", extra=[extra])
    dest_root = tmp_path / "data"
    with pytest.raises(ValueError, match="unsafe") as info:
        dl.extract_category(archive, "bottle", dest_root, progress=False)
    assert extra[0].name in str(info.value)
    assert os.listdir(dest_root) == []
    assert os.listdir(outside) == []
    assert not (tmp_path / "evil.txt").exists()


def test_failed_extraction_leaves_no_half_folder(tmp_path, monkeypatch):
    archive = make_archive(tmp_path / "src.tar.xz")
    real_extract, calls = tarfile.TarFile.extract, []

    def failing_extract(self, member, *args, **kwargs):
        calls.append(member.name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_extract(self, member, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", failing_extract)
    dest_root = tmp_path / "data"
    with pytest.raises(OSError, match="simulated"):
        dl.extract_category(archive, "bottle", dest_root, progress=False)
    assert len(calls) == 2
    assert os.listdir(dest_root) == []


def test_missing_category_lists_found(tmp_path):
    archive = make_archive(tmp_path / "src.tar.xz")
    with pytest.raises(ValueError, match="bottle, cable"):
        dl.extract_category(archive, "zipper", tmp_path / "data", progress=False)
    assert os.listdir(tmp_path / "data") == []


def test_manual_archive_used_without_http(server, tmp_path):
    data_dir = tmp_path / "data" / "mvtec"
    archive = make_archive(tmp_path / "data" / MVTEC_ARCHIVE_NAME, prefix="mvtec_anomaly_detection/")
    expected = hashlib.sha256(archive.read_bytes()).hexdigest()
    out = dl.ensure_subset(data_dir, "bottle", download=True, url=server.url, expected_sha256=expected)
    assert _files_under(out) == set(BOTTLE_FILES)
    assert server.requests == []


def test_manual_archive_elsewhere_and_wrong_hash(server, tmp_path):
    archive = make_archive(tmp_path / "mine.tar.xz")
    with pytest.raises(ValueError, match="mine.tar.xz"):
        dl.ensure_subset(tmp_path / "data", "bottle", download=True, url=server.url,
                         expected_sha256="0" * 64, archive_path=archive)
    assert archive.exists()  # a user's own file is reported, never deleted
    out = dl.ensure_subset(tmp_path / "data", "cable", download=False, expected_sha256=None, archive_path=archive)
    assert _files_under(out) == {"train/good/000.png"}
    assert server.requests == []


def test_no_download_lists_present_subsets(tmp_path):
    data_dir = tmp_path / "data" / "mvtec"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dl.ensure_subset(data_dir, "bottle", download=False)
    (data_dir / "synthetic").mkdir(parents=True)
    (data_dir / "toothbrush").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        dl.ensure_subset(data_dir, "bottle", download=False)
    message = str(info.value)
    assert "synthetic, toothbrush" in message
    assert PAGE in message and str(tmp_path / "data" / MVTEC_ARCHIVE_NAME) in message
    assert "download=True" in message and "metal_nut" in message


def test_unknown_and_synthetic_subsets(tmp_path):
    (tmp_path / "bottle").mkdir()
    with pytest.raises(ValueError, match="bottle") as info:
        dl.ensure_subset(tmp_path, "bottel", download=True)
    assert "zipper" in str(info.value)
    with pytest.raises(ValueError, match="synthetic generator"):
        dl.ensure_subset(tmp_path, "synthetic", download=True)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_explains_manual_route_and_keeps_part(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/{MVTEC_ARCHIVE_NAME}"
    data_dir = tmp_path / "data" / "mvtec"
    part = tmp_path / "data" / (MVTEC_ARCHIVE_NAME + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"first half")
    with pytest.raises(dl.DownloadError) as info:
        dl.ensure_subset(data_dir, "bottle", download=True, url=url)
    message = str(info.value)
    assert url in message and "offline" in message and PAGE in message
    assert str(tmp_path / "data" / MVTEC_ARCHIVE_NAME) in message and str(data_dir) in message
    assert part.read_bytes() == b"first half"


def test_environment_url_override(server, tmp_path, monkeypatch):
    server.payload = make_archive(tmp_path / "src.tar.xz").read_bytes()
    monkeypatch.setenv(MVTEC_URL_ENV, server.url)
    out = dl.ensure_subset(tmp_path / "data" / "mvtec", "cable", download=True,
                           expected_sha256=hashlib.sha256(server.payload).hexdigest())
    assert _files_under(out) == {"train/good/000.png"}
    assert server.requests == [None]
