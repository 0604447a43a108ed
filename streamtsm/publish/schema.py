"""The wire format of streamtsm results: ZeroMQ multipart ``[topic, json]`` messages.

Every message has two frames:

1. the topic, UTF-8, dotted so that subscribers filter by prefix:

   ========================  ==========================================================
   ``streamtsm.pred.<id>``   one prediction per processed frame of stream ``<id>``
   ``streamtsm.event.<id>``  an action started (``onset``) or ended (``offset``)
   ``streamtsm.stats``       periodic health of every stream and of the publisher
   ========================  ==========================================================

   ZeroMQ matches raw byte prefixes: ``streamtsm.pred`` gets every stream's predictions,
   ``streamtsm`` gets everything, and ``streamtsm.pred.cam1`` also gets ``cam10``'s (check the
   payload's ``stream`` when ids share a prefix).

2. the payload, one compact UTF-8 JSON object (never pickle; a NaN or infinite number is sent as null). Every payload
   carries ``schema`` (``SCHEMA_VERSION``, bumped on any incompatible change) and ``type``. Times are Unix
   seconds (``time.time()``); ``capture_ts`` is when the frame was captured, ``publish_ts`` when the message
   was built, ``latency_ms`` their difference.

Prediction (``type`` ``"pred"``)::

    {"schema": 1, "type": "pred", "stream": "cam0", "frame": 120,
     "capture_ts": 1700000000.123456, "publish_ts": 1700000000.161, "latency_ms": 37.544,
     "model": "tsm_mobilenetv2", "generation": 0, "media_ts": null,
     "topk": [{"label": "waving", "score": 0.91}, {"label": "clapping", "score": 0.03}],
     "label": "waving", "score": 0.91}

    ``label``/``score`` repeat the top-1 entry (null when ``topk`` is empty); ``generation`` counts the
    stream's reconnects (the model state restarts with each). ``frame`` is the capture index. ``media_ts`` is
    the frame's position in its file in seconds (for a file or image sequence of known fps; null for a live
    source): a file is read as fast as the model goes, so ``capture_ts`` says when it was processed, not where.

Event (``type`` ``"event"``)::

    {"schema": 1, "type": "event", "event": "offset", "stream": "cam0", "model": "tsm_mobilenetv2",
     "label": "waving", "start_frame": 100, "start_ts": 1700000000.0, "end_frame": 180,
     "end_ts": 1700000002.7, "duration_s": 2.7, "score": 0.84,
     "frame": 183, "capture_ts": 1700000002.8, "publish_ts": 1700000002.83, "latency_ms": 30.0,
     "media_ts": null, "start_media_ts": null, "end_media_ts": null}

    An ``onset`` has ``end_frame``, ``end_ts`` and ``duration_s`` null. ``start_*``/``end_*`` are the first
    and last frames where the action was the top-1 class; ``frame``/``capture_ts`` are of the frame whose
    prediction decided the event (later than ``start_frame`` or ``end_frame`` by the detector's hold).
    Every onset is followed by exactly one offset for the same stream. From a file, ``media_ts``,
    ``start_media_ts`` and ``end_media_ts`` are the positions in the file of ``frame``, ``start_frame`` and
    ``end_frame``, and ``duration_s`` is in media time (their difference); from a live source they are null and
    ``duration_s`` is ``end_ts - start_ts``.

Stats (``type`` ``"stats"``)::

    {"schema": 1, "type": "stats", "publish_ts": 1700000010.0,
     "streams": {"cam0": {"fps": 29.9, "dropped": 3, "latency_p50_ms": 38.0,
                          "latency_p99_ms": 52.1, "status": "ok"}},
     "published": 1234, "publish_dropped": 0}

    ``streams`` holds whatever the pipeline reports per stream; further top-level keys come from ``extra``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from streamtsm.errors import ConfigError
from streamtsm.postprocess import ActionEvent

SCHEMA_VERSION = 1

TOPIC_PRED = "streamtsm.pred"
TOPIC_EVENT = "streamtsm.event"
TOPIC_STATS = "streamtsm.stats"

# Digits kept on the wire: microseconds for Unix timestamps, a microsecond for latencies in ms, 6 for scores.
_TS_DIGITS = 6
_MS_DIGITS = 3
_SCORE_DIGITS = 6

_PRED_KEYS = frozenset(
    {"schema", "type", "stream", "frame", "capture_ts", "publish_ts", "latency_ms", "model", "generation",
     "topk", "label", "score", "media_ts"}
)
_STATS_KEYS = frozenset({"schema", "type", "publish_ts", "streams"})


def topic_for(kind_prefix: str, stream_id: str) -> str:
    """Builds the topic of one stream's messages.

    Args:
        kind_prefix: ``TOPIC_PRED`` or ``TOPIC_EVENT``.
        stream_id: The stream's id, e.g. ``"cam0"``.

    Returns:
        ``"<kind_prefix>.<stream_id>"``.

    Raises:
        ConfigError: If ``stream_id`` is empty.
    """
    if not isinstance(stream_id, str) or not stream_id:
        raise ConfigError(f"stream id must be a non-empty string, got {stream_id!r}")
    return f"{kind_prefix}.{stream_id}"


def _ts(value: float) -> float:
    return round(float(value), _TS_DIGITS)


def _media_ts(value: float | None) -> float | None:
    return None if value is None else _ts(value)


def _score(value: float) -> float:
    return round(float(value), _SCORE_DIGITS)


def _latency_ms(publish_ts: float, capture_ts: float) -> float:
    return round((publish_ts - capture_ts) * 1000.0, _MS_DIGITS)


def _merge_extra(message: dict[str, Any], extra: dict | None, reserved: frozenset[str]) -> dict[str, Any]:
    if extra:
        clash = sorted(set(extra) & reserved)
        if clash:
            raise ValueError(f"extra fields must not replace message fields, got {clash}")
        message.update(extra)
    return message


def prediction_message(
    *,
    stream_id: str,
    frame_index: int,
    capture_ts: float,
    model: str,
    topk: list[tuple[str, float]],
    generation: int = 0,
    publish_ts: float | None = None,
    extra: dict | None = None,
    media_ts: float | None = None,
) -> dict[str, Any]:
    """Builds the payload of a prediction.

    Args:
        stream_id: The stream's id.
        frame_index: Capture index of the frame the prediction is for.
        capture_ts: Unix time the frame was captured.
        model: Model name.
        topk: ``(label, score)`` pairs, best first.
        generation: How many times the stream's source has reconnected.
        publish_ts: Unix time of publishing; ``time.time()`` when None.
        extra: Further top-level fields; they must not replace the ones above.
        media_ts: The frame's position in its file in seconds; None for a live source.

    Returns:
        A JSON-serializable dict (see the module docstring).

    Raises:
        ValueError: If ``extra`` names a field of the message.
    """
    if publish_ts is None:
        publish_ts = time.time()
    entries = [{"label": str(label), "score": _score(score)} for label, score in topk]
    message = {
        "schema": SCHEMA_VERSION,
        "type": "pred",
        "stream": str(stream_id),
        "frame": int(frame_index),
        "capture_ts": _ts(capture_ts),
        "publish_ts": _ts(publish_ts),
        "latency_ms": _latency_ms(publish_ts, capture_ts),
        "model": str(model),
        "generation": int(generation),
        "topk": entries,
        "label": entries[0]["label"] if entries else None,
        "score": entries[0]["score"] if entries else None,
        "media_ts": _media_ts(media_ts),
    }
    return _merge_extra(message, extra, _PRED_KEYS)


def event_message(
    *,
    stream_id: str,
    model: str,
    event: ActionEvent,
    frame_index: int,
    capture_ts: float,
    publish_ts: float | None = None,
    media_ts: float | None = None,
) -> dict[str, Any]:
    """Builds the payload of an action onset or offset.

    Args:
        stream_id: The stream's id.
        model: Model name.
        event: The onset or offset, as ``streamtsm.postprocess.EventDetector`` reported it.
        frame_index: The frame whose prediction decided the event.
        capture_ts: Capture time of ``frame_index``.
        publish_ts: Unix time of publishing; ``time.time()`` when None.
        media_ts: Position of ``frame_index`` in its file in seconds; None for a live source.

    Returns:
        A JSON-serializable dict (see the module docstring).
    """
    if publish_ts is None:
        publish_ts = time.time()
    is_offset = event.kind == "offset"
    return {
        "schema": SCHEMA_VERSION,
        "type": "event",
        "event": event.kind,
        "stream": str(stream_id),
        "model": str(model),
        "label": str(event.label),
        "start_frame": int(event.start_frame),
        "start_ts": _ts(event.start_ts),
        "end_frame": int(event.end_frame) if is_offset else None,
        "end_ts": _ts(event.end_ts) if is_offset else None,
        "duration_s": _ts(event.duration_s) if is_offset else None,
        "score": _score(event.score),
        "frame": int(frame_index),
        "capture_ts": _ts(capture_ts),
        "publish_ts": _ts(publish_ts),
        "latency_ms": _latency_ms(publish_ts, capture_ts),
        "media_ts": _media_ts(media_ts),
        "start_media_ts": _media_ts(event.start_media_ts),
        "end_media_ts": _media_ts(event.end_media_ts) if is_offset else None,
    }


def stats_message(
    *,
    streams: dict[str, dict],
    publish_ts: float | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Builds the payload of a stats report.

    Args:
        streams: Per stream id, its figures (``fps``, ``dropped``, ``latency_p50_ms``, ``latency_p99_ms``,
            ``status``, ...), passed through as given.
        publish_ts: Unix time of publishing; ``time.time()`` when None.
        extra: Further top-level fields (e.g. ``published``, ``publish_dropped``); they must not replace
            ``schema``, ``type``, ``publish_ts`` or ``streams``.

    Returns:
        A JSON-serializable dict, provided the figures given are.

    Raises:
        ValueError: If ``extra`` names a field of the message.
    """
    if publish_ts is None:
        publish_ts = time.time()
    message = {
        "schema": SCHEMA_VERSION,
        "type": "stats",
        "publish_ts": _ts(publish_ts),
        "streams": {str(stream_id): dict(figures) for stream_id, figures in streams.items()},
    }
    return _merge_extra(message, extra, _STATS_KEYS)


def _check_schema(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise ValueError(f"payload must be a JSON object, got {type(payload).__name__}")
    if "schema" not in payload:
        raise ValueError("payload has no 'schema' field")
    version = payload["schema"]
    # bool is an int in Python; true must not pass for version 1.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ValueError(f"unsupported schema {version!r}: expected {SCHEMA_VERSION}")


def encode(topic: str, payload: dict) -> list[bytes]:
    """Serializes one message.

    A float that is NaN or infinite (a model gone wrong, an overflowing fp16/int8 graph) is sent as null:
    ``NaN``/``Infinity`` are not JSON, and a strict subscriber would refuse the whole message, while raising
    here would take down the process that publishes.

    Args:
        topic: The topic, e.g. ``topic_for(TOPIC_PRED, "cam0")``.
        payload: A JSON-serializable dict with a ``schema`` field.

    Returns:
        ``[topic as UTF-8, compact JSON as UTF-8]``, ready for ``send_multipart``.

    Raises:
        ValueError: If the topic is not a string, the payload has no supported ``schema``, or is not
            JSON-serializable.
    """
    if not isinstance(topic, str):
        raise ValueError(f"topic must be a string, got {type(topic).__name__}")
    _check_schema(payload)
    try:
        try:
            body = _dumps(payload)
        except ValueError:
            # Only a non-finite float (or a circular reference) gets here: the common path never walks the payload.
            body = _dumps(finite_or_null(payload))
    except TypeError as error:
        raise ValueError(f"payload is not JSON-serializable: {error}") from None
    except RecursionError:
        raise ValueError("payload is nested too deeply or refers to itself") from None
    return [topic.encode("utf-8"), body.encode("utf-8")]


def _dumps(payload: dict) -> str:
    return json.dumps(payload, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, containers copied, the rest as it was."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"JSON constant {name} is not allowed")


def decode(parts: list[bytes]) -> tuple[str, dict]:
    """Parses one received message.

    Args:
        parts: The frames from ``recv_multipart``.

    Returns:
        ``(topic, payload)``.

    Raises:
        ValueError: For anything that is not a two-frame message of a UTF-8 topic and a UTF-8 JSON object
            with a supported ``schema``; never any other exception.
    """
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        count = len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__
        raise ValueError(f"expected a message of 2 parts [topic, json], got {count}")
    raw_topic, raw_payload = parts
    if not isinstance(raw_topic, (bytes, bytearray, memoryview)) or not isinstance(
        raw_payload, (bytes, bytearray, memoryview)
    ):
        raise ValueError("expected message parts as bytes")
    try:
        topic = bytes(raw_topic).decode("utf-8")
        text = bytes(raw_payload).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("message is not valid UTF-8") from None
    try:
        payload = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        # A deeply nested array from a hostile peer must not escape as a non-ValueError.
        raise ValueError("payload JSON is nested too deeply") from None
    except ValueError as error:
        raise ValueError(f"payload is not valid JSON: {error}") from None
    _check_schema(payload)
    return topic, payload

