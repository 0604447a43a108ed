"""The pipeline's last stage: turns its results into messages (the wire format of :mod:`streamtsm.publish.schema`)
and hands each to every sink, and each model step's report to the sinks that want one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from streamtsm.publish import Publisher
from streamtsm.publish.schema import (
    TOPIC_EVENT,
    TOPIC_PRED,
    TOPIC_STATS,
    event_message,
    prediction_message,
    stats_message,
    topic_for,
)
from streamtsm.sinks.base import Sink, StepReport, wants_steps

if TYPE_CHECKING:
    from streamtsm.capture import Frame
    from streamtsm.postprocess import ActionEvent


class Fanout:
    """Builds messages once and gives them to every sink, in the order the sinks were given.

    A message is only built when there is a sink to take it, and a step report only when a sink wants steps
    (``wants_steps``), so a pipeline without sinks (a benchmark) pays for neither.

    A sink that defines ``offset_fields(stream_id, event) -> dict`` adds those fields to every offset message,
    for all sinks alike (the event recorder's ``clip`` and ``snapshot`` paths); they must not replace a field.

    Args:
        sinks: where results go; a :class:`~streamtsm.publish.Publisher` among them is counted in
            :meth:`publish_counts`.
    """

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)
        self.step_sinks = tuple(s for s in self.sinks if wants_steps(s))
        self._publishers = [s for s in self.sinks if isinstance(s, Publisher)]
        self._offset_fields = [s.offset_fields for s in self.sinks if callable(getattr(s, "offset_fields", None))]

    def prediction(self, stream_id: str, model: str, frame: Frame, topk: list[tuple[str, float]]) -> None:
        if self.sinks:
            self._emit(topic_for(TOPIC_PRED, stream_id), prediction_message(
                stream_id=stream_id, frame_index=frame.index, capture_ts=frame.timestamp, model=model, topk=topk,
                generation=frame.generation, media_ts=frame.media_ts))

    def events(self, stream_id: str, model: str, events: list[ActionEvent], frame_index: int,
               capture_ts: float, media_ts: float | None = None) -> None:
        """``frame_index``, ``capture_ts`` and ``media_ts``: of the frame whose prediction decided the events."""
        for event in events:
            payload = event_message(stream_id=stream_id, model=model, event=event, frame_index=frame_index,
                                    capture_ts=capture_ts, media_ts=media_ts)
            if event.kind == "offset":
                for fields in self._offset_fields:
                    added = fields(stream_id, event)
                    clash = sorted(set(added) & set(payload))
                    if clash:
                        raise ValueError(f"a sink's offset fields must not replace message fields, got {clash}")
                    payload.update(added)
            self._emit(topic_for(TOPIC_EVENT, stream_id), payload)

    def stats(self, stats: dict) -> None:
        """``stats``: the pipeline's stats (``streams``, ``models``, ``published``, ...)."""
        if self.sinks:
            rest = dict(stats)
            self._emit(TOPIC_STATS, stats_message(streams=rest.pop("streams"), extra=rest))

    def step(self, report: StepReport) -> None:
        for sink in self.step_sinks:
            sink.on_step(report)

    def publish_counts(self) -> dict:
        """``published`` and ``publish_dropped`` of the stats: the sums over the publishers among the sinks."""
        return {"published": sum(p.sent for p in self._publishers),
                "publish_dropped": sum(p.dropped for p in self._publishers)}

    def _emit(self, topic: str, payload: dict) -> None:
        for sink in self.sinks:
            sink.on_message(topic, payload)
