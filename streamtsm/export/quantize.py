"""Int8 quantization of an exported file: calibration frames, static QDQ quantization with onnxruntime, and a
top-1 agreement check of the int8 file against its fp32 source (torch-free).

Calibration feeds what the model meets when deployed: online models get (frame, state) pairs collected by stepping
the fp32 model frame by frame through calibration sequences; clip models get windows of ``T`` frames
``frame_interval`` apart, as the live ring buffer samples them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..config import ModelConfig, window_span
from ..errors import ConfigError, first_line
from ..formats import CLIP, FRAME, META_PRECISION, META_QUANTIZATION, add_metadata, read_metadata
from .onnx import ExportError, cpu_session

log = logging.getLogger(__name__)


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

    def __init__(self, feeds: list[dict], bar=None) -> None:
        self._feeds = feeds
        self._next = 0
        self._bar = bar  # a tqdm bar ticked per input, or None

    def get_next(self) -> dict | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        if self._bar is not None:
            self._bar.update()
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
    names = [FRAME, *(s["name"] for s in meta["state"])]
    feeds = []
    for t in range(sequences.shape[1]):
        feed = dict(zip(names, [np.ascontiguousarray(sequences[:, t]), *state]))
        feeds.append(feed)
        state = session.run(None, feed)[1:]
    return feeds


def clip_windows(sequences: np.ndarray, clip_len: int, interval: int = 1) -> np.ndarray:
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
        names = [FRAME, *(s["name"] for s in meta["state"])]
        state = [np.zeros((sequences.shape[0], *s["shape"]), np.float32) for s in meta["state"]]
        out = []
        for t in range(sequences.shape[1]):
            logits, *state = session.run(None, dict(zip(names, [np.ascontiguousarray(sequences[:, t]), *state])))
            out.append(logits)
        return np.concatenate(out)
    clips = clip_windows(sequences, clip_len, interval)
    return np.concatenate([session.run(None, {CLIP: clips[i : i + 4]})[0] for i in range(0, len(clips), 4)])


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration_frames: np.ndarray, *,
                  holdout_frames: np.ndarray | None = None, holdout_fraction: float = 0.25, per_channel: bool = True,
                  threads: int | None = None, progress: bool = False) -> dict:
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
        progress: a progress bar on stderr while calibrating.

    Returns:
        ``{"path", "size_bytes", "fp32_size_bytes", "calibration_inputs", "holdout_predictions",
        "top1_agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "logit_std", "io_dtypes",
        "quantization"}`` (logit_std: the fp32 logits' spread over classes, averaged over predictions); agreement
        is the fraction of held-out predictions (online: every frame of every held-out sequence, stepped through
        both models) whose top-1 class is the same in int8 and fp32.

    Raises:
        ConfigError: the input is not an fp32 streamtsm export, or the frames do not fit it.
        ExportError: quantization failed or left a non-float graph input/output, or either model outputs NaN or
            infinity on the held-out frames (the int8 file is then removed).
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
    clip_len = meta["io"]["inputs"][CLIP][1] if meta["kind"] == "clip" else 1
    interval = cfg.frame_interval if meta["kind"] == "clip" else 1
    frames = _as_sequences(calibration_frames, size, "calibration_frames")
    if holdout_frames is None:
        calib, holdout = _split_holdout(frames, holdout_fraction)
    else:
        calib, holdout = frames, _as_sequences(holdout_frames, size, "holdout_frames")

    fp32 = cpu_session(fp32_path, threads)
    if meta["kind"] == "online":
        feeds = _online_feeds(fp32, calib, meta)
    else:
        clips = clip_windows(calib, clip_len, interval)
        feeds = [{CLIP: clips[i : i + 4]} for i in range(0, len(clips), 4)]
    settings = {"format": "QDQ", "per_channel": per_channel, "activations": "uint8", "weights": "int8",
                "calibration": "minmax", "calibration_inputs": int(sum(len(next(iter(f.values()))) for f in feeds))}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamtsm-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except Exception as e:  # shape inference or optimization can fail on unusual graphs: quantize as exported
            log.warning("quantization pre-processing failed (%s); quantizing the graph as exported", first_line(e))
            prepared = fp32_path
        quantized = Path(work) / "int8.onnx"
        from tqdm import tqdm

        try:
            with tqdm(total=len(feeds), desc="calibrating", unit="input", leave=False, disable=not progress) as bar:
                quantize_static(str(prepared), str(quantized), _Feeds(feeds, bar), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, reduce_range=False, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        except Exception as e:
            raise ExportError(f"onnxruntime quantization failed for {fp32_path}: {first_line(e)}") from e
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
        add_metadata(model, {META_PRECISION: "int8", META_QUANTIZATION: settings})
        tmp = out_path.with_name(out_path.name + ".tmp")
        try:
            onnx.save(model, str(tmp))
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)

    int8 = cpu_session(out_path, threads)
    ref = _run_logits(fp32, holdout, meta, clip_len, interval)
    got = _run_logits(int8, holdout, meta, clip_len, interval)
    for which, logits in (("fp32", ref), ("int8", got)):
        if not np.isfinite(logits).all():
            # NaN would make every comparison below false and the agreement figures meaningless; no file is kept.
            out_path.unlink(missing_ok=True)
            raise ExportError(f"the {which} model outputs NaN or infinity on the held-out frames "
                              f"({int((~np.isfinite(logits)).any(1).sum())} of {len(logits)} predictions); "
                              "expected finite logits, nothing written")
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
