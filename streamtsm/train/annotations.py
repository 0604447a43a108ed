"""Where the videos of a dataset are listed: annotation lists and class folders, read into :class:`VideoRecord`,
in mmaction2's conventions::

    video list      ``path label``                    one video file per line
    rawframe list   ``frame_dir total_frames label``  frames ``frame_dir/img_00001.jpg`` ... (template configurable)
    class folders   ``root/<class>/<video or frame dir>``  class names sorted -> label indices
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
FRAME_TEMPLATE = "img_{:05d}.jpg"


@dataclass(frozen=True)
class VideoRecord:
    """One labelled video.

    Attributes:
        path: a video file or a directory of frames (empty for in-memory clips).
        label: class index.
        num_frames: frames in a frame directory (from the list); None for video files (read when opened).
        frames: an in-memory clip, BGR uint8 ``[F, H, W, 3]`` (tests, generated data); ``path`` is then a name.
        scene: what the clip shows apart from its action, for matched batches (:class:`MatchedBatchSampler`);
            default: the file name, which ``streamtsm synth`` shares between the classes of one scene.
    """

    path: str
    label: int
    num_frames: int | None = None
    frames: np.ndarray | None = None
    scene: str | None = None

    @property
    def scene_key(self) -> str:
        return self.scene if self.scene is not None else os.path.basename(os.path.normpath(self.path))

    @property
    def kind(self) -> str:
        if self.frames is not None:
            return "array"
        return "video" if self.num_frames is None else "frames"


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else base / p)


def read_annotations(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                     list_format: str = "auto") -> list[VideoRecord]:
    """Read an mmaction2-style annotation list.

    Args:
        path: the list file; ``#`` starts a comment line, blank lines are skipped.
        data_root: folder the paths in the list are relative to (default: the list file's folder).
        list_format: ``"video"`` (``path label``), ``"rawframes"`` (``frame_dir total_frames label``) or
            ``"auto"``: rawframes when every line ends in two integers, else video. Paths may contain spaces.

    Raises:
        ConfigError: the file is missing, empty, or a line does not parse.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"annotation list not found: {path}")
    if list_format not in ("auto", "video", "rawframes"):
        raise ConfigError(f"list format must be auto, video or rawframes, got {list_format!r}")
    base = Path(data_root) if data_root is not None else path.parent
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise ConfigError(f"annotation list {path} has no entries")

    def ends_in_two_ints(line: str) -> bool:
        parts = line.rsplit(maxsplit=2)
        return len(parts) == 3 and parts[1].isdigit() and parts[2].lstrip("-").isdigit()

    if list_format == "auto":
        list_format = "rawframes" if all(ends_in_two_ints(line) for _, line in lines) else "video"
    records = []
    for n, line in lines:
        parts = line.rsplit(maxsplit=2 if list_format == "rawframes" else 1)
        try:
            if list_format == "rawframes":
                if len(parts) != 3:
                    raise ValueError
                rel, total, label = parts[0], int(parts[1]), int(parts[2])
                if total < 1:
                    raise ConfigError(f"{path}:{n}: total_frames must be >= 1, got {total}")
                records.append(VideoRecord(_resolve(rel, base), label, total))
            else:
                if len(parts) != 2:
                    raise ValueError
                records.append(VideoRecord(_resolve(parts[0], base), int(parts[1])))
        except ValueError:
            form = "frame_dir total_frames label" if list_format == "rawframes" else "path label"
            raise ConfigError(f"{path}:{n}: expected '{form}', got {line!r}") from None
        if records[-1].label < 0:
            raise ConfigError(f"{path}:{n}: label must be >= 0, got {records[-1].label}")
    return records


def scan_folders(root: str | os.PathLike, labels: Sequence[str] | None = None,
                 frame_template: str = FRAME_TEMPLATE) -> tuple[list[VideoRecord], list[str]]:
    """Records of a folder-per-class layout: ``root/<class>/<video file | frame directory>``.

    Args:
        root: the dataset folder.
        labels: class names in label order; default: the sorted sub-folder names.
        frame_template: names of the frames in a frame directory (their count is its total_frames).

    Returns:
        ``(records, labels)``.

    Raises:
        ConfigError: the folder is missing, holds no class folders, or a class folder is not in ``labels``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dataset folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root} holds no class folders (expected root/<class>/<video>)")
    labels = list(labels) if labels is not None else classes
    index = {name: i for i, name in enumerate(labels)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ConfigError(f"class folders {unknown[:5]} of {root} are not in the {len(labels)} labels given")
    pattern = frame_template_glob(frame_template)
    records = []
    for name in classes:
        for entry in sorted((root / name).iterdir()):
            if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS:
                records.append(VideoRecord(str(entry), index[name]))
            elif entry.is_dir():
                count = len(list(entry.glob(pattern)))
                if count:
                    records.append(VideoRecord(str(entry), index[name], count))
    if not records:
        raise ConfigError(f"no videos ({', '.join(VIDEO_EXTENSIONS[:4])}, ...) or frame folders found under {root}")
    return records, labels


def frame_template_glob(template: str) -> str:
    """``img_{:05d}.jpg`` -> ``img_*.jpg``."""
    start, end = template.find("{"), template.find("}")
    if start < 0 or end < start:
        raise ConfigError(f"frame template must hold one {{}} field for the index, got {template!r}")
    return template[:start] + "*" + template[end + 1 :]


def load_records(source: str | os.PathLike, data_root: str | os.PathLike | None = None,
                 labels: Sequence[str] | None = None, frame_template: str = FRAME_TEMPLATE,
                 list_format: str = "auto") -> tuple[list[VideoRecord], list[str] | None]:
    """Records of an annotation list or a class-folder root; the labels of the folders (None for a list)."""
    path = Path(source)
    if path.is_dir():
        return scan_folders(path, labels, frame_template)
    return read_annotations(path, data_root, list_format), None
