"""The wire schema, the ZeroMQ publisher and subscriber, the listen formatter and loop."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtsm.errors import PublishError
from streamtsm.postprocess import ActionEvent
from streamtsm.publish import (
    SCHEMA_VERSION,
    TOPIC_EVENT,
    TOPIC_PRED,
    TOPIC_STATS,
    Publisher,
    Subscriber,
    decode,
    encode,
    event_message,
    format_message,
    listen,
    prediction_message,
    stats_message,
    topic_for,
)

RANDOM_PORT = "tcp://127.0.0.1:*"
TIMEOUT_S = 5.0


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    # Sockets are closed by the tests; destroy() closes any a failing test left behind, with linger 0.
    context.destroy(linger=0)


def pred(stream="cam0", frame=1, **overrides):
    fields = dict(
        stream_id=stream,
        frame_index=frame,
        capture_ts=1000.0,
        model="tsm_mobilenetv2",
        topk=[("waving", 0.9), ("clapping", 0.1)],
        publish_ts=1000.05,
    )
    fields.update(overrides)
    return prediction_message(**fields)


def onset(stream="cam0", frame=10):
    event = ActionEvent(kind="onset", label="waving", start_frame=frame - 2, start_ts=10.0, end_frame=None,
                        end_ts=None, score=0.8)
    return event_message(stream_id=stream, model="m", event=event, frame_index=frame, capture_ts=10.2,
                         publish_ts=10.25)


def offset_100_to_180():
    event = ActionEvent(kind="offset", label="waving", start_frame=100, start_ts=10.0, end_frame=180, end_ts=12.7,
                        score=0.75)
    return event_message(stream_id="cam0", model="m", event=event, frame_index=183, capture_ts=12.8,
                         publish_ts=12.81)


def first_delivery(publisher, subscriber, topic, payload, timeout=TIMEOUT_S):
    """Sends until the subscriber gets a message: a SUB connects and subscribes asynchronously (slow joiner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        publisher.send(topic, payload)
        message = subscriber.recv(timeout=0.02)
        if message is not None:
            return message
    pytest.fail(f"no message reached the subscriber within {timeout} s")


def drain(subscriber, quiet_s=0.1):
    """Receives until nothing arrives for quiet_s seconds."""
    received = []
    while (message := subscriber.recv(timeout=quiet_s)) is not None:
        received.append(message)
    return received


# -- schema ------------------------------------------------------------------------------------------------


def test_topic_for_joins_prefix_and_stream():
    assert topic_for(TOPIC_PRED, "cam0") == "streamtsm.pred.cam0"
    assert topic_for(TOPIC_EVENT, "cam0") == "streamtsm.event.cam0"
    assert TOPIC_STATS == "streamtsm.stats"


def test_topic_for_rejects_empty_stream_id():
    with pytest.raises(ValueError, match="stream id"):
        topic_for(TOPIC_PRED, "")


def test_prediction_message_has_every_field():
    message = prediction_message(
        stream_id="cam0", frame_index=120, capture_ts=1000.0, model="tsm_mobilenetv2",
        topk=[("arm wrestling", 0.912345678), ("punching", 0.03)], generation=2, publish_ts=1000.038,
    )
    assert message == {
        "schema": SCHEMA_VERSION,
        "type": "pred",
        "stream": "cam0",
        "frame": 120,
        "capture_ts": 1000.0,
        "publish_ts": 1000.038,
        "latency_ms": 38.0,
        "model": "tsm_mobilenetv2",
        "generation": 2,
        "topk": [{"label": "arm wrestling", "score": 0.912346}, {"label": "punching", "score": 0.03}],
        "label": "arm wrestling",
        "score": 0.912346,
        "media_ts": None,  # a live source has no position
    }


def test_prediction_message_converts_numpy_scalars_to_json_types():
    np = pytest.importorskip("numpy")
    message = pred(frame=np.int64(3), topk=[("a", np.float32(0.5))])
    assert type(message["frame"]) is int and type(message["score"]) is float
    encode("t", message)


def test_prediction_message_empty_topk_gives_null_top1():
    message = pred(topk=[])
    assert message["topk"] == [] and message["label"] is None and message["score"] is None


def test_prediction_message_defaults_publish_ts_to_now():
    before = time.time()
    message = pred(publish_ts=None, capture_ts=before)
    assert before <= message["publish_ts"] <= time.time() + 1e-3
    assert message["latency_ms"] >= 0


def test_prediction_message_merges_extra_but_not_over_fields():
    assert pred(extra={"clip_len": 8})["clip_len"] == 8
    with pytest.raises(ValueError, match="label"):
        pred(extra={"label": "forged"})


def test_event_message_onset_has_every_field():
    assert onset() == {
        "schema": SCHEMA_VERSION,
        "type": "event",
        "event": "onset",
        "stream": "cam0",
        "model": "m",
        "label": "waving",
        "start_frame": 8,
        "start_ts": 10.0,
        "end_frame": None,
        "end_ts": None,
        "duration_s": None,
        "score": 0.8,
        "frame": 10,
        "capture_ts": 10.2,
        "publish_ts": 10.25,
        "latency_ms": 50.0,
        "media_ts": None,  # a live source has no position
        "start_media_ts": None,
        "end_media_ts": None,
    }


def test_event_message_offset_has_end_and_duration():
    message = offset_100_to_180()
    assert message["event"] == "offset"
    assert (message["end_frame"], message["end_ts"], message["duration_s"]) == (180, 12.7, 2.7)
    assert (message["frame"], message["capture_ts"], message["latency_ms"]) == (183, 12.8, 10.0)


def test_event_message_rejects_unknown_kind_and_offset_without_end():
    # The event checks itself when it is made, so no malformed event reaches the message builder.
    with pytest.raises(ValueError, match="onset"):
        event_message(stream_id="c", model="m", frame_index=0, capture_ts=0.0, event=ActionEvent(
            kind="start", label="x", start_frame=0, start_ts=0.0, end_frame=None, end_ts=None, score=1.0))
    with pytest.raises(ValueError, match="end_frame"):
        event_message(stream_id="c", model="m", frame_index=0, capture_ts=0.0, event=ActionEvent(
            kind="offset", label="x", start_frame=0, start_ts=0.0, end_frame=None, end_ts=None, score=1.0))


def test_stats_message_passes_streams_through_and_merges_extra():
    figures = {"fps": 29.9, "dropped": 3, "latency_p50_ms": 38.0, "latency_p99_ms": 52.5, "status": "ok"}
    message = stats_message(streams={"cam0": figures}, publish_ts=5.0, extra={"published": 10, "publish_dropped": 1})
    assert message == {
        "schema": SCHEMA_VERSION,
        "type": "stats",
        "publish_ts": 5.0,
        "streams": {"cam0": figures},
        "published": 10,
        "publish_dropped": 1,
    }
    with pytest.raises(ValueError, match="streams"):
        stats_message(streams={}, extra={"streams": {}})


def test_encode_is_compact_utf8_json():
    topic, body = encode("streamtsm.pred.cam0", {"schema": 1, "label": "café"})
    assert topic == b"streamtsm.pred.cam0"
    assert body == '{"schema":1,"label":"café"}'.encode("utf-8")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_encode_sends_nan_and_infinity_as_null(bad):
    # Issue 16: NaN/Infinity are not JSON; raising here killed the recognizer. They go out as null.
    _, body = encode("t", {"schema": 1, "score": bad, "topk": [{"label": "x", "score": bad}], "frame": 3})
    assert json.loads(body, parse_constant=_refuse) == {"schema": 1, "score": None,
                                                        "topk": [{"label": "x", "score": None}], "frame": 3}


def _refuse(name):
    raise AssertionError(f"non-JSON constant {name} on the wire")


def test_encode_rejects_payload_without_schema_or_unserializable():
    with pytest.raises(ValueError, match="schema"):
        encode("t", {"label": "x"})
    with pytest.raises(ValueError, match="JSON"):
        encode("t", {"schema": 1, "x": object()})


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([b"t"], "2 parts"),
        ([b"t", b"{}", b"x"], "2 parts"),
        ([b"\xff", b'{"schema":1}'], "UTF-8"),
        ([b"t", b"\xc3("], "UTF-8"),
        ([b"t", b"not json"], "JSON"),
        ([b"t", b'{"schema":1,"score":NaN}'], "JSON"),
        ([b"t", b"[1, 2]"], "object"),
        ([b"t", b'{"type":"pred"}'], "schema"),
        ([b"t", b'{"schema":2}'], "unsupported schema 2"),
        ([b"t", b'{"schema":true}'], "unsupported schema"),
        ([b"t", b"[" * 100_000], "nested|JSON"),
    ],
)
def test_decode_rejects_malformed_with_value_error(parts, match):
    with pytest.raises(ValueError, match=match):
        decode(parts)


JSON_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
PAYLOADS = st.dictionaries(st.text(), JSON_VALUES, max_size=6).map(lambda d: {**d, "schema": SCHEMA_VERSION})


@settings(max_examples=200, deadline=None)
@given(topic=st.text(), payload=PAYLOADS)
def test_decode_inverts_encode(topic, payload):
    assert decode(encode(topic, payload)) == (topic, payload)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=64), max_size=4)
    | st.tuples(
        st.binary(max_size=16),
        st.binary() | st.text().map(str.encode) | JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    ).map(list)
)
def test_decode_raises_only_value_error_on_arbitrary_bytes(parts):
    try:
        topic, payload = decode(parts)
    except ValueError:
        return
    assert isinstance(topic, str) and payload["schema"] == SCHEMA_VERSION


# -- publisher and subscriber ------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0"])
def test_publisher_bind_to_random_port_reports_real_endpoint(ctx, endpoint):
    with Publisher(endpoint, context=ctx) as publisher:
        match = re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", publisher.endpoint)
        assert match and int(match[1]) > 0
        assert publisher.last_endpoint == publisher.endpoint


def test_publisher_delivers_every_message_type_over_tcp(ctx):
    with Publisher(RANDOM_PORT, context=ctx) as publisher, Subscriber(publisher.endpoint, context=ctx) as subscriber:
        topic = topic_for(TOPIC_PRED, "cam0")
        assert first_delivery(publisher, subscriber, topic, pred()) == (topic, pred())
        drain(subscriber)
        stats = stats_message(streams={"cam0": {"fps": 30.0, "status": "ok"}}, publish_ts=1.0, extra={"published": 3})
        sent = [(topic, pred(frame=2)), (topic_for(TOPIC_EVENT, "cam0"), onset()), (TOPIC_STATS, stats)]
        for message in sent:
            assert publisher.send(*message)
        received = [subscriber.recv(timeout=TIMEOUT_S) for _ in sent]
    assert received == sent


def test_subscriber_receives_only_subscribed_topic_prefix(ctx):
    with Publisher(RANDOM_PORT, context=ctx) as publisher, Subscriber(
        publisher.endpoint, [TOPIC_EVENT], context=ctx
    ) as subscriber:
        event_topic = topic_for(TOPIC_EVENT, "cam1")
        first_delivery(publisher, subscriber, event_topic, onset(stream="cam1"))
        drain(subscriber)
        for frame in range(5):
            publisher.send(topic_for(TOPIC_PRED, "cam1"), pred(stream="cam1", frame=frame))
            publisher.send(event_topic, onset(stream="cam1", frame=frame))
            publisher.send(TOPIC_STATS, stats_message(streams={}))
        received = drain(subscriber)
    assert [topic for topic, _ in received] == [event_topic] * 5
    assert [payload["frame"] for _, payload in received] == list(range(5))


def test_publisher_connects_to_bound_subscriber_over_ipc(ctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/results.sock"
    with Subscriber(endpoint, bind=True, context=ctx) as subscriber, Publisher(
        endpoint, bind=False, context=ctx
    ) as publisher:
        assert subscriber.endpoint == endpoint
        topic = topic_for(TOPIC_PRED, "cam0")
        assert first_delivery(publisher, subscriber, topic, pred()) == (topic, pred())


def test_publisher_binds_ipc_path(ctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    with Publisher(endpoint, context=ctx) as publisher, Subscriber(endpoint, context=ctx) as subscriber:
        assert publisher.endpoint == endpoint
        assert first_delivery(publisher, subscriber, TOPIC_STATS, stats_message(streams={}))[0] == TOPIC_STATS


def test_publisher_address_in_use_raises_publish_error(ctx):
    with Publisher(RANDOM_PORT, context=ctx) as first:
        with pytest.raises(PublishError) as caught:
            Publisher(first.endpoint, context=ctx)
    assert str(caught.value) == f"cannot bind {first.endpoint}: address already in use"


@pytest.mark.parametrize(
    "endpoint",
    ["localhost:5556", "tcp://127.0.0.1", "tcp://:5556", "tcp://127.0.0.1:70000", "udp://127.0.0.1:5556",
     "ipc://", "inproc://", "", "tcp://127.0.0.1:55 56"],
)
def test_publisher_invalid_endpoint_raises_publish_error(ctx, endpoint):
    with pytest.raises(PublishError, match="invalid ZeroMQ endpoint"):
        Publisher(endpoint, context=ctx)


@pytest.mark.parametrize("endpoint", ["tcp://*:5556", "tcp://127.0.0.1:*", "tcp://127.0.0.1:0"])
def test_subscriber_connect_to_wildcard_endpoint_raises_publish_error(ctx, endpoint):
    with pytest.raises(PublishError, match="connect"):
        Subscriber(endpoint, context=ctx)


def test_publisher_without_subscribers_counts_sends(ctx):
    with Publisher(RANDOM_PORT, context=ctx) as publisher:
        assert all(publisher.send(TOPIC_STATS, stats_message(streams={})) for _ in range(10))
        assert (publisher.sent, publisher.dropped) == (10, 0)


def test_publisher_counts_drops_behind_subscriber_that_never_reads(ctx):
    with Publisher(RANDOM_PORT, sndhwm=10, context=ctx) as publisher, Subscriber(
        publisher.endpoint, context=ctx
    ) as subscriber:
        # Once one message has arrived, the subscription is known to the publisher and sends are matched.
        first_delivery(publisher, subscriber, TOPIC_STATS, stats_message(streams={}))
        sent_before, dropped_before = publisher.sent, publisher.dropped
        padded = pred(extra={"padding": "x" * 2000})
        attempts = 20_000
        accepted = sum(publisher.send(topic_for(TOPIC_PRED, "cam0"), padded) for _ in range(attempts))
        sent, dropped = publisher.sent - sent_before, publisher.dropped - dropped_before
    assert dropped > 0
    assert sent == accepted
    assert sent + dropped == attempts


def test_publisher_send_nan_payload_goes_out_as_valid_json(ctx):
    with Publisher(RANDOM_PORT, context=ctx) as publisher:
        assert publisher.send("streamtsm.pred.cam0", pred(topk=[("x", float("nan"))]))
        assert (publisher.sent, publisher.dropped) == (1, 0)


def test_publisher_close_is_idempotent_and_send_after_close_raises(ctx):
    publisher = Publisher(RANDOM_PORT, context=ctx)
    publisher.close()
    publisher.close()
    with pytest.raises(PublishError, match="closed"):
        publisher.send(TOPIC_STATS, stats_message(streams={}))


def test_publisher_close_frees_endpoint_for_rebind(ctx):
    with Publisher(RANDOM_PORT, context=ctx) as first:
        endpoint = first.endpoint
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        # libzmq unbinds on its I/O thread after close(); retry briefly rather than sleep a fixed time.
        try:
            Publisher(endpoint, context=ctx).close()
            break
        except PublishError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_subscriber_skips_and_counts_malformed_messages(ctx):
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        port = raw.bind_to_random_port("tcp://127.0.0.1")
        with Subscriber(f"tcp://127.0.0.1:{port}", context=ctx) as subscriber:
            good = encode(TOPIC_STATS, stats_message(streams={}, publish_ts=1.0))
            deadline = time.monotonic() + TIMEOUT_S
            while subscriber.recv(timeout=0.02) is None:
                assert time.monotonic() < deadline, "subscriber never connected"
                raw.send_multipart(good)
            drain(subscriber)
            raw.send_multipart([b"streamtsm.pred.cam0", b"not json"])
            raw.send_multipart([b"streamtsm.pred.cam0"])
            raw.send_multipart([b"streamtsm.pred.cam0", b'{"schema": 99}'])
            raw.send_multipart(good)
            assert subscriber.recv(timeout=TIMEOUT_S) == decode(good)
            assert subscriber.malformed == 3
    finally:
        raw.close(linger=0)


def test_subscriber_recv_times_out_with_none(ctx):
    with Publisher(RANDOM_PORT, context=ctx) as publisher, Subscriber(publisher.endpoint, context=ctx) as subscriber:
        assert subscriber.recv(timeout=0.05) is None


def test_subscriber_rejects_bare_string_topics(ctx):
    with pytest.raises(ValueError, match="list"):
        Subscriber("tcp://127.0.0.1:5556", "streamtsm", context=ctx)


# -- format_message and listen -----------------------------------------------------------------------------


def clock(ts):
    return time.strftime("%H:%M:%S", time.localtime(ts))


def test_format_message_prediction_line():
    message = prediction_message(
        stream_id="cam0", frame_index=120, capture_ts=1000.345, model="m",
        topk=[("arm wrestling", 0.912), ("punching", 0.031)], publish_ts=1000.383,
    )
    line = format_message("streamtsm.pred.cam0", message)
    assert line == f"{clock(1000)}.345 cam0 #120  arm wrestling 0.91 | punching 0.03  (38 ms)"


def test_format_message_onset_and_offset_lines():
    line = format_message("streamtsm.event.cam0", onset(frame=10))
    assert line == f"{clock(10)}.200 cam0 EVENT onset  waving from #8"
    offset = offset_100_to_180()
    line = format_message("streamtsm.event.cam0", offset)
    assert line == f"{clock(12)}.800 cam0 EVENT offset waving #100-#180 (2.7 s)"


def test_format_message_stats_line():
    message = stats_message(
        streams={
            "cam0": {"fps": 29.94, "dropped": 3, "latency_p50_ms": 38.2, "latency_p99_ms": 52.0, "status": "ok"},
            "cam1": {"fps": 0.0, "dropped": 0, "latency_p50_ms": None, "latency_p99_ms": None,
                     "status": "reconnecting"},
        },
        publish_ts=1000.0,
        extra={"published": 1234, "publish_dropped": 0},
    )
    assert format_message(TOPIC_STATS, message) == (
        f"{clock(1000)}.000 STATS cam0 29.9 fps drop 3 lat 38/52 ms ok"
        " | cam1 0.0 fps drop 0 lat -/- ms reconnecting | published=1234 publish_dropped=0"
    )


@pytest.mark.parametrize(
    "payload",
    [{"schema": 1, "type": "heartbeat", "n": 1}, {"schema": 1, "type": "pred", "stream": "cam0"}, {"schema": 1}],
)
def test_format_message_unknown_or_incomplete_falls_back_to_topic_and_json(payload):
    line = format_message("streamtsm.other", payload)
    assert line == "streamtsm.other " + json.dumps(payload, separators=(",", ":"))


def run_listen(endpoint, publisher, payload, **kwargs):
    """Runs listen() in a thread while publishing until it returns; gives (returned count, printed text)."""
    out = io.StringIO()
    result = {}
    thread = threading.Thread(target=lambda: result.update(count=listen(endpoint, out=out, **kwargs)))
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while thread.is_alive() and time.monotonic() < deadline:
        publisher.send(topic_for(TOPIC_PRED, "cam0"), payload)
        thread.join(timeout=0.01)
    thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive(), "listen() did not return"
    return result["count"], out.getvalue()


def test_listen_returns_after_max_messages():
    with Publisher(RANDOM_PORT) as publisher:
        count, text = run_listen(publisher.endpoint, publisher, pred(), topics=["streamtsm"], as_json=False,
                                 max_messages=3, timeout=TIMEOUT_S)
    assert count == 3
    assert text.splitlines() == [format_message("streamtsm.pred.cam0", pred())] * 3


def test_listen_as_json_prints_payload_per_line():
    with Publisher(RANDOM_PORT) as publisher:
        count, text = run_listen(publisher.endpoint, publisher, pred(), topics=["streamtsm.pred"],
                                 as_json=True, max_messages=2, timeout=TIMEOUT_S)
    assert count == 2
    assert [json.loads(line) for line in text.splitlines()] == [pred(), pred()]


def test_listen_returns_after_timeout_without_messages():
    with Publisher(RANDOM_PORT) as publisher:
        out = io.StringIO()
        assert listen(publisher.endpoint, ["streamtsm"], as_json=False, out=out, timeout=0.2) == 0
    assert out.getvalue() == ""


def test_listen_returns_when_stop_is_set():
    stop = threading.Event()
    with Publisher(RANDOM_PORT) as publisher:
        result = {}
        thread = threading.Thread(
            target=lambda: result.update(
                count=listen(publisher.endpoint, ["streamtsm"], as_json=False, out=io.StringIO(), stop=stop)
            )
        )
        thread.start()
        stop.set()
        thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive() and result["count"] == 0


def run_listen_raw(parts, **kwargs):
    """Runs listen() while a bare PUB socket sends ``parts`` (what a foreign or hostile peer may send)."""
    context = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        out = io.StringIO()
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            count=listen(f"tcp://127.0.0.1:{port}", ["streamtsm"], out=out, max_messages=1, timeout=TIMEOUT_S,
                         **kwargs)))
        thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while thread.is_alive() and time.monotonic() < deadline:
            pub.send_multipart(parts)
            thread.join(timeout=0.01)
        thread.join(timeout=TIMEOUT_S)
        assert not thread.is_alive(), "listen() did not return"
    finally:
        pub.close(linger=0)
    return result["count"], out.getvalue()


_HOSTILE = json.dumps({"schema": 1, "type": "pred", "stream": "cam0\n\x1b[2Jcam1", "frame": 1,
                       "capture_ts": 1.0, "topk": [{"label": "wave\r\x07\x85", "score": 0.5}]})


def test_listen_escapes_control_characters_when_it_prints():
    count, text = run_listen_raw([b"streamtsm.pred.cam0", _HOSTILE.encode()], as_json=False)
    assert count == 1 and text.count("\n") == 1
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text and "\x85" not in text
    assert "cam0\\n\\x1b[2Jcam1" in text and "wave\\r\\x07\\x85" in text


@pytest.mark.parametrize("raw", [
    b'{"schema": 1, "type": "stats", "label": "\\ud800 lone", "n": "a\\nb\\u0085"}',
    _HOSTILE.encode(),
])
def test_listen_json_always_writes_one_valid_json_object_per_line(raw):
    count, text = run_listen_raw([b"streamtsm.pred.cam0", raw], as_json=True)
    lines = text.splitlines()
    assert count == 1 and len(lines) == 1 and text.endswith("\n")
    payload = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert payload["schema"] == 1
    text.encode("utf-8")  # printable to any UTF-8 terminal or file
    assert payload == json.loads(raw)


# -- publishing on the publisher's own thread -----------------------------------------------------------------------


def test_publisher_background_sends_from_its_own_thread_in_order(ctx):
    publisher = Publisher(RANDOM_PORT, context=ctx, background=True)
    with Subscriber(publisher.endpoint, context=ctx) as subscriber:
        first_delivery(publisher, subscriber, TOPIC_STATS, stats_message(streams={}))
        drain(subscriber)
        caller = threading.get_ident()
        sending = []
        real_send = publisher._socket.send_multipart

        def spy(parts, **kwargs):
            sending.append(threading.get_ident())
            return real_send(parts, **kwargs)

        publisher._socket.send_multipart = spy
        for i in range(50):
            assert publisher.send(topic_for(TOPIC_PRED, "cam0"), pred(frame=i))
        frames = [payload["frame"] for _, payload in drain(subscriber, quiet_s=0.5)]
        publisher.close()
    assert frames == list(range(50))
    assert len(sending) == 50 and caller not in sending
    assert publisher.dropped == 0


def test_publisher_background_full_queue_drops_and_counts(ctx):
    publisher = Publisher(RANDOM_PORT, context=ctx, background=True, queue_size=3)
    gate = threading.Event()
    real_send = publisher._socket.send_multipart

    def blocked(parts, **kwargs):  # a send that cannot finish yet: the queue fills behind it
        gate.wait(TIMEOUT_S)
        return real_send(parts, **kwargs)

    publisher._socket.send_multipart = blocked
    accepted = [publisher.send(TOPIC_STATS, stats_message(streams={})) for _ in range(10)]
    # One message is in the blocked send or still queued: at most 4 accepted, the rest refused at the queue.
    assert 3 <= sum(accepted) <= 4 and accepted[:3] == [True] * 3
    assert publisher.dropped == 10 - sum(accepted)
    gate.set()
    publisher.close()  # sends what is queued before closing the socket
    assert publisher.sent == sum(accepted) and publisher.sent + publisher.dropped == 10


def test_publisher_background_rejects_a_queue_of_zero(ctx):
    with pytest.raises(ValueError, match="queue_size must be at least 1, got 0"):
        Publisher(RANDOM_PORT, context=ctx, background=True, queue_size=0)
