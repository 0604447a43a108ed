"""The live web view and the HTTP endpoints (``run --http-port``, ``--metrics-port``).

- :mod:`.sink`: :class:`WebSink`, the recognizer's side: what the pages show, kept in memory; never blocks;
- :mod:`.server`: :class:`WebServer`, the one HTTP server: the page, MJPEG, Server-Sent Events, ``/metrics``,
  ``/healthz`` and ``/readyz``;
- :mod:`.health`: :class:`Readiness`, the streams' statuses behind ``/readyz``.
"""

from streamtsm.web.health import Readiness
from streamtsm.web.server import WebServer

__all__ = ["Readiness", "WebServer"]
