"""The ``streamtsm`` command: parses arguments, calls library functions, maps errors to exit codes.

Exit codes: 0 success, 2 bad input (one line on stderr; the traceback only with --debug), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ConfigError, StreamTSMError
from .settings import RUN_DEFAULTS, check_setting, merge_settings
from .stream_ids import check_stream_id, unique_stream_id

if TYPE_CHECKING:
    from .siteconfig import SiteConfig

log = logging.getLogger("streamtsm")

# Commands that may load onnxruntime (an .onnx model to run, or an export to verify).
_ONNXRUNTIME_COMMANDS = ("run", "eval", "export-onnx", "quantize", "export-triton")
# Commands that only list, download or relay messages: they need neither OpenCV nor onnxruntime.
_LIGHT_COMMANDS = ("models", "download", "listen", "broker", "bridge")


def _check_builds(command: str) -> None:
    """OpenCV and onnxruntime come in builds that install the same module, so a plain install has neither: the
    user picks one extra. Say which, in one line, instead of an ImportError's traceback.

    Raises:
        ConfigError: a command needs a module that is not installed.
    """
    if command in _LIGHT_COMMANDS:
        return
    wanted = [("cv2", "OpenCV")] + ([("onnxruntime", "onnxruntime")] if command in _ONNXRUNTIME_COMMANDS[1:] else [])
    missing = [name for module, name in wanted if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"`streamtsm {command}` needs {' and '.join(missing)}, which is not installed: install "
                          "streamtsm with one of its extras, pip install 'streamtsm[cpu]' (a server), "
                          "'streamtsm[gpu]' (NVIDIA GPU) or 'streamtsm[desktop]' (with --show windows)")


def _quiet_native_libraries(command: str, verbose: bool) -> None:
    """Keeps OpenCV's, FFmpeg's and onnxruntime's own messages off the terminal unless ``verbose``.

    They print from C++ straight to stderr, past Python's logging, so a camera that does not open would
    otherwise be a screen of FFmpeg and OpenCV lines around our one-line error. Their levels must be set before
    a capture is opened: the environment variables for a cv2 not imported yet (OpenCV reads them on its first
    log line, FFmpeg when its backend starts), OpenCV's log level for one already imported. A level the user
    set in the environment is kept.
    """
    if verbose:
        return
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    if "cv2" in sys.modules and os.environ["OPENCV_LOG_LEVEL"] == "SILENT":
        import cv2.utils.logging  # OpenCV 4 also has cv2.setLogLevel; 5 only this

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    # onnxruntime takes ~0.4 s to import: only for the commands that may use it, and only where installed.
    if command in _ONNXRUNTIME_COMMANDS and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # errors only


def _cmd_models(args: argparse.Namespace) -> int:
    from .hub import catalog
    from .models import get_spec, list_models

    def table(rows: list[tuple[str, ...]]) -> None:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:  # the last column runs free
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])

    print("architectures (--model NAME):")
    rows = [("name", "kind", "input", "frames", "description")]
    for name in list_models(kind=args.kind):
        spec = get_spec(name)
        d = spec.defaults
        if spec.kind == "online":
            frames = "1/step"
        else:  # a window of clip_len frames, frame_interval apart
            frames = f"{d.get('clip_len', d.get('num_segments', 8))}x{d.get('frame_interval', 1)}"
        rows.append((name, spec.kind, str(d.get("input_size", 224)), frames, spec.description))
    table(rows)

    print("\npublished checkpoints (--weights NAME; downloaded once into the cache):")
    rows = [("name", "architecture", "dataset", "classes", "size", "cached", "published accuracy")]
    for entry in catalog.entries():
        if args.kind and get_spec(entry.arch).kind != args.kind:
            continue
        path = catalog.local_path(entry)
        size = entry.size if entry.size is not None else path.stat().st_size if path.is_file() else None
        cached = "packaged" if entry.packaged else "yes" if path.is_file() else "no"
        rows.append((entry.name, entry.arch, entry.dataset, str(entry.num_classes),
                     "-" if size is None else f"{size / 1e6:.1f} MB", cached, entry.accuracy))
    table(rows)
    return 0


class _AppendSource(argparse.Action):
    """--camera and --source append to one list, keeping the order given (it pairs with --name)."""

    def __call__(self, parser, namespace, value, option_string=None):
        sources = list(getattr(namespace, "sources", None) or [])
        if option_string == "--camera":
            try:
                value = int(value)
            except ValueError:
                raise argparse.ArgumentError(self, f"invalid camera index: {value!r}") from None
        sources.append(value)
        namespace.sources = sources


# Options that describe a camera or its model: with --config the file sets them per camera.
_CAMERA_OPTIONS = {"sources": "--camera/--source", "name": "--name", "model": "--model", "weights": "--weights",
                   "onnx": "--onnx", "backend": "--backend", "url": "--url", "triton_model": "--triton-model",
                   "labels": "--labels", "device": "--device", "providers": "--providers",
                   "frame_stride": "--frame-stride", "clip_stride": "--clip-stride"}


# Numeric options of `run` and `listen`, each checked by the range of its setting (streamtsm.settings.RANGES).
_NUMERIC_OPTIONS = ("max_frames", "duration", "stats_interval", "threshold", "topk", "hold", "smooth",
                    "frame_stride", "clip_stride", "threads", "lanes", "live_buffer", "metrics_port", "max_messages",
                    "timeout", "startup_timeout", "http_port")
# --record-events' numbers; its options need the folder.
_RECORD_OPTIONS = {"pre_roll": "--pre-roll", "post_roll": "--post-roll", "record_max_gb": "--record-max-gb",
                   "record_max_clip": "--record-max-clip"}
_NUMERIC_OPTIONS += tuple(_RECORD_OPTIONS)
# Options that name a file to read: a folder there is refused before anything is loaded.
_FILE_OPTIONS = ("labels", "weights", "onnx", "config")


def check_options(args: argparse.Namespace) -> None:
    """Every value of `run` (or `listen`) checked before anything starts: numbers in range, camera indices, stream
    ids under the rule, files that are not folders.

    Raises:
        ConfigError: one line naming the option, what it takes and what was given.
    """
    for name in _NUMERIC_OPTIONS:
        if getattr(args, name, None) is not None:
            check_setting(name, getattr(args, name), "--" + name.replace("_", "-"))
    for source in getattr(args, "sources", None) or []:
        if isinstance(source, int):
            check_setting("camera", source, "--camera")
    for name in getattr(args, "name", None) or []:
        check_stream_id(name, "--name")
    for name in _FILE_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and Path(value).is_dir():
            raise ConfigError(f"--{name} must name a file, got the folder {value}")


def _groups_from_args(args: argparse.Namespace, settings: dict):
    from .capture import stream_name
    from .engine.factory import build_engine
    from .pipeline import ModelGroup, StreamSpec

    sources = args.sources or ["synthetic"]
    names = list(args.name or [])
    if len(names) > len(sources):
        raise ConfigError(f"{len(names)} --name values for {len(sources)} sources")
    # A source without --name gets its derived id, made unique (two cameras "a/x.mp4", "b/x.mp4" -> x, x-2); the
    # names given are checked by check_options and taken first.
    taken = set(names)
    for src in sources[len(names):]:
        names.append(unique_stream_id(stream_name(src), taken))
        taken.add(names[-1])
    specs = [StreamSpec(src, names[i], frame_stride=args.frame_stride) for i, src in enumerate(sources)]
    providers = args.providers.split(",") if args.providers else None
    engine = build_engine(model=args.model, weights=args.weights, onnx=args.onnx, labels_file=args.labels,
                          device=settings["device"], providers=providers, threads=args.threads,
                          backend=settings["backend"], url=args.url, triton_model=args.triton_model)
    return [ModelGroup(engine, specs, clip_stride=settings["clip_stride"])]


def _demo_model_note(args: argparse.Namespace, settings: dict) -> str | None:
    """The line `run` prints when it falls back to the built-in demo model (no model, weights, ONNX file or server
    named) on a real source: that model knows only the synthetic scene's motions."""
    sources = args.sources or ["synthetic"]
    named = (args.model, args.weights, args.onnx, args.url, args.triton_model)
    if (any(v is not None for v in named) or settings["backend"] not in ("auto", "torch")
            or all(str(src).startswith("synthetic") for src in sources)):
        return None
    return ("streamtsm: note: the built-in demo model knows only the synthetic scene's nine motions; on a camera use "
            "a catalog model, e.g. --weights tsm_mobilenetv2_jester_online (hand gestures) or --weights "
            "x3d_m_kinetics400 (Kinetics actions); `streamtsm models` lists them")


def _refuse_camera_options(args: argparse.Namespace) -> None:
    given = [flag for name, flag in _CAMERA_OPTIONS.items() if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"--config sets the cameras and their models per camera; drop {', '.join(given)} "
                          "(or set them in the file's [defaults] or [[camera]] tables)")


def _output_settings(args: argparse.Namespace, site: SiteConfig | None) -> dict:
    """Every setting of `run` (output, post-processing, model and run control; see :mod:`streamtsm.settings`): the
    command line's, else the site config's, else the built-in defaults. The publisher is one choice, bind or
    connect: made on the command line or in the file."""
    if args.publish is not None and args.connect is not None:
        raise ConfigError(f"give either --publish {args.publish} (bind) or --connect {args.connect} (a broker's "
                          "frontend), not both")
    from_file = {}
    if site is not None:
        from_file = {**site.options, "metrics_port": site.metrics_port, "metrics_addr": site.metrics_addr}
        if args.publish is None and args.connect is None:  # bind and connect are one choice: made here or there
            from_file.update(publish=site.publish, connect=site.connect)
    values = merge_settings(vars(args), from_file)
    if values["connect"]:
        values["publish"] = None
    if args.metrics_addr is not None and values["metrics_port"] is None:
        raise ConfigError(f"--metrics-addr {args.metrics_addr} needs a port: give --metrics-port PORT"
                          + (" or set [metrics] port in the config" if site is not None else ""))
    _check_http(args, values)
    return values


def _check_http(args: argparse.Namespace, values: dict) -> None:
    """--http-addr needs --http-port; the web view and the metrics on one port are one server, on one address."""
    if args.http_addr is not None and values["http_port"] is None:
        raise ConfigError(f"--http-addr {args.http_addr} needs a port: give --http-port PORT")
    if (values["http_port"] is not None and values["http_port"] == values["metrics_port"]
            and values["http_addr"] != values["metrics_addr"]):
        raise ConfigError(f"--http-port and --metrics-port are both {values['http_port']}: one server then serves the "
                          f"page and /metrics, on one address; got --http-addr {values['http_addr']} and "
                          f"--metrics-addr {values['metrics_addr']}")


def _record_dir(args: argparse.Namespace, out: dict):
    """The folder of --record-events, created and checked before anything starts; None when not recording."""
    if out["record_events"] is None:
        given = [flag for name, flag in _RECORD_OPTIONS.items() if getattr(args, name, None) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} need --record-events DIR (the folder recordings go to)")
        return None
    from .sinks.recorder import prepare_record_dir

    return prepare_record_dir(out["record_events"])


def _stop_before_start(signum: int, _frame) -> None:
    """SIGINT/SIGTERM before `run`'s streams start (the interpreter starting, a model loading, a source opening): the
    process ends at once, exit 0; nothing it has opened yet holds anything to keep. Not by raising an exception from
    the handler: one raised while Python code runs inside a C++ call (torch's imports do) aborts the process (C++
    terminate, exit 134)."""
    print("streamtsm: stopped before the streams started", file=sys.stderr, flush=True)
    os._exit(0)


# Set when `run` has ended, everything it opened closed: entry() then ends the process at once (see there). The
# streams whose capture threads were left blocked in a decoder (Pipeline.blocked_streams) are named in a warning.
_run_ended = threading.Event()
_blocked_at_exit: list[str] = []


def _cmd_run(args: argparse.Namespace) -> int:
    check_options(args)
    stop, running = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame) -> None:
        # Ctrl-C and SIGTERM: once the streams run, the loop ends at its next check (within ~50 ms) and everything
        # is joined and closed; before that (a model loading, sources opening) setup is abandoned at once.
        stop.set()
        if not running.is_set():
            _stop_before_start(signum, _frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        return _run(args, stop, running)
    finally:
        _run_ended.set()


def _run(args: argparse.Namespace, stop, running) -> int:
    from .capture import opencv_on_calling_threads
    from .pipeline import Pipeline, PipelineOptions
    from .publish import Publisher
    from .sinks import ConsoleSink

    if args.show:
        from .sinks.display import check_display

        check_display()  # one line and exit 2 without a display, before a model loads or a window opens
    site = None
    if args.config:
        from .siteconfig import load_site_config

        _refuse_camera_options(args)
        site = load_site_config(args.config)
    out = _output_settings(args, site)
    record_dir = _record_dir(args, out)
    if out["output"] is not None:
        from .sinks.video import check_output

        check_output(out["output"], len(site.cameras) if site is not None else len(args.sources or [None]))
    metrics = None
    if out["metrics_port"] is not None:
        from .sinks.metrics import MetricsSink  # before any model is loaded: a missing prometheus-client fails fast

        metrics = MetricsSink()
    if site is not None:
        from .siteconfig import build_groups

        groups = build_groups(site, args.threads)
    else:
        groups = _groups_from_args(args, out)
    options = PipelineOptions.from_settings(out)
    display = publisher = web = recorder = video = None
    sinks = []  # closed in the finally below, in the order made
    servers = []  # the web view's HTTP server, closed first
    try:
        # background: JSON encoding and sends run on the publisher's thread, not between model steps.
        if out["connect"]:
            publisher = Publisher(out["connect"], bind=False, background=True)  # into a broker's frontend
        elif out["publish"] != "none":
            publisher = Publisher(out["publish"], bind=True, background=True)
        if publisher is not None:
            sinks.append(publisher)
        sinks.append(ConsoleSink(quiet=args.quiet))
        if out["http_port"] is not None:
            from .web import WebServer
            from .web.sink import WebSink

            web = WebSink()
            sinks.append(web)
            shared = metrics is not None and out["metrics_port"] == out["http_port"]
            servers.append(WebServer(out["http_port"], out["http_addr"], view=web, what="the web view",
                                     registry=metrics.registry if shared else None).start())
        if metrics is not None:
            if out["metrics_port"] != out["http_port"]:
                metrics.serve(out["metrics_port"], out["metrics_addr"])  # its own server, closed with the sink
            sinks.append(metrics)
        stream_ids = [spec.name or str(spec.source) for g in groups for spec in g.streams]
        # Files wait for a slow writer (nothing lost); live sources would not, so their frames are dropped, counted.
        live = (out["output"] is None and record_dir is None) or _any_live(groups)
        if out["output"] is not None:
            from .sinks.video import video_sink

            video = video_sink(out["output"], stream_ids, live=live, stop=stop)
            sinks.append(video)
        if record_dir is not None:
            from .sinks.recorder import GB, Recorder, RecorderSink

            recorder = RecorderSink(Recorder(record_dir, pre_roll=out["pre_roll"], post_roll=out["post_roll"],
                                             max_bytes=out["record_max_gb"] * GB, max_clip=out["record_max_clip"],
                                             onset_lag=options.hold),
                                    policy="drop_newest" if live else "block", stop=stop)
            sinks.append(recorder)
        if args.show:
            from .sinks.display import display_sink

            # Last, so that the others are closed when its close raises what the window could not do.
            display = display_sink(stop, streams=len(stream_ids))
            sinks.append(display)
        pipeline = Pipeline.from_groups(groups, sinks=sinks, options=options)
        opencv_on_calling_threads()  # the capture threads are the parallelism; see its docstring
        running.set()  # from here a signal only sets stop: start() and run() end promptly and close what is open
        if stop.is_set():
            pipeline.stop()
            return 0
        # The sources open first: a source that cannot be opened is the one line on stderr, no banner before it.
        pipeline.start(stop)
        note = _demo_model_note(args, out) if site is None else None
        if note:
            print(note, file=sys.stderr, flush=True)
        if not args.quiet:  # --quiet: errors, warnings (the note above), where it serves and the final summary
            models = ", ".join(f"{g.engine.model_name} ({g.engine.backend})" for g in groups)
            reach = f", publishing on {endpoint_reach(publisher.endpoint)}" if publisher else ""
            lanes = f" in {pipeline.lanes} lanes" if pipeline.lanes > 1 else ""
            print(f"streamtsm: {models} on {', '.join(pipeline.stream_ids)}{lanes}{reach}", file=sys.stderr,
                  flush=True)
        for server in [*servers, metrics and metrics.server]:
            if server:  # said even with --quiet: an HTTP port someone must know is open
                print(f"streamtsm: serving {_served(server)} at {server.url}", file=sys.stderr, flush=True)
        final = pipeline.run(stop)
    finally:
        for server in servers:
            server.close()
        try:
            for sink in sinks:
                sink.close()
        finally:
            for group in groups:
                group.engine.close()  # a Triton engine ends its sequences on the server
    _print_summary(final)
    if recorder is not None:
        print(recorder.summary())
    if display is not None:
        print(f"display: {display.dropped} frames dropped (the window could not keep up)")
    if web is not None:
        w = web.stats()
        print(f"web view: {w['frames_encoded']} frames encoded; {w['frames_dropped']} frames and "
              f"{w['messages_dropped']} messages dropped for slow clients")
    if video is not None:
        for sid, f in video.target.files.items():
            rate = "" if f.fps is None else f" at {f.fps:.3g} fps"
            print(f"output: {sid}: {f.written} frames written to {f.path}{rate}")
        print(f"output: {video.dropped} frames dropped (the writer could not keep up)")
    _blocked_at_exit[:] = pipeline.blocked_streams
    return 0


def _any_live(groups) -> bool:
    """Whether any stream's source is live (a camera, a network stream, synthetic); a source given as a function
    counts as live (what it makes is not known before it runs)."""
    from .capture import Source, open_source

    for spec in (spec for g in groups for spec in g.streams):
        source = spec.source
        if isinstance(source, Source):
            live = source.is_live
        else:
            live = callable(source) or open_source(source).is_live  # made, not opened: no device is touched
        if live:
            return True
    return False


def _served(server) -> str:
    """What a server of `run` serves, for its line at start."""
    parts = ["the web view"] if server.view is not None else []
    parts += ["/metrics"] if server.registry is not None else []
    return " and ".join(parts) + " (health: /healthz, /readyz)"


def _shown(value, spec: str = "") -> str:
    """A figure of a summary line; "-" for one not measured (None), never the word None."""
    return "-" if value is None else format(value, spec)


def _print_summary(stats: dict) -> None:
    for sid, s in stats["streams"].items():
        p50, p99 = _shown(s["latency_p50_ms"], ".0f"), _shown(s["latency_p99_ms"], ".0f")
        print(f"{sid}: {s['frames']} frames processed, {s['captured']} captured, {s['dropped']} dropped, "
              f"{s['skipped']} skipped, {s['bad_frames']} bad, {s['reconnects']} reconnects, latency p50/p99 "
              f"{p50}/{p99} ms, status {s['status']}" + (f" ({s['last_error']})" if s["last_error"] else ""))
    for name, m in stats["models"].items():
        print(f"{name} ({m['backend']}): {m['steps']} model steps, p50 {_shown(m['step_p50_ms'])} ms, "
              f"mean batch {_shown(m['batch_mean'])}")
    print(f"messages published {stats['published']}, dropped {stats['publish_dropped']}")


def endpoint_reach(endpoint: str) -> str:
    """A bound endpoint and who can reach it, for the start lines of `run` and `broker`.

    Args:
        endpoint: a ZeroMQ endpoint as bound (``tcp://HOST:PORT``, ``ipc://...``).

    Returns:
        The endpoint, followed for a wildcard host by "(every interface: reachable from the network)" and for a
        loopback host by "(loopback: this machine only)"; any other endpoint as given.
    """
    host = endpoint.rpartition(":")[0].removeprefix("tcp://").strip("[]")
    if host in ("*", "0.0.0.0", "::"):
        return f"{endpoint} (every interface: reachable from the network)"
    if host == "localhost" or host == "::1" or host.startswith("127."):
        return f"{endpoint} (loopback: this machine only)"
    return endpoint


def _cmd_broker(args: argparse.Namespace) -> int:
    from .publish.broker import run_broker

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"streamtsm broker: recognizers publish into {endpoint_reach(args.frontend)}, clients subscribe at "
          f"{endpoint_reach(args.backend)}", file=sys.stderr, flush=True)
    run_broker(args.frontend, args.backend, stop=stop)
    return 0


def _cmd_bridge_mqtt(args: argparse.Namespace) -> int:
    from .bridge.mqtt import MqttBridge, MqttOptions, parse_broker_address, run_bridge
    from .publish.publisher import check_endpoint

    check_endpoint(args.connect, bind=False)
    host, port = parse_broker_address(args.mqtt or "127.0.0.1", tls=args.tls)
    # Credentials from the environment keep them out of the process list (and out of a unit file's ExecStart).
    options = MqttOptions(
        host=host, port=port, prefix=args.prefix, tls=args.tls, cafile=args.cafile,
        username=args.username or os.environ.get("STREAMTSM_MQTT_USERNAME") or None,
        password=args.password or os.environ.get("STREAMTSM_MQTT_PASSWORD") or None,
        predictions_per_second=args.predictions_per_second, homeassistant=args.homeassistant,
        discovery_prefix=args.discovery_prefix, buffer=args.mqtt_buffer)
    bridge = MqttBridge(options)  # checks the options and reads a --cafile, before anything is said or started
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"streamtsm bridge: {args.connect} -> MQTT {host}:{port}{' (TLS)' if args.tls else ''} under "
          f"{options.prefix}/", file=sys.stderr, flush=True)
    run_bridge(args.connect, bridge, stop=stop)
    return 0


def _cmd_listen(args: argparse.Namespace) -> int:
    from .publish import listen

    check_options(args)
    listen(args.connect, args.topic or ["streamtsm"], as_json=args.json, out=sys.stdout,
           max_messages=args.max_messages, timeout=args.timeout, status=None if args.quiet else sys.stderr)
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .hub import catalog
    from .hub.download import checkpoints_dir, home

    target = Path(args.to) if args.to else None
    for name in args.names:  # every name checked before the first download, so a typo costs no transfer
        catalog.get_entry(name)
    for name in args.names:
        entry = catalog.get_entry(name)
        path = catalog.fetch(entry, home=target, progress=not args.quiet and sys.stderr.isatty())
        print(f"{entry.name}: {path}")
    if target is not None:
        print(f"copy {target} to the site and set STREAMTSM_HOME={target} there (its files are in "
              f"{checkpoints_dir(target)}); streamtsm then uses them without a network")
    elif not args.quiet:
        print(f"cache: {home()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamtsm", description="Streaming action recognition for live cameras.")
    parser.add_argument("--version", action="version", version=f"streamtsm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the architectures and the published checkpoints of the catalog")
    p.add_argument("--kind", choices=["online", "clip"], help="only models of this kind")
    p.set_defaults(func=_cmd_models)

    d = RUN_DEFAULTS
    p = sub.add_parser("run", help="recognize actions live and publish the results on ZeroMQ",
                       description="Recognize actions live. With no source, runs on the built-in synthetic scene.")
    src = p.add_argument_group("sources (repeatable, in order)")
    src.add_argument("--camera", action=_AppendSource, metavar="N", help="OpenCV camera index")
    src.add_argument("--source", action=_AppendSource, metavar="SRC",
                     help="video file, rtsp:// or http:// URL, image pattern (img_%%05d.jpg), or synthetic[:WxH@FPS]")
    src.add_argument("--name", action="append", help="stream id of the source in the same position")
    src.add_argument("--frame-stride", type=int, metavar="K",
                     help="feed every k-th frame (default: the stride an online model was trained with, else 1)")
    src.add_argument("--realtime", action="store_true", help="play files at their native fps, not as fast as possible")
    src.add_argument("--live-buffer", type=int, metavar="N",
                     help="frames a live source holds for the model; when a frame comes and N wait, the oldest is "
                          f"dropped and counted (default: {d['live_buffer']})")
    src.add_argument("--config", help="site config (TOML) listing cameras, models and the publisher; options "
                     "given here override its values, camera and model options are refused")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="registered model name (see `streamtsm models`); default: the shipped demo model")
    m.add_argument("--weights", help="checkpoint (streamtsm, official TSM, mmaction2)")
    m.add_argument("--onnx", help="run an exported .onnx file on onnxruntime (no torch needed)")
    m.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "triton"],
                   help="auto (default): triton with --url, onnxruntime with --onnx, else torch")
    m.add_argument("--url", metavar="HOST:PORT", help="Triton server's gRPC endpoint (e.g. localhost:8001)")
    m.add_argument("--triton-model", metavar="NAME", help="the model's name on the Triton server (see export-triton)")
    m.add_argument("--labels", help="class names, one per line")
    m.add_argument("--device", help=f"torch device: cpu, cuda, cuda:N (default: {d['device']})")
    m.add_argument("--providers", help="onnxruntime providers, comma-separated: tensorrt,cuda,cpu")
    m.add_argument("--clip-stride", type=int, metavar="K",
                   help=f"clip models: predict every k-th frame (default: {d['clip_stride']})")
    m.add_argument("--threads", type=int, help="model threads (default: all cores but one, leaving one for capture)")
    m.add_argument("--lanes", type=int, metavar="N",
                   help="split the streams into N lanes, each stepping its streams' batches on a thread of its own "
                        "(models on this machine's CPU; default: 2 on a 2-core machine, else 1)")
    o = p.add_argument_group("output")
    o.add_argument("--publish", metavar="ENDPOINT",
                   help=f"ZeroMQ PUB endpoint to bind, or 'none' (default: {d['publish']})")
    o.add_argument("--connect", metavar="ENDPOINT",
                   help="publish into a broker's frontend (e.g. tcp://broker:5559) instead of binding")
    o.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    o.add_argument("--metrics-addr", metavar="ADDR",
                   help=f"address for --metrics-port (default: {d['metrics_addr']}, loopback)")
    o.add_argument("--http-port", type=int, metavar="PORT",
                   help="serve the live web view (every stream's annotated video, top-k, events, stats; /healthz, "
                        "/readyz) on this port; the same port as --metrics-port also serves /metrics")
    o.add_argument("--http-addr", metavar="ADDR",
                   help=f"address for --http-port (default: {d['http_addr']}, loopback)")
    o.add_argument("--smooth", type=int, metavar="K", help=f"average the last K logits (default: {d['smooth']})")
    o.add_argument("--topk", type=int, metavar="K", help=f"classes per prediction (default: {d['topk']})")
    o.add_argument("--threshold", type=float,
                   help=f"minimum smoothed score for an action event (default: {d['threshold']})")
    o.add_argument("--hold", type=int, metavar="M",
                   help=f"steps a class must hold to start or end an action (default: {d['hold']})")
    o.add_argument("--background", action="append", metavar="LABEL",
                   help="label that never starts an action (repeatable; given ones replace the config's)")
    o.add_argument("--stats-interval", type=float, metavar="S",
                   help=f"seconds between stats messages (default: {d['stats_interval']})")
    o.add_argument("--show", action="store_true",
                   help="show each stream in a window with its predictions drawn on (q or Esc quits)")
    o.add_argument("--output", metavar="PATH",
                   help="write the annotated video to PATH (.mp4 or .avi; {stream} in it is replaced by the stream "
                        "id, needed with several streams); at a file's own fps, at the processed rate for live "
                        "sources")
    o.add_argument("--quiet", action="store_true", help="print only the final summary")
    r = p.add_argument_group("event recordings")
    r.add_argument("--record-events", metavar="DIR",
                   help="for each action, write a clip (from --pre-roll before its onset to --post-roll after its "
                        "offset), a JPEG snapshot of its first frame and a JSON sidecar of its events into "
                        "DIR/<stream>/; the offset message names the clip and snapshot (relative to DIR)")
    r.add_argument("--pre-roll", type=float, metavar="S",
                   help=f"seconds of video before an action's onset (default: {d['pre_roll']:g})")
    r.add_argument("--post-roll", type=float, metavar="S",
                   help=f"seconds of video after an action's offset (default: {d['post_roll']:g})")
    r.add_argument("--record-max-gb", type=float, metavar="GB",
                   help=f"keep DIR's recordings under this size, the oldest removed first (default: "
                        f"{d['record_max_gb']:g})")
    r.add_argument("--record-max-clip", type=float, metavar="S",
                   help=f"longest clip in seconds; a longer action is cut there (default: {d['record_max_clip']:g})")
    c = p.add_argument_group("run control")
    c.add_argument("--max-frames", type=int, help="stop each stream after this many processed frames")
    c.add_argument("--duration", type=float, help="stop after this many seconds")
    c.add_argument("--startup-timeout", type=float, metavar="S",
                   help=f"seconds a single source may take to open before run gives up (default: "
                        f"{d['startup_timeout']:g}); with several sources, one that is down is retried while the "
                        "others run")
    c.add_argument("--keep-trying", action="store_const", const=True,
                   help="a single source that does not open is retried with back-off instead of failing")
    p.set_defaults(func=_cmd_run, sources=None)

    p = sub.add_parser("broker", help="relay many recognizers to many subscribers (ZeroMQ XSUB/XPUB proxy)")
    # Loopback by default, as `run --publish`: `--frontend tcp://*:5559 --backend tcp://*:5560` serves the network.
    p.add_argument("--frontend", default="tcp://127.0.0.1:5559",
                   help="where recognizers publish (run --connect here; default: %(default)s, this machine only)")
    p.add_argument("--backend", default="tcp://127.0.0.1:5560",
                   help="where clients subscribe (listen --connect here; default: %(default)s, this machine only)")
    p.set_defaults(func=_cmd_broker)

    p = sub.add_parser("bridge", help="republish results on another messaging system (mqtt)")
    bridges = p.add_subparsers(dest="bridge", required=True, metavar="SYSTEM")
    b = bridges.add_parser("mqtt", help="republish events, current actions and (capped) predictions on MQTT",
                           description="Subscribe to a recognizer (or a broker's backend) and republish on an MQTT "
                                       "broker: <prefix>/<stream>/event (QoS 1), <prefix>/<stream>/action (retained), "
                                       "<prefix>/<stream>/pred, <prefix>/stats, <prefix>/status (online/offline).")
    b.add_argument("--connect", default="tcp://127.0.0.1:5556", help="endpoint of the publisher or broker backend "
                   "(default: tcp://127.0.0.1:5556)")
    b.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker (default: 127.0.0.1:1883, 8883 with --tls)")
    b.add_argument("--username", help="MQTT user name (or STREAMTSM_MQTT_USERNAME)")
    b.add_argument("--password", help="MQTT password (better: STREAMTSM_MQTT_PASSWORD, which ps does not show)")
    b.add_argument("--tls", action="store_true", help="connect with TLS, verifying the broker's certificate")
    b.add_argument("--cafile", metavar="PATH", help="CA certificates for --tls (default: the system's)")
    b.add_argument("--prefix", default="streamtsm", help="first topic level(s) (default: streamtsm)")
    b.add_argument("--predictions-per-second", type=float, default=0.0, metavar="R",
                   help="republish at most R predictions per second per stream (default: 0, none)")
    b.add_argument("--buffer", dest="mqtt_buffer", type=int, default=1000, metavar="N",
                   help="events kept while the MQTT broker is away; beyond, the oldest are dropped (default: 1000)")
    b.add_argument("--homeassistant", action="store_true",
                   help="publish Home Assistant MQTT discovery configs (an action sensor per stream)")
    b.add_argument("--discovery-prefix", default="homeassistant",
                   help="Home Assistant's discovery prefix (default: homeassistant)")
    b.set_defaults(func=_cmd_bridge_mqtt)

    p = sub.add_parser("download", help="fetch catalog checkpoints into the cache (or --to DIR for another machine)",
                       description="Download and verify catalog checkpoints (see `streamtsm models`) ahead of use, "
                                   "e.g. for a site without internet.")
    p.add_argument("names", nargs="+", metavar="NAME", help="catalog entry names")
    p.add_argument("--to", metavar="DIR", help="a folder to use as STREAMTSM_HOME elsewhere (default: this "
                                                "machine's cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("listen", help="print the messages a recognizer publishes")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", help="endpoint of the publisher or broker")
    p.add_argument("--topic", action="append", help="topic prefix to subscribe to (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print raw JSON payloads, one per line")
    p.add_argument("--max-messages", type=int, help="exit after this many messages")
    p.add_argument("--timeout", type=float, help="exit when no message arrives for this many seconds")
    p.add_argument("--quiet", action="store_true", help="print the messages only (no waiting line on stderr)")
    p.set_defaults(func=_cmd_listen)

    from .export.commands import add_commands as add_export_commands
    from .train.commands import add_commands as add_train_commands

    add_export_commands(sub)
    add_train_commands(sub)
    _add_global_options(parser, GLOBAL_DEFAULTS)
    for command in dict.fromkeys(sub.choices.values()):
        _add_global_options(command, None)
    return parser


# The global options and their values when given nowhere.
GLOBAL_DEFAULTS = {"debug": False, "log_level": "WARNING", "offline": False}


def _add_global_options(p: argparse.ArgumentParser, defaults: dict | None) -> None:
    """The global options, on the main parser and on every command's, so they are taken before the command
    (``streamtsm --debug run``) and after it (``streamtsm run --debug``).

    The main parser holds the defaults (``defaults``); a command's parser has none (None: SUPPRESS), so it sets a
    value only when the option follows the command, and then that value wins over one given before it."""
    def default(name: str):
        return argparse.SUPPRESS if defaults is None else defaults[name]

    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--debug", action="store_true", default=default("debug"), help="show tracebacks for errors")
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=default("log_level"),
                   help=f"log level (default: {GLOBAL_DEFAULTS['log_level']})")
    g.add_argument("--offline", action="store_true", default=default("offline"),
                   help="never touch the network: catalog checkpoints come from the cache only "
                        "(same as STREAMTSM_OFFLINE=1)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run" and signal.getsignal(signal.SIGTERM) is _stop_before_start:
        # Only `run` takes a stop for its normal end; the others are interrupted as any program is (Ctrl-C: 130).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.offline:
        os.environ["STREAMTSM_OFFLINE"] = "1"  # read by every download, in this process and the ones it starts
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _quiet_native_libraries(args.command, verbose=args.debug or args.log_level == "DEBUG")
        _check_builds(args.command)
        return func(args)
    except StreamTSMError as e:
        if args.debug:
            raise
        print(f"streamtsm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The `streamtsm` command. When `run` has ended, it has closed everything it opened (sinks, files, engines; the
    publisher discards what is queued anyway), so the process ends at once with its exit code, its output flushed,
    without the interpreter's clean-up: on a loaded machine that takes seconds (torch's and OpenCV's teardown) where
    a stop must take under one, and a capture thread still blocked inside a decoder (a stalled network camera) would
    be torn down under it and abort the process (C++ terminate, exit 134)."""
    # From the first moment, so that a stop while the interpreter starts (imports, the command line) is a clean
    # exit, not a death by signal; main() gives the other commands Python's defaults back, `run` its own handlers.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_before_start)
    code = main()
    if _run_ended.is_set():
        if _blocked_at_exit:
            log.warning("leaving %d capture thread(s) blocked in a decoder (%s)", len(_blocked_at_exit),
                        ", ".join(_blocked_at_exit))
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
