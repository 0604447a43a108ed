"""Faults real cameras and networks produce: odd frames mid-stream, a broker that restarts."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from streamtsm.capture import Source
from streamtsm.engine.torch_engine import TorchOnlineEngine
from streamtsm.models import create
from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec
from streamtsm.publish import Publisher, Subscriber
from streamtsm.publish.broker import run_broker
from streamtsm.publish.schema import SCHEMA_VERSION


class OddFramesSource(Source):
    """A live source cycling through what broken cameras send: gray, BGRA, 16-bit, empty, a new resolution."""

    is_live = True
    name = "odd camera"
    fps = 100.0

    def __init__(self):
        self.reads = 0

    def open(self):
        pass

    def read(self):
        self.reads += 1
        time.sleep(0.01)
        kind = self.reads % 6
        if kind == 0:
            return np.zeros((48, 64, 3), np.uint8)
        if kind == 1:
            return np.zeros((48, 64), np.uint8)  # grayscale
        if kind == 2:
            return np.zeros((48, 64, 4), np.uint8)  # BGRA
        if kind == 3:
            return np.zeros((48, 64, 3), np.uint16)  # 16-bit
        if kind == 4:
            return np.zeros((0, 0, 3), np.uint8)  # empty
        return np.zeros((120, 90, 3), np.uint8)  # the resolution changed

    def release(self):
        pass


@pytest.fixture(scope="module")
def engine():
    return TorchOnlineEngine(create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, input_size=32,
                                    resize_size=36))


def test_odd_frames_are_converted_or_counted_and_the_stream_goes_on(engine):
    pipeline = Pipeline(engine, [StreamSpec(OddFramesSource(), "odd"), StreamSpec("synthetic:64x48@50", "ok")],
                        options=PipelineOptions(max_frames=25))
    pipeline.start()
    streams = pipeline.run()["streams"]
    assert streams["odd"]["frames"] == 25 and streams["ok"]["frames"] == 25
    assert streams["odd"]["bad_frames"] >= 1, "empty frames are counted, not processed"
    assert streams["odd"]["step_errors"] == 0


def test_publishers_reach_subscribers_again_after_the_broker_restarts(tmp_path):
    front, back = f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back"

    def start_broker():
        stop, ready = threading.Event(), threading.Event()
        t = threading.Thread(target=run_broker, args=(front, back), kwargs={"stop": stop, "ready": ready})
        t.start()
        assert ready.wait(5)
        return stop, t

    def heard(pub, sub, seconds=10):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pub.send("streamtsm.pred.cam0", {"schema": SCHEMA_VERSION, "type": "pred", "stream": "cam0"})
            if sub.recv(timeout=0.05) is not None:
                return True
        return False

    stop, thread = start_broker()
    pub, sub = Publisher(front, bind=False), Subscriber(back, ["streamtsm"])
    try:
        assert heard(pub, sub)
        stop.set()
        thread.join(5)
        stop, thread = start_broker()  # same endpoints; both sides reconnect on their own
        assert heard(pub, sub), "ZeroMQ reconnects publisher and subscriber to the restarted broker"
    finally:
        stop.set()
        thread.join(5)
        pub.close()
        sub.close()


# `streamtsm run` whose model takes 0.6 s a step and says when a step begins (stderr), for signalling mid-step.
_SLOW_RUN = """
import sys, time
from streamtsm.cli import main
from streamtsm.engine.torch_engine import TorchOnlineEngine
plain = TorchOnlineEngine.step
def slow(self, frames, state):
    print("IN_STEP", file=sys.stderr, flush=True)
    time.sleep(0.6)
    return plain(self, frames, state)
TorchOnlineEngine.step = slow
sys.exit(main(["run", "--source", "synthetic:64x48@30", "--publish", "none", "--model", "tsm_mobilenetv2_online",
               "--threads", "1"]))
"""


def test_sigterm_in_the_middle_of_a_step_finishes_it_and_exits_cleanly():
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        steps = 0
        deadline = time.monotonic() + 60
        while steps < 2 and time.monotonic() < deadline:  # the second step: the pipeline is in its loop
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"run exited early with {proc.returncode}")
            steps += line.startswith("IN_STEP")
        time.sleep(0.2)  # well inside the 0.6 s step
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "IN_STEP" not in err, "no new step starts after the signal"
    assert "frames processed" in out and "status stopped" in out
