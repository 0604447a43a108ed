"""TEMPORARY stand-in for streamtsm.overlay until it lands; removed on merge."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import cv2


@dataclass
class StreamView:
    stream_id: str
    topk: list = field(default_factory=list)
    action: str | None = None
    action_score: float | None = None
    fps: float | None = None
    latency_ms: float | None = None
    status: str = "starting"


class ViewTracker:
    def __init__(self) -> None:
        self._views: dict[str, StreamView] = {}
        self._lock = threading.Lock()

    def on_message(self, topic: str, payload: dict) -> None:
        with self._lock:
            if payload.get("type") == "pred":
                v = self._views.setdefault(payload["stream"], StreamView(payload["stream"]))
                v.topk = [(e["label"], e["score"]) for e in payload["topk"]]

    def view(self, stream_id: str) -> StreamView:
        with self._lock:
            v = self._views.get(stream_id) or StreamView(stream_id)
            return replace(v, topk=list(v.topk))


def annotate(image, view: StreamView):
    image = image.copy()
    for i, (label, score) in enumerate(view.topk[:3]):
        cv2.putText(image, f"{label} {score:.2f}", (8, 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255))
    return image
