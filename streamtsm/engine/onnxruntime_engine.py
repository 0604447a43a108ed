"""The onnxruntime backend: runs a file from ``streamtsm export-onnx`` with nothing but that file (no torch).

Everything the engine needs (config, labels, kind, state names and shapes) comes from the file's streamtsm
metadata (see :mod:`streamtsm.export.onnx`), and the graph's inputs and outputs are checked against it on load.

Execution providers: by default TensorRT, then CUDA, then CPU, among those onnxruntime offers and only when a CUDA
device is present (onnxruntime-gpu lists the GPU providers on machines without a GPU too); an explicit list
(``["cpu"]``, ``"cuda,cpu"``, ``["tensorrt", "cuda", "cpu"]``) overrides it. The providers actually used are logged
and kept as ``engine.providers``.

State, where it lives::

    CPU provider           numpy arrays in and out of session.run (host memory is the device)
    CUDA / TensorRT        OrtValues in device memory, bound with IOBinding: each step copies the frames in and
                           the logits out, the state never leaves the GPU. split() hands out row views of the batch
                           state and stack() of exactly those rows, in order, gives the batch state back without a
                           copy; only when streams join or leave (a new composition of rows) are the rows gathered
                           through host memory, once, after which the new batch state stays on the device again.

This module must not import torch, directly or through streamtsm.models (tested).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..config import ModelConfig
from ..errors import ConfigError
from ..export.onnx import BATCH, read_metadata
from .base import ClipEngine, Engine, OnlineEngine, State, default_labels

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_ALIASES = {"trt": "tensorrt", "gpu": "cuda"}
_DEVICE_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


# -- providers ----------------------------------------------------------------------------------------------


def resolve_providers(names: str | Sequence[str] | None) -> list[str] | None:
    """Map short names (``cpu``, ``cuda``, ``tensorrt``/``trt``; or full EP names) to onnxruntime EP names.

    ``"cpu,cuda"`` and ``["cpu", "cuda"]`` are both accepted; None stays None (automatic choice).
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    for name in names:
        key = _ALIASES.get(name.strip().lower(), name.strip().lower())
        if key in PROVIDERS:
            out.append(PROVIDERS[key])
        elif name.strip() in PROVIDERS.values():
            out.append(name.strip())
        else:
            raise ConfigError(f"unknown execution provider {name.strip()!r}; expected any of "
                              f"{', '.join(PROVIDERS)} (or trt), comma-separated, in order of preference")
    if not out:
        raise ConfigError(f"no execution provider given; expected any of {', '.join(PROVIDERS)}")
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver), asked of libcuda directly, without torch."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(name)
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


def default_providers() -> list[str]:
    """TensorRT, CUDA, CPU: those onnxruntime offers, GPU ones only when a CUDA device is present."""
    available = ort.get_available_providers()
    gpu = [p for p in _DEVICE_PROVIDERS if p in available] if cuda_device_count() > 0 else []
    return [*gpu, "CPUExecutionProvider"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _open_session(path: Path, providers: str | Sequence[str] | None, threads: int | None) -> ort.InferenceSession:
    requested = resolve_providers(providers)
    chosen = requested or default_providers()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: onnxruntime's warnings about unused initializers are noise here
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, NotImplemented, ...)
        raise ConfigError(f"onnxruntime cannot load {path}: {_first_line(e)}") from None
    used = session.get_providers()
    if requested is not None and not set(requested) & set(used):
        raise ConfigError(f"none of the requested execution providers {requested} could be used for {path}; "
                          f"onnxruntime runs it with {used} (available here: {ort.get_available_providers()})")
    if used[0] != chosen[0]:
        log.warning("%s: %s unusable here; running with %s", path.name, chosen[0], used)
    log.info("%s: onnxruntime %s with providers %s", path.name, ort.__version__, used)
    return session


# -- file checks --------------------------------------------------------------------------------------------


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else BATCH if d == BATCH else f"{d}?" for d in shape) + "]"


def _check_graph(path: Path, meta: dict, session: ort.InferenceSession) -> None:
    """The graph's inputs and outputs are the ones its metadata promises, with the same shapes, all float32."""
    problems = []
    for side, found in (("input", session.get_inputs()), ("output", session.get_outputs())):
        expected = meta["io"][side + "s"]
        found = {v.name: v for v in found}
        for name, shape in expected.items():
            if name not in found:
                problems.append(f"{side} {name!r} {_shape_text(shape)} is missing")
                continue
            got = found[name].shape
            dims_ok = len(got) == len(shape) and all(
                not isinstance(g, int) if e == BATCH else g == e for g, e in zip(got, shape))
            if not dims_ok:
                problems.append(f"{side} {name!r} has shape {_shape_text(got)}, expected {_shape_text(shape)}")
            if found[name].type != "tensor(float)":
                problems.append(f"{side} {name!r} is {found[name].type}, expected tensor(float)")
        if side == "input":
            problems += [f"unexpected input {n!r}" for n in found if n not in expected]
    if problems:
        names = ", ".join(v.name for v in session.get_inputs())
        raise ConfigError(f"{path} does not match its streamtsm metadata: {'; '.join(problems)} "
                          f"(graph inputs: {names})")


class _OrtModel:
    """What both engines load: metadata, config, labels, the checked session."""

    def __init__(self, path: str | os.PathLike, kind: str, providers, labels, threads) -> None:
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        if self.meta["kind"] != kind:
            raise ConfigError(f"{self.path} holds a {self.meta['kind']} model; use load_onnx_engine() or the "
                              f"{'OrtOnlineEngine' if self.meta['kind'] == 'online' else 'OrtClipEngine'}")
        self.cfg = ModelConfig.from_dict(self.meta["config"])
        if labels is not None and len(labels) != self.cfg.num_classes:
            raise ConfigError(f"{len(labels)} labels given for a model with {self.cfg.num_classes} classes")
        self.labels = list(labels or self.cfg.labels or default_labels(self.cfg.num_classes))
        self.session = _open_session(self.path, providers, threads)
        _check_graph(self.path, self.meta, self.session)
        self.providers = self.session.get_providers()


def _check_frames(frames: np.ndarray, size: int, what: str, rank: int) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.ndim != rank or frames.shape[-3:] != (3, size, size):
        shape = frames.shape if isinstance(frames, np.ndarray) else type(frames).__name__
        layout = "[B, 3, H, W]" if rank == 4 else "[B, T, 3, H, W]"
        raise ValueError(f"{what} must be a float32 {layout} array with H = W = {size}, got {shape}")
    return np.ascontiguousarray(frames, dtype=np.float32)


# -- engines ------------------------------------------------------------------------------------------------


class OrtOnlineEngine(OnlineEngine):
    """Online step of an exported online model: ``logits, state = engine.step(frames, state)``.

    Args:
        path: an .onnx file written by ``streamtsm export-onnx`` (fp32 or int8).
        providers: execution providers in order of preference (short or full names); automatic when None.
        labels: class names (the file's, else ``class_i``, when None).
        threads: onnxruntime intra-op threads (onnxruntime's default when None).
        io_binding: keep the state in device memory with IOBinding; None turns it on when the CUDA or TensorRT
            provider runs the model. True on CPU runs the same path with host OrtValues (what the tests do).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: str | Sequence[str] | None = None,
                 labels: list[str] | None = None, *, threads: int | None = None,
                 io_binding: bool | None = None) -> None:
        model = _OrtModel(path, "online", providers, labels, threads)
        self.path, self.meta, self.cfg, self.labels = model.path, model.meta, model.cfg, model.labels
        self.session, self.providers = model.session, model.providers
        self.precision = self.meta["precision"]
        self._state_inputs = [s["name"] for s in self.meta["state"]]
        self._state_outputs = [s["output"] for s in self.meta["state"]]
        self._shapes = [tuple(s["shape"]) for s in self.meta["state"]]
        self._outputs = ["logits", *self._state_outputs]
        on_device = self.providers[0] in _DEVICE_PROVIDERS
        if io_binding is None:
            io_binding = on_device
        self._device = _DeviceState(self.session, self._state_inputs, self._outputs, self._shapes,
                                    "cuda" if on_device else "cpu") if io_binding else None

    @property
    def num_state(self) -> int:
        return len(self._shapes)

    def zero_state(self, batch: int) -> State:
        if self._device is not None:
            return self._device.zeros(batch)
        return [np.zeros((batch, *shape), np.float32) for shape in self._shapes]

    def step(self, frames: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        frames = _check_frames(frames, self.cfg.input_size, "frames", 4)
        if len(state) != len(self._shapes):
            raise ValueError(f"state must hold {len(self._shapes)} arrays (one per shifted block), got {len(state)}")
        if self._device is not None:
            return self._device.step(frames, state)
        for i, s in enumerate(state):
            if s.shape[0] != frames.shape[0]:
                raise ValueError(f"state[{i}] holds {s.shape[0]} streams but the frame batch has {frames.shape[0]}")
        feeds = {"frame": frames, **dict(zip(self._state_inputs, state))}
        logits, *new_state = self.session.run(self._outputs, feeds)
        return logits, new_state

    def stack(self, states: Sequence[State]) -> State:
        if len(states) == 1:
            return states[0]
        if self._device is not None:
            return self._device.stack(states)
        return [np.concatenate(parts, 0) for parts in zip(*states)]

    def split(self, state: State, batch: int) -> list[State]:
        if batch == 1:
            return [state]
        if self._device is not None:
            return self._device.split(state, batch)
        return [[s[i : i + 1] for s in state] for i in range(batch)]

    def close(self) -> None:
        self.session = None
        self._device = None


class OrtClipEngine(ClipEngine):
    """An exported clip model on windows of frames ``[B, T, 3, S, S]`` (T = ``self.clip_len``).

    Args: as :class:`OrtOnlineEngine`, without io_binding (clips come from the host each call).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: str | Sequence[str] | None = None,
                 labels: list[str] | None = None, *, threads: int | None = None) -> None:
        model = _OrtModel(path, "clip", providers, labels, threads)
        self.path, self.meta, self.cfg, self.labels = model.path, model.meta, model.cfg, model.labels
        self.session, self.providers = model.session, model.providers
        self.precision = self.meta["precision"]
        self.clip_len = int(self.meta["io"]["inputs"]["clip"][1])

    def predict(self, clips: np.ndarray) -> np.ndarray:
        clips = _check_frames(clips, self.cfg.input_size, "clips", 5)
        if clips.shape[1] != self.clip_len:
            raise ValueError(f"clips must have T = {self.clip_len} frames, got {clips.shape[1]}")
        return self.session.run(["logits"], {"clip": clips})[0]

    def close(self) -> None:
        self.session = None


def load_onnx_engine(path: str | os.PathLike, providers: str | Sequence[str] | None = None,
                     labels: list[str] | None = None, *, threads: int | None = None) -> Engine:
    """An :class:`OrtOnlineEngine` or :class:`OrtClipEngine`, as the file's metadata says.

    Raises:
        ConfigError: missing file, not ONNX, not a streamtsm export, graph not matching its metadata, unknown or
            unusable providers, wrong number of labels.
    """
    kind = read_metadata(path)["kind"]
    engine = OrtOnlineEngine if kind == "online" else OrtClipEngine
    return engine(path, providers, labels, threads=threads)


# -- device-resident state (CUDA / TensorRT) ----------------------------------------------------------------


class _Row:
    """Row ``index`` of a batch state tensor held on the device: what split() hands out, without copying."""

    __slots__ = ("index", "parent")

    def __init__(self, parent: ort.OrtValue, index: int) -> None:
        self.parent = parent
        self.index = index

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *self.parent.shape()[1:])


class _DeviceState:
    """The IOBinding path: state OrtValues stay in ``device`` memory between steps.

    Copies through host memory happen only in :meth:`stack` / single-row steps when the composition of a batch
    changes (streams join or leave); stepping the same batch, or splitting it and stacking the same rows back in
    order, copies nothing but frames in and logits out.
    """

    def __init__(self, session: ort.InferenceSession, inputs: list[str], outputs: list[str],
                 shapes: list[tuple[int, ...]], device: str, device_id: int = 0) -> None:
        self.session = session
        self.inputs = inputs
        self.outputs = outputs  # logits first, then the new state
        self.shapes = shapes
        self.device = device
        self.device_id = device_id

    def _upload(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.float32), self.device, self.device_id)

    def zeros(self, batch: int) -> list[ort.OrtValue]:
        # Uploaded rather than allocated: ortvalue_from_shape_and_type leaves device memory uninitialized.
        return [self._upload(np.zeros((batch, *shape), np.float32)) for shape in self.shapes]

    def _batch_of(self, parts: list) -> ort.OrtValue:
        """One device tensor of the rows ``parts`` (OrtValues or _Rows), copying only if they are not one."""
        if len(parts) == 1 and isinstance(parts[0], ort.OrtValue):
            return parts[0]
        first = parts[0]
        if (isinstance(first, _Row) and first.parent.shape()[0] == len(parts)
                and all(isinstance(p, _Row) and p.parent is first.parent and p.index == i
                        for i, p in enumerate(parts))):
            return first.parent  # the rows of one batch, all of them, in order: the batch itself
        hosts: dict[int, np.ndarray] = {}  # one download per parent

        def host(p) -> np.ndarray:
            value = p.parent if isinstance(p, _Row) else p
            if id(value) not in hosts:
                hosts[id(value)] = value.numpy()
            return hosts[id(value)][p.index : p.index + 1] if isinstance(p, _Row) else hosts[id(value)]

        return self._upload(np.concatenate([host(p) for p in parts], 0))

    def step(self, frames: np.ndarray, state: list) -> tuple[np.ndarray, list[ort.OrtValue]]:
        state = [self._batch_of([s]) if isinstance(s, _Row) else s for s in state]
        for i, s in enumerate(state):
            if s.shape()[0] != frames.shape[0]:
                raise ValueError(f"state[{i}] holds {s.shape()[0]} streams but the frame batch has {frames.shape[0]}")
        binding = self.session.io_binding()
        binding.bind_cpu_input("frame", frames)
        for name, value in zip(self.inputs, state):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.outputs[0], "cpu")  # logits: the only thing copied back each step
        for name in self.outputs[1:]:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        logits, *new_state = binding.get_outputs()
        return logits.numpy(), new_state

    def stack(self, states: Sequence[list]) -> list[ort.OrtValue]:
        return [self._batch_of(list(parts)) for parts in zip(*states)]

    def split(self, state: list, batch: int) -> list[list[_Row]]:
        state = [self._batch_of([s]) if isinstance(s, _Row) else s for s in state]
        return [[_Row(s, i) for s in state] for i in range(batch)]
