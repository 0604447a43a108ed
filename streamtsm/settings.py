"""The settings of ``streamtsm run``: their built-in defaults, written once, and the rule that merges them.

A setting comes from one of three places, the first that gives it winning::

    command line  ──►  site file (``--config``: its [defaults], [publish], [metrics])  ──►  RUN_DEFAULTS

"Gives" means "is not None": the command line's parser leaves every option it was not given at None, and a site
file has no None (TOML cannot write one), so None always means "not said here". The CLI, the site config (a
camera's keys over its ``[defaults]``) and the pipeline's options (:class:`PipelineOptions`, built from the merged
settings) all take their values through :func:`merge_settings` and their defaults from :data:`RUN_DEFAULTS`.

This module imports nothing of the package, so any part of it can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
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


@dataclass
class PipelineOptions:
    """The pipeline's post-processing and run-control settings (see ``streamtsm run --help``); defaults from
    :data:`RUN_DEFAULTS`."""

    smooth: int = RUN_DEFAULTS["smooth"]
    topk: int = RUN_DEFAULTS["topk"]
    threshold: float = RUN_DEFAULTS["threshold"]
    hold: int = RUN_DEFAULTS["hold"]
    background: list[str] = field(default_factory=lambda: list(RUN_DEFAULTS["background"]))
    realtime: bool = RUN_DEFAULTS["realtime"]
    max_frames: int | None = RUN_DEFAULTS["max_frames"]
    duration: float | None = RUN_DEFAULTS["duration"]
    stats_interval: float = RUN_DEFAULTS["stats_interval"]
    startup_timeout: float = RUN_DEFAULTS["startup_timeout"]
    read_timeout: float = RUN_DEFAULTS["read_timeout"]
    backoff: tuple[float, float] = RUN_DEFAULTS["backoff"]

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> PipelineOptions:
        """The options among merged run settings (see :func:`merge_settings`); the names it
        lacks keep their defaults, the others are ignored."""
        values = {f.name: settings[f.name] for f in fields(cls) if settings.get(f.name) is not None}
        if "background" in values:
            values["background"] = list(values["background"])
        return cls(**values)
