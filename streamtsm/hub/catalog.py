"""The catalog of published checkpoints: which file, from where, with which hash, into which architecture, with
which class names and data settings (after pytorchvideo's ``models/hub``: data beside the model files, not code
inside them).

The data is ``catalog.toml`` beside this file, one table per entry with its citation; the class names are
``labels/*.txt``, each in its publisher's class order. :func:`fetch` turns an entry into a verified local file
(:func:`streamtsm.hub.download.fetch_file`); :func:`streamtsm.models.load` turns the name into a model::

    name ("x3d_s_kinetics400")
      -> Entry (arch, overrides, classes, url, sha256, labels, layout)     catalog.toml
      -> file in <STREAMTSM_HOME>/checkpoints, downloaded once, verified   fetch
      -> create(arch, **overrides), strict load of its layout, labels      streamtsm.models.load

Torch-free, so the CLI can list the catalog without importing torch.
"""

from __future__ import annotations

import difflib
import functools
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError
from ..labels import read_labels

CATALOG_FILE = Path(__file__).with_name("catalog.toml")
LABELS_DIR = Path(__file__).with_name("labels")
# Where an entry without a url lies: the files that ship inside the package.
PACKAGED_DIR = Path(__file__).resolve().parents[1] / "assets"
# Settings given as TOML arrays that the models take as tuples.
_TUPLE_SETTINGS = ("mean", "std")


@dataclass(frozen=True)
class Entry:
    """One published checkpoint.

    Attributes:
        name: the short name users type (``--weights NAME``).
        arch: the registry name of the architecture it loads into.
        overrides: architecture arguments and :class:`~streamtsm.config.ModelConfig` fields the publisher trained
            and tested with (input_size, resize_size, mean, std, num_segments, clip_len, frame_interval, ...).
        num_classes: the classifier's size.
        dataset: what it was trained on.
        labels: file name under ``labels/``, in the publisher's class order; None: the names the checkpoint
            records (a streamtsm checkpoint).
        url: where the publisher serves it; None: it ships in the package (``streamtsm/assets/<filename>``).
        filename: the file's name, in the cache or in the package.
        sha256: the publisher's SHA-256, full or the prefix in its file name; None when not published (the first
            download records one).
        size: bytes, when the publisher states it.
        license: the license the publisher gives.
        accuracy: the accuracy the publisher reports, with its test protocol.
        source: the citation for url, hash and accuracy.
        layout: the checkpoint's key layout (``plain``, ``mit-han-lab``, ``mmaction2``, ``pytorchvideo``,
            ``uniformer``, ``streamtsm``).
        backbone: an image classifier, a starting point for training any architecture with that backbone.
        description: one line for listings.
    """

    name: str
    arch: str
    num_classes: int
    dataset: str
    license: str
    accuracy: str
    source: str
    layout: str
    description: str
    filename: str
    overrides: dict = field(default_factory=dict)
    labels: str | None = None
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    backbone: bool = False

    @property
    def packaged(self) -> bool:
        """Whether the file ships in the package (no download)."""
        return self.url is None


# The fields without a default must be in every table; the name is the table's.
_REQUIRED = {f.name for f in fields(Entry) if f.default is MISSING and f.default_factory is MISSING} - {"name"}
_KNOWN = {f.name for f in fields(Entry)} - {"name"}


def _entry(name: str, table: dict) -> Entry:
    """An entry from its TOML table; ValueError for a malformed table (a bug in the package's data)."""
    missing = sorted(_REQUIRED - set(table))
    unknown = sorted(set(table) - _KNOWN)
    problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
        [f"has unknown fields {', '.join(unknown)}"] if unknown else [])
    if problems:
        raise ValueError(f"{CATALOG_FILE}: entry {name!r} {'; '.join(problems)}")
    values = dict(table)
    values["overrides"] = {k: tuple(v) if k in _TUPLE_SETTINGS else v
                           for k, v in values.get("overrides", {}).items()}
    return Entry(name=name, **values)


@functools.cache
def _catalog() -> dict[str, Entry]:
    with open(CATALOG_FILE, "rb") as f:
        data = tomllib.load(f)
    return {name: _entry(name, table) for name, table in data.items()}


def entries() -> list[Entry]:
    """Every entry, in the catalog's order."""
    return list(_catalog().values())


def names() -> list[str]:
    """Every entry's name, in the catalog's order."""
    return list(_catalog())


def is_entry_name(text: object) -> bool:
    """Whether ``text`` is a catalog entry's name (a string naming no existing path is not necessarily one)."""
    return isinstance(text, str) and text in _catalog()


def close_names(text: str, n: int = 3) -> list[str]:
    """Up to ``n`` entry names that look like ``text`` (a typo, or a registry name such as ``x3d_s``)."""
    candidates = names()
    close = difflib.get_close_matches(text, candidates, n=n, cutoff=0.6)
    # A part of a name ("jester", "x3d_s") finds the entries that contain it.
    containing = [c for c in candidates if text and text.lower() in c and c not in close]
    return (close + containing)[:n]


def get_entry(name: str) -> Entry:
    """The entry called ``name``.

    Raises:
        ConfigError: no such entry; the message names the closest ones.
    """
    try:
        return _catalog()[name]
    except KeyError:
        close = close_names(name)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown catalog entry {name!r}; {hint}(`streamtsm models` lists them)") from None


def _as_entry(entry_or_name: Entry | str) -> Entry:
    return entry_or_name if isinstance(entry_or_name, Entry) else get_entry(entry_or_name)


def label_path(entry: Entry | str) -> Path | None:
    """The entry's label file in the package; None when the checkpoint records its own names."""
    entry = _as_entry(entry)
    return LABELS_DIR / entry.labels if entry.labels else None


def label_names(entry: Entry | str) -> list[str]:
    """The entry's class names, in its publisher's class order (index = class id).

    An entry without a label file (the shipped demo model) reads the names its checkpoint records, which imports
    torch.

    Raises:
        ConfigError: the label file does not hold exactly ``num_classes`` unique names.
    """
    entry = _as_entry(entry)
    path = label_path(entry)
    if path is not None:
        return read_labels(path, entry.num_classes)
    from ..models.checkpoint import read_checkpoint  # torch, only for a checkpoint that holds its names

    names_saved = (read_checkpoint(local_path(entry)).get("config") or {}).get("labels")
    if not names_saved or len(names_saved) != entry.num_classes:
        raise ConfigError(f"catalog entry {entry.name}: its checkpoint records no {entry.num_classes} class names")
    return list(names_saved)


def local_path(entry: Entry | str, home: str | os.PathLike | None = None) -> Path:
    """Where the entry's file is, or will be once fetched: in the package, else in the cache's checkpoints folder."""
    entry = _as_entry(entry)
    if entry.packaged:
        return PACKAGED_DIR / entry.filename
    from . import download

    return download.checkpoints_dir(Path(home) if home is not None else None) / entry.filename


def is_cached(entry: Entry | str, home: str | os.PathLike | None = None) -> bool:
    """Whether the entry's file is on this machine (in the package, or in the cache; not verified here)."""
    return local_path(entry, home).is_file()


def fetch(entry_or_name: Entry | str, *, home: str | os.PathLike | None = None, offline: bool | None = None,
          progress: bool = True) -> Path:
    """The entry's file on this machine: the packaged file, else downloaded once into the cache and verified.

    Args:
        entry_or_name: an :class:`Entry` or an entry's name.
        home: the cache's home folder (None: ``STREAMTSM_HOME``, else the user's cache folder).
        offline: never touch the network (None: ``STREAMTSM_OFFLINE``).
        progress: show a progress bar while downloading.

    Raises:
        ConfigError: no such entry.
        DownloadError: the file cannot be downloaded or verified (one line naming the URL and where to put the
            file by hand).
    """
    entry = _as_entry(entry_or_name)
    if entry.packaged:
        path = local_path(entry)
        if not path.is_file():
            raise ConfigError(f"catalog entry {entry.name}: its file {path} is missing from the package "
                              "(reinstall streamtsm)")
        return path
    from . import download

    return download.fetch_file(entry.url, entry.filename, sha256=entry.sha256,
                               home=Path(home) if home is not None else None, offline=offline, progress=progress)


__all__ = ["CATALOG_FILE", "LABELS_DIR", "PACKAGED_DIR", "Entry", "close_names", "entries", "fetch", "get_entry",
           "is_cached", "is_entry_name", "label_names", "label_path", "local_path", "names"]
