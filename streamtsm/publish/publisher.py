"""The ZeroMQ publisher: sends results without ever blocking inference, and counts what it could not send."""

from __future__ import annotations

import errno
import logging
import re
import threading
from collections import deque

import zmq

from streamtsm.errors import PublishError
from streamtsm.publish import schema

log = logging.getLogger(__name__)

_ENDPOINT_HELP = "expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"

# HOST: "*", an IPv4 address, a host or interface name, or a bracketed IPv6 address. PORT: digits or "*".
_TCP_RE = re.compile(r"tcp://(?P<host>\*|\[[0-9A-Fa-f:.%\w]+\]|[\w.\-]+):(?P<port>\*|\d{1,5})")


def check_endpoint(endpoint: str, *, bind: bool) -> None:
    """Checks the form of a ZeroMQ endpoint before it reaches libzmq, whose errors are less clear.

    Args:
        endpoint: ``tcp://HOST:PORT`` (``tcp://*:PORT`` and port ``*`` or ``0`` only when binding),
            ``ipc://PATH`` or ``inproc://NAME``.
        bind: Whether the endpoint is to be bound (else connected to).

    Raises:
        PublishError: If the endpoint is not of one of these forms.
    """
    if not isinstance(endpoint, str):
        raise PublishError(f"invalid ZeroMQ endpoint {endpoint!r}: {_ENDPOINT_HELP}")
    match = _TCP_RE.fullmatch(endpoint)
    if match:
        port = match["port"]
        if port != "*" and int(port) > 65535:
            raise PublishError(f"invalid ZeroMQ endpoint '{endpoint}': port must be 0-65535, got {port}")
        if not bind and (match["host"] == "*" or port in ("*", "0") or int(port) == 0):
            raise PublishError(
                f"invalid ZeroMQ endpoint '{endpoint}' to connect to: expected tcp://HOST:PORT with a "
                "concrete host and port"
            )
        return
    for scheme in ("ipc://", "inproc://"):
        if endpoint.startswith(scheme) and len(endpoint) > len(scheme) and endpoint.strip() == endpoint:
            return
    raise PublishError(f"invalid ZeroMQ endpoint '{endpoint}': {_ENDPOINT_HELP}")


def attach(socket: zmq.Socket, endpoint: str, *, bind: bool) -> str:
    """Binds or connects ``socket`` to exactly the endpoint given.

    Args:
        socket: An open ZeroMQ socket.
        endpoint: See ``check_endpoint``.
        bind: Bind if True, else connect.

    Returns:
        The endpoint in effect (libzmq's ``LAST_ENDPOINT``): for a bound ``tcp://127.0.0.1:*`` it names the
        port the system chose.

    Raises:
        PublishError: If the endpoint is malformed or cannot be bound or connected.
    """
    check_endpoint(endpoint, bind=bind)
    verb = "bind" if bind else "connect to"
    try:
        if bind:
            socket.bind(endpoint)
        else:
            socket.connect(endpoint)
    except zmq.ZMQError as error:
        if error.errno == errno.EADDRINUSE:
            reason = "address already in use"
        elif error.errno == errno.ENAMETOOLONG:
            reason = f"ipc path longer than the system's limit of {getattr(zmq, 'IPC_PATH_MAX_LEN', 107)} bytes"
        else:
            reason = zmq.strerror(error.errno).lower()
        raise PublishError(f"cannot {verb} {endpoint}: {reason}") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


class Publisher:
    """Publishes ``[topic, json]`` messages on a ZeroMQ PUB socket without blocking the caller.

    Delivery is best effort, as suits live results: a message is either queued for every subscriber whose
    subscriptions match it, or dropped and counted. ZeroMQ keeps a queue of up to ``sndhwm`` messages per
    subscriber. A plain PUB socket silently discards what does not fit; this one sets ``ZMQ_XPUB_NODROP``
    (honoured by PUB sockets since libzmq 4.2) so that a send that does not fit fails with ``EAGAIN``, and
    sends with ``NOBLOCK`` so that the failure returns at once instead of waiting. The failure is counted in
    ``dropped``. libzmq checks every matching subscriber's queue before sending, so one subscriber that has
    stopped reading makes the message a drop for all of them: a slow consumer shows up as a rising
    ``dropped`` rather than as a silent gap in its own copy of the stream.

    A message that no subscriber wants (including every message while nobody is connected) is accepted by
    ZeroMQ and counted in ``sent``.

    Like every ZeroMQ socket, a Publisher must be used from one thread only (the pipeline's publishing
    thread); without ``background`` it holds no locks.

    With ``background=True`` the encoding and sending move to a thread of the publisher's own, behind a queue
    of ``queue_size`` messages: ``send`` and ``on_message`` only append, so the caller (the pipeline's model
    thread) spends no time on JSON or ZeroMQ, and that work runs while the next model step holds no GIL. The
    socket is then used by that thread only. A message that finds the queue full is dropped and counted in
    ``dropped``, as one ZeroMQ refuses; a payload that is not JSON is dropped, counted and logged there instead of
    raising in the caller. ``close()`` hands what is queued to ZeroMQ (for at most ``close_timeout`` seconds)
    before closing the socket, as a run's last stats are sent before the publisher is closed without it.

    Attributes:
        endpoint: The endpoint in effect (``LAST_ENDPOINT``), e.g. ``tcp://127.0.0.1:40123`` after binding
            ``tcp://127.0.0.1:*``.
        sent: Messages accepted by ZeroMQ.
        dropped: Messages refused because a subscriber's queue was full.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = True,
        sndhwm: int = 1000,
        context: zmq.Context | None = None,
        background: bool = False,
        queue_size: int = 1000,
        close_timeout: float = 2.0,
    ) -> None:
        """Creates the socket and binds (or connects) it.

        Args:
            endpoint: ``tcp://HOST:PORT`` (port ``*`` or ``0`` picks a free one), ``ipc://PATH`` or
                ``inproc://NAME``.
            bind: Bind the endpoint (default). False connects instead, e.g. to a broker's XSUB frontend.
            sndhwm: Messages queued per subscriber before sends are dropped.
            context: The ZeroMQ context; the process-wide one when None (required to share ``inproc://``).
            background: Encode and send on a thread of the publisher's own (see the class docstring).
            queue_size: With ``background``, messages waiting for that thread before new ones are dropped.
            close_timeout: With ``background``, seconds ``close()`` waits for the queue to be sent.

        Raises:
            PublishError: If the endpoint is malformed, in use, or cannot be bound or connected.
            ValueError: If ``sndhwm`` is below 1.
        """
        if sndhwm < 1:
            # 0 means "no limit" to libzmq: memory would grow without bound behind a stalled subscriber.
            raise ValueError(f"sndhwm must be at least 1, got {sndhwm}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.sent = 0
        self.dropped = 0
        self._closed = False
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUB)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.SNDHWM, sndhwm)
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)
            self.endpoint = attach(self._socket, endpoint, bind=bind)
        except BaseException:
            self._socket.close(linger=0)
            self._closed = True
            raise
        self.background = background
        self.queue_size = queue_size
        self.close_timeout = close_timeout
        self._queue: deque[tuple[str, dict]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if background:
            # Started after the bind: from here on the socket belongs to this thread (the start is the memory
            # barrier ZeroMQ asks for when a socket changes threads).
            self._thread = threading.Thread(target=self._send_queued, name="publisher", daemon=True)
            self._thread.start()

    @property
    def last_endpoint(self) -> str:
        """The endpoint in effect; the same as ``endpoint``."""
        return self.endpoint

    def send(self, topic: str, payload: dict) -> bool:
        """Publishes one message without blocking.

        Args:
            topic: The message's topic (see ``streamtsm.publish.schema``).
            payload: A payload from one of the ``schema`` builders.

        Returns:
            True if ZeroMQ took the message, False if it was dropped (counted in ``dropped``). With
            ``background``: True if it was queued for the sending thread, False if the queue was full (counted in
            ``dropped``); whether ZeroMQ then takes it is counted in ``sent`` or ``dropped`` too.

        Raises:
            ValueError: If the payload is not JSON-serializable (a NaN or infinite number is not a reason: it is
                sent as null, see ``schema.encode``).
            PublishError: If the publisher is closed.
        """
        if self._closed:
            raise PublishError(f"cannot send on {self.endpoint}: the publisher is closed")
        if self._thread is not None:
            return self._enqueue(topic, payload)
        return self._send_now(topic, payload)

    def _send_now(self, topic: str, payload: dict) -> bool:
        parts = schema.encode(topic, payload)
        try:
            # With XPUB_NODROP, libzmq decides on the first frame for the whole message (its queues count
            # whole messages), so Again here means nothing was sent and the socket is not left mid-message.
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            with self._cond:  # the caller's thread counts queue drops in the same counter
                self.dropped += 1
            return False
        with self._cond:
            self.sent += 1
        return True

    def _enqueue(self, topic: str, payload: dict) -> bool:
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self.dropped += 1
                return False
            self._queue.append((topic, payload))
            self._cond.notify()
        return True

    def _send_queued(self) -> None:
        """The sending thread: sends what is queued until close() asks it to stop, then closes the socket."""
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue:
                        return
                    topic, payload = self._queue.popleft()
                try:
                    self._send_now(topic, payload)
                except ValueError as error:  # a payload that is not JSON: a bug in its maker; the rest still go
                    with self._cond:
                        self.dropped += 1
                    log.error("publisher %s: dropped a %s message: %s", self.endpoint, topic, error)
        finally:
            self._socket.close(linger=0)

    def on_message(self, topic: str, payload: dict) -> None:
        """Publishes one message as a pipeline sink (see ``streamtsm.sinks``): ``send``, its outcome counted in
        ``sent`` or ``dropped``, which the pipeline's stats report."""
        self.send(topic, payload)

    def close(self) -> None:
        """Closes the socket, discarding anything still queued in ZeroMQ (with ``background``, after sending this
        publisher's own queue). Safe to call more than once."""
        if self._closed:
            return
        if self._thread is None:
            self._closed = True
            self._socket.close(linger=0)
            return
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            # Still sending after close_timeout: what it had not taken is lost; the daemon thread closes the
            # socket when it finishes.
            with self._cond:
                left = len(self._queue)
                self._queue.clear()
                self.dropped += left
            log.warning("publisher %s: %d queued messages not sent by close", self.endpoint, left)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
