"""Capture: sources, the frames they give, the bounded buffer, the thread that connects them, and the supervised
stream that owns a thread and its buffer and replaces a hung reader (what the pipeline holds per stream).

Typical use of the parts::

    source = open_source("videos/sample.mp4")
    buffer = FrameBuffer(capacity=4, policy="wait" if not source.is_live else "drop_oldest")
    thread = CaptureThread(source, stream_name("videos/sample.mp4"), buffer).start()
    while not buffer.finished:
        frame = buffer.pop()
        ...
    thread.join()

or, supervised (buffer policy chosen from the source, a hung reader replaced on ``poll()``)::

    capture = StreamCapture("rtsp://10.0.0.5/live", "door").start()
    while not capture.finished:
        capture.poll()
        frame = capture.pop()
        ...
"""

from streamtsm.capture.buffer import POLICIES, FrameBuffer
from streamtsm.capture.frame import Frame
from streamtsm.capture.sources import (CameraSource, Source, SyntheticSource, VideoSource, open_source, stream_name,
                                       to_bgr)
from streamtsm.capture.supervisor import (TRANSITIONS, StatusTransitionError, StreamCapture, StreamStatus,
                                          check_transition)
from streamtsm.capture.thread import STATUSES, CaptureThread, opencv_on_calling_threads

__all__ = [
    "POLICIES",
    "STATUSES",
    "TRANSITIONS",
    "CameraSource",
    "CaptureThread",
    "Frame",
    "FrameBuffer",
    "Source",
    "StatusTransitionError",
    "StreamCapture",
    "StreamStatus",
    "SyntheticSource",
    "VideoSource",
    "check_transition",
    "open_source",
    "opencv_on_calling_threads",
    "stream_name",
    "to_bgr",
]
