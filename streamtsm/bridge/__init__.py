"""Bridges from streamtsm's ZeroMQ results to other messaging systems (``streamtsm bridge ...``).

A bridge is a separate process beside a recognizer or a broker: it subscribes like any client, so the pipeline never
waits on a foreign network. ``mqtt`` imports paho-mqtt, which the ``mqtt`` extra installs.
"""
