"""Prometheus metrics for `streamtsm run --metrics-port`: per-stream fps, drops and reconnects; latency
histograms for capture->publish and for the model step; action events by stream, label and kind; the build.

A sink: predictions feed the latency histogram, stats messages the gauges and counters, each model step the step
histogram. Updating them is a few in-memory operations, so it runs inline in the pipeline's thread. Served on its
own registry so nothing else of the process leaks into it, by the package's one HTTP server
(:class:`~streamtsm.web.WebServer`), which also answers ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

from streamtsm import __version__
from streamtsm.errors import ConfigError
from streamtsm.sinks.base import StepReport
from streamtsm.web import Readiness, WebServer

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ModuleNotFoundError as e:
    if e.name != "prometheus_client":  # a dependency of an installed prometheus-client: not ours to explain
        raise
    raise ConfigError("Prometheus metrics (--metrics-port) need prometheus-client, which is not installed: "
                      "pip install 'streamtsm[metrics]'") from None

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class MetricsSink:
    """Turns the pipeline's messages into Prometheus metrics.

    Args:
        registry: where the metrics live (a fresh one when None).

    Attributes:
        readiness: the streams' statuses from the stats, for ``/readyz``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.fps = Gauge("streamtsm_stream_fps", "Frames processed per second", ["stream"], registry=r)
        self.up = Gauge("streamtsm_stream_up", "1 while the stream's source delivers, else 0", ["stream"], registry=r)
        self.frames = Counter("streamtsm_stream_frames", "Frames processed", ["stream"], registry=r)
        self.dropped = Counter("streamtsm_stream_dropped_frames", "Frames dropped because the model was busy",
                               ["stream"], registry=r)
        self.nonfinite = Counter("streamtsm_nonfinite", "Model outputs holding NaN or infinity (frame skipped)",
                                 ["stream"], registry=r)
        self.reconnects = Counter("streamtsm_stream_reconnects", "Source reconnects", ["stream"], registry=r)
        self.latency = Histogram("streamtsm_capture_to_publish_seconds", "Capture to publish latency",
                                 ["stream"], buckets=_LATENCY_BUCKETS_S, registry=r)
        # Labelled by the model group's key (see Pipeline.stats): two groups of one model stay apart.
        self.step = Histogram("streamtsm_model_step_seconds", "Duration of one batched model call",
                              ["model"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.publish_dropped = Counter("streamtsm_publish_dropped_messages",
                                       "Messages dropped because a subscriber's queue was full", registry=r)
        self.events = Counter("streamtsm_events", "Action events (onset, offset)", ["stream", "label", "event"],
                              registry=r)
        self.build_info = Gauge("streamtsm_build_info", "The running streamtsm's version (always 1)", ["version"],
                                registry=r)
        self.build_info.labels(__version__).set(1)
        self.readiness = Readiness()
        self.server: WebServer | None = None
        self._last: dict[tuple[str, str], float] = {}

    def serve(self, port: int, addr: str = "127.0.0.1") -> WebServer:
        """Serve ``/metrics`` (and ``/healthz``, ``/readyz``) over HTTP in a daemon thread, until :meth:`close`.

        Raises:
            ConfigError: the address cannot be bound (in use, not an address of this host).
        """
        self.server = WebServer(port, addr, registry=self.registry, readiness=self.readiness, what="metrics").start()
        return self.server

    def on_step(self, step: StepReport) -> None:
        """Records one batched model call of its group (labelled by the group's key: ``name``, ``name#2``, ...)."""
        self.step.labels(step.group).observe(step.step_ms / 1e3)

    def on_message(self, topic: str, payload: dict) -> None:
        self.readiness.on_message(topic, payload)
        kind = payload.get("type")
        if kind == "pred":
            self.latency.labels(payload["stream"]).observe(payload["latency_ms"] / 1e3)
        elif kind == "event":
            self.events.labels(payload["stream"], payload["label"], payload["event"]).inc()
        elif kind == "stats":
            for sid, s in payload["streams"].items():
                self.fps.labels(sid).set(s["fps"])
                self.up.labels(sid).set(1.0 if s["status"] == "running" else 0.0)
                self._advance(self.frames.labels(sid), (sid, "frames"), s["frames"])
                self._advance(self.dropped.labels(sid), (sid, "dropped"), s["dropped"])
                self._advance(self.reconnects.labels(sid), (sid, "reconnects"), s["reconnects"])
                self._advance(self.nonfinite.labels(sid), (sid, "nonfinite"), s.get("nonfinite", 0))
            self._advance(self.publish_dropped, ("", "publish_dropped"), payload.get("publish_dropped", 0))

    def close(self) -> None:
        """Stops the server :meth:`serve` started (a server shared with the web view is closed by its maker)."""
        if self.server is not None:
            self.server.close()

    def _advance(self, counter: Counter, key: tuple[str, str], total: float) -> None:
        # Stats carry running totals; Prometheus counters only go up by increments.
        delta = total - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._last[key] = max(total, self._last.get(key, 0))
