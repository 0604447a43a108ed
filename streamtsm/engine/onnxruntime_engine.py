"""The onnxruntime backend: runs a file from ``streamtsm export-onnx`` with nothing but that file (no torch).

Everything the engine needs (config, labels, kind, state names and shapes) comes from the file's streamtsm
metadata (see :mod:`streamtsm.formats`), and the graph's inputs and outputs are checked against it on load. The
state is a mapping keyed by the graph's state input names (``state_i``), so it feeds the graph as it is.

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
from ..errors import ConfigError, first_line
from ..formats import BATCH, CLIP, FRAME, LOGITS, read_metadata
from ..labels import resolve_labels
from .base import ClipEngine, Engine, OnlineEngine, State, StateSpec, check_frames

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


def session_options(threads: int | None, spinning: bool | None = None) -> ort.SessionOptions:
    """The session options the engines use: ``threads`` intra-op threads (onnxruntime's default, one per core,
    when None), one inter-op thread (the graphs are one chain of operators: a second pool would only add threads),
    and the intra-op pool's spinning.

    Spinning: between parallel regions onnxruntime's pool threads busy-wait for the next one, which saves a wake-up
    when the model has the cores to itself but takes them from every other thread when it does not. In a pipeline
    the capture threads render or decode and preprocess on the same cores, so spinning is off unless asked for
    (``spinning=True``); with one thread there is no pool and it changes nothing.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: onnxruntime's warnings about unused initializers are noise here
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def _open_session(path: Path, providers: str | Sequence[str] | None, threads: int | None,
                  spinning: bool | None = None) -> ort.InferenceSession:
    requested = resolve_providers(providers)
    chosen = requested or default_providers()
    options = session_options(threads, spinning)
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, NotImplemented, ...)
        raise ConfigError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
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


def _metadata_vs_graph(meta: dict, session: ort.InferenceSession) -> list[str]:
    """What the metadata's kind, state list and config say the graph must be, against the graph itself. The io
    table is checked apart: a file edited by hand, or merged from two exports, can carry an io table that matches
    the graph and a kind, state or config that do not, and the engine trusts all of them."""
    inputs = {v.name: v.shape for v in session.get_inputs()}
    outputs = {v.name: v.shape for v in session.get_outputs()}
    cfg, kind, states = meta["config"], meta["kind"], meta["state"]
    if not isinstance(cfg, dict) or not isinstance(states, list) or not all(
            isinstance(s, dict) and {"name", "output", "shape"} <= s.keys() for s in states):
        return [f"metadata config {type(cfg).__name__} and state {states!r}: expected a config table and a list of "
                "{name, output, shape} entries"]
    problems = []

    def fixed(dim) -> int | None:
        return dim if isinstance(dim, int) else None

    size = cfg.get("input_size")
    main = FRAME if kind == "online" else CLIP
    if main not in inputs:
        problems.append(f"kind is {kind!r} but the graph has no {main!r} input (its inputs: {', '.join(inputs)})")
    else:
        rank = 4 if kind == "online" else 5
        shape = inputs[main]
        if len(shape) != rank:
            problems.append(f"kind is {kind!r} but the graph's {main!r} has rank {len(shape)}, expected {rank}")
        elif any(fixed(d) not in (None, size) for d in shape[-2:]):
            problems.append(f"config input_size is {size} but the graph's {main!r} is {_shape_text(shape)}")
    if kind == "online":
        graph_states = sorted(n for n in inputs if n != main)
        if len(graph_states) != len(states):
            problems.append(f"metadata lists {len(states)} state tensors, the graph takes {len(graph_states)}")
        for st in states:
            for name, side in ((st["name"], inputs), (st["output"], outputs)):
                if name not in side:
                    continue  # the io table's check names a missing tensor
                got, want = side[name], [BATCH, *st["shape"]]
                if len(got) != len(want) or any(fixed(g) not in (None, w) for g, w in zip(got[1:], want[1:])):
                    problems.append(f"state {name!r} is {_shape_text(want)} in the metadata, "
                                    f"{_shape_text(got)} in the graph")
    elif states:
        problems.append(f"kind is 'clip' but the metadata lists {len(states)} state tensors")
    logits = outputs.get(LOGITS)
    if logits is None:
        problems.append(f"the graph has no {LOGITS!r} output")
    elif len(logits) != 2 or fixed(logits[1]) not in (None, cfg.get("num_classes")):
        problems.append(f"config num_classes is {cfg.get('num_classes')} but the graph's {LOGITS!r} is "
                        f"{_shape_text(logits)}")
    return problems


def _check_graph(path: Path, meta: dict, session: ort.InferenceSession) -> None:
    """The graph's inputs and outputs are the ones its metadata promises (its kind, state list, config and io
    table), with the same shapes, all float32."""
    problems = _metadata_vs_graph(meta, session)
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

    def __init__(self, path: str | os.PathLike, kind: str, providers, labels, labels_file, threads,
                 spinning=None) -> None:
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        if self.meta["kind"] != kind:
            raise ConfigError(f"{self.path} holds a {self.meta['kind']} model; use load_onnx_engine() or the "
                              f"{'OrtOnlineEngine' if self.meta['kind'] == 'online' else 'OrtClipEngine'}")
        self.cfg = ModelConfig.from_dict(self.meta["config"])
        self.session = _open_session(self.path, providers, threads, spinning)
        _check_graph(self.path, self.meta, self.session)  # before the labels: a wrong class count is named here
        self.labels = resolve_labels(self.cfg.num_classes, labels_file=labels_file, given=labels,
                                     saved=self.cfg.labels)
        self.providers = self.session.get_providers()
        self.host_cpu = self.providers[0] not in _DEVICE_PROVIDERS


# -- engines ------------------------------------------------------------------------------------------------


class OrtOnlineEngine(OnlineEngine):
    """Online step of an exported online model: ``logits, state = engine.step(frames, state)``.

    Args:
        path: an .onnx file written by ``streamtsm export-onnx`` (fp32 or int8).
        providers: execution providers in order of preference (short or full names); automatic when None.
        labels, labels_file: class names, or a file of them; the file's own when neither is given, else numbered
            (see :func:`streamtsm.labels.resolve_labels`).
        threads: onnxruntime intra-op threads (onnxruntime's default when None).
        spinning: let the intra-op pool's threads busy-wait between parallel regions (off unless True; see
            :func:`session_options`).
        io_binding: keep the state in device memory with IOBinding; None turns it on when the CUDA or TensorRT
            provider runs the model. True on CPU runs the same path with host OrtValues (what the tests do).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: str | Sequence[str] | None = None,
                 labels: Sequence[str] | None = None, *, threads: int | None = None, io_binding: bool | None = None,
                 labels_file: str | os.PathLike | None = None, spinning: bool | None = None) -> None:
        model = _OrtModel(path, "online", providers, labels, labels_file, threads, spinning)
        self.path, self.meta, self.cfg, self.labels = model.path, model.meta, model.cfg, model.labels
        self.session, self.providers, self.host_cpu = model.session, model.providers, model.host_cpu
        self.precision = self.meta["precision"]
        self.state_spec = tuple(StateSpec(s["name"], tuple(s["shape"])) for s in self.meta["state"])
        self._outputs = [LOGITS, *(s["output"] for s in self.meta["state"])]
        if io_binding is None:
            io_binding = not self.host_cpu
        self._device = _DeviceState(self.session, self.state_spec, self._outputs,
                                    "cpu" if self.host_cpu else "cuda") if io_binding else None

    @property
    def num_state(self) -> int:
        return len(self.state_spec)

    def zero_state(self, batch: int) -> State:
        if self._device is not None:
            return self._device.zeros(batch)
        return {spec.name: np.zeros((batch, *spec.shape), np.float32) for spec in self.state_spec}

    def step(self, frames: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        frames = check_frames(frames, self.cfg.input_size)
        state = self.check_state(state)
        if self._device is not None:
            return self._device.step(frames, state)
        self.check_state_shapes(state, frames.shape[0])
        # The state's names are the graph's state inputs: it feeds the session as it is.
        logits, *new_state = self.session.run(self._outputs, {FRAME: frames, **state})
        return logits, dict(zip(self.state_names, new_state))

    def stack(self, states: Sequence[State]) -> State:
        if len(states) == 1:
            return states[0]
        if self._device is not None:
            return self._device.stack(states)
        return {name: np.concatenate([s[name] for s in states], 0) for name in self.state_names}

    def split(self, state: State, batch: int) -> list[State]:
        if batch == 1:
            return [state]
        if self._device is not None:
            return self._device.split(state, batch)
        return [{name: s[i : i + 1] for name, s in state.items()} for i in range(batch)]

    def close(self) -> None:
        self.session = None
        self._device = None


class OrtClipEngine(ClipEngine):
    """An exported clip model on windows of frames ``[B, T, 3, S, S]`` (T = ``self.clip_len``).

    Args: as :class:`OrtOnlineEngine`, without io_binding (clips come from the host each call).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: str | Sequence[str] | None = None,
                 labels: Sequence[str] | None = None, *, threads: int | None = None,
                 labels_file: str | os.PathLike | None = None, spinning: bool | None = None) -> None:
        model = _OrtModel(path, "clip", providers, labels, labels_file, threads, spinning)
        self.path, self.meta, self.cfg, self.labels = model.path, model.meta, model.cfg, model.labels
        self.session, self.providers, self.host_cpu = model.session, model.providers, model.host_cpu
        self.precision = self.meta["precision"]
        self.clip_len = int(self.meta["io"]["inputs"][CLIP][1])

    def predict(self, clips: np.ndarray) -> np.ndarray:
        clips = check_frames(clips, self.cfg.input_size, what="clips", clip_len=self.clip_len)
        return self.session.run([LOGITS], {CLIP: clips})[0]

    def close(self) -> None:
        self.session = None


def load_onnx_engine(path: str | os.PathLike, providers: str | Sequence[str] | None = None,
                     labels: Sequence[str] | None = None, *, threads: int | None = None,
                     labels_file: str | os.PathLike | None = None, spinning: bool | None = None) -> Engine:
    """An :class:`OrtOnlineEngine` or :class:`OrtClipEngine`, as the file's metadata says.

    Raises:
        ConfigError: missing file, not ONNX, not a streamtsm export, graph not matching its metadata, unknown or
            unusable providers, wrong number of labels.
    """
    kind = read_metadata(path)["kind"]
    engine = OrtOnlineEngine if kind == "online" else OrtClipEngine
    return engine(path, providers, labels, threads=threads, labels_file=labels_file, spinning=spinning)


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

    def __init__(self, session: ort.InferenceSession, spec: tuple[StateSpec, ...], outputs: list[str], device: str,
                 device_id: int = 0) -> None:
        self.session = session
        self.spec = spec
        self.names = tuple(s.name for s in spec)
        self.outputs = outputs  # logits first, then the new state in spec order
        self.device = device
        self.device_id = device_id

    def _upload(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.float32), self.device, self.device_id)

    def zeros(self, batch: int) -> dict[str, ort.OrtValue]:
        # Uploaded rather than allocated: ortvalue_from_shape_and_type leaves device memory uninitialized.
        return {s.name: self._upload(np.zeros((batch, *s.shape), np.float32)) for s in self.spec}

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

    def _whole(self, state: dict) -> dict[str, ort.OrtValue]:
        """``state`` with every _Row made an OrtValue of its own."""
        return {name: self._batch_of([s]) if isinstance(s, _Row) else s for name, s in state.items()}

    def step(self, frames: np.ndarray, state: dict) -> tuple[np.ndarray, dict[str, ort.OrtValue]]:
        state = self._whole(state)
        for name, s in state.items():
            if s.shape()[0] != frames.shape[0]:
                raise ValueError(f"state {name!r} holds {s.shape()[0]} streams but the frame batch has "
                                 f"{frames.shape[0]}")
        binding = self.session.io_binding()
        binding.bind_cpu_input(FRAME, frames)
        for name, value in state.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.outputs[0], "cpu")  # logits: the only thing copied back each step
        for name in self.outputs[1:]:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        logits, *new_state = binding.get_outputs()
        return logits.numpy(), dict(zip(self.names, new_state))

    def stack(self, states: Sequence[dict]) -> dict[str, ort.OrtValue]:
        return {name: self._batch_of([s[name] for s in states]) for name in self.names}

    def split(self, state: dict, batch: int) -> list[dict[str, _Row]]:
        state = self._whole(state)
        return [{name: _Row(s, i) for name, s in state.items()} for i in range(batch)]
