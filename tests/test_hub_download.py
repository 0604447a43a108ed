"""Downloading checkpoints into the cache (streamtsm.hub.download) against a real HTTP server on 127.0.0.1 that
serves bytes and misbehaves on purpose: nothing is mocked and nothing leaves this machine.

Every failure must be one line naming the URL and how to place the file by hand, and leave nothing partial in the
cache."""

from __future__ import annotations

import hashlib
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from streamtsm.errors import StreamTSMError
from streamtsm.hub.download import DownloadError, checkpoints_dir, fetch_file, home, is_offline

ROOT = Path(__file__).resolve().parents[1]
NAME = "w.pth"
BODY = random.Random(15).randbytes(64 * 1024)
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Behaviour by the path's first part, the file by the rest: see :class:`Server`."""

    def do_GET(self):
        owner = self.server.owner
        owner.requests.append(self.path)
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind == "status":
            self.send_error(int(name))
            return
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/files/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = owner.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) + (1000 if kind == "truncate" else 0)))
        self.end_headers()
        if kind == "slow":
            step = len(body) // 16
            for start in range(0, len(body), step):
                self.wfile.write(body[start:start + step])
                self.wfile.flush()
                time.sleep(0.05)
        elif kind == "stall":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            owner.stop.wait(30)
        else:
            self.wfile.write(body)
        self.close_connection = True  # a truncated body then ends with the connection

    def log_message(self, format, *args):  # quiet: the tests read the outcome, not the access log
        pass


class Server:
    """An HTTP server on 127.0.0.1 with a free port, serving ``files`` by name and counting ``requests``.

    Paths: ``/files/<name>`` the bytes; ``/slow/<name>`` the bytes in 16 parts 0.05 s apart; ``/truncate/<name>`` a
    Content-Length 1000 bytes larger than the body, then the connection closes; ``/stall/<name>`` half the body,
    then nothing; ``/redirect/<name>`` a 302 to ``/files/<name>``; ``/status/<code>`` that HTTP error."""

    def __init__(self):
        self.files = {NAME: BODY}
        self.requests: list[str] = []
        self.stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str = f"/files/{NAME}", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.stop.set()
    s.httpd.shutdown()
    s.httpd.server_close()
    s.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def local_environment(monkeypatch):
    """No proxy between the tests and 127.0.0.1, and none of the user's streamtsm settings."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "STREAMTSM_HOME", "STREAMTSM_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


def cache_listing(home_dir: Path) -> list[str]:
    folder = checkpoints_dir(home_dir)
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def assert_one_line_remedy(error: BaseException, url: str, target: Path) -> str:
    """The message every failure gives: one line, the URL, and the two ways to place the file by hand."""
    text = str(error)
    assert "\n" not in text and "\r" not in text, f"expected one line, got {text!r}"
    assert url in text, f"expected the URL {url} in {text!r}"
    assert str(target) in text, f"expected the cache path {target} in {text!r}"
    assert "--weights PATH" in text, f"expected '--weights PATH' in {text!r}"
    return text


def test_home_prefers_streamtsm_home_then_xdg_cache_home(monkeypatch, tmp_path):
    assert home() == Path.home() / ".cache" / "streamtsm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says to ignore a relative one
    assert home() == Path.home() / ".cache" / "streamtsm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert home() == tmp_path / "xdg" / "streamtsm"
    monkeypatch.setenv("STREAMTSM_HOME", str(tmp_path / "st"))
    assert home() == tmp_path / "st"
    assert checkpoints_dir() == tmp_path / "st" / "checkpoints"
    assert checkpoints_dir(tmp_path / "other") == tmp_path / "other" / "checkpoints"


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("0", False),
                                             ("", False), ("no", False)])
def test_is_offline_reads_streamtsm_offline(monkeypatch, value, expected):
    monkeypatch.setenv("STREAMTSM_OFFLINE", value)
    assert is_offline() is expected


def test_fetch_file_downloads_into_the_cache_with_a_progress_bar(server, tmp_path, capsys):
    path = fetch_file(server.url(), NAME, home=tmp_path)
    assert path == tmp_path / "checkpoints" / NAME
    assert path.read_bytes() == BODY
    # Without a publisher hash the first download's sha256 is recorded, as sha256sum writes it.
    assert (tmp_path / "checkpoints" / f"{NAME}.sha256").read_text() == f"{BODY_SHA256}  {NAME}\n"
    assert cache_listing(tmp_path) == [NAME, f"{NAME}.sha256"], "a temporary or lock file was left behind"
    err = capsys.readouterr().err
    assert NAME in err and "100%" in err, f"expected a progress bar on stderr, got {err!r}"


def test_fetch_file_without_progress_writes_nothing(server, tmp_path, capsys):
    fetch_file(server.url(), NAME, home=tmp_path, progress=False)
    assert capsys.readouterr() == ("", "")


def test_fetch_file_follows_redirects(server, tmp_path):
    assert fetch_file(server.url(f"/redirect/{NAME}"), NAME, home=tmp_path, progress=False).read_bytes() == BODY
    assert server.requests == [f"/redirect/{NAME}", f"/files/{NAME}"]


def test_fetch_file_cache_hit_makes_no_request(server, tmp_path):
    first = fetch_file(server.url(), NAME, home=tmp_path, progress=False)
    second = fetch_file(server.url(), NAME, home=tmp_path, progress=False)
    assert first == second
    assert server.requests == [f"/files/{NAME}"]


@pytest.mark.parametrize("sha256", [BODY_SHA256, BODY_SHA256[:8], BODY_SHA256[:12].upper()],
                         ids=["full", "prefix8", "prefix12-upper"])
def test_fetch_file_accepts_the_publishers_full_or_prefix_hash(server, tmp_path, sha256):
    path = fetch_file(server.url(), NAME, sha256=sha256, home=tmp_path, progress=False)
    assert path.read_bytes() == BODY
    assert cache_listing(tmp_path) == [NAME], "the publisher's hash needs no recorded one"
    fetch_file(server.url(), NAME, sha256=sha256, home=tmp_path, progress=False)
    assert len(server.requests) == 1


def test_fetch_file_hash_mismatch_is_an_error_and_deletes_the_download(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        fetch_file(server.url(), NAME, sha256=wrong, home=tmp_path, progress=False)
    text = assert_one_line_remedy(info.value, server.url(), tmp_path / "checkpoints" / NAME)
    assert wrong in text and BODY_SHA256 in text, f"expected the expected and the actual hash in {text!r}"
    assert cache_listing(tmp_path) == []
    assert isinstance(info.value, StreamTSMError), "the CLI prints a StreamTSMError as one line, exit 2"


def test_fetch_file_checks_a_cached_file_against_the_publishers_hash(server, tmp_path):
    target = checkpoints_dir(tmp_path) / NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the publisher's file")
    with pytest.raises(DownloadError) as info:
        fetch_file(server.url(), NAME, sha256=BODY_SHA256[:8], home=tmp_path, progress=False)
    text = assert_one_line_remedy(info.value, server.url(), target)
    assert BODY_SHA256[:8] in text and hashlib.sha256(b"not the publisher's file").hexdigest() in text
    assert "delete it" in text
    assert target.read_bytes() == b"not the publisher's file", "a file the user placed is never deleted"
    assert server.requests == []


def test_fetch_file_finds_a_cached_file_changed_on_disk(server, tmp_path):
    target = fetch_file(server.url(), NAME, home=tmp_path, progress=False)
    target.write_bytes(BODY[:-1] + b"x")
    with pytest.raises(DownloadError) as info:
        fetch_file(server.url(), NAME, home=tmp_path, progress=False)
    text = assert_one_line_remedy(info.value, server.url(), target)
    assert "changed on disk" in text and "delete it to download it again" in text, text
    assert BODY_SHA256 in text, f"expected the recorded hash in {text!r}"
    target.unlink()  # what the message says to do
    assert fetch_file(server.url(), NAME, home=tmp_path, progress=False).read_bytes() == BODY
    assert len(server.requests) == 2


def test_fetch_file_records_the_hash_of_a_file_placed_by_hand(server, tmp_path):
    target = checkpoints_dir(tmp_path) / NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"placed by hand")
    assert fetch_file(server.url(), NAME, home=tmp_path, progress=False) == target
    assert server.requests == []
    recorded = (target.parent / f"{NAME}.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(b"placed by hand").hexdigest()


def test_fetch_file_truncated_transfer_leaves_nothing(server, tmp_path):
    url = server.url(f"/truncate/{NAME}")
    with pytest.raises(DownloadError) as info:
        fetch_file(url, NAME, home=tmp_path, progress=False)
    text = assert_one_line_remedy(info.value, url, tmp_path / "checkpoints" / NAME)
    assert f"{len(BODY)} of the {len(BODY) + 1000} bytes" in text, text
    assert cache_listing(tmp_path) == []


def test_fetch_file_stalled_transfer_times_out_and_leaves_nothing(server, tmp_path):
    url = server.url(f"/stall/{NAME}")
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch_file(url, NAME, home=tmp_path, progress=False, timeout=0.5)
    assert time.monotonic() - start < 30, "a stalled server must not hang the fetch"
    text = assert_one_line_remedy(info.value, url, tmp_path / "checkpoints" / NAME)
    assert "timed out after 0.5 s" in text, text
    assert cache_listing(tmp_path) == []


@pytest.mark.parametrize("status", [404, 500])
def test_fetch_file_http_error_names_the_status_and_url(server, tmp_path, status):
    url = server.url(f"/status/{status}")
    with pytest.raises(DownloadError) as info:
        fetch_file(url, NAME, home=tmp_path, progress=False)
    text = assert_one_line_remedy(info.value, url, tmp_path / "checkpoints" / NAME)
    assert f"HTTP {status}" in text, text
    assert cache_listing(tmp_path) == []


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_fetch_file_connection_refused_is_an_error(tmp_path, scheme):
    url = f"{scheme}://127.0.0.1:{closed_port()}/{NAME}"
    with pytest.raises(DownloadError) as info:
        fetch_file(url, NAME, home=tmp_path, progress=False, timeout=1.0)
    text = assert_one_line_remedy(info.value, url, tmp_path / "checkpoints" / NAME)
    assert "refused" in text.lower(), text
    assert cache_listing(tmp_path) == []


def test_fetch_file_unanswering_server_times_out(tmp_path):
    # The kernel completes the handshake for a listening socket that never accepts: the request goes out and no
    # answer ever comes, as with a stuck server or a proxy that swallows traffic.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/{NAME}"
        start = time.monotonic()
        with pytest.raises(DownloadError) as info:
            fetch_file(url, NAME, home=tmp_path, progress=False, timeout=0.5)
        assert time.monotonic() - start < 30, "an unanswering server must not hang the fetch"
    text = assert_one_line_remedy(info.value, url, tmp_path / "checkpoints" / NAME)
    assert "timed out after 0.5 s" in text, text
    assert cache_listing(tmp_path) == []


def test_fetch_file_tls_failure_is_an_error(server, tmp_path):
    url = server.url(scheme="https")  # the server speaks plain HTTP: the TLS handshake fails
    with pytest.raises(DownloadError) as info:
        fetch_file(url, NAME, home=tmp_path, progress=False, timeout=2.0)
    assert_one_line_remedy(info.value, url, tmp_path / "checkpoints" / NAME)
    assert cache_listing(tmp_path) == []


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_fetch_file_offline_returns_a_cached_file_without_a_request(server, tmp_path, monkeypatch, how):
    fetch_file(server.url(), NAME, home=tmp_path, progress=False)
    if how == "environment":
        monkeypatch.setenv("STREAMTSM_OFFLINE", "1")
    path = fetch_file(server.url(), NAME, home=tmp_path, progress=False, offline=True if how == "argument" else None)
    assert path.read_bytes() == BODY
    assert len(server.requests) == 1


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_fetch_file_offline_missing_file_says_where_to_place_it(server, tmp_path, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("STREAMTSM_OFFLINE", "yes")
    with pytest.raises(DownloadError) as info:
        fetch_file(server.url(), NAME, home=tmp_path, progress=False, offline=True if how == "argument" else None)
    text = assert_one_line_remedy(info.value, server.url(), tmp_path / "checkpoints" / NAME)
    assert "offline" in text, text
    assert server.requests == []
    assert not checkpoints_dir(tmp_path).exists(), "offline must not create the cache either"


_CHILD = """
import sys, time
from pathlib import Path
from streamtsm.hub.download import fetch_file
url, home, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
deadline = time.monotonic() + 20
while not go.exists() and time.monotonic() < deadline:  # start together with the other process
    time.sleep(0.005)
print(fetch_file(url, "w.pth", home=home, progress=False))
"""


def test_fetch_file_concurrent_processes_download_once(server, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, server.url(f"/slow/{NAME}"), str(tmp_path / "home"),
                                  str(r), str(go)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for r in ready]
    try:
        deadline = time.monotonic() + 20
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outputs = [child.communicate(timeout=30) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    target = tmp_path / "home" / "checkpoints" / NAME
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, f"a fetching process failed: {err}"
        assert out.strip() == str(target)
    assert target.read_bytes() == BODY
    assert (target.parent / f"{NAME}.sha256").read_text().split()[0] == BODY_SHA256
    assert cache_listing(tmp_path / "home") == [NAME, f"{NAME}.sha256"], "a temporary or lock file was left"
    # The lock makes the second process wait for the first and then find the file.
    assert server.requests == [f"/slow/{NAME}"]


def run_as_nobody(fn) -> str:
    """``fn()`` in a forked child that dropped root for ``nobody``: "ok <result>" or "<error type> <message>".

    A fork, not a new interpreter: this interpreter may live under /root (mode 0700), which nobody cannot open."""
    import pwd  # POSIX only, like the fork

    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                result = f"ok {fn()}"
            except Exception as e:
                result = f"{type(e).__name__} {e}"
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if select.select([read_end], [], [], deadline - time.monotonic())[0]:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, 9)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to drop to 'nobody': as an ordinary user a cache folder mode cannot be made "
                           "unwritable to oneself reliably enough to test")
def test_fetch_file_unwritable_cache_is_an_error_and_a_read_only_cache_works(server):
    # Root writes through any mode, so the fetch runs as nobody against folders owned by root, mode 0755; under
    # /tmp, not pytest's tmp_path, whose parent is 0700 and would stop nobody from even reading the cache.
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o755)
        home_dir = Path(base) / "home"
        cached = checkpoints_dir(home_dir) / "cached.pth"
        cached.parent.mkdir(parents=True, mode=0o755)
        cached.write_bytes(BODY)
        os.chmod(cached, 0o644)
        url = server.url()

        result = run_as_nobody(lambda: fetch_file(url, NAME, home=home_dir, progress=False))
        assert result.startswith("DownloadError "), f"expected a DownloadError, got {result!r}"
        assert_one_line_remedy(result, url, checkpoints_dir(home_dir) / NAME)
        assert "cannot write to the cache folder" in result and "Permission denied" in result, result

        no_folder = Path(base) / "home2"  # the checkpoints folder cannot even be created
        no_folder.mkdir(mode=0o755)
        result = run_as_nobody(lambda: fetch_file(url, NAME, home=no_folder, progress=False))
        assert result.startswith("DownloadError ") and "Permission denied" in result, result

        # A home copied read-only from another machine still serves what it holds (its hash recorded or not).
        result = run_as_nobody(lambda: fetch_file(url, "cached.pth", home=home_dir, progress=False))
        assert result == f"ok {cached}", result
        assert sorted(os.listdir(cached.parent)) == ["cached.pth"]
    assert server.requests == []


def test_fetch_file_cache_under_a_regular_file_is_an_error(server, tmp_path):
    not_a_folder = tmp_path / "home"
    not_a_folder.write_bytes(b"a file where the cache's home should be")
    with pytest.raises(DownloadError) as info:
        fetch_file(server.url(), NAME, home=not_a_folder, progress=False)
    text = assert_one_line_remedy(info.value, server.url(), not_a_folder / "checkpoints" / NAME)
    assert "cannot write to the cache folder" in text, text
    assert not_a_folder.read_bytes() == b"a file where the cache's home should be"
    assert server.requests == []


@pytest.mark.parametrize("url, filename, sha256", [
    ("ftp://example.org/w.pth", NAME, None),
    ("http://127.0.0.1:1/w.pth", "sub/w.pth", None),
    ("http://127.0.0.1:1/w.pth", "..", None),
    ("http://127.0.0.1:1/w.pth", NAME, "abc1234"),
    ("http://127.0.0.1:1/w.pth", NAME, "z" * 64),
], ids=["scheme", "folder-in-name", "dotdot", "short-hash", "not-hex"])
def test_fetch_file_rejects_malformed_arguments(tmp_path, url, filename, sha256):
    # What no user input causes is a bug in the caller or the catalog: ValueError, before any file or request.
    with pytest.raises(ValueError):
        fetch_file(url, filename, sha256=sha256, home=tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_fetch_file_removes_parts_left_by_a_killed_download(server, tmp_path):
    folder = checkpoints_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / f".{NAME}.0badc0de.part").write_bytes(BODY[:100])  # what a process killed mid-download leaves
    (folder / "other.pth").write_bytes(b"another checkpoint")
    fetch_file(server.url(), NAME, home=tmp_path, progress=False)
    assert cache_listing(tmp_path) == ["other.pth", NAME, f"{NAME}.sha256"]
