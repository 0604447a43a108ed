"""The settings of ``streamtsm run``: their built-in defaults, written once, and the rule that merges them.

A setting comes from one of three places, the first that gives it winning::

    command line  ──►  site file (``--config``: its [defaults], [publish], [metrics])  ──►  RUN_DEFAULTS

"Gives" means "is not None": the command line's parser leaves every option it was not given at None, and a site
file has no None (TOML cannot write one), so None always means "not said here". The CLI, the site config (a
camera's keys over its ``[defaults]``) and the pipeline's options all take their values through
:func:`merge_settings` and their defaults from :data:`RUN_DEFAULTS`.

This module imports nothing of the package, so any part of it can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

RUN_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    # output
    "publish": "tcp://*:5556",  # ZeroMQ endpoint to bind; "none" publishes nothing
    "metrics_addr": "127.0.0.1",  # loopback: metrics are not served to the network unless asked
    "stats_interval": 1.0,  # seconds between stats messages
    # post-processing
    "smooth": 8,
    "topk": 5,
    "threshold": 0.0,
    "hold": 3,
    "background": (),
    # model
    "device": "cpu",
    "backend": "auto",
    "clip_stride": 1,
    # run control
    "realtime": False,
    "max_frames": None,
    "duration": None,
    "startup_timeout": 15.0,
    "read_timeout": 5.0,
    "backoff": (0.5, 8.0),
})


def merge_settings(*layers: Mapping[str, Any] | None, names: Iterable[str] | None = None,
                   defaults: Mapping[str, Any] = RUN_DEFAULTS) -> dict[str, Any]:
    """Each setting's value from the first layer that gives it (not None), else its default.

    Args:
        layers: the sources of values, the strongest first (e.g. the command line's, then the site file's); a None
            layer is skipped.
        names: the settings wanted; default: every name of ``defaults`` and of the layers.
        defaults: the values when no layer gives one (a name without a default gets None).

    Returns:
        ``{name: value}`` for every name.
    """
    given = [layer for layer in layers if layer is not None]
    if names is None:
        names = dict.fromkeys([*defaults, *(name for layer in given for name in layer)])
    merged = {}
    for name in names:
        merged[name] = next((layer[name] for layer in given if layer.get(name) is not None), defaults.get(name))
    return merged
