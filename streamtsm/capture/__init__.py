"""Capture: sources, the frames they give, the bounded buffer and the thread that connects them.

Typical use::

    source = open_source("videos/sample.mp4")
    buffer = FrameBuffer(capacity=4, policy="wait" if not source.is_live else "drop_oldest")
    thread = CaptureThread(source, stream_name("videos/sample.mp4"), buffer).start()
    while not buffer.finished:
        frame = buffer.pop()
        ...
    thread.join()
"""

from streamtsm.capture.buffer import POLICIES, FrameBuffer
from streamtsm.capture.frame import Frame
from streamtsm.capture.sources import (CameraSource, Source, SyntheticSource, VideoSource, open_source, stream_name,
                                       to_bgr)
from streamtsm.capture.thread import STATUSES, CaptureThread

__all__ = [
    "POLICIES",
    "STATUSES",
    "CameraSource",
    "CaptureThread",
    "Frame",
    "FrameBuffer",
    "Source",
    "SyntheticSource",
    "VideoSource",
    "open_source",
    "stream_name",
    "to_bgr",
]
