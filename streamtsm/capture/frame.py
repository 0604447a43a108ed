"""The unit of data that flows from a capture thread to the inference loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


# eq=False: frames compare by identity; comparing pixel arrays field by field would be ambiguous and slow.
@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded frame of one stream.

    Attributes:
        stream_id: Short id of the stream the frame belongs to (see ``stream_name``).
        index: 0-based position of the frame among all frames decoded from the source by its capture thread,
            counting frames skipped by the stride, dropped by the buffer or rejected as bad. It keeps growing
            across reconnects, so it is unique and increasing within a stream.
        timestamp: Capture time, ``time.time()`` taken right after the decode returned.
        image: H x W x 3 uint8 image in BGR order (OpenCV's).
        generation: Incremented every time the source is reopened (reconnect or restart); the model state of the
            stream must be reset when it changes.
        media_ts: For a file or image sequence with a known frame rate, the frame's position in it in seconds
            (the number of images decoded before it since the source was opened, over the source's fps); None
            for live sources, which have no position, and for files whose fps is unknown.
        tensor: The image already preprocessed for the stream's model (float32 ``[3, S, S]``), made by the capture
            thread when it was given the model's preprocessing, so that this per-frame work runs on the capture
            threads, side by side with the model step, instead of in the model's thread; None when not made there.
    """

    stream_id: str
    index: int
    timestamp: float
    image: np.ndarray = field(repr=False)
    generation: int = 0
    media_ts: float | None = None
    tensor: np.ndarray | None = field(default=None, repr=False)
