"""The site config of `streamtsm run --config site.toml`: cameras, their models, and where results go.

::

    [publish]
    endpoint = "tcp://*:5556"          # bind here; or: connect = "tcp://broker:5559"

    [metrics]
    port = 9100                        # optional; addr = "127.0.0.1" by default

    [defaults]                         # any camera key below, plus smooth, topk, threshold, hold, background
    model = "tsm_mobilenetv2_online"
    weights = "models/site.pth"

    [[camera]]
    id = "door"
    source = "rtsp://10.0.0.5/live"    # or a camera index (0), a file, "synthetic"
    frame_stride = 2
    crop = [0, 0, 640, 480]            # x, y, width, height

    [[camera]]
    id = "yard"
    source = 1
    model = "x3d_s"                    # another model: a second group, run side by side
    weights = "models/X3D_S.pyth"      # another model inherits no weights or labels from [defaults]
    clip_stride = 8

Relative paths (``weights``, ``onnx``, ``labels``, a file ``source``) are read from the config file's folder.
A camera takes every key it does not set from ``[defaults]``, except that the keys of a model (``model``,
``weights``, ``onnx``, ``labels``, ``triton_model``) come as one: a camera that names another model (its own
``model``, ``onnx``, ``triton_model`` or ``backend``, or weights that are a catalog name) inherits none of them, so
the site's weights and labels are never loaded into another network. ``weights`` may name a catalog entry
(``streamtsm models``): it is kept as a name unless a file of that name lies beside the config. A camera served by Triton sets ``backend = "triton"``, ``url`` and
``triton_model``.
Cameras with the same model, weights, onnx file, labels, device, providers, backend, url, Triton model and
clip_stride share one batched model call (a group).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .engine.factory import BACKENDS
from .errors import ConfigError, StreamTSMError, first_line
from .hub.catalog import is_entry_name
from .settings import RANGES, RUN_DEFAULTS, check_setting, merge_settings
from .stream_ids import RULE as ID_RULE
from .stream_ids import is_stream_id

if TYPE_CHECKING:
    from .pipeline import ModelGroup

_CAMERA_KEYS = {"id", "source", "model", "weights", "onnx", "labels", "device", "providers", "backend", "url",
                "triton_model", "frame_stride", "crop", "clip_stride"}
# The keys that describe one model: inherited from [defaults] together or not at all (see the module docstring).
_MODEL_KEYS = {"model", "weights", "onnx", "labels", "triton_model"}
_MODEL_IDENTITY_KEYS = {"model", "onnx", "triton_model", "backend"}
_OPTION_KEYS = {"smooth", "topk", "threshold", "hold", "background", "startup_timeout", "keep_trying"}
_TOP_KEYS = {"publish", "metrics", "defaults", "camera"}
_TYPES = {"id": str, "model": str, "weights": str, "onnx": str, "labels": str, "device": str, "providers": str,
          "backend": str, "url": str, "triton_model": str, "frame_stride": int, "clip_stride": int, "smooth": int,
          "topk": int, "hold": int, "threshold": (int, float), "startup_timeout": (int, float), "keep_trying": bool}
# [defaults] keys of the event recordings (run --record-events and its options); record_events is a folder.
_RECORD_KEYS = {"record_events": str, "pre_roll": (int, float), "post_roll": (int, float),
                "record_max_gb": (int, float), "record_max_clip": (int, float)}
_OPTION_KEYS |= set(_RECORD_KEYS)
_TYPES.update(_RECORD_KEYS)
_CAMERA_HEADER = re.compile(r"^\s*\[\[\s*camera\s*\]\]")
_TABLE_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


@dataclass
class CameraConfig:
    id: str
    source: str | int
    model: str | None = None
    weights: str | None = None
    onnx: str | None = None
    labels: str | None = None
    device: str = RUN_DEFAULTS["device"]
    providers: str | None = None
    backend: str = RUN_DEFAULTS["backend"]
    url: str | None = None
    triton_model: str | None = None
    frame_stride: int | None = None  # None: the model's (see streams.effective_frame_stride)
    crop: tuple[int, int, int, int] | None = None
    clip_stride: int = RUN_DEFAULTS["clip_stride"]
    line: int | None = field(default=None, compare=False)  # of its [[camera]] header, for errors

    def model_key(self) -> tuple:
        """Cameras with equal keys share one engine (and one batched call)."""
        return (self.model, self.weights, self.onnx, self.labels, self.device, self.providers, self.backend,
                self.url, self.triton_model)


@dataclass
class SiteConfig:
    """A checked site config. The publisher and metrics fields are None where the file leaves them out, so that
    the command line's defaults apply (see ``streamtsm.cli``)."""

    cameras: list[CameraConfig]
    publish: str | None = None
    connect: str | None = None
    metrics_port: int | None = None
    metrics_addr: str | None = None
    options: dict = field(default_factory=dict)
    path: Path | None = None


class _Locator:
    """Finds the line of a key in the TOML text, for errors that point at it.

    The text is indexed once (:func:`index_lines`): the lines of every table header and of every ``key =`` line, so that
    each question is a lookup, not a scan of the text. A config of 10,000 cameras checks every camera's keys, and a
    scan per key made loading quadratic in the file's size.
    """

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self._camera_headers, self._tables, self._keys = index_lines(text.splitlines())

    def line(self, key: str, camera: int | None = None, table: str | None = None) -> int | None:
        if camera is not None:
            if camera >= len(self._camera_headers):
                return None
            header = self._camera_headers[camera]
            found = self._keys[header].get(key)
            return found + 1 if found is not None else header + 1  # a missing key: point at its [[camera]] header
        if table is not None:
            header = self._tables.get(table)
            if header is None:
                return None
            found = self._keys[header].get(key)
        else:
            found = next((keys[key] for keys in self._keys.values() if key in keys), None)
        return found + 1 if found is not None else None

    def camera_line(self, camera: int) -> int | None:
        """The line of the ``camera``-th ``[[camera]]`` header (0-based index)."""
        return self._camera_headers[camera] + 1 if camera < len(self._camera_headers) else None

    def error(self, message: str, key: str, camera: int | None = None, table: str | None = None) -> ConfigError:
        line = self.line(key, camera, table)
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: {message}")


def index_lines(lines: list[str]) -> tuple[list[int], dict[str, int], dict[int, dict[str, int]]]:
    """One pass over a TOML text's lines: the 0-based lines of the ``[[camera]]`` headers, of the first header of
    each ``[table]``, and for each section (keyed by the line of its header, -1 before any) the first line of each
    ``key =`` in it. What :func:`load_site_config` needs to point an error at its line, built once per file."""
    camera_headers: list[int] = []
    tables: dict[str, int] = {}
    keys: dict[int, dict[str, int]] = {-1: {}}
    section = -1
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith("["):
            section = i
            keys[i] = {}
            if _CAMERA_HEADER.match(line):
                camera_headers.append(i)
            else:
                table = _TABLE_HEADER.match(line)
                if table:
                    tables.setdefault(table.group(1), i)
            continue
        key = _KEY.match(line)
        if key:
            keys[section].setdefault(key.group(1), i)
    return camera_headers, tables, keys


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check a site config; every problem is one ConfigError naming the file, line and key."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        # TOML is UTF-8; "utf-8-sig" also takes the byte-order mark that some Windows editors write first.
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw_bytes[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw_bytes[e.start]:02x} at offset {e.start}); "
                          "save the config as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {first_line(e)}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{path}: not a site config: values nested too deeply") from None
    loc = _Locator(path, text)
    for key in data:
        if key not in _TOP_KEYS:
            raise loc.error(f"unknown key {key!r}; expected {', '.join(sorted(_TOP_KEYS))}", key)

    publish = data.get("publish", {})
    _check_table(loc, publish, "publish", {"endpoint", "connect"})
    if "endpoint" in publish and "connect" in publish:
        raise loc.error("give either publish.endpoint (bind) or publish.connect (broker), not both", "connect",
                        table="publish")
    metrics = data.get("metrics", {})
    _check_table(loc, metrics, "metrics", {"port", "addr"})
    if "port" in metrics:
        try:
            check_setting("metrics_port", metrics["port"], "metrics.port")
        except ConfigError as e:
            raise loc.error(str(e), "port", table="metrics") from None
    if "addr" in metrics and not isinstance(metrics["addr"], str):
        raise loc.error(f"metrics.addr must be a string (an address to bind, e.g. \"127.0.0.1\"), "
                        f"got {metrics['addr']!r}", "addr", table="metrics")
    for key in ("endpoint", "connect"):
        if key in publish and not isinstance(publish[key], str):
            raise loc.error(f"publish.{key} must be a string (a ZeroMQ endpoint), got {publish[key]!r}", key,
                            table="publish")

    defaults = data.get("defaults", {})
    _check_table(loc, defaults, "defaults", (_CAMERA_KEYS - {"id", "source"}) | _OPTION_KEYS)
    for key, value in defaults.items():
        _check_value(loc, key, value, table="defaults")

    cameras_raw = data.get("camera")
    if not isinstance(cameras_raw, list) or not cameras_raw:
        raise ConfigError(f"{path}: no cameras: add at least one [[camera]] table with id and source")
    cameras, ids = [], set()
    for i, raw in enumerate(cameras_raw):
        if not isinstance(raw, dict):  # e.g. camera = [1, 2] instead of [[camera]] tables
            raise loc.error(f"camera {i + 1} must be a [[camera]] table, got {raw!r:.80}", "camera")
        for key in raw:
            if key not in _CAMERA_KEYS:
                raise loc.error(f"camera {i + 1}: unknown key {key!r}; expected {', '.join(sorted(_CAMERA_KEYS))}",
                                key, camera=i)
        for key in ("id", "source"):
            if key not in raw:
                raise loc.error(f"camera {i + 1}: missing {key!r}", key, camera=i)
        inherited = {k: v for k, v in defaults.items() if k in _CAMERA_KEYS}
        # A catalog name as weights names a whole model (architecture, labels, settings) just as `model` does.
        own_entry = is_entry_name(raw.get("weights")) and raw["weights"] != defaults.get("weights")
        if own_entry or any(k in raw and raw[k] != defaults.get(k) for k in _MODEL_IDENTITY_KEYS):
            inherited = {k: v for k, v in inherited.items() if k not in _MODEL_KEYS}
        # The camera's own keys beat [defaults]; what neither sets takes CameraConfig's defaults (RUN_DEFAULTS).
        merged = merge_settings(raw, inherited, names=dict.fromkeys([*inherited, *raw]), defaults={})
        for key, value in merged.items():
            _check_value(loc, key, value, camera=i if key in raw else None,
                         table=None if key in raw else "defaults")
        if not is_stream_id(merged["id"]):
            raise loc.error(f"camera id {merged['id']!r} may only hold {ID_RULE}", "id", camera=i)
        if merged["id"] in ids:
            raise loc.error(f"camera id {merged['id']!r} is used twice", "id", camera=i)
        ids.add(merged["id"])
        if "crop" in merged:
            merged["crop"] = tuple(merged["crop"])
        for key in ("weights", "onnx", "labels", "source"):
            if isinstance(merged.get(key), str):
                # weights may also name a catalog entry: kept as a name unless a file of that name is beside it.
                must_exist = key == "source" or (key == "weights" and is_entry_name(merged[key]))
                merged[key] = _beside(path, merged[key], must_exist=must_exist)
                if key != "source" and Path(merged[key]).is_dir():
                    raise loc.error(f"camera {i + 1}: {key} must name a file, got the folder {merged[key]}", key,
                                    camera=i if key in raw else None, table=None if key in raw else "defaults")
        cameras.append(CameraConfig(**merged, line=loc.camera_line(i)))

    options = {k: v for k, v in defaults.items() if k in _OPTION_KEYS}
    if "record_events" in options:
        options["record_events"] = _beside(path, options["record_events"], must_exist=False)
    return SiteConfig(
        cameras=cameras,
        publish=publish.get("endpoint"),
        connect=publish.get("connect"),
        metrics_port=metrics.get("port"),
        metrics_addr=metrics.get("addr"),
        options=options,
        path=path,
    )


def _beside(config: Path, value: str, *, must_exist: bool) -> str:
    """A relative file path in the config, resolved from the config's folder (as a site's files travel with it);
    absolute paths, URLs and patterns stay as written. With ``must_exist`` it is only resolved when that file exists
    there: a source string can also be a URL, ``synthetic[...]`` or a device name, and weights a catalog name."""
    if "://" in value or value.startswith("synthetic") or Path(value).is_absolute():
        return value
    candidate = config.resolve().parent / value
    if must_exist and not candidate.exists():
        return value
    return str(candidate)


def build_groups(site: SiteConfig, threads: int | None = None) -> list[ModelGroup]:
    """One :class:`~streamtsm.pipeline.ModelGroup` per distinct model of the site's cameras, in file order.

    Args:
        site: a config from :func:`load_site_config`.
        threads: intra-op threads of each engine (default: the engine factory's).

    Raises:
        StreamTSMError: an engine cannot be built; the same kind of error as the factory's, its message prefixed
            with the file, the camera's line and id (the factory speaks of command-line options).
    """
    from .engine.factory import build_engine
    from .pipeline import ModelGroup, StreamSpec

    groups: dict[tuple, ModelGroup] = {}
    try:
        for cam in site.cameras:
            key = cam.model_key() + (cam.clip_stride,)
            if key not in groups:
                providers = cam.providers.split(",") if cam.providers else None
                try:
                    engine = build_engine(model=cam.model, weights=cam.weights, onnx=cam.onnx,
                                          labels_file=cam.labels, device=cam.device, providers=providers,
                                          threads=threads, backend=cam.backend, url=cam.url,
                                          triton_model=cam.triton_model)
                except StreamTSMError as e:
                    where = f"{site.path}:{cam.line}" if cam.line else str(site.path)
                    raise type(e)(f"{where}: camera {cam.id!r}: {e}") from e
                groups[key] = ModelGroup(engine, [], clip_stride=cam.clip_stride)
            groups[key].streams.append(StreamSpec(cam.source, cam.id, frame_stride=cam.frame_stride,
                                                  crop=cam.crop))
    except BaseException:
        for group in groups.values():
            group.engine.close()  # a Triton engine ends its sequences on the server
        raise
    return list(groups.values())


def _check_table(loc: _Locator, value, name: str, allowed: set[str]) -> None:
    if not isinstance(value, dict):
        raise loc.error(f"{name} must be a table", name)
    for key in value:
        if key not in allowed:
            raise loc.error(f"[{name}]: unknown key {key!r}; expected {', '.join(sorted(allowed))}", key, table=name)


def _check_value(loc: _Locator, key: str, value, camera: int | None = None, table: str | None = None) -> None:
    where = f"camera {camera + 1}: " if camera is not None else (f"[{table}] " if table else "")
    expected = _TYPES.get(key)
    if expected is bool and not isinstance(value, bool):
        raise loc.error(f"{where}{key} must be true or false, got {value!r}", key, camera, table)
    if expected not in (None, bool) and (not isinstance(value, expected) or isinstance(value, bool)):
        name = {int: "an integer", str: "a string"}.get(expected, "a number")
        raise loc.error(f"{where}{key} must be {name}, got {value!r}", key, camera, table)
    if key == "source" and not isinstance(value, (str, int)):
        raise loc.error(f"{where}source must be a string or a camera index, got {value!r}", key, camera, table)
    if key in RANGES:  # the same range as the command line's option (streamtsm.settings.RANGES)
        try:
            check_setting(key, value, f"{where}{key}")
        except ConfigError as e:
            raise loc.error(str(e), key, camera, table) from None
    if key == "source" and isinstance(value, int) and not isinstance(value, bool):
        try:
            check_setting("camera", value, f"{where}source")
        except ConfigError as e:
            raise loc.error(str(e), key, camera, table) from None
    if key == "crop" and (not isinstance(value, list) or len(value) != 4
                          or not all(isinstance(v, int) and v >= 0 for v in value) or min(value[2:]) == 0):
        raise loc.error(f"{where}crop must be [x, y, width, height] of non-negative integers, got {value!r}",
                        key, camera, table)
    if key == "backend" and value not in BACKENDS:
        raise loc.error(f"{where}backend must be one of {', '.join(BACKENDS)}, got {value!r}", key, camera, table)
    if key == "background" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise loc.error(f"{where}background must be a list of labels, got {value!r}", key, camera, table)
