"""The one HTTP server of streamtsm: the web view's page, streams and events, Prometheus ``/metrics``, and the
health endpoints, in any combination on one port.

Built on the standard library's ``ThreadingHTTPServer``: a thread per connection suits a handful of long-lived
responses (an MJPEG and an event stream per open page) and costs no dependency; the state it serves is kept by
:class:`~streamtsm.web.sink.WebSink`, so the server never touches the pipeline.

=====================  ===========================================================================================
``/``                   the page (with a view): every stream's live image, top-k, recent events and stats
``/video/<id>.mjpg``    the stream's annotated frames, ``multipart/x-mixed-replace`` (MJPEG)
``/events``             Server-Sent Events: the pred, event and stats messages (as on ZeroMQ), and ``web`` records
``/metrics``            Prometheus text format (with a registry)
``/healthz``            200 while the process is alive
``/readyz``             200 when every stream is ``running``, else 503; JSON either way
=====================  ===========================================================================================

:meth:`WebServer.close` ends promptly with clients connected: the long-lived responses check a closing flag while
they wait, and the sockets of responses blocked in a write (a stalled browser) are shut down under them.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING

from streamtsm.errors import ConfigError
from streamtsm.web.health import Readiness

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from streamtsm.web.sink import WebSink

log = logging.getLogger(__name__)

_VIDEO_PATH = re.compile(r"^/video/([A-Za-z0-9_-]+)\.mjpg$")
_BOUNDARY = "streamtsmframe"
# A response that cannot write for this long (a browser gone without closing) ends, freeing its thread.
_WRITE_TIMEOUT_S = 30.0


class WebServer:
    """Serves what it is given: a view (the page, ``/video``, ``/events``), a Prometheus registry (``/metrics``),
    and always ``/healthz`` and ``/readyz``.

    The address is bound when the server is made, so a port in use is an error before anything else starts;
    :meth:`start` then serves in a daemon thread.

    Args:
        port: TCP port (0: any free one; see :attr:`port`).
        addr: address to bind; loopback unless told otherwise.
        view: the web view's state, or None for no page.
        registry: a Prometheus registry for ``/metrics``, or None.
        readiness: where ``/readyz`` looks; default the view's, else one that never hears of a stream.
        what: what the server is for, in the error message (``cannot serve <what> on ADDR:PORT: ...``).

    Raises:
        ConfigError: the address cannot be bound (in use, not an address of this host).
    """

    def __init__(self, port: int, addr: str = "127.0.0.1", *, view: WebSink | None = None,
                 registry: CollectorRegistry | None = None, readiness: Readiness | None = None,
                 what: str = "HTTP") -> None:
        self.view = view
        self.registry = registry
        self.readiness = readiness or (view.readiness if view is not None else Readiness())
        self.closing = threading.Event()
        self._page = resources.files("streamtsm.web").joinpath("page.html").read_bytes() if view else b""
        try:
            self._httpd = _HTTPServer((addr, port), _Handler, self)
        except OSError as e:
            raise ConfigError(f"cannot serve {what} on {addr}:{port}: {e.strerror or e}") from None
        self.addr = addr
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/"

    def start(self) -> WebServer:
        """Serves in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"http-{self.port}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops accepting, ends every response (within a fraction of a second, whatever the clients do) and
        releases the port."""
        if self.closing.is_set():
            return
        self.closing.set()
        if self._thread is not None:
            self._httpd.shutdown()  # returns once serve_forever has (it polls every 0.1 s)
            self._thread.join(1.0)
        self._httpd.close_connections()
        self._httpd.server_close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a response thread never holds the process open
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler, owner: WebServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request_thread(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def close_connections(self) -> None:
        """Shuts down every open connection: a response blocked in a write to a stalled client fails at once."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = _WRITE_TIMEOUT_S
    server_version = "streamtsm"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                self._reply(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                ready, body = owner.readiness.check()
                self._reply(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                            json.dumps(body).encode() + b"\n", "application/json")
            elif path == "/metrics" and owner.registry is not None:
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                self._reply(HTTPStatus.OK, generate_latest(owner.registry), CONTENT_TYPE_LATEST)
            elif owner.view is not None and path in ("/", "/index.html"):
                self._reply(HTTPStatus.OK, owner._page, "text/html; charset=utf-8")
            elif owner.view is not None and path == "/events":
                self._stream_events()
            elif owner.view is not None and (m := _VIDEO_PATH.match(path)):
                self._stream_video(m.group(1))
            else:
                self._reply(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            # The client went away, stalled past the write timeout, or the server closed the socket under it.
            self.close_connection = True

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")  # a proxy in front must not hold the stream back
        self.end_headers()
        self.close_connection = True

    def _stream_video(self, stream_id: str) -> None:
        owner = self.server.owner
        try:
            frames = owner.view.frames(stream_id, owner.closing)
        except KeyError:
            self._reply(HTTPStatus.NOT_FOUND, f"no stream {stream_id!r}\n".encode(), "text/plain; charset=utf-8")
            return
        self._start_stream(f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
        try:
            for jpeg in frames:
                self.wfile.write(b"--" + _BOUNDARY.encode() + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
        finally:
            frames.close()

    def _stream_events(self) -> None:
        owner = self.server.owner
        self._start_stream("text/event-stream; charset=utf-8")
        messages = owner.view.messages(owner.closing)
        try:
            for chunk in messages:
                self.wfile.write(chunk)
        finally:
            messages.close()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)
