"""The file contract between the exporters (:mod:`streamtsm.export`) and the engines (:mod:`streamtsm.engine`):
what an exported file and a Triton model config must say, so that the runtime needs nothing but the file.

It lives apart from both sides: the runtime never imports the exporter, and neither side can change a name
without the other seeing it. Importing this module needs neither torch nor onnx (onnx is imported by the functions
that read or write a file).

An exported ONNX file (see :func:`streamtsm.export.export_onnx`)::

    online model    inputs   frame    [batch, 3, S, S]       outputs  logits       [batch, K]
                             state_i  [batch, *shape_i]               new_state_i  [batch, *shape_i]
    clip model      inputs   clip     [batch, T, 3, S, S]    outputs  logits       [batch, K]

    metadata_props (JSON strings)
        streamtsm.config          ModelConfig.to_dict(), labels included
        streamtsm.kind            "online" | "clip"
        streamtsm.state           [{"name": "state_0", "output": "new_state_0", "shape": [fold, h, w]}, ...]
        streamtsm.io              {"inputs": {name: shape}, "outputs": {name: shape}}, "batch" for the dynamic axis
        streamtsm.precision       "fp32" | "int8"
        streamtsm.format_version  1
        streamtsm.quantization    the int8 settings (int8 files only)
        streamtsm.triton          the sequence controls (Triton's model.onnx only)

A Triton model (see :mod:`streamtsm.export.triton`) takes ``frame`` and Triton's sequence controls ``START``,
``END``, ``CORRID``, returns ``logits`` and ``sequence_id`` (CORRID echoed), keeps ``state_i`` / ``new_state_i``
as implicit state, and repeats the metadata above as config parameters of the same names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import MODEL_KINDS
from .errors import ConfigError, first_line

FORMAT_VERSION = 1
META_CONFIG = "streamtsm.config"
META_KIND = "streamtsm.kind"
META_STATE = "streamtsm.state"
META_IO = "streamtsm.io"
META_PRECISION = "streamtsm.precision"
META_FORMAT_VERSION = "streamtsm.format_version"
META_QUANTIZATION = "streamtsm.quantization"
META_TRITON = "streamtsm.triton"
BATCH = "batch"  # name of the dynamic axis

# Graph tensors.
FRAME = "frame"
CLIP = "clip"
LOGITS = "logits"


def state_names(index: int) -> tuple[str, str]:
    """``(input, output)`` names of the ``index``-th state tensor: ``("state_i", "new_state_i")``.

    The same names key an online engine's state mapping (:attr:`streamtsm.engine.base.OnlineEngine.state_spec`)
    and Triton's implicit state entries.
    """
    return f"state_{index}", f"new_state_{index}"


# Triton: the sequence controls the served graph takes, the echo of CORRID, and the config parameters (the
# metadata keys, so one name means one thing everywhere).
START = "START"
END = "END"
CORRID = "CORRID"
SEQUENCE_ID = "sequence_id"
PARAM_CONFIG = META_CONFIG
PARAM_KIND = META_KIND
PARAM_STATE = META_STATE
PARAM_PRECISION = META_PRECISION
PARAM_FORMAT_VERSION = META_FORMAT_VERSION
PARAM_TRITON = META_TRITON
TRITON_FORMAT_VERSION = 1
# ``streamtsm.triton``'s ``state_keeper``: who holds a sequence's folds between requests. "triton": implicit state,
# listed in the config's sequence_batching.state (onnxruntime backend); "model": the python-backend model.py of
# ``export-triton --runtime python``, by correlation id (the config lists no state). Absent means "triton".
STATE_KEPT_BY_TRITON = "triton"
STATE_KEPT_BY_MODEL = "model"


def read_metadata(path: str | os.PathLike) -> dict:
    """The streamtsm metadata of an exported file.

    Returns:
        ``{"config": dict, "kind": str, "state": [...], "io": {...}, "precision": str, "format_version": int,
        "quantization": dict | None}``.

    Raises:
        ConfigError: the file is missing, not ONNX (or truncated), not a streamtsm export, or from a newer version.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ConfigError(f"cannot read {path}: not an ONNX model, or truncated/corrupt ({first_line(e)})") from None
    if model.ir_version == 0 or not model.graph.node:
        raise ConfigError(f"cannot read {path}: not an ONNX model, or truncated/corrupt (no graph found)")
    props = {p.key: p.value for p in model.metadata_props}
    if META_CONFIG not in props or META_KIND not in props:
        raise ConfigError(f"{path} is an ONNX model but not a streamtsm export (no {META_CONFIG} metadata); "
                          "write it with `streamtsm export-onnx`")
    try:
        meta = {
            "config": json.loads(props[META_CONFIG]),
            "kind": json.loads(props[META_KIND]),
            "state": json.loads(props.get(META_STATE, "[]")),
            "io": json.loads(props.get(META_IO, "null")),
            "precision": json.loads(props.get(META_PRECISION, '"fp32"')),
            "format_version": int(json.loads(props.get(META_FORMAT_VERSION, "1"))),
            "quantization": json.loads(props.get(META_QUANTIZATION, "null")),
        }
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable streamtsm metadata ({first_line(e)})") from None
    if meta["format_version"] > FORMAT_VERSION:
        raise ConfigError(f"{path} has streamtsm format version {meta['format_version']}; this streamtsm reads "
                          f"up to {FORMAT_VERSION} (upgrade streamtsm)")
    if meta["kind"] not in MODEL_KINDS or not isinstance(meta["io"], dict):
        raise ConfigError(f"{path}: streamtsm metadata names kind {meta['kind']!r} and io {meta['io']!r}; "
                          f"expected a kind in {MODEL_KINDS} and an io table")
    return meta


def add_metadata(model, entries: dict) -> None:
    """Set streamtsm metadata_props (values JSON-encoded) on an onnx ModelProto, in place, replacing those keys."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    model.producer_name = "streamtsm"


def write_metadata(path: str | os.PathLike, entries: dict) -> None:
    """Set streamtsm metadata_props on the ONNX file at ``path``, in place (see :func:`add_metadata`)."""
    import onnx

    model = onnx.load(str(path))
    add_metadata(model, entries)
    onnx.save(model, str(path))
