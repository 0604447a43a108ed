"""Video sources: cameras, files, network streams, image sequences and a synthetic scene.

A source is a thin wrapper over one decoder. It is opened, read and released by a single thread (the capture
thread that owns it). ``read()`` returns the image as the backend decoded it; ``to_bgr`` is the one place that
turns whatever a backend gives (gray, BGRA, 16-bit, empty) into H x W x 3 uint8 BGR, and the capture thread counts
the images it rejects.
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np

from streamtsm.errors import ConfigError, SourceError
from streamtsm.stream_ids import sanitize_stream_id
from streamtsm.synthetic import MotionScene

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts "²"
_LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
_SEQUENCE = re.compile(r"%0?\d*d")  # printf pattern of an image sequence, e.g. img_%05d.jpg
_SYNTHETIC = re.compile(r"^synthetic(?::(\d+)x(\d+)(?:@(\d+(?:\.\d*)?|\.\d+))?)?$")
_SYNTHETIC_FORM = "'synthetic' or 'synthetic:WIDTHxHEIGHT@FPS' (e.g. synthetic:160x120@15)"


def to_bgr(image: np.ndarray | None) -> np.ndarray | None:
    """Converts a decoded image to H x W x 3 uint8 BGR.

    Handles what backends actually return: grayscale (H x W or H x W x 1), BGRA (H x W x 4) and 16-bit images
    (scaled down by 8 bits). A BGR uint8 image is returned as is, without a copy.

    Args:
        image: The decoded image, or None.

    Returns:
        The BGR image, or None if there is nothing usable (None, empty, another dtype or channel count). Callers
        count such frames as bad rather than treating them as the end of the stream.
    """
    if not isinstance(image, np.ndarray) or image.size == 0:
        return None
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        return None
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2BGR)
    if image.ndim != 3:
        return None
    if image.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGRA2BGR)
    if image.shape[2] == 3:
        return image
    return None


@dataclass(frozen=True)
class Loss:
    """Frames a source failed to deliver, found out when it ended (see ``Source.losses``).

    Attributes:
        kind: ``"truncated"`` (fewer frames than the file's header gives), ``"gap"`` (an image sequence stopped at
            a missing number while files with later numbers exist) or ``"decode_error"`` (the decoder raised).
        frames: How many frames were lost (0 when it cannot be told).
        message: One line for the log, naming the source.
    """

    kind: str
    frames: int
    message: str


class Source(ABC):
    """A source of video frames.

    Attributes:
        name: Human description used in messages, e.g. "camera 0", "file sample.mp4", "synthetic".
        is_live: True for cameras and network streams (frames keep coming whether read or not; a failure is worth
            reconnecting), False for files and image sequences (they end).
        fps: Native frame rate if known (set once opened), else None.
    """

    name: str = "source"
    is_live: bool = False
    fps: float | None = None

    @abstractmethod
    def open(self) -> None:
        """Opens (or reopens) the source.

        Raises:
            SourceError: If it cannot be opened; the message names the source.
        """

    @abstractmethod
    def read(self) -> np.ndarray | None:
        """Returns the next decoded image, or None at the end of the stream or on a read failure.

        The image is normally H x W x 3 uint8 BGR, but a backend may return another layout; pass it through
        ``to_bgr``.
        """

    @abstractmethod
    def release(self) -> None:
        """Releases the decoder; safe to call more than once or before ``open``."""

    def losses(self) -> list[Loss]:
        """What this source failed to deliver, asked once it has ended; nothing for sources that cannot tell."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _native_fps(capture: cv2.VideoCapture) -> float | None:
    fps = capture.get(cv2.CAP_PROP_FPS)
    # Backends report 0, NaN or absurd values (90000, the RTP clock) when they do not know.
    return float(fps) if 0 < fps <= 1000 else None


class _OpenCVSource(Source):
    """Shared read/release over a cv2.VideoCapture."""

    def __init__(self) -> None:
        self._capture: cv2.VideoCapture | None = None
        self.decoded = 0  # images read since the last open
        self.read_error: str | None = None  # the decoder's exception that ended the reading, if any

    def read(self) -> np.ndarray | None:
        if self._capture is None:
            return None
        try:
            ok, image = self._capture.read()
        except cv2.error as exc:
            self.read_error = _first_line(exc)
            return None
        if not ok:
            return None
        self.decoded += 1
        return image

    def release(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class CameraSource(_OpenCVSource):
    """A local camera by index (``cv2.VideoCapture(index)``); live.

    Args:
        index: Camera index, e.g. 0 for /dev/video0.
    """

    is_live = True

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.name = f"camera {index}"

    def open(self) -> None:
        self.release()
        try:
            capture = cv2.VideoCapture(self.index)
        except cv2.error as exc:
            raise SourceError(f"cannot open camera {self.index}: {_first_line(exc)}") from exc
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open camera {self.index}: no such device, or it is busy")
        self._capture = capture
        self.decoded = 0
        self.fps = _native_fps(capture)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _redact(url: str) -> str:
    """The URL with any password replaced, safe to print and log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class VideoSource(_OpenCVSource):
    """A video file, an image sequence (``frames/img_%05d.jpg``) or a network stream URL.

    rtsp(s)://, rtmp(s)://, http(s)://, udp://, tcp:// and srt:// URLs are live; files and image sequences are not.
    For URLs, FFmpeg's own open and read time-outs are set to ``timeout`` so that a dead stream makes ``read``
    return None instead of blocking for ever.

    Args:
        path_or_url: File path, image sequence pattern or URL.
        timeout: Open and read time-out in seconds for network streams.
    """

    def __init__(self, path_or_url: str, timeout: float = 5.0):
        super().__init__()
        self.spec = str(path_or_url)
        self.timeout = timeout
        self.is_url = bool(_URL.match(self.spec))
        self.is_live = self.is_url and self.spec.split("://", 1)[0].lower() in _LIVE_SCHEMES
        self.is_sequence = not self.is_url and bool(_SEQUENCE.search(Path(self.spec).name))
        if self.is_url:
            self.name = _redact(self.spec)
        elif self.is_sequence:
            self.name = f"image sequence {self.spec}"
        else:
            self.name = f"file {Path(self.spec).name}"
        self._pending: np.ndarray | None = None
        self.frame_count: int | None = None  # frames the file's header gives (files only)

    def open(self) -> None:
        self.release()
        self.read_error = None
        self.decoded = 0
        if self.is_url:
            capture = self._open_url()
        else:
            capture = self._open_file()
        self._capture = capture
        self.fps = _native_fps(capture)
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if not self.is_url and math.isfinite(count) and count > 0 else None

    def _open_url(self) -> cv2.VideoCapture:
        timeout_ms = int(self.timeout * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        try:
            capture = cv2.VideoCapture(self.spec, cv2.CAP_FFMPEG, params)
        except cv2.error as exc:
            raise SourceError(f"cannot open stream {self.name}: {_first_line(exc)}") from exc
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open stream {self.name}: unreachable, refused or not a video stream")
        return capture

    def _open_file(self) -> cv2.VideoCapture:
        path = Path(self.spec)
        what = "image sequence" if self.is_sequence else "video file"
        if self.is_sequence:
            if not path.parent.is_dir():
                raise SourceError(f"image sequence folder not found: {path.parent} (pattern {self.spec})")
        elif path.is_dir():
            raise SourceError(f"expected a video file, got a folder: {self.spec}")
        elif not path.exists():
            raise SourceError(f"video file not found: {self.spec}")
        try:
            capture = cv2.VideoCapture(self.spec)
        except cv2.error as exc:
            raise SourceError(f"cannot decode {what} {self.spec}: {_first_line(exc)}") from exc
        if not capture.isOpened():
            capture.release()
            reason = "no files match the pattern" if self.is_sequence else "not a video or an unsupported codec"
            raise SourceError(f"cannot decode {what} {self.spec}: {reason}")
        # Some files open but decode nothing; finding out now gives the user an error instead of an empty run.
        ok, first = capture.read()
        if not ok:
            capture.release()
            raise SourceError(f"cannot decode {what} {self.spec}: no frame could be decoded")
        self._pending = first
        return capture

    def read(self) -> np.ndarray | None:
        if self._pending is not None:
            image, self._pending = self._pending, None
            self.decoded += 1
            return image
        return super().read()

    def losses(self) -> list[Loss]:
        """What the file or image sequence failed to deliver, once ``read`` has returned None.

        A video is compared with the frame count of its header: a truncated file, or frames the decoder dropped
        as corrupt, both leave it short. An image sequence is compared with the files in its folder: OpenCV stops
        at the first missing number, so files after a gap would otherwise be skipped without a word.
        """
        if self.is_url:
            return []
        found = []
        if self.read_error is not None:
            found.append(Loss("decode_error", 0, f"{self.name}: decoding failed after {self.decoded} frames: "
                                                 f"{self.read_error}"))
        if self.is_sequence:
            found.extend(self._sequence_gap())
        elif self.frame_count is not None and self.decoded < self.frame_count:
            missing = self.frame_count - self.decoded
            found.append(Loss("truncated", missing,
                              f"{self.name} ended after {self.decoded} of the {self.frame_count} frames its header "
                              f"gives ({missing} lost): the file is truncated or some frames could not be decoded"))
        return found

    def _sequence_gap(self) -> list[Loss]:
        path = Path(self.spec)
        pattern = path.name
        match = _SEQUENCE.search(pattern)
        numbered = re.compile(re.escape(pattern[:match.start()]) + "([0-9]+)" + re.escape(pattern[match.end():]))
        numbers = []
        for entry in path.parent.iterdir():
            m = numbered.fullmatch(entry.name)
            # The printf pattern must give back the very name (img_%05d.jpg does not name img_1.jpg).
            if m and pattern.replace(match.group(0), match.group(0) % int(m.group(1)), 1) == entry.name:
                numbers.append(int(m.group(1)))
        if not numbers or not self.decoded:
            return []
        last_read = min(numbers) + self.decoded - 1
        later = [n for n in numbers if n > last_read]
        if not later:
            return []
        missing = max(later) - last_read  # positions of the sequence that never reached the model
        absent = sorted(set(range(last_read + 1, max(later) + 1)) - set(later))
        why = f"number {absent[0]} is missing" if absent else "the next file could not be decoded"
        return [Loss("gap", missing, f"{self.name} stopped at number {last_read}: {why}, so {len(later)} later "
                                     f"files (up to number {max(later)}) were not read")]

    def release(self) -> None:
        self._pending = None
        super().release()


class SyntheticSource(Source):
    """A camera stand-in rendering ``MotionScene`` frames, paced to ``fps`` by the real clock; live.

    ``read`` blocks until the next frame is due, as a camera does; the scene keeps its place across reopens.

    Args:
        width: Frame width in pixels.
        height: Frame height in pixels.
        fps: Frames per second (> 0).
        seed: Scene seed.
    """

    is_live = True

    def __init__(self, width: int = 320, height: int = 240, fps: float = 30.0, seed: int = 0):
        if fps <= 0:
            raise ConfigError(f"synthetic fps must be > 0, got {fps}")
        self.width = width
        self.height = height
        self.fps = float(fps)
        self.seed = seed
        self.name = "synthetic"
        self._scene: MotionScene | None = None
        self._t = 0
        self._next_due = 0.0

    @property
    def scene(self) -> MotionScene | None:
        """The scene being rendered (for ground-truth labels via ``motion_at``), None until opened."""
        return self._scene

    @property
    def position(self) -> int:
        """Scene time of the next frame ``read`` will return."""
        return self._t

    def open(self) -> None:
        if self._scene is None:
            self._scene = MotionScene(self.width, self.height, seed=self.seed)
        self._next_due = time.monotonic()

    def read(self) -> np.ndarray | None:
        if self._scene is None:
            return None
        delay = self._next_due - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing, as a camera blocks until its next exposure; at most one frame period
        elif delay < -1.0:
            self._next_due = time.monotonic()  # far behind (the reader stalled): do not burst to catch up
        self._next_due += 1.0 / self.fps
        image = self._scene.render(self._t)
        self._t += 1
        return image

    def release(self) -> None:
        self._scene = None


def open_source(spec: str | int, *, timeout: float = 5.0) -> Source:
    """Makes the source a command-line spec names (not opened yet).

    Args:
        spec: A camera index (int or a string of digits), ``"synthetic"`` or ``"synthetic:WIDTHxHEIGHT@FPS"``
            (``@FPS`` optional), or a file path, image sequence pattern or URL.
        timeout: Open and read time-out in seconds for network streams.

    Returns:
        The source.

    Raises:
        ConfigError: If a synthetic spec is malformed.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        return CameraSource(spec)
    spec = str(spec).strip()
    if _DIGITS.fullmatch(spec):
        return CameraSource(int(spec))
    if spec == "synthetic" or spec.startswith("synthetic:"):
        match = _SYNTHETIC.match(spec)
        if match is None:
            raise ConfigError(f"synthetic source must be {_SYNTHETIC_FORM}, got {spec!r}")
        if match.group(1) is None:
            return SyntheticSource()
        width, height = int(match.group(1)), int(match.group(2))
        fps = float(match.group(3)) if match.group(3) else 30.0
        if width < 8 or height < 8 or fps <= 0:
            raise ConfigError(f"synthetic source must be at least 8x8 at a positive fps, got {spec!r}")
        return SyntheticSource(width, height, fps)
    return VideoSource(spec, timeout=timeout)


def stream_name(spec: str | int) -> str:
    """A short stream id for a source spec, under the rule of :mod:`streamtsm.stream_ids` (a topic part).

    Examples: ``0`` -> ``"cam0"``, ``"videos/sample.mp4"`` -> ``"sample"``,
    ``"rtsp://user:pw@10.0.0.5:554/live"`` -> ``"10-0-0-5-554-live"``, ``"synthetic:160x120@15"`` -> ``"synthetic"``,
    ``"frames/img_%05d.jpg"`` -> ``"img"``.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        return f"cam{spec}"
    spec = str(spec).strip()
    if _DIGITS.fullmatch(spec):
        return f"cam{int(spec)}"
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return "synthetic"
    if _URL.match(spec):
        try:
            parts = urlsplit(spec)
        except ValueError:  # a malformed URL ("rtsp://[" is an unclosed IPv6 host): its text is sanitized below
            parts = None
        try:
            port = parts.port if parts else None
        except ValueError:  # a malformed port: keep the host and path only
            port = None
        raw = (parts.hostname or "") + (f"-{port}" if port else "") + parts.path if parts else spec
    else:
        path = Path(spec)
        raw = _SEQUENCE.sub("", path.stem) or path.parent.name
    # Under the one rule for stream ids (streamtsm.stream_ids), as a site config's or --name's id is.
    return sanitize_stream_id(raw)
