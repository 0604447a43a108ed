"""Label files: one class name per line, line number = class index (the layout of ../shared/data/labels)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def read_labels(path: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """Class names from a label file.

    Surrounding whitespace is stripped and blank lines are skipped (a trailing newline or an empty last line is
    common); every other line is one class.

    Args:
        path: the file.
        num_classes: when given, the number of classes the file must hold.

    Raises:
        ConfigError: the file is missing, unreadable, empty, or holds another number of classes.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read labels file {path}: {e}") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ConfigError(f"labels file {path} holds no class names")
    if num_classes is not None and len(labels) != num_classes:
        raise ConfigError(f"labels file {path} has {len(labels)} classes but the model has {num_classes}")
    return labels
