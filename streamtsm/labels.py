"""Class names: label files (one class name per line, line number = class index, the layout of ../shared/data/labels)
and the one rule that decides which names a model runs with. Torch-free: every engine uses it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError


def read_labels(path: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """Class names from a label file.

    Surrounding whitespace is stripped and blank lines are skipped (a trailing newline or an empty last line is
    common); every other line is one class. A name may appear once: class names key events and metrics.

    Args:
        path: the file.
        num_classes: when given, the number of classes the file must hold.

    Raises:
        ConfigError: the file is missing, unreadable, empty, repeats a name, or holds another number of classes.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
    except FileNotFoundError:
        raise ConfigError(f"labels file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"labels file {path} is a folder; expected a text file, one class name per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read labels file {path}: {e}") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ConfigError(f"labels file {path} holds no class names")
    seen: set[str] = set()
    for name in labels:
        if name in seen:
            raise ConfigError(f"labels file {path} repeats the name {name!r}; expected each class once")
        seen.add(name)
    if num_classes is not None and len(labels) != num_classes:
        raise ConfigError(f"labels file {path} has {len(labels)} classes but the model has {num_classes}")
    return labels


def numbered_labels(num_classes: int) -> list[str]:
    """``class_0 ... class_{K-1}``: the names of a model whose classes nobody named."""
    return [f"class_{i}" for i in range(num_classes)]


def resolve_labels(num_classes: int, *, labels_file: str | os.PathLike | None = None,
                   given: Sequence[str] | None = None, saved: Sequence[str] | None = None) -> list[str]:
    """The class names a model runs with: a label file or names given, else the names saved with the model (a
    checkpoint's config, an ONNX file's metadata, a Triton model's parameters), else numbered ones.

    Raises:
        ConfigError: the given names or file do not hold ``num_classes`` names.
    """
    if labels_file is not None:
        return read_labels(labels_file, num_classes)
    for names, what in ((given, "labels given"), (saved, "labels saved with the model")):
        if names:
            if len(names) != num_classes:
                raise ConfigError(f"{len(names)} {what} for a model with {num_classes} classes")
            return list(names)
    return numbered_labels(num_classes)
