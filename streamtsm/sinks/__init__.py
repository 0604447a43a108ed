"""Where results go: every output of the pipeline is a sink (see :mod:`streamtsm.sinks.base`).

- :mod:`.base`: the ``Sink`` protocol, ``StepReport``, ``QueuedSink`` (a blocking sink on its own thread) and
  ``CallbackSink`` (plain functions);
- :mod:`.console`: the lines ``streamtsm run`` prints;
- :mod:`.metrics`: Prometheus metrics (needs the ``metrics`` extra, so it is imported on its own);
- :mod:`.annotated`: the front of the sinks that draw the overlay (:mod:`streamtsm.overlay`) on each frame;
- :mod:`.display`: the ``--show`` window (imported on its own: only ``--show`` opens windows);
- :mod:`.video`: the ``--output`` video file.

The ZeroMQ :class:`~streamtsm.publish.Publisher` is a sink too.
"""

from streamtsm.sinks.base import (
    DROP_POLICIES,
    CallbackSink,
    QueuedSink,
    Sink,
    StepReport,
    StepSink,
    StreamResult,
    wants_steps,
)
from streamtsm.sinks.console import ConsoleSink

__all__ = [
    "DROP_POLICIES",
    "CallbackSink",
    "ConsoleSink",
    "QueuedSink",
    "Sink",
    "StepReport",
    "StepSink",
    "StreamResult",
    "wants_steps",
]
