"""The ``--output`` video: each stream's predicted frames with the overlay drawn on, written to a file.

One file per stream, named by the path given with ``{stream}`` replaced by the stream's id; the container follows
the extension (:data:`CODECS`: ``.mp4`` as MPEG-4 Part 2, ``.avi`` as Motion JPEG, both written by OpenCV without
extra libraries). The file plays at the rate the frames were taken:

- from a file, the file's own frame rate over the frame stride (frame ``i`` of a file sits at ``i / fps``, which is
  each frame's ``media_ts``), so the output lasts as long as the input;
- from a live source, the rate at which frames were processed, measured on the capture times of the first
  :data:`RATE_FRAMES` frames (at most :data:`RATE_SECONDS` of them; the median gap, so a slow first model step
  does not count), so the output plays in real time. A source whose rate changes later plays faster or slower.

Until the rate is decided the first frames wait in memory (a few frames). Writing can block (a disk), so
:func:`video_sink` runs the writer behind an :class:`~streamtsm.sinks.annotated.AnnotatingSink`. Its policy follows
the sources: from live sources ``drop_newest`` (a file keeps its frames in order, and what the writer cannot keep up
with is counted, never a model step delayed: the camera would not wait); when every source is a file, ``block``
(every processed frame is written: a file processed faster than the writer encodes waits for it, as the file can;
a stop still ends the wait at once). ``close()`` writes what is queued and closes each file (so it plays after a
stop, SIGTERM included).
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from streamtsm.errors import ConfigError
from streamtsm.overlay import annotate
from streamtsm.sinks.annotated import AnnotatingSink, ViewedFrame

log = logging.getLogger(__name__)

# Container by extension -> FourCC of the codec written into it.
CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
STREAM_FIELD = "{stream}"
RATE_FRAMES = 10  # live sources: frames whose capture times decide the rate
RATE_SECONDS = 2.0  # ... or fewer, once they span this long
FALLBACK_FPS = 30.0  # a rate nothing tells (a file of one frame, a live source that gave one frame)
MIN_FPS, MAX_FPS = 1.0, 240.0  # what a written rate is kept within (players refuse rates far outside)
FRAMES_PER_STREAM = 16  # the writer's queue, per stream
CLOSE_TIMEOUT = 10.0  # seconds close() gives the writer to finish the queue and close the files


def output_path(template: str, stream_id: str) -> Path:
    """The file of stream ``stream_id``: ``template`` with ``{stream}`` replaced by the id."""
    return Path(template.replace(STREAM_FIELD, stream_id))


def check_output(template: str, streams: int, option: str = "--output") -> None:
    """Checks an output path before anything starts: a known extension, ``{stream}`` when there are several
    streams, not a folder, and a parent folder that exists and can be written (the part of it before any
    ``{stream}``; see :func:`check_output_paths` for the rest).

    Raises:
        ConfigError: one line naming the option, what it takes and what was given.
    """
    suffix = Path(template).suffix.lower()
    if suffix not in CODECS:
        raise ConfigError(f"{option} must end in {' or '.join(CODECS)} (the container), got {template!r}")
    if streams > 1 and STREAM_FIELD not in template:
        raise ConfigError(f"{option} must contain {STREAM_FIELD} with {streams} streams (one file each, e.g. "
                          f"out-{STREAM_FIELD}{suffix}), got {template!r}")
    parts = Path(template).parts
    fixed = next((i for i, part in enumerate(parts) if STREAM_FIELD in part), len(parts))
    if fixed == len(parts):
        _check_file(Path(template), option)
    elif fixed < len(parts) - 1:  # {stream} names a folder: the part above it must exist
        _check_folder(Path(*parts[:fixed]) if fixed else Path("."), option)
    else:
        _check_folder(Path(template).parent, option)


def check_output_paths(paths: dict[str, Path], option: str = "--output") -> None:
    """Checks each stream's file: distinct, not a folder, in a folder that exists and can be written.

    Raises:
        ConfigError: one line naming the option, the stream and the file.
    """
    seen: dict[Path, str] = {}
    for sid, path in paths.items():
        key = path.resolve()
        if key in seen:
            raise ConfigError(f"{option} gives streams {seen[key]!r} and {sid!r} the same file {path}")
        seen[key] = sid
        _check_file(path, f"{option} (stream {sid!r})")


def _check_file(path: Path, option: str) -> None:
    if path.is_dir():
        raise ConfigError(f"{option} must name a video file, got the folder {path}")
    _check_folder(path.parent, option)


def _check_folder(folder: Path, option: str) -> None:
    where = folder if str(folder) else Path(".")
    if not where.is_dir():
        raise ConfigError(f"{option} must be in a folder that exists, got {where}"
                          + (" (a file)" if where.exists() else ""))
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} must be in a folder this user can write to, got {where}")


@dataclass
class _StreamFile:
    """One stream's file: the frames waiting for the rate, then the open writer."""

    path: Path
    pending: list[tuple[np.ndarray, ViewedFrame]] = field(default_factory=list)
    writer: cv2.VideoWriter | None = None
    size: tuple[int, int] | None = None  # (width, height) of the file
    fps: float | None = None
    written: int = 0


def decide_rate(frames: list, final: bool = False) -> float | None:
    """The frame rate to write ``frames`` at (see the module docstring), or None while it cannot be told yet.

    Args:
        frames: the stream's first frames (:class:`~streamtsm.capture.Frame`), in order.
        final: no more frames will come: decide with what there is.
    """
    if not frames:
        return None
    if frames[0].media_ts is not None:  # a file: its fps over the stride
        if len(frames) < 2 and not final:
            return None
        known = [f for f in frames if f.media_ts and f.index > 0]
        if not known:
            return FALLBACK_FPS
        native = known[-1].index / known[-1].media_ts
        gaps = [b.index - a.index for a, b in zip(frames, frames[1:]) if b.index > a.index]
        return min(MAX_FPS, max(MIN_FPS, native / (min(gaps) if gaps else 1)))
    span = frames[-1].timestamp - frames[0].timestamp
    if len(frames) < RATE_FRAMES and span < RATE_SECONDS and not final:
        return None
    gaps = [b.timestamp - a.timestamp for a, b in zip(frames, frames[1:]) if b.timestamp > a.timestamp]
    if not gaps:
        return FALLBACK_FPS
    return min(MAX_FPS, max(MIN_FPS, 1.0 / statistics.median(gaps)))


class VideoWriter:
    """Writes each stream's annotated frames to its file; its ``on_step`` takes a
    :class:`~streamtsm.sinks.annotated.ViewedFrame` (see :func:`video_sink`), on the writer's thread.

    Args:
        paths: each stream's file.

    Attributes:
        files: per stream, its file's path, rate (``fps``, None until decided) and frames ``written``.
    """

    def __init__(self, paths: dict[str, Path]) -> None:
        self.files = {sid: _StreamFile(Path(path)) for sid, path in paths.items()}

    def on_message(self, topic: str, payload: dict) -> None:
        pass

    def on_step(self, item: ViewedFrame) -> None:
        sid = item.result.stream_id
        f = self.files.get(sid)
        if f is None:
            return  # a stream not asked for
        image = annotate(item.result.frame.image, item.view)
        if f.writer is None:
            f.pending.append((image, item))
            self._open_when_rate_known(sid, f, final=False)
        else:
            self._write(f, image)

    def _open_when_rate_known(self, sid: str, f: _StreamFile, final: bool) -> None:
        fps = decide_rate([item.result.frame for _, item in f.pending], final=final)
        if fps is None:
            return
        height, width = f.pending[0][0].shape[:2]
        codec = CODECS[f.path.suffix.lower()]
        writer = cv2.VideoWriter(str(f.path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
        if not writer.isOpened():
            f.pending.clear()
            raise ConfigError(f"--output: OpenCV cannot write {f.path} ({codec} in {f.path.suffix}, {width}x{height} "
                              f"at {fps:g} fps); is its video writer (FFmpeg) available?")
        f.writer, f.size, f.fps = writer, (width, height), fps
        log.info("%s: writing %s at %.3g fps", sid, f.path, fps)
        pending, f.pending = f.pending, []
        for image, _ in pending:
            self._write(f, image)

    def _write(self, f: _StreamFile, image: np.ndarray) -> None:
        if (image.shape[1], image.shape[0]) != f.size:
            # A source that came back at another resolution: the file keeps its first size.
            image = cv2.resize(image, f.size, interpolation=cv2.INTER_AREA)
        f.writer.write(image)
        f.written += 1

    def close(self) -> None:
        """Writes the frames still waiting for a rate, and closes every file."""
        error = None
        for sid, f in self.files.items():
            try:
                if f.writer is None and f.pending:
                    self._open_when_rate_known(sid, f, final=True)
            except Exception as e:  # noqa: BLE001 - the other files are still closed; the first error is raised
                error = error or e
            finally:
                if f.writer is not None:
                    f.writer.release()
                    f.writer = None
        if error is not None:
            raise error


def video_sink(template: str, stream_ids: list[str], option: str = "--output", *, live: bool = True,
               stop: threading.Event | None = None) -> AnnotatingSink:
    """The ``--output`` video as a sink: the overlay kept from every message, and a :class:`VideoWriter` on its
    own thread behind a queue of ``FRAMES_PER_STREAM`` frames per stream; the writer is the returned sink's
    ``target``.

    Args:
        template: the path given (see :func:`output_path`).
        stream_ids: the streams, one file each.
        option: names the option in errors.
        live: whether any source is live: ``drop_newest`` then, else ``block`` (see the module docstring).
        stop: the run's stop event, which ends a ``block`` wait.

    Raises:
        ConfigError: the path does not suit the streams (see :func:`check_output` and :func:`check_output_paths`).
    """
    check_output(template, len(stream_ids), option)
    paths = {sid: output_path(template, sid) for sid in stream_ids}
    check_output_paths(paths, option)
    return AnnotatingSink(VideoWriter(paths), maxsize=FRAMES_PER_STREAM * max(1, len(stream_ids)),
                          policy="drop_newest" if live else "block", close_timeout=CLOSE_TIMEOUT, name="output",
                          stop=stop)
