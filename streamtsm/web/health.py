"""Readiness from the stats messages: a process is ready when every stream it runs is ``running``.

``/healthz`` says the process is alive (any answer at all); ``/readyz`` says whether its cameras deliver, so a load
balancer or an orchestrator can tell a recognizer that is up but blind (a camera connecting, reconnecting, failed
or ended) from one that works. The statuses are those of the newest stats message (see
:class:`~streamtsm.capture.supervisor.StreamStatus`); before the first one, nothing is known and nothing is ready.
"""

from __future__ import annotations

import threading

READY_STATUS = "running"


class Readiness:
    """Keeps each stream's status from the stats messages; fed by a sink's ``on_message``, read by the server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: dict[str, str] | None = None

    def on_message(self, topic: str, payload: dict) -> None:
        if payload.get("type") == "stats":
            statuses = {str(sid): str(s.get("status")) for sid, s in payload.get("streams", {}).items()}
            with self._lock:
                self._statuses = statuses

    def check(self) -> tuple[bool, dict]:
        """``(ready, body)``: ready when stats have come and every stream in them is running. ``body`` (JSON for
        ``/readyz``) has ``ready``, ``streams`` (every stream's status) and ``not_ready`` (the others' statuses)."""
        with self._lock:
            statuses = self._statuses
        if statuses is None:
            return False, {"ready": False, "streams": {}, "not_ready": {}, "reason": "no stats yet"}
        not_ready = {sid: status for sid, status in statuses.items() if status != READY_STATUS}
        ready = bool(statuses) and not not_ready
        body = {"ready": ready, "streams": statuses, "not_ready": not_ready}
        if not statuses:
            body["reason"] = "no streams"
        return ready, body
