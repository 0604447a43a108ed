"""The settings of ``streamtsm run``: their built-in defaults, written once, and the rule that merges them.

A setting comes from one of three places, the first that gives it winning::

    command line  ──►  site file (``--config``: its [defaults], [publish], [metrics])  ──►  RUN_DEFAULTS

"Gives" means "is not None": the command line's parser leaves every option it was not given at None, and a site
file has no None (TOML cannot write one), so None always means "not said here". The CLI, the site config (a
camera's keys over its ``[defaults]``) and the pipeline's options (:class:`PipelineOptions`, built from the merged
settings) all take their values through :func:`merge_settings` and their defaults from :data:`RUN_DEFAULTS`.

Each numeric setting's range is written once, in :data:`RANGES`; :func:`check_setting` applies it to a value from
the command line or from a site file alike, before anything starts.

This module imports nothing of the package but its errors, so any part of it can use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

RUN_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    # output
    # ZeroMQ endpoint to bind; "none" publishes nothing. Loopback, like the metrics: results reach the network only
    # when asked (`--publish tcp://*:5556`, as the container images do inside their own network).
    "publish": "tcp://127.0.0.1:5556",
    "metrics_addr": "127.0.0.1",  # loopback: metrics are not served to the network unless asked
    "http_addr": "127.0.0.1",  # the web view: loopback too, for the same reason
    "stats_interval": 1.0,  # seconds between stats messages
    "output": None,  # annotated video file ("{stream}" replaced by each stream's id); None writes none
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
    "startup_timeout": 15.0,  # seconds a single source may take to open (a site's cameras are waited for forever)
    "keep_trying": False,  # a single source that does not open: keep retrying instead of failing at the timeout
    "read_timeout": 5.0,
    "backoff": (0.5, 8.0),
    "lanes": None,  # threads stepping the streams' batches; None: the machine's (see streamtsm.pipeline.default_lanes)
    # Frames a live source holds for the model; beyond, the oldest is dropped (counted). Two, so that a step that
    # comes late by up to a frame period (a core taken away for a moment) catches the missed frame up in the next
    # step instead of losing it: an online model's cached folds assume consecutive frames.
    "live_buffer": 2,
    # event recordings (--record-events)
    "record_events": None,  # a folder; None records nothing
    "pre_roll": 2.0,  # seconds of video before an action's onset
    "post_roll": 2.0,  # seconds after its offset
    "record_max_gb": 10.0,  # the folder's recordings are kept under this, the oldest removed first
    "record_max_clip": 120.0,  # seconds; a longer action is cut (memory holds an action's frames until written)
})


@dataclass(frozen=True)
class Range:
    """The values a numeric setting takes: ``kind`` (int or float), ``low`` to ``high``, the low end open or not.
    ``high`` is a sanity bound: beyond it a value is a typo or an attack, not a setting (and some would overflow
    or allocate without end further in)."""

    kind: type
    low: float
    high: float
    low_open: bool = False  # True: ``low`` itself is refused (a duration of 0 s means nothing)
    high_open: bool = False  # True: ``high`` itself is refused (a dropout of 1 keeps nothing)
    meaning: str = ""  # what the value is, for the message

    def describe(self) -> str:
        kind = "an integer" if self.kind is int else "a number"
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        high = f"< {self.high:g}" if self.high_open else f"<= {self.high:g}"
        return f"{low} and {high} ({kind}" + (f", {self.meaning})" if self.meaning else ")")


_DAY = 86400.0
# One range per numeric setting, used by the command line and the site config alike.
RANGES: Mapping[str, Range] = MappingProxyType({
    "camera": Range(int, 0, 1023, meaning="an OpenCV camera index"),
    "smooth": Range(int, 1, 10_000, meaning="logits averaged"),
    "topk": Range(int, 1, 10_000, meaning="classes per prediction"),
    "threshold": Range(float, 0.0, 1.0, meaning="a probability"),
    "hold": Range(int, 1, 10_000, meaning="steps"),
    "frame_stride": Range(int, 1, 10_000),
    "clip_stride": Range(int, 1, 10_000),
    "threads": Range(int, 1, 4096),
    "lanes": Range(int, 1, 256, meaning="threads stepping the streams' batches"),
    "live_buffer": Range(int, 1, 64, meaning="frames held per live source"),
    "max_frames": Range(int, 1, 10**12),
    "duration": Range(float, 0.0, 365 * _DAY, low_open=True, meaning="seconds"),
    "stats_interval": Range(float, 0.0, _DAY, low_open=True, meaning="seconds"),
    "startup_timeout": Range(float, 0.0, _DAY, low_open=True, meaning="seconds"),
    "metrics_port": Range(int, 1, 65535, meaning="a TCP port"),
    "http_port": Range(int, 1, 65535, meaning="a TCP port"),
    # listen's
    "max_messages": Range(int, 1, 10**12),
    "timeout": Range(float, 0.0, 365 * _DAY, low_open=True, meaning="seconds"),
    # event recordings: the rolls and the clip are held in memory (JPEG), so they are bounded
    "pre_roll": Range(float, 0.0, 300.0, meaning="seconds"),
    "post_roll": Range(float, 0.0, 300.0, meaning="seconds"),
    "record_max_gb": Range(float, 0.0, 1_000_000.0, low_open=True, meaning="gigabytes"),
    "record_max_clip": Range(float, 0.0, 3600.0, low_open=True, meaning="seconds"),
    # bridge mqtt's
    "mqtt_port": Range(int, 1, 65535, meaning="a TCP port"),
    "predictions_per_second": Range(float, 0.0, 1000.0, meaning="per stream; 0: none"),
    "mqtt_buffer": Range(int, 1, 1_000_000, meaning="events kept while the MQTT broker is away"),
    # export-onnx, export-triton, quantize
    "input_size": Range(int, 16, 4096, meaning="pixels"),
    "num_classes": Range(int, 1, 100_000),
    "opset": Range(int, 9, 23, meaning="an ONNX opset torch can export"),
    "calib_frames": Range(int, 1, 100_000, meaning="frames"),
    "max_batch_size": Range(int, 1, 4096),
    "idle_timeout": Range(float, 0.0, 365 * _DAY, low_open=True, meaning="seconds"),
    "max_sequences": Range(int, 1, 1_000_000),
    "queue_delay": Range(float, 0.0, 60_000.0, meaning="milliseconds"),
    "instances": Range(int, 1, 1024),
    # train, eval (and their data options)
    "epochs": Range(int, 1, 100_000),
    "batch_size": Range(int, 1, 65_536),
    "lr": Range(float, 0.0, 10.0, low_open=True, meaning="a learning rate"),
    "momentum": Range(float, 0.0, 1.0, high_open=True),
    "weight_decay": Range(float, 0.0, 1.0),
    "lr_steps": Range(int, 1, 100_000, meaning="epochs"),
    "warmup_epochs": Range(float, 0.0, 100_000.0, meaning="epochs"),
    "clip_grad": Range(float, 0.0, 1e9, meaning="a gradient norm, 0 disables"),
    "frame_loss": Range(int, 0, 10_000, meaning="frames"),
    "matched_warmup": Range(int, 0, 100_000, meaning="epochs"),
    "seed": Range(int, 0, 2**32 - 1),
    "num_segments": Range(int, 1, 1024),
    "resize_size": Range(int, 16, 8192, meaning="pixels"),
    "width_mult": Range(float, 0.0, 16.0, low_open=True),
    "width": Range(int, 1, 4096, meaning="channels"),
    "dropout": Range(float, 0.0, 1.0, high_open=True, meaning="a probability"),
    "start_index": Range(int, 0, 10**9),
    "clip_len": Range(int, 1, 1024, meaning="frames"),
    "frame_interval": Range(int, 1, 1024, meaning="frames"),
    "workers": Range(int, 0, 256, meaning="processes"),
    "num_clips": Range(int, 1, 1000),
    "avg_last": Range(int, 1, 10_000, meaning="frames"),
    # synth
    "clips_per_class": Range(int, 1, 1_000_000),
    "frames": Range(int, 2, 100_000, meaning="frames per clip"),
    "motion_frames": Range(int, 2, 100_000, meaning="frames"),
    "val_fraction": Range(float, 0.0, 1.0, high_open=True, meaning="a fraction"),
    "fps": Range(float, 0.0, 1000.0, low_open=True, meaning="frames per second"),
    "background_contrast": Range(float, 0.0, 1.0),
})


def check_setting(name: str, value: Any, where: str | None = None) -> Any:
    """``value`` if it lies in the range of setting ``name`` (see :data:`RANGES`), else a one-line ConfigError.

    Args:
        name: the setting, e.g. ``"smooth"``; a name without a range passes any value.
        value: the value given (None passes: not given).
        where: how the message names it, e.g. ``"--smooth"`` or ``"site.toml:4: [defaults] smooth"``;
            default: the name.

    Raises:
        ConfigError: the value is of another type, not finite, or out of range; the message says what was
            expected and what was given.
    """
    rule = RANGES.get(name)
    if rule is None or value is None:
        return value
    where = where or name
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (rule.kind is int and not isinstance(value, int)):
        raise ConfigError(f"{where} must be {rule.describe()}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be {rule.describe()}, got {value!r}")
    too_low = value <= rule.low if rule.low_open else value < rule.low
    too_high = value >= rule.high if rule.high_open else value > rule.high
    if too_low or too_high:
        raise ConfigError(f"{where} must be {rule.describe()}, got {value!r}")
    return value


def check_settings(values: Mapping[str, Any], names: Iterable[str]) -> None:
    """:func:`check_setting` on each of ``names`` in ``values`` (a command's parsed options, ``vars(args)``), each
    named by its option (``batch_size`` -> ``--batch-size``); a list (``nargs``) is checked item by item.

    Raises:
        ConfigError: the first value out of its range.
    """
    for name in names:
        value = values.get(name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            check_setting(name, item, "--" + name.replace("_", "-"))


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
    keep_trying: bool = RUN_DEFAULTS["keep_trying"]
    read_timeout: float = RUN_DEFAULTS["read_timeout"]
    backoff: tuple[float, float] = RUN_DEFAULTS["backoff"]
    lanes: int | None = RUN_DEFAULTS["lanes"]
    live_buffer: int = RUN_DEFAULTS["live_buffer"]

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> PipelineOptions:
        """The options among merged run settings (see :func:`merge_settings`); the names it
        lacks keep their defaults, the others are ignored."""
        values = {f.name: settings[f.name] for f in fields(cls) if settings.get(f.name) is not None}
        if "background" in values:
            values["background"] = list(values["background"])
        return cls(**values)
