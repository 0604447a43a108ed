"""Publishing results over ZeroMQ: the message schema, the publisher and the subscriber side.

See ``streamtsm.publish.schema`` for the wire format.
"""

from streamtsm.publish.publisher import Publisher
from streamtsm.publish.schema import (
    SCHEMA_VERSION,
    TOPIC_EVENT,
    TOPIC_PRED,
    TOPIC_STATS,
    decode,
    encode,
    event_message,
    prediction_message,
    stats_message,
    topic_for,
)
from streamtsm.publish.subscriber import Subscriber, format_message, listen

__all__ = [
    "SCHEMA_VERSION",
    "TOPIC_EVENT",
    "TOPIC_PRED",
    "TOPIC_STATS",
    "Publisher",
    "Subscriber",
    "decode",
    "encode",
    "event_message",
    "format_message",
    "listen",
    "prediction_message",
    "stats_message",
    "topic_for",
]
