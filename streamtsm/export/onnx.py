"""ONNX export of streamtsm models: one self-describing file, verified against torch, optionally quantized to int8.

What a file holds, so that a runtime needs nothing else (see :mod:`streamtsm.engine.onnxruntime_engine`)::

    online model (one frame per step, explicit state; batch = number of streams, a dynamic axis everywhere)
        inputs   frame     [batch, 3, S, S]          outputs  logits       [batch, K]
                 state_i   [batch, fold_i, h_i, w_i]          new_state_i  [batch, fold_i, h_i, w_i]
    clip model (offline TSM, X3D, UniFormer, ...)
        inputs   clip      [batch, T, 3, S, S]       outputs  logits       [batch, K]

    metadata_props (JSON strings)
        streamtsm.config          ModelConfig.to_dict(), labels included
        streamtsm.kind            "online" | "clip"
        streamtsm.state           [{"name": "state_0", "output": "new_state_0", "shape": [fold, h, w]}, ...]
        streamtsm.io              {"inputs": {name: shape}, "outputs": {name: shape}}, "batch" for the dynamic axis
        streamtsm.precision       "fp32" | "int8"
        streamtsm.format_version  1

Export uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the torch.export-based one
needs onnxscript, which this package does not depend on. The shift is plain Slice/Concat on the channel axis, so
nothing in the graph is specialised to the batch the trace ran with; verification runs a different batch than the
trace to catch it if a model ever does.

This module imports torch only inside the functions that export; :func:`read_metadata`, :func:`quantize_int8` and
:func:`calibration_frames` are torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import MODEL_KINDS, ModelConfig, window_span
from ..errors import ConfigError, StreamTSMError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_CONFIG = "streamtsm.config"
META_KIND = "streamtsm.kind"
META_STATE = "streamtsm.state"
META_IO = "streamtsm.io"
META_PRECISION = "streamtsm.precision"
META_FORMAT_VERSION = "streamtsm.format_version"
META_QUANTIZATION = "streamtsm.quantization"
BATCH = "batch"  # name of the dynamic axis
# Largest |onnxruntime - torch| allowed in float32, per output tensor, in units of max(1, max |torch output|): an
# absolute 1e-4 for outputs within [-1, 1], relative above. Two correct fp32 implementations of a deep network
# differ by ~1e-5 of the activations' scale (summation order, BN folded into the conv weights), so a bare absolute
# 1e-4 fails good exports whose logits or cached folds reach ~5; a graph that is wrong (a frozen slice, a lost
# state) differs by O(1).
TOLERANCE = 1e-4
EXPORTER = "torchscript (torch.onnx.export dynamo=False)"


class ExportError(StreamTSMError):
    """An export or quantization produced a graph that is not faithful to the model, or could not be produced."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well the file matched torch.

    Attributes:
        path: the .onnx file.
        kind: ``"online"`` or ``"clip"``.
        exporter: which torch exporter produced the graph.
        opset: ONNX opset.
        input_size: side S of the frames the graph takes.
        inputs, outputs: graph input / output names.
        size_bytes: file size.
        max_abs_diff: largest |onnxruntime - torch| over logits and new state during verification; None when
            verification was skipped.
        max_scaled_diff: the same difference divided by max(1, max |torch output|) of its tensor, the figure
            compared with the 1e-4 tolerance; None when verification was skipped.
        verification: what was compared (steps, batches), or ``"skipped"``.
    """

    path: str
    kind: str
    exporter: str
    opset: int
    input_size: int
    inputs: list[str]
    outputs: list[str]
    size_bytes: int
    max_abs_diff: float | None
    max_scaled_diff: float | None
    verification: str


# -- graph layout -------------------------------------------------------------------------------------------


def _is_online(model) -> bool:
    return model.cfg.kind == "online" and bool(getattr(model, "online", False))


def _clip_len(model) -> int:
    """Frames per clip T: ``num_segments`` for TSM, ``cfg.clip_len`` for families without segments."""
    return int(getattr(model, "num_segments", None) or model.cfg.clip_len)


def _io_spec(kind: str, size: int, num_classes: int, state_shapes: list[tuple[int, int, int]],
             clip_len: int) -> tuple[dict, list[dict]]:
    """(``{"inputs": {name: shape}, "outputs": {...}}``, state entries) with ``BATCH`` for the dynamic axis."""
    logits = {"logits": [BATCH, num_classes]}
    if kind == "clip":
        return {"inputs": {"clip": [BATCH, clip_len, 3, size, size]}, "outputs": logits}, []
    state = [{"name": f"state_{i}", "output": f"new_state_{i}", "shape": list(s)} for i, s in enumerate(state_shapes)]
    inputs = {"frame": [BATCH, 3, size, size], **{s["name"]: [BATCH, *s["shape"]] for s in state}}
    outputs = {**logits, **{s["output"]: [BATCH, *s["shape"]] for s in state}}
    return {"inputs": inputs, "outputs": outputs}, state


def _step_module(model):
    """The online model's step as a module ``forward(frame, *state) -> (logits, *new_state)`` for the tracer."""
    from torch import nn

    class StepGraph(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, frame, *state):
            logits, new_state = self.inner.step_unchecked(frame, tuple(state))
            return (logits, *new_state)

    return StepGraph(model)


# -- export -------------------------------------------------------------------------------------------------


def export_onnx(model, path: str | os.PathLike, *, input_size: int | None = None, opset: int = 17,
                verify: bool = True, labels: list[str] | None = None) -> ExportReport:
    """Export a model from :func:`streamtsm.models.create` to a self-describing ONNX file.

    Online models (``cfg.kind == "online"`` with a step form) export their step: ``frame`` and ``state_i`` in,
    ``logits`` and ``new_state_i`` out. Clip models export ``clip -> logits``. Batch is dynamic everywhere.

    Args:
        model: the model (float32, weights loaded).
        path: the .onnx file to write (replaced atomically; nothing is left behind when export or verification
            fails).
        input_size: side of the square frames the graph takes; ``model.cfg.input_size`` when None.
        opset: ONNX opset.
        verify: run ``onnx.checker`` and compare onnxruntime with torch on random input (see :func:`verify_onnx`).
        labels: class names stored in the metadata (``model.cfg.labels`` when None).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ConfigError: labels do not match the classifier, or a bad input size.
        ExportError: the exporter failed, or onnxruntime differs from torch by more than 1e-4 of an output's scale
            (see ``TOLERANCE``).
    """
    import onnx
    import torch

    cfg: ModelConfig = model.cfg
    size = int(input_size or cfg.input_size)
    if size < 8:
        raise ConfigError(f"input_size must be >= 8, got {size}")
    labels = list(labels) if labels is not None else cfg.labels
    if labels is not None and len(labels) != cfg.num_classes:
        raise ConfigError(f"{len(labels)} labels given for a model with {cfg.num_classes} classes")
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ExportError(f"export a float32 model (got {param.dtype}); quantize the exported file instead")
    online = _is_online(model)
    kind = "online" if online else "clip"
    out_cfg = dataclasses.replace(cfg, kind=kind, input_size=size, resize_size=max(cfg.resize_size, size),
                                  labels=labels)
    clip_len = _clip_len(model)
    state_shapes = model.state_shapes(size, size) if online else []
    io, state = _io_spec(kind, size, cfg.num_classes, state_shapes, clip_len)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    was_training = model.training
    model.eval()
    try:
        # Traced with batch 2; verification runs batches 1..3, so a graph frozen to the trace's batch fails there.
        with torch.no_grad():
            if online:
                module = _step_module(model).eval()
                args = (torch.randn(2, 3, size, size, device=param.device),
                        *model.init_state(2, size, size, device=param.device))
            else:
                module = model
                args = (torch.randn(2, clip_len, 3, size, size, device=param.device),)
            names_in, names_out = list(io["inputs"]), list(io["outputs"])
            with warnings.catch_warnings():
                # The legacy exporter's deprecation notice, and tracer warnings about Python-side shape checks in
                # forward() (they only raise errors, and the batch-changing verification covers what they hide).
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                try:
                    torch.onnx.export(module, args, str(tmp), input_names=names_in, output_names=names_out,
                                      dynamic_axes={n: {0: BATCH} for n in names_in + names_out},
                                      opset_version=opset, do_constant_folding=True, dynamo=False)
                except Exception as e:  # the exporter raises many types (SymbolicValueError, RuntimeError, ...)
                    raise ExportError(f"torch.onnx.export failed for {cfg.name}: {_first_line(e)}") from e
        graph_file = onnx.load(str(tmp))
        _declare_io_shapes(graph_file, io)
        _write_metadata(tmp, {
            META_CONFIG: out_cfg.to_dict(),
            META_KIND: kind,
            META_STATE: state,
            META_IO: io,
            META_PRECISION: "fp32",
            META_FORMAT_VERSION: FORMAT_VERSION,
        }, check=True, base=graph_file)
        diffs, what = (None, None), "skipped"
        if verify:
            check = verify_onnx(model, tmp, input_size=size)
            diffs, what = (check["max_abs_diff"], check["max_scaled_diff"]), check["compared"]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    report = ExportReport(str(path), kind, EXPORTER, opset, size, list(io["inputs"]), list(io["outputs"]),
                          path.stat().st_size, *diffs, what)
    log.info("exported %s to %s (%s, max abs diff %s)", cfg.name, path, kind, diffs[0])
    return report


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _declare_io_shapes(model, io: dict) -> None:
    """Write the known shapes of the graph inputs and outputs into ``model`` (an onnx ModelProto).

    The tracer leaves some dims symbolic (``logits`` of a clip model comes out ``[batch, ReduceMean_dim_1]``);
    the runtime checks the file against its metadata, so the file states them exactly.
    """
    for values, shapes in ((model.graph.input, io["inputs"]), (model.graph.output, io["outputs"])):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            shape = shapes[value.name]
            if len(dims) != len(shape):
                raise ExportError(f"exported {value.name} has rank {len(dims)}, expected shape {shape}")
            for dim, want in zip(dims, shape):
                if want == BATCH:
                    dim.dim_param = BATCH
                else:
                    dim.dim_value = want


def _write_metadata(path: Path, entries: dict, *, check: bool = False, base=None) -> None:
    """Set streamtsm metadata_props (values JSON-encoded) on the ONNX file at ``path``, in place."""
    import onnx

    model = onnx.load(str(path)) if base is None else base
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    model.producer_name = "streamtsm"
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # ValidationError, InferenceError
            raise ExportError(f"exported graph fails onnx.checker: {_first_line(e)}") from e
    onnx.save(model, str(path))


def _cpu_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(model, path: str | os.PathLike, *, input_size: int | None = None, steps: int = 6, batch: int = 2,
                tolerance: float = TOLERANCE, seed: int = 0) -> dict:
    """Compare onnxruntime (CPU) running ``path`` with ``model`` in torch on random input.

    Online: ``steps`` frames of ``batch`` streams stepped one by one, each side feeding its own state back, every
    logit and state output compared; then two steps at another batch (batch + 1). Clip: random clips at batch 1
    and ``batch + 1``.

    Returns:
        ``{"max_abs_diff", "max_scaled_diff", "worst", "compared"}``: the largest absolute difference, the largest
        difference in units of max(1, max |torch output|) of its tensor (see ``TOLERANCE``), where the latter
        occurred, and what was compared.

    Raises:
        ExportError: a scaled difference exceeds ``tolerance``.
    """
    import torch

    size = int(input_size or model.cfg.input_size)
    session = _cpu_session(path)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    worst_abs, worst = 0.0, (-1.0, "")  # (max scaled difference, where)

    def compare(where: str, ours: list[np.ndarray], theirs) -> None:
        nonlocal worst_abs, worst
        for name, a, b in zip([o.name for o in session.get_outputs()], ours, theirs):
            if not a.size:
                continue
            b = b.detach().cpu().numpy()
            d = float(np.abs(a - b).max())
            worst_abs = max(worst_abs, d)
            scaled = d / max(1.0, float(np.abs(b).max()))
            if scaled > worst[0]:
                worst = (scaled, f"{name} at {where} (abs {d:.3g}, max |torch| {np.abs(b).max():.3g})")

    with torch.no_grad():
        if _is_online(model):
            names = [i.name for i in session.get_inputs()]
            for b, n in ((batch, steps), (batch + 1, 2)):
                state_t = model.init_state(b, size, size, device=device)
                state_o = [np.zeros(tuple(s.shape), np.float32) for s in state_t]
                for t in range(n):
                    frame = rng.standard_normal((b, 3, size, size), dtype=np.float32)
                    logits, state_t = model.step(torch.from_numpy(frame).to(device), state_t)
                    outs = session.run(None, dict(zip(names, [frame, *state_o])))
                    state_o = outs[1:]
                    compare(f"step {t} (batch {b})", outs, (logits, *state_t))
            what = f"online: {steps} steps at batch {batch}, 2 at batch {batch + 1}, state fed back"
        else:
            t = _clip_len(model)
            for b in (1, batch + 1):
                clip = rng.standard_normal((b, t, 3, size, size), dtype=np.float32)
                logits = model(torch.from_numpy(clip).to(device))
                compare(f"batch {b}", session.run(None, {"clip": clip}), (logits,))
            what = f"clip: batches 1 and {batch + 1} of {t}-frame clips"
    if worst[0] > tolerance:
        raise ExportError(f"onnxruntime differs from torch by {worst[0]:.3g} of the output's scale (> {tolerance:g})"
                          f" in {worst[1]}; the exported graph is not faithful to the model")
    return {"max_abs_diff": worst_abs, "max_scaled_diff": max(worst[0], 0.0), "worst": worst[1], "compared": what}


# -- metadata -----------------------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict:
    """The streamtsm metadata of an exported file (torch-free).

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
        raise ConfigError(f"cannot read {path}: not an ONNX model, or truncated/corrupt ({_first_line(e)})") from None
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
        raise ConfigError(f"{path}: unreadable streamtsm metadata ({_first_line(e)})") from None
    if meta["format_version"] > FORMAT_VERSION:
        raise ConfigError(f"{path} has streamtsm format version {meta['format_version']}; this streamtsm reads "
                          f"up to {FORMAT_VERSION} (upgrade streamtsm)")
    if meta["kind"] not in MODEL_KINDS or not isinstance(meta["io"], dict):
        raise ConfigError(f"{path}: streamtsm metadata names kind {meta['kind']!r} and io {meta['io']!r}; "
                          f"expected a kind in {MODEL_KINDS} and an io table")
    return meta


# -- calibration data ---------------------------------------------------------------------------------------


def calibration_frames(cfg: ModelConfig, source: str = "synthetic", *, num_frames: int = 256,
                       sequence_length: int = 32, seed: int = 0) -> np.ndarray:
    """Preprocessed frames for int8 calibration, as consecutive sequences (torch-free).

    Args:
        cfg: the model's config (input size, resize, mean/std).
        source: ``"synthetic"`` (a :class:`streamtsm.synthetic.MotionScene` at 320x240, rendered without
            real-time pacing) or a video path/URL read through :func:`streamtsm.capture.open_source`.
        num_frames: frames to take (a video that ends earlier gives fewer).
        sequence_length: frames per sequence; the result is cut into whole sequences.
        seed: seed of the synthetic scene.

    Returns:
        float32 ``[N, sequence_length, 3, S, S]``.
    """
    from ..preprocess import Preprocessor

    if num_frames < 1 or sequence_length < 1:
        raise ConfigError(f"num_frames and sequence_length must be >= 1, got {num_frames}, {sequence_length}")
    sequence_length = min(sequence_length, num_frames)
    preprocess = Preprocessor.for_config(cfg)
    frames = [preprocess(image) for image in _images(source, num_frames, seed)]
    usable = len(frames) // sequence_length * sequence_length
    if usable == 0:
        raise ConfigError(f"calibration source {source!r} gave {len(frames)} frames; need at least {sequence_length}")
    return np.stack(frames[:usable]).reshape(-1, sequence_length, 3, cfg.input_size, cfg.input_size)


def _images(source: str, num_frames: int, seed: int) -> Iterator[np.ndarray]:
    if source == "synthetic":
        from ..synthetic import MotionScene

        scene = MotionScene(320, 240, seed=seed)
        for t in range(num_frames):
            yield scene.render(t)
        return
    from ..capture import open_source, to_bgr

    capture = open_source(source)
    capture.open()
    try:
        for _ in range(num_frames):
            image = to_bgr(capture.read())
            if image is None:
                return
            yield image
    finally:
        capture.release()


# -- int8 quantization --------------------------------------------------------------------------------------


class _Feeds:
    """A CalibrationDataReader over a list of input dicts (onnxruntime calls get_next until None)."""

    def __init__(self, feeds: list[dict]) -> None:
        self._feeds = feeds
        self._next = 0

    def get_next(self) -> dict | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


def _as_sequences(frames: np.ndarray, size: int, what: str) -> np.ndarray:
    frames = np.asarray(frames, np.float32)
    if frames.ndim == 4:
        frames = frames[None]
    if frames.ndim != 5 or frames.shape[2:] != (3, size, size) or frames.shape[1] == 0:
        raise ConfigError(f"{what} must be preprocessed frames [F, 3, {size}, {size}] or sequences "
                          f"[N, F, 3, {size}, {size}], got {tuple(np.shape(frames))}")
    return frames


def _split_holdout(frames: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole sequences when there are several, else the tail of the one sequence."""
    n, f = frames.shape[:2]
    if n >= 2:
        k = min(n - 1, max(1, round(n * fraction)))
        return frames[: n - k], frames[n - k :]
    k = min(f - 1, max(1, round(f * fraction)))
    if k < 1:
        raise ConfigError("need at least 2 calibration frames to hold some out for the agreement check")
    return frames[:, : f - k], frames[:, f - k :]


def _online_feeds(session, sequences: np.ndarray, meta: dict) -> list[dict]:
    """(frame, state) inputs met when stepping ``sequences`` [N, F, ...] through the fp32 model, N streams at once."""
    n = sequences.shape[0]
    state = [np.zeros((n, *s["shape"]), np.float32) for s in meta["state"]]
    names = ["frame", *(s["name"] for s in meta["state"])]
    feeds = []
    for t in range(sequences.shape[1]):
        feed = dict(zip(names, [np.ascontiguousarray(sequences[:, t]), *state]))
        feeds.append(feed)
        state = session.run(None, feed)[1:]
    return feeds


def _clips(sequences: np.ndarray, clip_len: int, interval: int = 1) -> np.ndarray:
    """Non-overlapping windows of ``clip_len`` frames ``interval`` apart (as the live ring samples them) from each
    sequence: ``[M, clip_len, 3, S, S]``."""
    n, f = sequences.shape[:2]
    span = window_span(clip_len, interval)
    if f < span:
        raise ConfigError(f"clip model takes {clip_len} frames {interval} apart ({span} consecutive frames); "
                          f"calibration sequences have only {f} frames")
    starts = range(0, f - span + 1, span)
    # [N, W, clip_len, 3, S, S] -> [N * W, clip_len, 3, S, S]
    windows = np.stack([sequences[:, s : s + span : interval] for s in starts], 1)
    return windows.reshape(-1, clip_len, *sequences.shape[2:])


def _run_logits(session, sequences: np.ndarray, meta: dict, clip_len: int, interval: int = 1) -> np.ndarray:
    """Logits at every step (online, streams stepped frame by frame from zero state) or every clip: ``[M, K]``."""
    if meta["kind"] == "online":
        names = ["frame", *(s["name"] for s in meta["state"])]
        state = [np.zeros((sequences.shape[0], *s["shape"]), np.float32) for s in meta["state"]]
        out = []
        for t in range(sequences.shape[1]):
            logits, *state = session.run(None, dict(zip(names, [np.ascontiguousarray(sequences[:, t]), *state])))
            out.append(logits)
        return np.concatenate(out)
    clips = _clips(sequences, clip_len, interval)
    return np.concatenate([session.run(None, {"clip": clips[i : i + 4]})[0] for i in range(0, len(clips), 4)])


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration_frames: np.ndarray, *,
                  holdout_frames: np.ndarray | None = None, holdout_fraction: float = 0.25, per_channel: bool = True,
                  threads: int | None = None) -> dict:
    """Static int8 quantization (QDQ, per-channel weights) of an exported fp32 file, with an agreement check.

    Calibration feeds what the model meets when deployed: online models get (frame, state) pairs collected by
    stepping the fp32 model frame by frame through the calibration sequences; clip models get windows of
    ``T`` frames ``frame_interval`` apart, as the live ring buffer samples them. The graph's inputs and outputs
    (state included) stay float32; only the inside is int8.
    Activations are uint8 and weights int8 (the layout x86 VNNI kernels run), calibrated with min/max.

    Args:
        fp32_path: a file from :func:`export_onnx`.
        out_path: the int8 file to write; it carries the fp32 metadata plus ``streamtsm.precision = "int8"``.
        calibration_frames: preprocessed float32 frames ``[F, 3, S, S]`` (one sequence) or ``[N, F, 3, S, S]``
            (see :func:`calibration_frames`).
        holdout_frames: frames for the agreement check, same layouts; when None, the last ``holdout_fraction`` of
            the calibration sequences (or of the frames of a single sequence) is held out of calibration.
        per_channel: per-output-channel weight scales.
        threads: onnxruntime intra-op threads for calibration and the check.

    Returns:
        ``{"path", "size_bytes", "fp32_size_bytes", "calibration_inputs", "holdout_predictions",
        "top1_agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "logit_std", "io_dtypes",
        "quantization"}`` (logit_std: the fp32 logits' spread over classes, averaged over predictions); agreement
        is the fraction of held-out predictions (online: every frame of every held-out sequence, stepped through
        both models) whose top-1 class is the same in int8 and fp32.

    Raises:
        ConfigError: the input is not an fp32 streamtsm export, or the frames do not fit it.
        ExportError: quantization failed or left a non-float graph input/output.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    meta = read_metadata(fp32_path)
    if meta["precision"] != "fp32":
        raise ConfigError(f"{fp32_path} is already {meta['precision']}; quantize the fp32 export")
    cfg = ModelConfig.from_dict(meta["config"])
    size = cfg.input_size
    clip_len = meta["io"]["inputs"]["clip"][1] if meta["kind"] == "clip" else 1
    interval = cfg.frame_interval if meta["kind"] == "clip" else 1
    frames = _as_sequences(calibration_frames, size, "calibration_frames")
    if holdout_frames is None:
        calib, holdout = _split_holdout(frames, holdout_fraction)
    else:
        calib, holdout = frames, _as_sequences(holdout_frames, size, "holdout_frames")

    fp32 = _cpu_session(fp32_path, threads)
    if meta["kind"] == "online":
        feeds = _online_feeds(fp32, calib, meta)
    else:
        clips = _clips(calib, clip_len, interval)
        feeds = [{"clip": clips[i : i + 4]} for i in range(0, len(clips), 4)]
    settings = {"format": "QDQ", "per_channel": per_channel, "activations": "uint8", "weights": "int8",
                "calibration": "minmax", "calibration_inputs": int(sum(len(next(iter(f.values()))) for f in feeds))}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamtsm-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except Exception as e:  # shape inference or optimization can fail on unusual graphs: quantize as exported
            log.warning("quantization pre-processing failed (%s); quantizing the graph as exported", _first_line(e))
            prepared = fp32_path
        quantized = Path(work) / "int8.onnx"
        try:
            quantize_static(str(prepared), str(quantized), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=False, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        except Exception as e:
            raise ExportError(f"onnxruntime quantization failed for {fp32_path}: {_first_line(e)}") from e
        model = onnx.load(str(quantized))
        io_dtypes = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
                     for v in [*model.graph.input, *model.graph.output]}
        not_float = {k: v for k, v in io_dtypes.items() if v != "float"}
        if not_float:
            raise ExportError(f"quantized graph has non-float32 inputs/outputs {not_float}; state must stay float")
        fp32_meta = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
        del model.metadata_props[:]
        for key, value in fp32_meta.items():
            model.metadata_props.add(key=key, value=value)
        tmp = out_path.with_name(out_path.name + ".tmp")
        try:
            _write_metadata(tmp, {META_PRECISION: "int8", META_QUANTIZATION: settings}, base=model)
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)

    int8 = _cpu_session(out_path, threads)
    ref = _run_logits(fp32, holdout, meta, clip_len, interval)
    got = _run_logits(int8, holdout, meta, clip_len, interval)
    diff = np.abs(ref - got)
    report = {
        "path": str(out_path),
        "size_bytes": out_path.stat().st_size,
        "fp32_size_bytes": fp32_path.stat().st_size,
        "calibration_inputs": settings["calibration_inputs"],
        "holdout_predictions": len(ref),
        "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "logit_std": float(ref.std(1).mean()),
        "io_dtypes": io_dtypes,
        "quantization": settings,
    }
    log.info("quantized %s to %s: top-1 agreement %.4f over %d held-out predictions", fp32_path, out_path,
             report["top1_agreement"], report["holdout_predictions"])
    return report
