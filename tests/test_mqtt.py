"""`streamtsm bridge mqtt` against a real Mosquitto broker: events at QoS 1, the retained current action, predictions
under their cap, reconnection across a broker restart with a bounded buffer, Home Assistant discovery, and a clean
exit on SIGTERM that leaves the status offline."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

paho = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install 'streamtsm[mqtt]')")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from streamtsm.bridge.mqtt import (  # noqa: E402
    MqttBridge,
    MqttOptions,
    check_topic_prefix,
    discovery_config,
    parse_broker_address,
    run_bridge,
    subscriptions,
)
from streamtsm.cli import main  # noqa: E402
from streamtsm.errors import ConfigError, PublishError  # noqa: E402
from streamtsm.postprocess import ActionEvent  # noqa: E402
from streamtsm.publish import Publisher  # noqa: E402
from streamtsm.publish.schema import (  # noqa: E402
    TOPIC_EVENT,
    TOPIC_PRED,
    TOPIC_STATS,
    event_message,
    prediction_message,
    stats_message,
    topic_for,
)
from streamtsm.stream_ids import is_stream_id  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WAIT_S = 15.0  # generous: the machine may be busy; a pass never waits this long


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A Mosquitto broker on 127.0.0.1 and a free port, with its config, database and log in ``workdir``.

    Persistence is on so that a subscriber's session (clean_session=False) outlives a restart: the subscriber then
    misses nothing the bridge sends while the subscriber itself is still reconnecting.
    """

    def __init__(self, workdir: Path, settings: str = "allow_anonymous true\n", listeners: str = "") -> None:
        self.port = _free_tcp_port()
        self.workdir = workdir
        self.config = workdir / "mosquitto.conf"
        # As root, Mosquitto drops to the user "mosquitto", who cannot write in pytest's private tmp folder; naming the
        # current user keeps it as it is (without root the setting has no effect).
        self.config.write_text(
            f"{settings}persistence true\npersistence_location {workdir}/\n"
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlog_dest file {workdir}/mosquitto.log\n"
            f"listener {self.port} 127.0.0.1\n{listeners}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: it saves its database (the sessions) and closes every connection
            self.proc.wait(WAIT_S)
        if self.proc is not None:
            self.proc.stderr.close()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path):
    if not os.path.exists(MOSQUITTO):
        reason = f"the Mosquitto broker is not installed ({MOSQUITTO}; apt-get install mosquitto, as tools/setup.sh " \
                 "does)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


class Collector:
    """A paho subscriber that records ``(topic, payload, qos, retain)`` of every message it gets."""

    def __init__(self, port: int, topics: list[str], client_id: str = "", clean: bool = True,
                 username: str | None = None, password: str | None = None) -> None:
        self.messages: list[tuple[str, bytes, int, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda c, u, mid, codes, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S), "the collector subscribes"

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append((message.topic, message.payload, message.qos, bool(message.retain)))
            self._cond.notify_all()

    def on(self, topic: str) -> list[tuple[bytes, int, bool]]:
        with self._cond:
            return [(p, q, r) for t, p, q, r in self.messages if t == topic]

    def wait_for(self, predicate, what: str, timeout: float = WAIT_S) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self), timeout), f"{what}; got {self.messages}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _newest_action(collected: Collector, stream: str = "cam0"):
    """The ``action`` of the newest message on the stream's action topic; ``...`` when none came yet."""
    got = collected.on(f"streamtsm/{stream}/action")
    return json.loads(got[-1][0])["action"] if got else ...


@contextmanager
def collector(port: int, topics: list[str], **kwargs):
    c = Collector(port, topics, **kwargs)
    try:
        yield c
    finally:
        c.close()


@contextmanager
def bridge_running(publisher: Publisher | str, options: MqttOptions, **kwargs):
    lines: list[str] = []
    bridge = MqttBridge(options, log=lines.append, **kwargs)
    stop, ready = threading.Event(), threading.Event()
    endpoint = publisher if isinstance(publisher, str) else publisher.endpoint
    thread = threading.Thread(target=run_bridge, args=(endpoint, bridge),
                              kwargs={"stop": stop, "ready": ready}, daemon=True)
    thread.start()
    assert ready.wait(WAIT_S)
    try:
        yield bridge, lines
    finally:
        stop.set()
        thread.join(WAIT_S)
        assert not thread.is_alive(), "the bridge stops when asked"


def _sync(publisher: Publisher, sink: Collector, prefix: str = "streamtsm", streams=("cam0",)) -> None:
    """Sends stats until they come out of MQTT: from then on the ZeroMQ subscription and the MQTT connection are up
    (a SUB socket misses what is published before its subscription reaches the publisher)."""
    deadline = time.monotonic() + WAIT_S
    while not sink.on(f"{prefix}/stats"):
        assert time.monotonic() < deadline, f"stats never reached MQTT; got {sink.messages}"
        publisher.send(TOPIC_STATS, stats_message(streams={s: {"fps": 30.0, "status": "ok"} for s in streams}))
        time.sleep(0.05)


def _onset(stream: str, label: str, frame: int) -> dict:
    event = ActionEvent(kind="onset", label=label, start_frame=frame, start_ts=1700000000.0 + frame, end_frame=None,
                        end_ts=None, score=0.9)
    return event_message(stream_id=stream, model="m", event=event, frame_index=frame + 3,
                         capture_ts=1700000000.0 + frame + 3, publish_ts=1700000000.0 + frame + 3.1)


def _offset(stream: str, label: str, start: int, end: int) -> dict:
    event = ActionEvent(kind="offset", label=label, start_frame=start, start_ts=1700000000.0 + start, end_frame=end,
                        end_ts=1700000000.0 + end, score=0.8)
    return event_message(stream_id=stream, model="m", event=event, frame_index=end + 3,
                         capture_ts=1700000000.0 + end + 3, publish_ts=1700000000.0 + end + 3.1)


def _action(sink: Collector, topic: str) -> dict | None:
    got = sink.on(topic)
    return json.loads(got[-1][0]) if got else None


@pytest.fixture
def publisher():
    with Publisher("tcp://127.0.0.1:*") as pub:
        yield pub


def test_bridge_republishes_events_at_qos1_and_retains_the_current_action(mosquitto, publisher):
    with bridge_running(publisher, MqttOptions(port=mosquitto.port)), \
            collector(mosquitto.port, ["streamtsm/#"]) as sink:
        _sync(publisher, sink)
        onset = _onset("cam0", "waving", 100)
        publisher.send(topic_for(TOPIC_EVENT, "cam0"), onset)
        sink.wait_for(lambda s: s.on("streamtsm/cam0/event"), "the event arrives")
        body, qos, _ = sink.on("streamtsm/cam0/event")[0]
        assert json.loads(body) == onset and qos == 1

        # A subscriber that comes later still learns what is going on now.
        with collector(mosquitto.port, ["streamtsm/cam0/action"]) as late:
            # The bridge publishes the action after the event, so it may still be on its way to the broker when
            # this subscriber arrives: the retained message it gets is then the one before, and the update follows.
            late.wait_for(lambda s: _newest_action(s) == "waving", "the retained action")
            body, qos, retained = late.on("streamtsm/cam0/action")[0]
            action = json.loads(late.on("streamtsm/cam0/action")[-1][0])
            assert retained and qos == 1
            assert action["stream"] == "cam0" and action["since"] == onset["start_ts"]

        publisher.send(topic_for(TOPIC_EVENT, "cam0"), _offset("cam0", "waving", 100, 180))
        sink.wait_for(lambda s: len(s.on("streamtsm/cam0/event")) == 2, "the offset arrives")
        with collector(mosquitto.port, ["streamtsm/cam0/action"]) as late:
            late.wait_for(lambda s: s.on("streamtsm/cam0/action"), "the retained action after the offset")
            assert late.on("streamtsm/cam0/action")[0][2], "a late subscriber first gets the retained action"
            late.wait_for(lambda s: _newest_action(s) is None, "the action ended")

        # The status is retained too, and says online while the bridge runs.
        with collector(mosquitto.port, ["streamtsm/status"]) as late:
            late.wait_for(lambda s: s.on("streamtsm/status"), "the retained status")
            assert late.on("streamtsm/status")[0][0] == b"online"


def test_bridge_caps_predictions_per_stream(mosquitto, publisher):
    ticks = iter(i * 0.125 for i in range(10_000))  # the bridge reads its clock once per prediction it handles
    options = MqttOptions(port=mosquitto.port, predictions_per_second=2.0)
    with bridge_running(publisher, options, clock=lambda: next(ticks)), \
            collector(mosquitto.port, ["streamtsm/#"]) as sink:
        _sync(publisher, sink, streams=("cam0", "cam1"))
        for i in range(20):  # cam0 at 0, 0.25, ... s; cam1 at 0.125, 0.375, ... s: 2.5 s of 4 predictions a second
            stream = "cam0" if i % 2 == 0 else "cam1"
            publisher.send(topic_for(TOPIC_PRED, stream), prediction_message(
                stream_id=stream, frame_index=i, capture_ts=time.time(), model="m", topk=[("a", 0.5)]))
        publisher.send(topic_for(TOPIC_EVENT, "cam0"), _onset("cam0", "end", 1))  # marks the end (QoS 1, in order)
        sink.wait_for(lambda s: s.on("streamtsm/cam0/event"), "the marker event")
        frames = {s: [json.loads(p)["frame"] for p, _, _ in sink.on(f"streamtsm/{s}/pred")] for s in ("cam0", "cam1")}
        # At most one per 0.5 s per stream, the first of each half second kept.
        assert frames == {"cam0": [0, 4, 8, 12, 16], "cam1": [1, 5, 9, 13, 17]}
        assert {q for _, q, _ in sink.on("streamtsm/cam0/pred")} == {0}


def test_bridge_subscribes_to_predictions_only_when_it_republishes_them():
    assert TOPIC_PRED not in subscriptions(MqttOptions())
    assert TOPIC_PRED in subscriptions(MqttOptions(predictions_per_second=0.5))


def test_bridge_reconnects_after_a_broker_restart_and_delivers_what_came_meanwhile(mosquitto, publisher):
    options = MqttOptions(port=mosquitto.port, buffer=2, reconnect_delay=(0.2, 1.0), keepalive=5)
    with bridge_running(publisher, options) as (bridge, lines), \
            collector(mosquitto.port, ["streamtsm/#"], client_id="collector-restart", clean=False) as sink:
        _sync(publisher, sink)
        publisher.send(topic_for(TOPIC_EVENT, "cam0"), _onset("cam0", "waving", 100))
        sink.wait_for(lambda s: s.on("streamtsm/cam0/event"), "the first event")

        mosquitto.stop()
        deadline = time.monotonic() + WAIT_S
        while bridge.connected:
            assert time.monotonic() < deadline, "the bridge notices the broker is gone"
            time.sleep(0.02)
        # Three events while the broker is away, with room for two: the oldest is dropped and counted.
        during = [_offset("cam0", "waving", 100, 150), _onset("cam0", "clapping", 160), _onset("cam1", "jumping", 5)]
        for message in during:
            publisher.send(topic_for(TOPIC_EVENT, message["stream"]), message)
        while bridge.counts.dropped < 1 or bridge.buffered < 2:
            assert time.monotonic() < deadline, f"the bridge buffers ({bridge.buffered}, {bridge.counts})"
            time.sleep(0.02)
        mosquitto.start()

        sink.wait_for(lambda s: s.on("streamtsm/cam1/event"), "the buffered events after the restart")
        events = [json.loads(p) for p, _, _ in sink.on("streamtsm/cam0/event")] + \
                 [json.loads(p) for p, _, _ in sink.on("streamtsm/cam1/event")]
        # QoS 1 is at least once: a message whose acknowledgement the restart cut off comes again (identical).
        distinct = [e for i, e in enumerate(events) if e not in events[:i]]
        assert distinct == [_onset("cam0", "waving", 100), during[1], during[2]]  # in order, the oldest missing
        assert bridge.counts.dropped == 1
        assert any("1 events dropped" in line for line in lines), lines
        assert any("reconnected" in line for line in lines), lines

        # Events after the restart flow as before.
        later = _offset("cam1", "jumping", 5, 40)
        publisher.send(topic_for(TOPIC_EVENT, "cam1"), later)
        sink.wait_for(lambda s: len(s.on("streamtsm/cam1/event")) == 2, "an event after the restart")
        assert json.loads(sink.on("streamtsm/cam1/event")[1][0]) == later

        # The action that changed while the broker was away is the retained one now.
        with collector(mosquitto.port, ["streamtsm/+/action"]) as late:
            late.wait_for(lambda s: s.on("streamtsm/cam0/action"), "the retained action after the restart")
            assert _action(late, "streamtsm/cam0/action")["action"] == "clapping"


def test_bridge_picks_up_a_recognizer_that_restarts(mosquitto):
    first = Publisher("tcp://127.0.0.1:*")
    endpoint = first.endpoint
    with bridge_running(endpoint, MqttOptions(port=mosquitto.port)), \
            collector(mosquitto.port, ["streamtsm/#"]) as sink:
        try:
            _sync(first, sink)
        finally:
            first.close()
        deadline = time.monotonic() + WAIT_S
        while True:  # the same endpoint, once libzmq has let go of it (closing is asynchronous)
            try:
                second = Publisher(endpoint)
                break
            except PublishError:
                assert time.monotonic() < deadline, f"{endpoint} is free again"
                time.sleep(0.05)
        with second:  # ZeroMQ reconnects the bridge's socket by itself
            while not sink.on("streamtsm/cam1/event"):
                assert time.monotonic() < deadline, "events from the restarted recognizer reach MQTT"
                second.send(topic_for(TOPIC_EVENT, "cam1"), _onset("cam1", "waving", 1))
                time.sleep(0.05)


def test_bridge_homeassistant_discovery_is_retained_and_well_formed(mosquitto, publisher):
    options = MqttOptions(port=mosquitto.port, homeassistant=True)
    with bridge_running(publisher, options), collector(mosquitto.port, ["streamtsm/#"]) as sink:
        _sync(publisher, sink, streams=("cam0", "door-2"))
        with collector(mosquitto.port, ["homeassistant/#"]) as ha:
            ha.wait_for(lambda s: len({t for t, *_ in s.messages}) == 2, "a discovery config per stream")
            configs = {}
            for topic, payload, _, retained in ha.messages:
                assert retained, topic
                configs[topic] = json.loads(payload)
        assert set(configs) == {"homeassistant/sensor/streamtsm_cam0/action/config",
                                "homeassistant/sensor/streamtsm_door-2/action/config"}
        cam0 = configs["homeassistant/sensor/streamtsm_cam0/action/config"]
        assert cam0["state_topic"] == "streamtsm/cam0/action" == cam0["json_attributes_topic"]
        assert cam0["availability_topic"] == "streamtsm/status"
        assert (cam0["payload_available"], cam0["payload_not_available"]) == ("online", "offline")
        assert cam0["device"]["identifiers"] == ["streamtsm_cam0"]
        ids = {c["unique_id"] for c in configs.values()}
        assert len(ids) == 2, "each sensor has its own unique_id"

        # Home Assistant announcing a restart gets the configs again.
        with collector(mosquitto.port, ["homeassistant/sensor/#"]) as ha:
            ha.wait_for(lambda s: len(s.messages) == 2, "the retained configs")
            ha.client.publish("homeassistant/status", "online", qos=1)
            ha.wait_for(lambda s: len(s.messages) >= 4, "the configs sent again")


def test_bridge_cli_sigterm_exits_0_promptly_and_leaves_the_status_offline(mosquitto, publisher):
    proc = subprocess.Popen([sys.executable, "-m", "streamtsm.cli", "bridge", "mqtt", "--connect", publisher.endpoint,
                             "--mqtt", f"127.0.0.1:{mosquitto.port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with collector(mosquitto.port, ["streamtsm/#"]) as sink:
            _sync(publisher, sink)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=WAIT_S)
            assert proc.returncode == 0, err
            sink.wait_for(lambda s: s.on("streamtsm/status") and s.on("streamtsm/status")[-1][0] == b"offline",
                          "the status goes offline")
        assert "stats published on MQTT" in err and "Traceback" not in err
        with collector(mosquitto.port, ["streamtsm/status"]) as late:
            late.wait_for(lambda s: s.on("streamtsm/status"), "the retained status")
            assert late.on("streamtsm/status")[0][:1] == (b"offline",)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_bridge_republishes_what_a_real_run_recognizes(mosquitto):
    port = _free_tcp_port()
    # The demo model on its synthetic scene announces a motion about every two seconds.
    run = subprocess.Popen([sys.executable, "-m", "streamtsm.cli", "run", "--source", "synthetic", "--name", "cam0",
                            "--publish", f"tcp://127.0.0.1:{port}", "--duration", "60", "--quiet", "--threads", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        options = MqttOptions(port=mosquitto.port, predictions_per_second=1.0)
        with bridge_running(f"tcp://127.0.0.1:{port}", options), collector(mosquitto.port, ["streamtsm/#"]) as sink:
            sink.wait_for(lambda s: s.on("streamtsm/cam0/event") and s.on("streamtsm/cam0/pred")
                          and s.on("streamtsm/stats"), "an event, a prediction and stats from the run",
                          timeout=4 * WAIT_S)  # the model loads first
            event = json.loads(sink.on("streamtsm/cam0/event")[0][0])
            assert event["type"] == "event" and event["stream"] == "cam0" and event["schema"] == 1
            stats = json.loads(sink.on("streamtsm/stats")[0][0])
            assert "cam0" in stats["streams"]
            sink.wait_for(lambda s: s.on("streamtsm/cam0/action"), "the action")
            action = json.loads(sink.on("streamtsm/cam0/action")[0][0])
            assert action["action"] == (event["label"] if event["event"] == "onset" else None)
    finally:
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=WAIT_S)
        assert run.returncode == 0, err


def test_bridge_waits_for_a_broker_that_is_not_up_yet(tmp_path, publisher):
    if not os.path.exists(MOSQUITTO):
        pytest.skip(f"the Mosquitto broker is not installed ({MOSQUITTO})")
    broker = Mosquitto(tmp_path)  # its port is chosen but nothing listens there yet
    with bridge_running(publisher, MqttOptions(port=broker.port, reconnect_delay=(0.2, 0.5))) as (bridge, lines):
        deadline = time.monotonic() + WAIT_S
        while not any("cannot connect" in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.02)
        broker.start()
        try:
            with collector(broker.port, ["streamtsm/#"]) as sink:
                _sync(publisher, sink)
        finally:
            broker.stop()


def _require_mosquitto() -> None:
    if not os.path.exists(MOSQUITTO):
        reason = f"the Mosquitto broker is not installed ({MOSQUITTO})"
        print(f"SKIP: {reason}")
        pytest.skip(reason)


def _wait_for_line(lines: list[str], text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, f"no line with {text!r}: {lines}"
        time.sleep(0.02)


def test_bridge_cli_connects_with_credentials_from_the_environment(tmp_path, publisher):
    _require_mosquitto()
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "bridge", "s3cret"], check=True,
                   capture_output=True)
    broker = Mosquitto(tmp_path, settings=f"allow_anonymous false\npassword_file {passwords}\n")
    broker.start()
    env = dict(os.environ, STREAMTSM_MQTT_USERNAME="bridge", STREAMTSM_MQTT_PASSWORD="s3cret")
    proc = subprocess.Popen([sys.executable, "-m", "streamtsm.cli", "bridge", "mqtt", "--connect", publisher.endpoint,
                             "--mqtt", f"127.0.0.1:{broker.port}"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        with collector(broker.port, ["streamtsm/#"], username="bridge", password="s3cret") as sink:
            _sync(publisher, sink)  # only an authenticated bridge gets stats through
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, err
        assert "s3cret" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        broker.stop()


def test_bridge_says_when_the_broker_refuses_its_credentials(tmp_path, publisher):
    _require_mosquitto()
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "bridge", "s3cret"], check=True,
                   capture_output=True)
    broker = Mosquitto(tmp_path, settings=f"allow_anonymous false\npassword_file {passwords}\n")
    broker.start()
    try:
        options = MqttOptions(port=broker.port, username="bridge", password="wrong", reconnect_delay=(0.2, 0.5))
        with bridge_running(publisher, options) as (bridge, lines):
            _wait_for_line(lines, "refused the connection")
            assert not bridge.connected
            assert sum("refused" in line for line in lines) == 1, "said once, not at every retry"
    finally:
        broker.stop()


def _make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=streamtsm test CA")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def test_bridge_connects_over_tls_verifying_the_broker_certificate(tmp_path, publisher):
    _require_mosquitto()
    if shutil.which("openssl") is None:
        print("SKIP: openssl is not installed (it makes the test certificates)")
        pytest.skip("openssl is not installed (it makes the test certificates)")
    ca, cert, key = _make_certificates(tmp_path)
    tls_port = _free_tcp_port()
    broker = Mosquitto(tmp_path, listeners=f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\n"
                                           f"keyfile {key}\n")
    broker.start()
    try:
        # Without the test CA the broker's certificate is refused, and the bridge says where to look.
        with bridge_running(publisher, MqttOptions(port=tls_port, tls=True, reconnect_delay=(0.2, 0.5))) as (
                bridge, lines):
            _wait_for_line(lines, "--cafile")
            assert not bridge.connected
        with bridge_running(publisher, MqttOptions(port=tls_port, tls=True, cafile=str(ca))), \
                collector(broker.port, ["streamtsm/#"]) as sink:
            _sync(publisher, sink)  # over TLS to the broker, read back on its plain listener
    finally:
        broker.stop()


def test_bridge_refuses_a_cafile_it_cannot_read(tmp_path):
    (tmp_path / "not-a-ca.pem").write_text("hello\n")
    for path in (tmp_path / "missing.pem", tmp_path / "not-a-ca.pem"):
        with pytest.raises(ConfigError, match="--cafile"):
            MqttBridge(MqttOptions(tls=True, cafile=str(path)))


# --- without a broker ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:1883", ("127.0.0.1", 1883)),
    ("broker.local", ("broker.local", 1883)),
    ("[::1]:8884", ("::1", 8884)),
])
def test_parse_broker_address_reads_host_and_port(text, expected):
    assert parse_broker_address(text) == expected


def test_parse_broker_address_defaults_to_8883_with_tls():
    assert parse_broker_address("mq", tls=True) == ("mq", 8883)


@pytest.mark.parametrize("text", ["", "host:", "host:x", "host:0", "host:70000", "::1:1883", "[::1", "a b:1",
                                  "tcp://h:1"])
def test_parse_broker_address_refuses_malformed_addresses(text):
    with pytest.raises(ConfigError, match="--mqtt"):
        parse_broker_address(text)


@pytest.mark.parametrize("prefix", ["", "a/+", "a/#", "a//b", "/a", "a/", "$SYS", "a\nb"])
def test_check_topic_prefix_refuses_what_cannot_lead_a_topic(prefix):
    with pytest.raises(ConfigError, match="--prefix"):
        check_topic_prefix(prefix)


def test_check_topic_prefix_takes_several_levels():
    assert check_topic_prefix("site1/streamtsm") == "site1/streamtsm"


def test_stream_id_rule_keeps_ids_single_topic_levels():
    # The bridge puts stream ids into MQTT topics as one level: the rule must leave out the level separator and
    # both wildcards.
    for bad in ("a/b", "a+", "a#", "+", "#"):
        assert not is_stream_id(bad)


def test_bridge_refuses_a_stream_id_that_would_leave_its_topic_level():
    bridge = MqttBridge(MqttOptions(), log=lambda line: None)
    for stream in ("cam0/../x", "#", "a+b"):
        message = dict(_onset("cam0", "waving", 1), stream=stream)
        bridge.handle("streamtsm.event.x", message)
    bridge.handle("streamtsm.other", {"schema": 1, "type": "other", "stream": "cam0"})
    assert bridge.counts.refused == 4 and bridge.buffered == 0 and bridge.streams == []
    bridge.close()


def test_discovery_config_names_distinct_nodes_per_prefix():
    topic_a, config_a = discovery_config(MqttOptions(prefix="site1/streamtsm"), "cam0")
    topic_b, config_b = discovery_config(MqttOptions(), "cam0")
    assert topic_a == "homeassistant/sensor/site1_streamtsm_cam0/action/config"
    assert config_a["state_topic"] == "site1/streamtsm/cam0/action"
    assert topic_a != topic_b and config_a["unique_id"] != config_b["unique_id"]


@pytest.mark.parametrize("argv, message", [
    (["--predictions-per-second", "-1"], "--predictions-per-second must be >= 0"),
    (["--predictions-per-second", "nan"], "--predictions-per-second must be"),
    (["--buffer", "0"], "--buffer must be >= 1"),
    (["--mqtt", "host:99999"], "--mqtt port must be"),
    (["--prefix", "a/#"], "--prefix must be"),
    (["--connect", "tcp://*:5556"], "to connect to"),
    (["--password", "x"], "needs a user name"),
    (["--cafile", "ca.pem"], "add --tls"),
    (["--tls", "--cafile", "/nonexistent/ca.pem"], "--cafile /nonexistent/ca.pem"),
])
def test_bridge_cli_bad_options_are_one_line_and_exit_2(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("STREAMTSM_MQTT_USERNAME", raising=False)
    assert main(["bridge", "mqtt", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
