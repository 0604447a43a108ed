"""Published checkpoints into a local cache: downloaded once, verified, never left half-written.

The cache is ``<home>/checkpoints/<filename>`` (the publisher's file name), where home is ``STREAMTSM_HOME``, else
``$XDG_CACHE_HOME/streamtsm``, else ``~/.cache/streamtsm``; a home copied from another machine works offline.
A download goes through these steps, and any failure leaves the cache as it was::

    lock <checkpoints>/.<filename>.lock         one process downloads, the others wait, then find the file
    GET url -> <checkpoints>/.<filename>.<random>.part     hashed while written, length checked
    verify sha256                               the publisher's (full or prefix), else record it:
                                                <filename>.sha256, as ``sha256sum`` writes it
    os.replace(part, <filename>)                atomic: readers see no file or the whole file

A cached file is hashed again on every use and compared with the publisher's hash or the recorded one, so a file
changed on disk is found before a model loads it. Every failure is one :class:`DownloadError` line naming the URL
and how to place the file by hand (``--weights PATH``, or the cache path).

Only the standard library and tqdm (the progress bar); importing this module needs no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import secrets
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..errors import StreamTSMError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the temporary file and the atomic rename still keep the cache whole
    fcntl = None

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
OFFLINE_VALUES = ("1", "true", "yes")
SIDECAR_SUFFIX = ".sha256"
_HEX = re.compile(r"[0-9a-f]+")


class DownloadError(StreamTSMError):
    """A checkpoint could not be downloaded, verified or placed in the cache; the message is one line that names the
    URL and how to place the file by hand."""


def home() -> Path:
    """STREAMTSM_HOME if set, else $XDG_CACHE_HOME/streamtsm, else ~/.cache/streamtsm."""
    if os.environ.get("STREAMTSM_HOME"):
        return Path(os.environ["STREAMTSM_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and to be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "streamtsm"
    return Path.home() / ".cache" / "streamtsm"


_default_home = home  # the parameters named ``home`` below shadow the function


def checkpoints_dir(home: Path | None = None) -> Path:
    """<home>/checkpoints: where downloaded files live, under the file name the publisher gave."""
    return (Path(home).expanduser() if home is not None else _default_home()) / "checkpoints"


def is_offline() -> bool:
    """True when STREAMTSM_OFFLINE is set to 1/true/yes (the CLI's global --offline sets it)."""
    return os.environ.get("STREAMTSM_OFFLINE", "").strip().lower() in OFFLINE_VALUES


def fetch_file(url: str, filename: str, *, sha256: str | None = None, home: Path | None = None,
               offline: bool | None = None, progress: bool = True, timeout: float = 10.0) -> Path:
    """The file at <checkpoints_dir(home)>/<filename>, downloaded from url once.

    sha256: the publisher's hash, full (64 hex) or a prefix (>= 8 hex, as in mmaction2/torchvision file names);
    None: the sha256 is recorded at the first download (a sidecar <filename>.sha256) and checked on every later use.
    Downloads to a temporary file in the same folder, renamed into place only when complete and verified; a lock
    file serializes two processes fetching the same file. offline (None: is_offline()): never touches the network;
    a missing file is a DownloadError saying where to place it.
    Every failure (unreachable host, HTTP error, hash mismatch, truncated transfer, unwritable cache) is one
    DownloadError naming the URL and how to place the file by hand (--weights PATH, or the cache path), leaving
    nothing partial in the cache, within 30 s when the network is unreachable.

    Args:
        url: http or https URL of the file.
        filename: a plain file name (no folder), usually the publisher's.
        sha256: the publisher's hash or a prefix of it (case-insensitive), or None.
        home: the cache's home folder; None: :func:`home`.
        offline: never touch the network; None: :func:`is_offline`.
        progress: show a progress bar on stderr while downloading.
        timeout: seconds for each socket operation (connecting to one address, each read); connecting to all of a
            host's addresses together gets at most twice this.

    Returns:
        The path of the verified file in the cache.

    Raises:
        DownloadError: the file cannot be downloaded, verified or written (or is missing while offline).
        ValueError: url, filename or sha256 is malformed (a bug in the caller or the catalog, not a user error).
    """
    expected = _check_arguments(url, filename, sha256, timeout)
    folder = checkpoints_dir(home)
    target = folder / filename
    if _is_cached(url, target):
        _check_cached(url, target, expected)
        return target
    if is_offline() if offline is None else offline:
        raise DownloadError(f"offline (--offline or STREAMTSM_OFFLINE=1) and {filename} is not in the cache "
                            f"{folder}; {_by_hand(url, target)}")
    with _locked(url, folder, target):
        if _is_cached(url, target):  # another process downloaded it while this one waited for the lock
            _check_cached(url, target, expected)
            return target
        _download(url, target, expected, progress=progress, timeout=timeout)
    return target


def _check_arguments(url: str, filename: str, sha256: str | None, timeout: float) -> str | None:
    """The publisher's hash in lower case; ValueError for what no user input can cause."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"url must be http:// or https://, got {url!r}")
    if filename in ("", ".", "..") or any(sep and sep in filename for sep in ("/", os.sep, os.altsep)):
        raise ValueError(f"filename must be a plain file name without a folder, got {filename!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if sha256 is None:
        return None
    expected = sha256.strip().lower()
    if not (8 <= len(expected) <= 64 and _HEX.fullmatch(expected)):
        raise ValueError(f"sha256 must be 8 to 64 hex digits (the full hash or a prefix), got {sha256!r}")
    return expected


def _by_hand(url: str, target: Path) -> str:
    """The remedy every message ends with."""
    return f"to place the file by hand, download {url} to {target}, or pass --weights PATH to a copy of it"


def _one_line(text: object) -> str:
    """A reason from an OS or a server, newlines and all, as part of a one-line message."""
    return " ".join(str(text).splitlines()).strip()


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + SIDECAR_SUFFIX)


def _file_sha256(url: str, path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError as e:
        raise DownloadError(f"cannot read the cached {path}: {_one_line(e.strerror or e)}; "
                            f"{_by_hand(url, path)}") from e
    return digest.hexdigest()


def _is_cached(url: str, target: Path) -> bool:
    """Whether target is a file; a folder on the way that cannot be searched (another user's home) is an error."""
    try:
        return target.is_file()
    except OSError as e:
        raise DownloadError(f"cannot look into the cache folder {target.parent} ({_one_line(e.strerror or e)}): "
                            f"make it readable or set STREAMTSM_HOME to another folder; or {_by_hand(url, target)}"
                            ) from e


def _check_cached(url: str, target: Path, expected: str | None) -> None:
    """Verify a cached file: the publisher's hash when known, else the one recorded at download. A file placed by
    hand without either has its hash recorded now, when the cache is writable (a read-only copied home is fine)."""
    actual = _file_sha256(url, target)
    if expected is not None:
        if not actual.startswith(expected):
            raise DownloadError(
                f"{target} does not match the publisher's sha256 of {url} (expected {expected}, got {actual}): it "
                f"changed on disk or came from elsewhere; delete it to download it again, or {_by_hand(url, target)}")
        return
    sidecar = _sidecar(target)
    try:
        recorded = sidecar.read_text(encoding="ascii").split()[0].lower()
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            _write_atomic(sidecar, f"{actual}  {target.name}\n".encode("ascii"))
        return
    except (OSError, UnicodeDecodeError, IndexError) as e:
        raise DownloadError(f"cannot read the sha256 recorded for {target} in {sidecar} ({_one_line(e)}); delete "
                            f"both to download {url} again, or {_by_hand(url, target)}") from e
    if recorded != actual:
        raise DownloadError(
            f"{target} changed on disk since it was downloaded from {url} (sha256 recorded in {sidecar}: "
            f"{recorded}, now {actual}); delete it to download it again, or {_by_hand(url, target)}")


def _unwritable(url: str, folder: Path, target: Path, error: OSError) -> DownloadError:
    return DownloadError(
        f"cannot write to the cache folder {folder} ({_one_line(error.strerror or error)}): make it writable or set "
        f"STREAMTSM_HOME to a writable folder; or {_by_hand(url, target)}")


@contextlib.contextmanager
def _locked(url: str, folder: Path, target: Path):
    """Hold <folder>/.<filename>.lock: the cache folder is created and a process that waits says so.

    The lock file is removed on release. A waiter may then hold a lock on the removed file while a newcomer creates
    and locks a new one; so a lock counts only while its file is still the one at the path (same inode)."""
    lock_path = folder / f".{target.name}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(url, folder, target, e) from e
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unwritable(url, folder, target, e) from e
        if fcntl is None:
            break
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process downloading %s", target)
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(lock_path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)  # releases the lock


def _create_part(path_for: Path) -> tuple[int, Path]:
    """A new temporary file beside path_for: (descriptor, path). Not tempfile.mkstemp: its mode 0600 would make a
    cache shared between users unreadable to the others; os.open applies the umask as any new file gets."""
    while True:
        part = path_for.with_name(f".{path_for.name}.{secrets.token_hex(4)}.part")
        try:
            return os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), part
        except FileExistsError:
            continue


def _write_atomic(path: Path, data: bytes) -> None:
    fd, part = _create_part(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


def _remove_stale_parts(target: Path) -> None:
    """Remove the temporary files of target that a process killed mid-download left (SIGKILL, power loss): only the
    holder of the lock writes them, and the caller holds it now. Without locks (Windows) they may be another
    process's download in flight, and stay."""
    if fcntl is None:
        return
    stale = re.compile(re.escape(f".{target.name}.") + r"[0-9a-f]{8}\.part")
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            if stale.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _download(url: str, target: Path, expected: str | None, *, progress: bool, timeout: float) -> None:
    """GET url into a temporary file beside target, verify it, and rename it into place (the caller holds the lock)."""
    _remove_stale_parts(target)
    try:
        fd, part = _create_part(target)
    except OSError as e:
        raise _unwritable(url, target.parent, target, e) from e
    log.info("downloading %s to %s", url, target)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _transfer(url, target, out, progress=progress, timeout=timeout)
            try:
                out.flush()
                os.fsync(out.fileno())  # the bytes are on disk before the name points at them
            except OSError as e:
                raise _unwritable(url, target.parent, target, e) from e
        if expected is not None and not actual.startswith(expected):
            raise DownloadError(
                f"sha256 mismatch for {url}: expected {expected}, got {actual} (the download was deleted); "
                f"{_by_hand(url, target)}")
        try:
            if expected is None:
                _write_atomic(_sidecar(target), f"{actual}  {target.name}\n".encode("ascii"))
            os.replace(part, target)
        except OSError as e:
            raise _unwritable(url, target.parent, target, e) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


def _transfer(url: str, target: Path, out, *, progress: bool, timeout: float) -> str:
    """Copy the response body into out, checking its length; returns its sha256."""
    request = urllib.request.Request(url, headers={"User-Agent": f"streamtsm/{__version__}"})
    try:
        response = _opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise DownloadError(f"HTTP {e.code} {_one_line(e.reason)} for {url}; {_by_hand(url, target)}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url}: {_describe(e.reason, timeout)}; {_by_hand(url, target)}") from e
    except (OSError, http.client.HTTPException) as e:  # raised while waiting for the status line
        raise DownloadError(f"no answer from {url}: {_describe(e, timeout)}; {_by_hand(url, target)}") from e
    with response:
        try:
            total = int(response.headers.get("Content-Length", ""))
        except ValueError:
            total = None  # chunked or unknown: the hash is the only check
        digest = hashlib.sha256()
        received = 0
        with tqdm(total=total, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                  disable=not progress, dynamic_ncols=True) as bar:
            while True:
                try:
                    chunk = response.read1(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as e:
                    of = "an unknown number of" if total is None else total
                    raise DownloadError(
                        f"the transfer from {url} broke off after {received} of {of} bytes: {_describe(e, timeout)} "
                        f"(the partial file was deleted); {_by_hand(url, target)}") from e
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as e:
                    raise _unwritable(url, target.parent, target, e) from e
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(
            f"truncated transfer from {url}: got {received} of the {total} bytes announced (the partial file was "
            f"deleted); {_by_hand(url, target)}")
    return digest.hexdigest()


def _describe(error: BaseException | str, timeout: float) -> str:
    if isinstance(error, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g} s"
    if isinstance(error, OSError) and error.strerror:
        return _one_line(error.strerror)
    return _one_line(error) or type(error).__name__


def _connect_within(address: tuple[str, int], timeout, source_address=None, *args, **kwargs) -> socket.socket:
    """socket.create_connection with a budget for all addresses together.

    create_connection gives each of a host's addresses the whole timeout in turn, so a host with four addresses
    behind a firewall that drops packets takes four timeouts. Here each try gets the timeout, and all of them
    together at most twice the timeout: 20 s by default, the rest of the 30 s left to the name lookup."""
    if not isinstance(timeout, (int, float)):
        return socket.create_connection(address, timeout, source_address, *args, **kwargs)
    host, port = address
    deadline = time.monotonic() + 2 * timeout
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(min(timeout, remaining))
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            sock.settimeout(timeout)
            return sock
        except OSError as e:
            error = e
            sock.close()
    raise error or TimeoutError(f"no address of {host} answered within {2 * timeout:g} s")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # http.client's one hook for how a connection is opened (an instance attribute, set in __init__).
        self._create_connection = _connect_within


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_within


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self):
        super().__init__()
        self.tls_context = ssl.create_default_context()

    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self.tls_context)


def _opener() -> urllib.request.OpenerDirector:
    """urllib's defaults (redirects; proxies from https_proxy / no_proxy, read now, not at import) with the
    connection budget above."""
    return urllib.request.build_opener(_HTTPHandler(), _HTTPSHandler())
