"""`streamtsm bridge mqtt`: a recognizer's ZeroMQ results republished on an MQTT broker (paho-mqtt).

::

    recognizer / broker ──ZeroMQ SUB──► MqttBridge ──paho (its own network thread)──► MQTT broker ──► HA, Node-RED

Topics, under ``prefix`` (default ``streamtsm``)::

    <prefix>/<stream>/event    every onset and offset: the ZeroMQ event payload as it came           QoS 1
    <prefix>/<stream>/action   the stream's current action (see below), RETAINED                     QoS 1
    <prefix>/<stream>/pred     predictions, at most R per second per stream (off unless R > 0)       QoS 0
    <prefix>/stats             the recognizer's stats payload as it came                             QoS 0
    <prefix>/status            "online" / "offline", RETAINED; "offline" is also the connection's will  QoS 1

The action payload is JSON, never empty (an empty retained message would delete the retained value, and a late
subscriber could not tell "no action" from "never heard")::

    {"schema": 1, "type": "action", "stream": "cam0", "action": "waving", "score": 0.91,
     "since": 1700000000.0, "model": "tsm_mobilenetv2", "publish_ts": 1700000000.2}

``action`` is the label after an onset and null after its offset; ``since`` is when that began (the onset's
``start_ts``, the offset's ``end_ts``); ``score`` is the event's. A stream gets its first action message with its first
event.

While the MQTT broker is away, paho reconnects with back-off (``reconnect_delay``); ZeroMQ reconnects by itself.
Events that arrive meanwhile wait in a bounded buffer (``buffer`` events; when full the oldest is dropped and
counted) and go out in order on reconnect, followed by every stream's current action (a broker restarted without
persistence has lost its retained messages) and, with Home Assistant discovery, the discovery configs. Predictions
and stats are live figures: while the broker is away they are skipped (counted), not buffered.
"""

from __future__ import annotations

import collections
import json
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from streamtsm import __version__
from streamtsm.errors import ConfigError, first_line
from streamtsm.publish import schema
from streamtsm.publish.subscriber import Subscriber
from streamtsm.settings import check_setting
from streamtsm.stream_ids import is_stream_id

try:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
except ImportError as e:  # pragma: no cover - depends on the installation
    if e.name is not None and not e.name.startswith("paho"):
        raise  # a dependency of an installed paho-mqtt: not ours to explain
    raise ConfigError("the MQTT bridge needs paho-mqtt, which is not installed: "
                      "pip install 'streamtsm[mqtt]'") from None

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"
# Longest wait for a ZeroMQ message inside run_bridge, so that a stop request and a reconnect are seen promptly.
_POLL_S = 0.1


def parse_broker_address(text: str, *, tls: bool = False, where: str = "--mqtt") -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``[IPv6]:PORT`` as ``(host, port)``; without a port, 1883 (8883 with TLS).

    Raises:
        ConfigError: one line naming ``where``, what it takes and what was given.
    """
    expected = f"{where} must be HOST:PORT (e.g. 127.0.0.1:1883)"
    if not isinstance(text, str) or not text or text != text.strip() or "/" in text:
        raise ConfigError(f"{expected}, got {text!r}")
    host, port_text = text, None
    if text.startswith("["):  # [v6]:port
        end = text.find("]")
        rest = text[end + 1:] if end > 0 else None
        if rest is None or (rest and not rest.startswith(":")):
            raise ConfigError(f"{expected}, got {text!r}")
        host, port_text = text[1:end], (rest[1:] if rest else None)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ConfigError(f"{expected} (an IPv6 address in brackets: [::1]:1883), got {text!r}")
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"{expected}, got {text!r}")
    if port_text is None:
        return host, DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    if not port_text.isdigit():
        raise ConfigError(f"{expected}, got {text!r}")
    return host, check_setting("mqtt_port", int(port_text), f"{where} port")


def check_topic_prefix(prefix: str, where: str = "--prefix") -> str:
    """``prefix`` if it can lead every topic the bridge publishes: one or more non-empty levels split by ``/``, no
    wildcard (``+``, ``#``: refused in a published topic), no NUL, not starting with ``$`` (the broker's own topics).

    Raises:
        ConfigError: one line naming ``where``, what it takes and what was given.
    """
    ok = (isinstance(prefix, str) and 0 < len(prefix) <= 200 and not prefix.startswith("$")
          and not any(c in prefix for c in "+#\0") and all(prefix.split("/")) and prefix.isprintable())
    if not ok:
        raise ConfigError(f"{where} must be topic levels split by '/' (no '+', '#', empty level or leading '$'), "
                          f"got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class MqttOptions:
    """How the bridge reaches the MQTT broker and what it publishes there (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    prefix: str = "streamtsm"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    cafile: str | None = None  # CA bundle for TLS; None: the system's
    predictions_per_second: float = 0.0  # per stream; 0: predictions are not republished
    homeassistant: bool = False
    discovery_prefix: str = "homeassistant"
    buffer: int = 1000  # events kept while the broker is away
    keepalive: int = 30  # seconds; a vanished broker (no RST) is noticed within 1.5 x this
    reconnect_delay: tuple[float, float] = (1.0, 30.0)  # paho's back-off: first wait, doubling up to the last
    client_id: str | None = None  # None: "streamtsm-" and 12 random hex digits

    def check(self) -> MqttOptions:
        """Itself, when every value is usable; else a one-line ConfigError."""
        check_topic_prefix(self.prefix)
        check_topic_prefix(self.discovery_prefix, "--discovery-prefix")
        check_setting("mqtt_port", self.port, "--mqtt port")
        check_setting("predictions_per_second", self.predictions_per_second, "--predictions-per-second")
        check_setting("mqtt_buffer", self.buffer, "--buffer")
        if self.password is not None and self.username is None:
            raise ConfigError("an MQTT password needs a user name: give --username (or STREAMTSM_MQTT_USERNAME)")
        if self.cafile is not None and not self.tls:
            raise ConfigError(f"--cafile {self.cafile} is for TLS: add --tls")
        return self


def topics(prefix: str, stream_id: str) -> dict[str, str]:
    """The topics of one stream: ``{"event": ..., "action": ..., "pred": ...}``."""
    return {kind: f"{prefix}/{stream_id}/{kind}" for kind in ("event", "action", "pred")}


def discovery_node_id(prefix: str, stream_id: str) -> str:
    """The Home Assistant node id of a stream: the prefix's characters outside ``[A-Za-z0-9_-]`` as ``_``, then the
    stream (``streamtsm_cam0``); distinct per prefix, so two bridges with different prefixes do not collide."""
    return "".join(c if c.isalnum() and c.isascii() or c in "_-" else "_" for c in prefix) + "_" + stream_id


def discovery_config(options: MqttOptions, stream_id: str) -> tuple[str, dict[str, Any]]:
    """Home Assistant's MQTT discovery message for a stream's action sensor: ``(topic, config)``.

    The topic is ``<discovery_prefix>/sensor/<node_id>/action/config``; the sensor's state is the action topic's
    ``action`` (``none`` when null), its attributes the rest of that payload, its availability the bridge's status.
    """
    node_id = discovery_node_id(options.prefix, stream_id)
    action_topic = topics(options.prefix, stream_id)["action"]
    config = {
        "name": "Action",
        "unique_id": f"{node_id}_action",
        "state_topic": action_topic,
        "value_template": "{{ value_json.action if value_json.action else 'none' }}",
        "json_attributes_topic": action_topic,
        "availability_topic": f"{options.prefix}/status",
        "payload_available": STATUS_ONLINE,
        "payload_not_available": STATUS_OFFLINE,
        "qos": 1,
        "icon": "mdi:motion-sensor",
        "device": {
            "identifiers": [node_id],
            "name": f"streamtsm {stream_id}",
            "manufacturer": "streamtsm",
            "model": "action recognizer",
            "sw_version": __version__,
        },
        "origin": {"name": "streamtsm", "sw_version": __version__},
    }
    return f"{options.discovery_prefix}/sensor/{node_id}/action/config", config


def _dumps(payload: Mapping[str, Any]) -> str:
    # schema.encode writes the payload as the ZeroMQ side does (compact UTF-8, NaN as null); its topic is unused.
    return schema.encode("-", dict(payload))[1].decode("utf-8")


@dataclass
class BridgeCounts:
    """What the bridge did, for its stderr report.

    Attributes:
        events, actions, predictions, stats: messages handed to the MQTT client.
        dropped: events lost because the buffer (or paho's queue) was full while the broker was away.
        skipped: predictions and stats not sent because the broker was away (live figures are not buffered).
        refused: ZeroMQ messages left out: a stream id outside the rule, an unknown type, or fields of the wrong kind.
    """

    events: int = 0
    actions: int = 0
    predictions: int = 0
    stats: int = 0
    dropped: int = 0
    skipped: int = 0
    refused: int = 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class MqttBridge:
    """Republishes decoded streamtsm messages on MQTT (see the module docstring).

    ``handle`` and ``service`` run on one thread (the caller's); paho's network thread runs the connection and only
    flags (re)connects, which the caller's thread acts on, so the order of what is published is the order received.

    Attributes:
        options: The options in effect.
        counts: What was sent, dropped, skipped and refused.
        streams: The streams seen, in order of first sight.
        log: Where lines about the connection and drops go.
    """

    def __init__(self, options: MqttOptions, *, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = _stderr) -> None:
        """Checks the options and prepares the client; nothing connects before :meth:`start`.

        Args:
            options: See :class:`MqttOptions`.
            clock: Seconds, for the prediction rate cap (monotonic; a test may pass its own).
            log: Where a line about the connection and drops goes (stderr by default).

        Raises:
            ConfigError: An option is out of range, or the TLS set-up cannot read its CA file.
        """
        self.options = options.check()
        self.counts = BridgeCounts()
        self.streams: list[str] = []
        self._seen: set[str] = set()
        self._clock = clock
        self.log = log
        self._status_topic = f"{options.prefix}/status"
        self._actions: dict[str, dict[str, Any]] = {}
        self._last_pred: dict[str, float] = {}
        self._min_pred_interval = 1.0 / options.predictions_per_second if options.predictions_per_second else None
        self._pending: collections.deque[tuple[str, str]] = collections.deque()
        self._connected = threading.Event()
        self._resync = threading.Event()  # set by a (re)connect: the caller's thread resends what the broker must hold
        self._rediscover = threading.Event()  # set when Home Assistant announces itself: resend discovery configs
        self._dropped_reported = 0
        self._ever_connected = False
        self._failing = False
        self._started = False
        self._closed = False
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        o = self.options
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=o.client_id or f"streamtsm-{uuid.uuid4().hex[:12]}",
                             protocol=paho.MQTTv311, clean_session=True)
        client.will_set(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls:
            try:
                client.tls_set(ca_certs=o.cafile, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"--cafile {o.cafile}: cannot be read as CA certificates ({first_line(e)})") from None
        client.reconnect_delay_set(o.reconnect_delay[0], o.reconnect_delay[1])
        # paho keeps QoS 1 messages of a lost connection and resends them; its queue is capped too, so that memory
        # stays bounded when the broker is away (our buffer holds the rest; a full one counts a drop).
        client.max_queued_messages_set(2 * o.buffer + 100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        return client

    @property
    def connected(self) -> bool:
        """Whether the client holds a connection to the broker now."""
        return self._connected.is_set()

    @property
    def buffered(self) -> int:
        """Events waiting for the broker to come back."""
        return len(self._pending)

    def start(self) -> MqttBridge:
        """Starts paho's network thread, which connects (and reconnects, with back-off) in the background; a broker
        that is not up yet is waited for, not an error. Returns self."""
        o = self.options
        self._client.connect_async(o.host, o.port, keepalive=o.keepalive)
        self._client.loop_start()
        self._started = True
        return self

    # --- paho's network thread: flags only -----------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._closed:
            return  # a connect that completed while closing: announcing "online" now would be wrong
        if reason_code.is_failure:
            if not self._failing:  # once per outage, not once per retry
                self._failing = True
                self.log(f"streamtsm bridge: MQTT broker {self.options.host}:{self.options.port} refused the "
                         f"connection: {reason_code} (retrying)")
            return
        self._failing = False
        client.publish(self._status_topic, STATUS_ONLINE, qos=1, retain=True)
        if self.options.homeassistant:
            # Home Assistant announces a restart here; it then needs the discovery configs again.
            client.subscribe(f"{self.options.discovery_prefix}/status", qos=1)
        self._connected.set()
        self._resync.set()
        again = "re" if self._ever_connected else ""
        self._ever_connected = True
        self.log(f"streamtsm bridge: {again}connected to MQTT broker {self.options.host}:{self.options.port}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._closed:
            self.log(f"streamtsm bridge: lost MQTT broker {self.options.host}:{self.options.port} ({reason_code}); "
                     f"reconnecting, up to {self.options.buffer} events kept meanwhile")

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._failing and not self._closed:
            self._failing = True
            # paho does not pass the reason on; with TLS a refused certificate is the likely one besides the network.
            hint = ""
            if self.options.tls:
                hint = " (with TLS: is the broker's certificate signed by --cafile or the system's CAs?)"
            self.log(f"streamtsm bridge: cannot connect to MQTT broker {self.options.host}:{self.options.port}{hint}; "
                     "retrying with back-off")

    def _on_message(self, client, userdata, message) -> None:
        if message.payload == b"online":
            self._rediscover.set()

    # --- the caller's thread --------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: Mapping[str, Any]) -> None:
        """Republishes one decoded ZeroMQ message (``Subscriber.recv``'s pair); others' types are refused.

        Args:
            topic: The ZeroMQ topic (unused: the payload's ``type`` and ``stream`` decide).
            payload: A payload of schema 1.
        """
        self.service()
        kind = payload.get("type")
        if kind == "stats":
            streams = payload.get("streams")
            if not isinstance(streams, dict):
                self.counts.refused += 1
                return
            for stream_id in streams:
                if is_stream_id(stream_id):
                    self._see(stream_id)
            self._send_live(f"{self.options.prefix}/stats", _dumps(payload), "stats")
            return
        stream_id = payload.get("stream")
        # A payload comes from the network, so its stream id is checked here. The stream id rule (letters, digits,
        # '_', '-') leaves out '/', '+' and '#': an id is exactly one topic level and can neither reach another
        # stream's topics nor act as a wildcard, which paho would refuse in a published topic.
        if not is_stream_id(stream_id) or kind not in ("event", "pred"):
            self.counts.refused += 1
            return
        self._see(stream_id)
        if kind == "event":
            self._handle_event(stream_id, payload)
        else:
            self._handle_pred(stream_id, payload)

    def _see(self, stream_id: str) -> None:
        if stream_id in self._seen:
            return
        self._seen.add(stream_id)
        self.streams.append(stream_id)
        if self.options.homeassistant and self.connected:
            self._publish_discovery(stream_id)

    def _handle_event(self, stream_id: str, payload: Mapping[str, Any]) -> None:
        event_topic = topics(self.options.prefix, stream_id)["event"]
        if self.connected:
            self._publish_event(event_topic, _dumps(payload))
        else:
            self._buffer_event(event_topic, _dumps(payload))
        label, current = payload.get("label"), self._actions.get(stream_id, {}).get("action")
        if payload.get("event") == "onset" and isinstance(label, str):
            self._set_action(stream_id, label, payload, payload.get("start_ts"))
        elif payload.get("event") == "offset" and current in (None, label):
            # An offset of another label than the current one (not sent by streamtsm's detector) leaves it on.
            self._set_action(stream_id, None, payload, payload.get("end_ts"))

    def _set_action(self, stream_id: str, label: str | None, event: Mapping[str, Any], since: Any) -> None:
        number = (int, float)
        score = event.get("score")
        self._actions[stream_id] = {
            "schema": schema.SCHEMA_VERSION, "type": "action", "stream": stream_id, "action": label,
            "score": score if isinstance(score, number) and not isinstance(score, bool) else None,
            "since": since if isinstance(since, number) and not isinstance(since, bool) else None,
            "model": event.get("model") if isinstance(event.get("model"), str) else None,
            "publish_ts": round(time.time(), 6),
        }
        if self.connected:
            self._publish_action(stream_id)
        # else: kept; every stream's current action goes out on reconnect

    def _handle_pred(self, stream_id: str, payload: Mapping[str, Any]) -> None:
        if self._min_pred_interval is None:
            return
        now = self._clock()
        last = self._last_pred.get(stream_id)
        if last is not None and now - last < self._min_pred_interval:
            return
        self._last_pred[stream_id] = now
        self._send_live(topics(self.options.prefix, stream_id)["pred"], _dumps(payload), "predictions")

    def _send_live(self, topic: str, body: str, counter: str) -> None:
        if not self.connected:
            self.counts.skipped += 1
            return
        info = self._client.publish(topic, body, qos=0)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            setattr(self.counts, counter, getattr(self.counts, counter) + 1)
        else:
            self.counts.skipped += 1

    def _publish_event(self, topic: str, body: str) -> bool:
        info = self._client.publish(topic, body, qos=1)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            self._count_drop()
            return False
        # MQTT_ERR_NO_CONN: the connection broke under us; paho keeps a QoS 1 message and sends it on reconnect.
        self.counts.events += 1
        return True

    def _buffer_event(self, topic: str, body: str) -> None:
        if len(self._pending) >= self.options.buffer:
            self._pending.popleft()  # drop_oldest: the latest events say most about now
            self._count_drop()
        self._pending.append((topic, body))

    def _count_drop(self) -> None:
        self.counts.dropped += 1
        if self.counts.dropped == self._dropped_reported + 1:  # the first of a run of drops
            self.log(f"streamtsm bridge: MQTT broker away and {self.options.buffer} events buffered: dropping the "
                     "oldest")

    def _publish_action(self, stream_id: str) -> None:
        action_topic = topics(self.options.prefix, stream_id)["action"]
        info = self._client.publish(action_topic, _dumps(self._actions[stream_id]), qos=1, retain=True)
        if info.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            self.counts.actions += 1
        # A refused action is not a loss: the current one is resent on the next reconnect.

    def _publish_discovery(self, stream_id: str) -> None:
        topic, config = discovery_config(self.options, stream_id)
        self._client.publish(topic, json.dumps(config, separators=(",", ":")), qos=1, retain=True)

    def service(self) -> None:
        """After a (re)connect: the buffered events in order, every stream's current action and (with Home Assistant)
        the discovery configs, before anything newer. Call it between messages too (``run_bridge`` does)."""
        if self._rediscover.is_set() and self.connected:
            self._rediscover.clear()
            for stream_id in self.streams:
                self._publish_discovery(stream_id)
        if not self._resync.is_set() or not self.connected:
            return
        self._resync.clear()
        if self.options.homeassistant:
            for stream_id in self.streams:
                self._publish_discovery(stream_id)
        while self._pending and self.connected:
            topic, body = self._pending[0]
            if not self._publish_event(topic, body):
                break
            self._pending.popleft()
        for stream_id in self._actions:
            self._publish_action(stream_id)
        if self.counts.dropped > self._dropped_reported:
            self.log(f"streamtsm bridge: {self.counts.dropped - self._dropped_reported} events dropped while the "
                     "MQTT broker was away")
            self._dropped_reported = self.counts.dropped

    def close(self, timeout: float = 1.0) -> None:
        """Says ``offline`` (retained) when connected, disconnects and stops paho's thread, within about ``timeout``
        seconds. Events still buffered are counted as dropped. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        deadline = time.monotonic() + timeout
        was_connected = self.connected
        if was_connected:
            self.service()
            info = self._client.publish(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass  # the connection went at this moment: the will says offline instead
        self.counts.dropped += len(self._pending)
        self._pending.clear()
        self._client.disconnect()  # also ends a back-off wait of the network thread
        # loop_stop joins paho's thread, which may be inside a connect to an unreachable host or a back-off sleep (up
        # to 1 s); a daemon helper keeps the wait bounded (paho's thread is a daemon too and ends with the process).
        # Connected, the thread has the DISCONNECT to send; else there is nothing left to wait for.
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.1, deadline - time.monotonic()) if was_connected else 0.1)

    def summary(self) -> str:
        """One line of what was done, for stderr at exit."""
        c = self.counts
        return (f"streamtsm bridge: {c.events} events, {c.actions} actions, {c.predictions} predictions, {c.stats} "
                f"stats published on MQTT; {c.dropped} events dropped, {c.skipped} live messages skipped while the "
                f"broker was away; {c.refused} messages refused")


def subscriptions(options: MqttOptions) -> list[str]:
    """The ZeroMQ topic prefixes the bridge needs: predictions only when they are republished."""
    wanted = [schema.TOPIC_EVENT, schema.TOPIC_STATS]
    if options.predictions_per_second:
        wanted.append(schema.TOPIC_PRED)
    return wanted


def run_bridge(endpoint: str, bridge: MqttBridge, *, stop: threading.Event, ready: threading.Event | None = None,
               context: zmq.Context | None = None) -> MqttBridge:
    """Subscribes to ``endpoint`` and republishes on MQTT until ``stop`` is set (blocking): the loop of
    ``streamtsm bridge mqtt``.

    Args:
        endpoint: A publisher's endpoint (``run --publish``) or a broker's backend, to connect to.
        bridge: The bridge, not started yet; its ``log`` gets the final summary.
        stop: Ends the loop (within ~0.1 s) when set; the bridge then says offline and disconnects.
        ready: Set once the ZeroMQ socket is connected and paho's thread started.
        context: The ZeroMQ context; the process-wide one when None.

    Returns:
        The bridge, closed, with its counts (and the subscriber's malformed messages in ``counts.refused``).

    Raises:
        PublishError: The endpoint is malformed.
    """
    with Subscriber(endpoint, subscriptions(bridge.options), context=context) as subscriber:
        bridge.start()
        try:
            if ready is not None:
                ready.set()
            while not stop.is_set():
                message = subscriber.recv(timeout=_POLL_S)
                if message is None:
                    bridge.service()
                else:
                    bridge.handle(*message)
        finally:
            bridge.close()
            bridge.counts.refused += subscriber.malformed
    bridge.log(bridge.summary())
    return bridge
