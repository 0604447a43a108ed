"""`streamtsm broker`: ZeroMQ's own XSUB/XPUB proxy, so many recognizer nodes publish into one place and many
clients subscribe there.

::

    recognizer ──PUB connect──►  frontend (XSUB, bind)  ═ zmq proxy ═  backend (XPUB, bind)  ◄──SUB connect── client
    recognizer ──PUB connect──►                                                              ◄──SUB connect── client

Subscriptions travel upstream through the proxy, so recognizers only send what someone subscribed to. The proxy is
libzmq's (``zmq_proxy_steerable``); this module only binds its sockets and stops it cleanly.
"""

from __future__ import annotations

import threading
import uuid

import zmq

from .publisher import attach


def run_broker(frontend: str, backend: str, *, stop: threading.Event | None = None,
               context: zmq.Context | None = None, ready: threading.Event | None = None) -> None:
    """Run the proxy until ``stop`` is set (blocking).

    Args:
        frontend: endpoint the recognizers publish into (bound, XSUB).
        backend: endpoint clients subscribe to (bound, XPUB).
        stop: ends the proxy when set; None runs until the process ends.
        context: ZeroMQ context (the process-wide one when None).
        ready: set once both endpoints are bound (for callers that start the broker in a thread).

    Raises:
        PublishError: an endpoint is malformed or cannot be bound.
    """
    ctx = context or zmq.Context.instance()
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    control_in, control_out = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    sockets = (xsub, xpub, control_in, control_out)
    for s in sockets:
        s.setsockopt(zmq.LINGER, 0)
    watcher = None
    try:
        attach(xsub, frontend, bind=True)
        attach(xpub, backend, bind=True)
        # A fresh name per broker: id() of a socket can be reused by the next broker in the process while the
        # closed one's inproc name is still being released, and binding it again fails ("address already in use").
        address = f"inproc://streamtsm-broker-{uuid.uuid4().hex}"
        control_in.bind(address)
        control_out.connect(address)
        if ready is not None:
            ready.set()
        if stop is not None:
            # The proxy blocks inside libzmq; a watcher turns the stop event into its TERMINATE command.
            def watch() -> None:
                stop.wait()
                control_out.send(b"TERMINATE")

            watcher = threading.Thread(target=watch, name="broker-stop", daemon=True)
            watcher.start()
        zmq.proxy_steerable(xsub, xpub, None, control_in)
    finally:
        if watcher is not None:
            watcher.join(timeout=1.0)
        for s in sockets:
            s.close(linger=0)
