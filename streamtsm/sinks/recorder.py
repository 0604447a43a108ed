"""Event recordings (``run --record-events DIR``): for each action, a clip from ``pre_roll`` seconds before its
onset to ``post_roll`` seconds after its offset, a JPEG snapshot of its first frame, and a JSON sidecar holding its
event messages.

::

    Pipeline ─► Fanout ── offset message + {"clip", "snapshot"} (RecordingNames: a pure function of the onset)
                   │
                   └─► RecorderSink ══ bounded queue ══► thread ──► Recorder
                       (drop_newest live, block for files)              ├ per stream: ring of JPEG frames
                                                                        │   (the pre-roll, nothing more)
                                                                        ├ actions in progress: an open video writer
                                                                        │   each (.part), fed as frames arrive
                                                                        └ DIR/<stream>/<stem>.mp4 .jpg .json
                                                                          (oldest removed past max_bytes)

The paths go into the offset message, which the pipeline builds before any sink has seen it, so they cannot come
from the recorder: :class:`RecordingNames` derives them from what the onset already says (stream, first frame, its
capture time), and the recorder uses the same names when it writes. The paths are relative to DIR, with ``/``
separators: a consumer on another machine, or in a container that mounts DIR elsewhere, joins them to its own view
of DIR. A path in a message promises nothing: the clip may not have been written (a full disk, frames the queue
dropped) or may have been removed since by the disk cap.

Streaming: a clip is encoded as its frames arrive, not at its end. At the onset the recorder opens the clip's video
writer (under a ``.part`` name) and writes the pre-roll from the ring; each later frame is written as it comes,
held back only ``onset_lag`` frames (an offset is decided that many frames after the action's last one, so those
may still fall past the post-roll and must not be written), until the post-roll has passed. Finishing a clip, at
its end or at a stop, is then only those few frames, the writer's release, the rename, the snapshot and the
sidecar: a stop mid-action is prompt however long the action has lasted.

Memory: frames are held JPEG-encoded, per stream only as far back as the pre-roll (plus the ``onset_lag`` frames by
which an onset is decided after its first frame), and per action in progress the ``onset_lag`` frames not yet
written and its snapshot; a clip holds at most ``max_clip`` seconds, an action that lasts longer is cut there (the
sidecar's ``end`` says ``"max_clip"``) and its sidecar gets the offset when it comes. Disk: after each recording,
the oldest recordings in DIR (clip, snapshot and sidecar together) are removed until the total is under
``max_bytes``; the newest is always kept.

Times: a frame's time is its position in its file (``media_ts``) when it has one, else its capture time, and the
clip plays at the rate its frames were taken at in that time: a file's clip at the file's rate (over the frame
stride), a live clip at the rate the frames were processed, measured over the stream's ring (the pre-roll) when
the clip's writer opens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from streamtsm.errors import ConfigError
from streamtsm.publish.schema import TOPIC_EVENT, finite_or_null
from streamtsm.sinks.base import QueuedSink, StepReport

if TYPE_CHECKING:
    from streamtsm.postprocess import ActionEvent

log = logging.getLogger(__name__)

CLIP_SUFFIX, SNAPSHOT_SUFFIX, SIDECAR_SUFFIX = ".mp4", ".jpg", ".json"
_SUFFIXES = (CLIP_SUFFIX, SNAPSHOT_SUFFIX, SIDECAR_SUFFIX)
# <stream>-<UTC time of the first frame, ms>-f<its index>: sorts by time within a stream, and a file whose name does
# not match is never touched by the disk cap (DIR may hold other things).
_STEM = re.compile(r"^[A-Za-z0-9_-]+-\d{8}T\d{6}\.\d{3}Z-f\d+$")
# The fastest frame rate the frame-count bounds are sized for: they hold when timestamps do not (a source whose clock
# stands still), so memory stays bounded whatever the times say.
MAX_FPS = 120
JPEG_QUALITY = 90
GB = 1e9
CLOSE_TIMEOUT = 2.0  # seconds RecorderSink.close() waits: the queue's items and a few frames per open clip


class RecordingNames:
    """The paths of an action's recording, a function of (stream id, first frame index, its capture time) only.

    Both the pipeline (adding them to the offset message) and the recorder (writing the files) call it, with the
    same values from the onset, so the names agree without the two talking.

    Args:
        root: DIR, where recordings go.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stem(self, stream_id: str, start_frame: int, start_ts: float) -> str:
        """``<stream>/<stream>-YYYYmmddTHHMMSS.fffZ-f<start_frame>``, relative to ``root``."""
        # Rounded as the wire rounds it (6 digits), so the onset's payload and its ActionEvent give the same name.
        ms = math.floor(round(float(start_ts), 6) * 1000)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
        return f"{stream_id}/{stream_id}-{stamp}-f{int(start_frame)}"

    def paths(self, stream_id: str, start_frame: int, start_ts: float) -> dict[str, str]:
        """The fields the offset message gets: ``clip`` and ``snapshot``, relative to ``root``."""
        stem = self.stem(stream_id, start_frame, start_ts)
        return {"clip": stem + CLIP_SUFFIX, "snapshot": stem + SNAPSHOT_SUFFIX}


def prepare_record_dir(path: str | Path, option: str = "--record-events") -> Path:
    """DIR made ready before anything starts: created if missing, refused if it is a file or cannot be written.

    Raises:
        ConfigError: one line naming the option, what it needs and what it got.
    """
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{option} must name a folder, got the file {path}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option}: cannot create the folder {path} ({e.strerror or e})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} must name a folder this process can write in, got {path} (permission denied)")
    return root


@dataclass(frozen=True)
class _Held:
    """A frame as the recorder holds it: encoded."""

    index: int
    t: float  # media time if the frame has one, else capture time
    jpeg: bytes


@dataclass
class _Recording:
    stream_id: str
    stem: str
    start_frame: int
    clip_start: float  # first time the clip takes (onset - pre_roll)
    onset: dict
    # Frames taken into the clip but not written yet: the raw image when the recorder has it (frames arriving), None
    # for the ring's (decoded from the JPEG).
    pending: deque[tuple[_Held, np.ndarray | None]]
    taken: int = 0  # frames taken into the clip (written or pending): what max_clip counts
    snapshot: _Held | None = None  # the action's first frame, once seen
    clip: _ClipWriter | None = None
    fps: float | None = None
    written: int = 0
    first: _Held | None = None  # the first frame written
    last_t: float | None = None  # time of the last frame written
    dead: bool = False  # the clip could not be written (counted once in ``failed``); its frames are let go
    offset: dict | None = None
    clip_end: float | None = None  # last time the clip takes (offset + post_roll), once the offset is known


@dataclass
class _Stream:
    ring: deque[_Held] = field(default_factory=deque)
    active: list[_Recording] = field(default_factory=list)
    last_t: float | None = None


def _ring_rate(ring: deque[_Held]) -> float | None:
    """The rate the ring's frames were taken at (frames per second of their times), None with fewer than two."""
    if len(ring) < 2:
        return None
    span = ring[-1].t - ring[0].t
    return (len(ring) - 1) / span if span > 0 else 1.0  # a clock that stood still: one frame a second


def _event_time(payload: dict, which: str) -> float:
    media = payload.get(f"{which}_media_ts")
    return float(media if media is not None else payload[f"{which}_ts"])


class Recorder:
    """Writes a clip, a snapshot and a sidecar per action; a sink that blocks on disk (run it behind a queue:
    :class:`RecorderSink`).

    Args:
        root: DIR (see :func:`prepare_record_dir`).
        pre_roll: seconds of video kept before an action's first frame.
        post_roll: seconds kept after its last frame.
        max_bytes: the recordings in ``root`` are kept under this many bytes, the oldest removed first.
        max_clip: seconds one clip holds at most; a longer action is cut there.
        onset_lag: model steps by which an onset is decided after the action's first frame (the detector's
            ``hold``): the ring keeps that many frames beyond the pre-roll, so the pre-roll is whole.

    Attributes:
        written: recordings written.
        removed: recordings removed by the disk cap (earlier runs' included).
        failed: recordings (or sidecar updates) that could not be written; the first failure is logged.
        missed: offsets whose onset the recorder never saw (dropped by the queue), so nothing was recorded.
    """

    def __init__(self, root: str | Path, *, pre_roll: float = 2.0, post_roll: float = 2.0,
                 max_bytes: float = 10 * GB, max_clip: float = 120.0, onset_lag: int = 3) -> None:
        self.names = RecordingNames(root)
        self.root = self.names.root
        self.pre_roll = float(pre_roll)
        self.post_roll = float(post_roll)
        self.max_bytes = float(max_bytes)
        self.max_clip = float(max_clip)
        self.onset_lag = int(onset_lag)
        self.ring_cap = math.ceil(self.pre_roll * MAX_FPS) + self.onset_lag + 1
        self.clip_cap = math.ceil(self.max_clip * MAX_FPS) + 1
        self.written = self.removed = self.failed = self.missed = 0
        self._streams: dict[str, _Stream] = {}
        # Recordings cut at max_clip whose offset is still to come: (stream, start_frame) -> (stem, sidecar data).
        self._awaiting_offset: dict[tuple[str, int], tuple[str, dict]] = {}
        self._units = self._scan()  # stem -> (mtime, bytes), oldest first

    # -- sink interface -----------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: dict) -> None:
        if payload.get("type") != "event":
            return
        if payload.get("event") == "onset":
            self._onset(payload)
        elif payload.get("event") == "offset":
            self._offset(payload)

    def on_step(self, step: StepReport) -> None:
        for result in step.results:
            frame = result.frame
            t = frame.media_ts if frame.media_ts is not None else frame.timestamp
            self._frame(result.stream_id, frame.index, float(t), frame.image)

    def close(self) -> None:
        """Finishes every recording still open (the run ended mid-action or mid post-roll: ``end`` ``run_ended``).

        Prompt: each open clip has only its last ``onset_lag`` frames left to encode.
        """
        for sid, stream in self._streams.items():
            for rec in list(stream.active):
                self._finish(stream, rec, "run_ended")

    # -- what the recorder holds --------------------------------------------------------------------------------

    def frames_held(self) -> int:
        """Encoded frames in memory (the rings and the frames of the actions in progress not yet written; a frame
        in both counts once)."""
        held = {id(h) for s in self._streams.values() for h in s.ring}
        held.update(id(h) for s in self._streams.values() for rec in s.active for h, _ in rec.pending)
        return len(held)

    def frames_unwritten(self) -> int:
        """Frames taken into the clips in progress and not encoded yet: what a stop still has to encode."""
        return sum(len(rec.pending) for s in self._streams.values() for rec in s.active)

    def disk_bytes(self) -> int:
        """Bytes of the recordings in DIR, as the disk cap counts them."""
        return sum(size for _, size in self._units.values())

    # -- events and frames --------------------------------------------------------------------------------------

    def _onset(self, payload: dict) -> None:
        sid, start_frame = payload["stream"], int(payload["start_frame"])
        stream = self._streams.setdefault(sid, _Stream())
        if any(rec.start_frame == start_frame for rec in stream.active):
            return
        clip_start = _event_time(payload, "start") - self.pre_roll
        stem = self.names.stem(sid, start_frame, payload["start_ts"])
        frames = [h for h in stream.ring if h.t >= clip_start]
        rec = _Recording(sid, stem, start_frame, clip_start, payload, deque((h, None) for h in frames),
                         taken=len(frames), snapshot=next((h for h in frames if h.index >= start_frame), None))
        stream.active.append(rec)
        # The ring's frames all come before the action's last frame (an onset is decided within the action), so no
        # offset can cut them: the pre-roll is written now.
        self._write_pending(stream, rec, keep=0)

    def _offset(self, payload: dict) -> None:
        sid, start_frame = payload["stream"], int(payload["start_frame"])
        stream = self._streams.setdefault(sid, _Stream())
        rec = next((r for r in stream.active if r.start_frame == start_frame and r.offset is None), None)
        if rec is not None:
            rec.offset = payload
            rec.clip_end = _event_time(payload, "end") + self.post_roll
            if stream.last_t is not None and stream.last_t > rec.clip_end:
                self._finish(stream, rec, "post_roll")
            else:
                self._write_pending(stream, rec, keep=0)  # every frame so far is inside the post-roll
            return
        cut = self._awaiting_offset.pop((sid, start_frame), None)
        if cut is not None:
            stem, sidecar = cut
            if stem in self._units:  # not removed by the disk cap meanwhile
                sidecar["offset"] = payload
                self._write_sidecar(stem, sidecar)
            return
        self.missed += 1

    def _frame(self, sid: str, index: int, t: float, image: np.ndarray) -> None:
        stream = self._streams.setdefault(sid, _Stream())
        if stream.last_t is not None and t < stream.last_t:
            # The timeline restarted (a file played again): what is held belongs to another time.
            for rec in list(stream.active):
                self._finish(stream, rec, "timeline_restarted")
            stream.ring.clear()
        stream.last_t = t
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            return
        held = _Held(int(index), t, buf.tobytes())
        ring = stream.ring
        ring.append(held)
        # The pre-roll is measured back from the newest frame that can still turn out to be an action's first frame
        # (onset_lag frames back): an onset arrives that many steps after it.
        anchor = ring[max(0, len(ring) - 1 - self.onset_lag)].t
        while len(ring) > self.ring_cap or (len(ring) > self.onset_lag + 1 and ring[0].t < anchor - self.pre_roll):
            ring.popleft()
        for rec in list(stream.active):
            if rec.clip_end is not None and t > rec.clip_end:
                self._finish(stream, rec, "post_roll")
                continue
            if rec.offset is None and (t - rec.clip_start > self.max_clip or rec.taken >= self.clip_cap):
                self._finish(stream, rec, "max_clip")
                continue
            rec.pending.append((held, image))
            rec.taken += 1
            if rec.snapshot is None and held.index >= rec.start_frame:
                rec.snapshot = held
            # Until the offset is known, the newest onset_lag frames may still fall past the post-roll.
            self._write_pending(stream, rec, keep=self.onset_lag if rec.clip_end is None else 0)

    # -- writing ------------------------------------------------------------------------------------------------

    def _write_pending(self, stream: _Stream, rec: _Recording, keep: int, final: bool = False) -> None:
        """Encodes the clip's pending frames but the newest ``keep``, opening its writer first if it is not open
        (once the rate can be told: ``final``, the clip ends, decides it with what there is)."""
        while len(rec.pending) > keep and not rec.dead:
            if rec.clip is None and not self._open_clip(stream, rec, final):
                return
            held, image = rec.pending.popleft()
            if image is None:
                image = cv2.imdecode(np.frombuffer(held.jpeg, np.uint8), cv2.IMREAD_COLOR)
                if image is None:
                    continue
            try:
                rec.clip.write(image)
            except cv2.error as e:
                self._fail(rec.stem, str(e))
                rec.dead = True
                break
            rec.written += 1
            rec.first = rec.first or held
            rec.last_t = held.t
        if rec.dead:
            rec.pending.clear()

    def _open_clip(self, stream: _Stream, rec: _Recording, final: bool) -> bool:
        fps = _ring_rate(stream.ring)
        if fps is None:
            if not final:
                return False  # one frame so far: the next tells the rate
            fps = 1.0
        held, image = rec.pending[0]
        if image is None:
            image = cv2.imdecode(np.frombuffer(held.jpeg, np.uint8), cv2.IMREAD_COLOR)
        try:
            if image is None:
                raise ValueError("a held frame does not decode")
            clip = self.root / (rec.stem + CLIP_SUFFIX)
            clip.parent.mkdir(parents=True, exist_ok=True)
            rec.clip = _ClipWriter(clip, fps, image.shape[1], image.shape[0])
        except (OSError, cv2.error, ValueError) as e:
            self._fail(rec.stem, str(e))
            rec.dead = True
            return False
        rec.fps = fps
        return True

    def _finish(self, stream: _Stream, rec: _Recording, end: str) -> None:
        stream.active.remove(rec)
        if rec.clip_end is not None:
            rec.pending = deque(p for p in rec.pending if p[0].t <= rec.clip_end)
        self._write_pending(stream, rec, keep=0, final=True)
        if rec.dead:
            if rec.clip is not None:
                rec.clip.abort()
            _remove_unit(self.root, rec.stem)
            return
        if rec.written == 0:
            if rec.clip is not None:
                rec.clip.abort()
            self._fail(rec.stem, "no frames were held for it (the queue dropped them)")
            return
        snapshot = rec.snapshot or rec.first  # the action's first frame, else (dropped) the clip's first
        try:
            rec.clip.finish()
            _write_atomic(self.root / (rec.stem + SNAPSHOT_SUFFIX), snapshot.jpeg)
        except (OSError, cv2.error, ValueError) as e:
            self._fail(rec.stem, str(e))
            _remove_unit(self.root, rec.stem)  # no clip without its snapshot, no snapshot without its clip
            return
        fps = rec.fps
        sidecar = {
            "stream": rec.stream_id,
            "clip": rec.stem + CLIP_SUFFIX,
            "snapshot": rec.stem + SNAPSHOT_SUFFIX,
            "snapshot_frame": snapshot.index,
            "time_base": "media" if rec.onset.get("start_media_ts") is not None else "capture",
            "clip_start": round(rec.first.t, 6),
            "clip_end": round(rec.last_t, 6),
            "frames": rec.written,
            "fps": round(fps, 3),
            "pre_roll": self.pre_roll,
            "post_roll": self.post_roll,
            # post_roll: whole; max_clip: the action was cut (longer than max_clip); run_ended: the run or stream
            # stopped first; timeline_restarted: the source's times went back (a file played again).
            "end": end,
            "onset": rec.onset,
            "offset": rec.offset,
        }
        self._units[rec.stem] = (time.time(), _unit_bytes(self.root, rec.stem))  # counted by the cap from here
        if not self._write_sidecar(rec.stem, sidecar):
            self._enforce_cap()
            return
        if end == "max_clip":
            self._awaiting_offset[(rec.stream_id, rec.start_frame)] = (rec.stem, sidecar)
        self.written += 1
        self._enforce_cap()

    def _write_sidecar(self, stem: str, sidecar: dict) -> bool:
        try:
            _write_atomic(self.root / (stem + SIDECAR_SUFFIX),
                          json.dumps(finite_or_null(sidecar), indent=1, allow_nan=False).encode("utf-8"))
        except (OSError, ValueError) as e:
            self._fail(stem, str(e))
            return False
        mtime, _ = self._units.get(stem, (time.time(), 0))
        self._units[stem] = (mtime, _unit_bytes(self.root, stem))
        return True

    def _fail(self, stem: str, reason: str) -> None:
        self.failed += 1
        if self.failed == 1:
            log.warning("recorder: cannot write %s (%s); the run goes on, further failures are only counted",
                        self.root / stem, reason)

    def _enforce_cap(self) -> None:
        total = self.disk_bytes()
        while total > self.max_bytes and len(self._units) > 1:
            stem, (_, size) = next(iter(self._units.items()))
            del self._units[stem]
            _remove_unit(self.root, stem)
            total -= size
            self.removed += 1
            log.info("recorder: removed %s (recordings over %.3g GB)", stem, self.max_bytes / GB)

    def _scan(self) -> dict[str, tuple[float, int]]:
        """The recordings already in DIR (earlier runs'), oldest first: the disk cap counts them too."""
        units: dict[str, tuple[float, int]] = {}
        for path in self.root.glob("*/*"):
            if path.suffix not in _SUFFIXES or not _STEM.match(path.stem):
                continue
            stem = f"{path.parent.name}/{path.stem}"
            try:
                st = path.stat()
            except OSError:
                continue
            mtime, size = units.get(stem, (0.0, 0))
            units[stem] = (max(mtime, st.st_mtime), size + st.st_size)
        return dict(sorted(units.items(), key=lambda item: (item[1][0], item[0])))


def _remove_unit(root: Path, stem: str) -> None:
    for suffix in _SUFFIXES:
        try:
            (root / (stem + suffix)).unlink(missing_ok=True)
        except OSError as e:
            log.warning("recorder: cannot remove %s (%s)", root / (stem + suffix), e.strerror)


def _unit_bytes(root: Path, stem: str) -> int:
    size = 0
    for suffix in _SUFFIXES:
        try:
            size += (root / (stem + suffix)).stat().st_size
        except OSError:
            pass
    return size


def _write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` so that ``path`` is either absent or whole (a reader never sees half a file)."""
    part = path.with_name(path.stem + ".part" + path.suffix)
    try:
        part.write_bytes(data)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


class _ClipWriter:
    """A clip being written: an OpenCV writer on ``<stem>.part.mp4`` (the container is chosen by the real suffix),
    renamed to the clip's name by :meth:`finish`, so a reader never sees half a clip."""

    def __init__(self, path: Path, fps: float, width: int, height: int) -> None:
        self.path = path
        self.part = path.with_name(path.stem + ".part" + path.suffix)
        self.size = (width, height)
        self.writer = cv2.VideoWriter(str(self.part), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), self.size)
        if not self.writer.isOpened():
            self.abort()
            raise OSError(f"OpenCV cannot open a video writer for {self.part}")

    def write(self, image: np.ndarray) -> None:
        if (image.shape[1], image.shape[0]) != self.size:  # the source changed size (a reconnect): one size per clip
            image = cv2.resize(image, self.size)
        self.writer.write(image)

    def finish(self) -> None:
        """Closes the file and gives it the clip's name."""
        self.writer.release()
        try:
            if not self.part.exists() or self.part.stat().st_size == 0:
                raise OSError(f"OpenCV wrote nothing to {self.part}")
            os.replace(self.part, self.path)
        finally:
            self.part.unlink(missing_ok=True)

    def abort(self) -> None:
        """Closes the file and removes it."""
        self.writer.release()
        self.part.unlink(missing_ok=True)


class RecorderSink:
    """What ``run --record-events`` adds to the sinks: a :class:`Recorder` on its own thread behind a bounded
    queue, fed only the event messages and the steps, and the offset message's ``clip`` and ``snapshot`` fields
    (see :meth:`offset_fields`). The queue's policy: ``drop_newest`` for live sources (a recording keeps the frames it
    has, in order, and never delays a model step), ``block`` when every source is a file (the run waits for the
    recorder instead of losing frames; see :class:`~streamtsm.sinks.base.QueuedSink`).

    Args:
        recorder: the recorder to run.
        maxsize: items (steps and event messages) the queue holds; a waiting step holds its frames' raw images,
            so this bounds that memory too (it covers a clip being written at 10-30 fps: about one to three seconds).
        close_timeout: seconds ``close()`` waits for the recorder to finish what is open (a stop mid-action: the
            queued items and, per open clip, a few frames, since clips are written as their frames arrive).
        policy: ``drop_newest`` or ``block``.
        stop: the run's stop event (``block``: a wait for room ends when it is set).
    """

    def __init__(self, recorder: Recorder, *, maxsize: int = 32, close_timeout: float = CLOSE_TIMEOUT,
                 policy: str = "drop_newest", stop: threading.Event | None = None) -> None:
        self.recorder = recorder
        self.names = recorder.names
        self.queue = QueuedSink(recorder, maxsize=maxsize, policy=policy, close_timeout=close_timeout, stop=stop,
                                name="recorder")

    def on_message(self, topic: str, payload: dict) -> None:
        if topic.startswith(TOPIC_EVENT + "."):  # predictions and stats would only crowd the queue
            self.queue.on_message(topic, payload)

    def on_step(self, step: StepReport) -> None:
        self.queue.on_step(step)

    def offset_fields(self, stream_id: str, event: ActionEvent) -> dict[str, str]:
        """The fields the offset message of ``event`` gets (the :class:`~streamtsm.sinks.fanout.Fanout` asks)."""
        return self.names.paths(stream_id, event.start_frame, event.start_ts)

    @property
    def dropped(self) -> int:
        """Steps and event messages the recorder could not keep up with."""
        return self.queue.dropped

    def close(self) -> None:
        self.queue.close()

    def summary(self) -> str:
        """The run summary's line."""
        r = self.recorder
        return (f"recordings: {r.written} written to {r.root}, {r.removed} removed (over "
                f"{r.max_bytes / GB:g} GB), {r.failed} failed, {r.missed} missed, {self.dropped} items dropped "
                "(the recorder could not keep up)")
