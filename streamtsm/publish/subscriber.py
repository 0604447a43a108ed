"""Receiving streamtsm results: a SUB socket wrapper, a one-line formatter and the loop of ``streamtsm listen``."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from typing import Any, TextIO

import zmq

from streamtsm.publish import schema
from streamtsm.publish.publisher import attach

# Longest single wait inside listen(), so that a stop event or Ctrl-C is seen promptly.
_LISTEN_POLL_S = 0.1


class Subscriber:
    """Receives and decodes ``[topic, json]`` messages on a ZeroMQ SUB socket.

    Malformed messages (wrong frame count, bad UTF-8 or JSON, missing or unsupported ``schema``) are
    counted in ``malformed`` and skipped, so a stray or newer publisher cannot crash a consumer. Like
    every ZeroMQ socket, a Subscriber must be used from one thread only.

    Attributes:
        endpoint: The endpoint in effect (``LAST_ENDPOINT``).
        received: Messages returned by ``recv``.
        malformed: Messages skipped because they could not be decoded.
    """

    def __init__(
        self,
        endpoint: str,
        topics: list[str] | tuple[str, ...] = ("streamtsm",),
        *,
        bind: bool = False,
        context: zmq.Context | None = None,
    ) -> None:
        """Creates the socket, subscribes and connects (or binds).

        Args:
            endpoint: The publisher's endpoint, e.g. ``tcp://127.0.0.1:5556``.
            topics: Topic prefixes to receive; ``("streamtsm",)`` is everything, ``[""]`` too.
            bind: Bind instead of connecting (e.g. when publishers connect to this subscriber).
            context: The ZeroMQ context; the process-wide one when None.

        Raises:
            PublishError: If the endpoint is malformed or cannot be connected or bound.
            ValueError: If ``topics`` is a bare string (a common slip that would subscribe per character).
        """
        if isinstance(topics, (str, bytes)):
            raise ValueError(f"topics must be a list of prefixes, got the string {topics!r}")
        self.received = 0
        self.malformed = 0
        self._closed = False
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            for topic in topics:
                self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
            self.endpoint = attach(self._socket, endpoint, bind=bind)
        except BaseException:
            self._socket.close(linger=0)
            self._closed = True
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    def recv(self, timeout: float | None = 1.0) -> tuple[str, dict] | None:
        """Waits for the next well-formed message.

        Args:
            timeout: Seconds to wait in all; None waits forever.

        Returns:
            ``(topic, payload)``, or None if nothing well-formed arrived in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                wait_ms = None
            else:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._poller.poll(wait_ms):
                return None
            parts = self._socket.recv_multipart(zmq.NOBLOCK)
            try:
                message = schema.decode(parts)
            except ValueError:
                self.malformed += 1
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            self.received += 1
            return message

    def close(self) -> None:
        """Closes the socket, discarding anything queued. Safe to call more than once."""
        if not self._closed:
            self._closed = True
            self._poller.unregister(self._socket)
            self._socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Characters that would act on a terminal instead of showing (C0 and C1 controls, DEL) and lone surrogates (which no
# terminal encoding can write): a publisher on the network chooses them, so listen shows them escaped.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def escape_controls(text: str) -> str:
    """``text`` with every control character and lone surrogate written as an escape (``\\n``, ``\\x1b``,
    ``\\ud800``), so that one message is one line and cannot move the cursor or recolour a terminal."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def json_line(payload: dict) -> str:
    """One payload as one line of valid JSON (``listen --json``): newlines inside strings are escaped by JSON, and
    where the text holds DEL, C1 controls or lone surrogates (not encodable as UTF-8) it is written in ASCII escapes.
    (Received payloads hold no NaN or infinity: :func:`schema.decode` refuses them.)"""
    line = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if _UNPRINTABLE.search(line):  # json escapes C0 controls itself; what is left: DEL, C1, lone surrogates
        line = json.dumps(payload, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return line


def _clock(ts: Any) -> str:
    return datetime.fromtimestamp(float(ts)).strftime("%H:%M:%S.%f")[:-3]


def _number(value: Any, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return format(value, spec)


def _format_pred(payload: dict) -> str:
    ranked = " | ".join(f"{entry['label']} {entry['score']:.2f}" for entry in payload["topk"]) or "-"
    latency = _number(payload.get("latency_ms"), ".0f")
    return f"{_clock(payload['capture_ts'])} {payload['stream']} #{payload['frame']}  {ranked}  ({latency} ms)"


def _format_event(payload: dict) -> str:
    head = f"{_clock(payload['capture_ts'])} {payload['stream']} EVENT"
    if payload["event"] == "onset":
        return f"{head} onset  {payload['label']} from #{payload['start_frame']}"
    if payload["event"] == "offset":
        duration = _number(payload.get("duration_s"), ".1f")
        return (
            f"{head} offset {payload['label']} #{payload['start_frame']}-#{payload['end_frame']} "
            f"({duration} s)"
        )
    raise ValueError(f"unknown event kind {payload['event']!r}")


def _format_stats(payload: dict) -> str:
    fields = []
    for stream_id, figures in payload["streams"].items():
        p50 = _number(figures.get("latency_p50_ms"), ".0f")
        p99 = _number(figures.get("latency_p99_ms"), ".0f")
        fields.append(
            f"{stream_id} {_number(figures.get('fps'), '.1f')} fps drop {_number(figures.get('dropped'), 'd')}"
            f" lat {p50}/{p99} ms {figures.get('status', '-')}"
        )
    known = {"schema", "type", "publish_ts", "streams"}
    extra = " ".join(f"{key}={json.dumps(value)}" for key, value in payload.items() if key not in known)
    if extra:
        fields.append(extra)
    return f"{_clock(payload['publish_ts'])} STATS " + (" | ".join(fields) or "no streams")


_FORMATTERS = {"pred": _format_pred, "event": _format_event, "stats": _format_stats}


def format_message(topic: str, payload: dict) -> str:
    """Renders one message as a readable line for ``streamtsm listen``.

    Examples::

        12:01:02.345 cam0 #120  arm wrestling 0.91 | punching 0.03  (38 ms)
        12:01:02.345 cam0 EVENT onset  waving from #100
        12:01:05.045 cam0 EVENT offset waving #100-#180 (2.7 s)
        12:01:10.000 STATS cam0 29.9 fps drop 3 lat 38/52 ms ok | published=1234 publish_dropped=0

    Times are local wall-clock times of capture (predictions, events) or of publishing (stats).

    Args:
        topic: The message's topic.
        payload: The decoded payload.

    Returns:
        One line without a trailing newline. A payload of unknown type, or one missing fields its type
        should have, is shown as ``topic json``.
    """
    formatter = _FORMATTERS.get(payload.get("type"))
    if formatter is not None:
        try:
            return formatter(payload)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError):
            # A peer on a compatible schema may still send odd fields; show it raw rather than stop listening.
            pass
    return f"{topic} {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}"


def listen(
    endpoint: str,
    topics: list[str] | tuple[str, ...],
    *,
    as_json: bool,
    out: TextIO,
    max_messages: int | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    status: TextIO | None = None,
) -> int:
    """Prints messages as they arrive: the loop behind ``streamtsm listen``.

    Args:
        endpoint: The publisher's endpoint to connect to.
        topics: Topic prefixes to receive.
        as_json: Print each payload as one compact JSON object per line (JSON Lines, as published; the
            topic follows from ``type`` and ``stream``) instead of a readable line.
        out: Where to print; flushed after every line so that pipes see messages at once.
        max_messages: Return after printing this many; None for no limit.
        timeout: Return when no message arrived for this many seconds; None waits forever.
        stop: Return soon after this event is set.
        status: Where to say, once, that it is connected and waiting for a publisher (``streamtsm listen``:
            stderr, apart from the messages); None says nothing.

    Returns:
        The number of messages printed.

    Raises:
        PublishError: If the endpoint is malformed or cannot be connected.
    """
    printed = 0
    with Subscriber(endpoint, topics) as subscriber:
        if status is not None:  # after the connect, so a bad endpoint is its one error line alone
            status.write(f"listen: waiting for messages on {endpoint} (topics {', '.join(topics)})\n")
            status.flush()
        last_message = time.monotonic()
        while max_messages is None or printed < max_messages:
            if stop is not None and stop.is_set():
                break
            wait = _LISTEN_POLL_S
            if timeout is not None:
                left = last_message + timeout - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            message = subscriber.recv(timeout=wait)
            if message is None:
                continue
            last_message = time.monotonic()
            topic, payload = message
            if as_json:
                line = json_line(payload)
            else:
                line = escape_controls(format_message(topic, payload))
            out.write(line + "\n")
            out.flush()
            printed += 1
    return printed
