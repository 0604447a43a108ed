"""An in-process stand-in for Triton Inference Server, for tests where no Triton is available.

A real gRPC server (grpcio, on 127.0.0.1 with an OS-chosen port) that implements the RPCs of Triton's
``GRPCInferenceService`` a client of an online model uses (ServerLive/Ready, ModelReady, ModelMetadata,
ModelConfig, RepositoryIndex, ModelInfer), from tritonclient's own service definitions. It reads a model
repository written for Triton's onnxruntime backend and runs each model with onnxruntime, emulating:

- the backend's load checks (see :func:`check_model`): the model's inputs are exactly the config's inputs, one per
  control, one per state; each control is a ``[batch, 1]`` model input of the control's type; inputs, outputs and
  states exist with the configured types and shapes. A model failing them is UNAVAILABLE, like in Triton.
- the sequence batcher with implicit state (oldest strategy): a request needs a correlation id; the first of a
  sequence needs START and gets the ``initial_state`` (zeros, or NaN standing for uninitialized memory when the
  config gives none); the state is kept between requests, dropped on END or after the idle timeout, and a request
  continuing an unknown sequence is an error. Requests waiting within ``batch_window_s`` are run as one batch, at
  most ``max_batch_size`` and never two of one sequence; the controls are filled in per row.

It knows nothing of streamtsm: everything comes from the repository, parsed with tritonclient's protobufs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent import futures as cf
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

# Triton data type -> ONNX element type, for the types a config here may use.
_ONNX_TYPES = {
    mc.TYPE_BOOL: onnx.TensorProto.BOOL, mc.TYPE_UINT8: onnx.TensorProto.UINT8, mc.TYPE_INT8: onnx.TensorProto.INT8,
    mc.TYPE_INT32: onnx.TensorProto.INT32, mc.TYPE_INT64: onnx.TensorProto.INT64,
    mc.TYPE_UINT32: onnx.TensorProto.UINT32, mc.TYPE_UINT64: onnx.TensorProto.UINT64,
    mc.TYPE_FP16: onnx.TensorProto.FLOAT16, mc.TYPE_FP32: onnx.TensorProto.FLOAT,
    mc.TYPE_FP64: onnx.TensorProto.DOUBLE,
}
_NUMPY = {mc.TYPE_BOOL: np.bool_, mc.TYPE_INT32: np.int32, mc.TYPE_INT64: np.int64, mc.TYPE_UINT32: np.uint32,
          mc.TYPE_UINT64: np.uint64, mc.TYPE_FP32: np.float32}
Kind = mc.ModelSequenceBatching.Control


def _dims(value_info) -> tuple[list[int], int]:
    """(dims with -1 for symbolic ones, ONNX element type) of a graph input or output."""
    t = value_info.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim], t.elem_type


def _control_type(control) -> int:
    if control.kind == Kind.CONTROL_SEQUENCE_CORRID:
        return control.data_type
    if control.bool_false_true:
        return mc.TYPE_BOOL
    if control.fp32_false_true:
        return mc.TYPE_FP32
    if control.int32_false_true:
        return mc.TYPE_INT32
    return mc.TYPE_INVALID


def _dims_match(model: list[int], config: list[int]) -> bool:
    return len(model) == len(config) and all(m == -1 or c == -1 or m == c for m, c in zip(model, config))


def check_model(config, graph) -> list[str]:
    """What Triton's onnxruntime backend would refuse to load, one line each (empty: it loads)."""
    problems = []
    inputs = {v.name: _dims(v) for v in graph.input}
    outputs = {v.name: _dims(v) for v in graph.output}
    batched = config.max_batch_size > 0

    def unbatched(dims: list[int], name: str) -> list[int]:
        if batched:
            if not dims or dims[0] != -1:
                problems.append(f"{name}: max_batch_size > 0 needs a dynamic first (batch) dimension, got {dims}")
            return dims[1:]
        return dims

    seq = config.sequence_batching if config.HasField("sequence_batching") else None
    controls = [(ci.name, c) for ci in (seq.control_input if seq else []) for c in ci.control]
    states = list(seq.state) if seq else []
    expected = len([i for i in config.input if not i.optional]) + len(controls) + len(states)
    if expected != len(inputs):
        problems.append(f"configuration expects {expected} inputs, model provides {len(inputs)}")
    for name, control in controls:
        if name not in inputs:
            problems.append(f"configuration specified sequence control '{name}', but model does not provide "
                            f"that input")
            continue
        dims, elem = inputs[name]
        if unbatched(dims, name) != [1]:
            problems.append(f"sequence control '{name}' in model has dims {dims}, but dims [1] is expected")
        wanted = _control_type(control)
        if _ONNX_TYPES.get(wanted) != elem:
            problems.append(f"sequence control '{name}': model type {elem}, config {mc.DataType.Name(wanted)}")
    for side, entries, found in (("input", config.input, inputs), ("output", config.output, outputs)):
        for entry in entries:
            if entry.name not in found:
                problems.append(f"{side} '{entry.name}' is not a model {side}")
                continue
            dims, elem = found[entry.name]
            if _ONNX_TYPES.get(entry.data_type) != elem:
                problems.append(f"{side} '{entry.name}': model type {elem}, config {mc.DataType.Name(entry.data_type)}")
            if not _dims_match(unbatched(dims, entry.name), list(entry.dims)):
                problems.append(f"{side} '{entry.name}': model dims {dims}, config dims {list(entry.dims)}")
    for state in states:
        for name, found in ((state.input_name, inputs), (state.output_name, outputs)):
            if name not in found:
                problems.append(f"state '{name}' is not in the model")
                continue
            dims, elem = found[name]
            if _ONNX_TYPES.get(state.data_type) != elem:
                problems.append(f"state '{name}': model type {elem}, config {mc.DataType.Name(state.data_type)}")
            if not _dims_match(unbatched(dims, name), list(state.dims)):
                problems.append(f"state '{name}': model dims {dims}, config dims {list(state.dims)}")
    return problems


@dataclass
class _Sequence:
    state: list[np.ndarray] | None = None  # None: not run yet (gets the initial state)
    last: float = field(default_factory=time.monotonic)


@dataclass
class _Pending:
    sequence_id: int
    start: bool
    end: bool
    inputs: dict[str, np.ndarray]
    requested: list[str]
    future: cf.Future = field(default_factory=cf.Future)


class _Model:
    """One model of the repository: its config, its session, its live sequences and its batcher."""

    def __init__(self, directory: Path, batch_window_s: float, idle_timeout_s: float | None) -> None:
        self.config = text_format.Parse((directory / "config.pbtxt").read_text(), mc.ModelConfig())
        self.name = self.config.name or directory.name
        path = directory / "1" / "model.onnx"
        graph = onnx.load(str(path)).graph
        self.problems = check_model(self.config, graph)
        self.ready = not self.problems
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) if self.ready else None
        seq = self.config.sequence_batching
        self.is_sequence = self.config.HasField("sequence_batching")
        idle_us = seq.max_sequence_idle_microseconds or 1_000_000  # Triton's default
        self.idle_timeout_s = idle_timeout_s if idle_timeout_s is not None else idle_us / 1e6
        self.window_s = max(batch_window_s, seq.oldest.max_queue_delay_microseconds / 1e6)
        self.sequences: dict[int, _Sequence] = {}
        self.batches: list[int] = []  # size of every execution
        # (sequence id, start, end, batch number) of every executed request; batch number indexes `batches`
        self.log: list[tuple[int, bool, bool, int]] = []
        self.expired: list[int] = []  # sequences dropped by the idle timeout
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._batcher, name=f"fake-triton-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # -- sequence bookkeeping ----------------------------------------------------------------------------------

    def admit(self, request: _Pending) -> None:
        """Check a request against the live sequences (what Triton does before batching) and queue it."""
        now = time.monotonic()
        with self._cond:
            for sid, seq in list(self.sequences.items()):
                if now - seq.last > self.idle_timeout_s:
                    del self.sequences[sid]
                    self.expired.append(sid)
            if request.start:
                self.sequences[request.sequence_id] = _Sequence()
            elif request.sequence_id not in self.sequences:
                raise ValueError(f"inference request for sequence {request.sequence_id} to model '{self.name}' "
                                 f"must specify the START flag on the first request of the sequence")
            self.sequences[request.sequence_id].last = now
            self._queue.append(request)
            self._cond.notify_all()

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            deadline = time.monotonic() + self.window_s
            while len(self._queue) < self.config.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch, seen, rest = [], set(), deque()
            while self._queue and len(batch) < max(1, self.config.max_batch_size):
                request = self._queue.popleft()
                if request.sequence_id in seen:  # oldest strategy: one request of a sequence per batch
                    rest.append(request)
                else:
                    seen.add(request.sequence_id)
                    batch.append(request)
            self._queue.extendleft(reversed(rest))
            return batch

    def _batcher(self) -> None:
        while (batch := self._take()) is not None:
            try:
                results = self._execute(batch)
            except Exception as e:  # noqa: BLE001 (handed to every request of the batch)
                for request in batch:
                    request.future.set_exception(e)
                continue
            for request, result in zip(batch, results):
                request.future.set_result(result)

    def _control_value(self, control, request: _Pending):
        dtype = _NUMPY[_control_type(control)]
        if control.kind == Kind.CONTROL_SEQUENCE_CORRID:
            return np.array([request.sequence_id], dtype)
        flag = {Kind.CONTROL_SEQUENCE_START: request.start, Kind.CONTROL_SEQUENCE_END: request.end,
                Kind.CONTROL_SEQUENCE_READY: True}[control.kind]
        values = control.bool_false_true or control.fp32_false_true or control.int32_false_true
        return np.array([values[int(flag)]], dtype)

    def _execute(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        seq = self.config.sequence_batching
        feeds = {name: np.concatenate([r.inputs[name] for r in batch]) for name in batch[0].inputs}
        for ci in seq.control_input:
            for control in ci.control:
                feeds[ci.name] = np.stack([self._control_value(control, r) for r in batch])  # [n, 1]
        with self._cond:
            held = [self.sequences[r.sequence_id].state for r in batch]
        for i, state in enumerate(seq.state):
            rows = []
            for held_state in held:
                if held_state is not None:
                    rows.append(held_state[i])
                elif state.initial_state and state.initial_state[0].HasField("zero_data"):
                    rows.append(np.zeros((1, *state.dims), _NUMPY[state.data_type]))
                else:  # Triton's start state without initial_state is uninitialized memory
                    rows.append(np.full((1, *state.dims), np.nan, _NUMPY[state.data_type]))
            feeds[state.input_name] = np.concatenate(rows)
        names = [o.name for o in self.session.get_outputs()]
        outs = dict(zip(names, self.session.run(names, feeds)))
        now = time.monotonic()
        results = []
        with self._cond:
            self.batches.append(len(batch))
            for b, request in enumerate(batch):
                self.log.append((request.sequence_id, request.start, request.end, len(self.batches) - 1))
                if request.end:
                    self.sequences.pop(request.sequence_id, None)
                elif request.sequence_id in self.sequences:
                    live = self.sequences[request.sequence_id]
                    live.state = [outs[s.output_name][b : b + 1] for s in seq.state]
                    live.last = now
                results.append({name: outs[name][b : b + 1] for name in request.requested})
        return results


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A gRPC server speaking Triton's protocol for the models of ``repo_dir``.

    Args:
        repo_dir: a model repository (``<name>/config.pbtxt``, ``<name>/1/model.onnx``).
        batch_window_s: how long the batcher waits for more requests before running a batch.
        idle_timeout_s: drop sequences idle this long (the config's timeout when None).

    Use as a context manager, or ``start()`` / ``stop()``; ``url`` is ``127.0.0.1:PORT``.
    """

    def __init__(self, repo_dir: str | Path, *, batch_window_s: float = 0.05,
                 idle_timeout_s: float | None = None) -> None:
        self.models = {}
        for directory in sorted(Path(repo_dir).iterdir()):
            if directory.is_dir() and not directory.name.startswith(".") and (directory / "config.pbtxt").is_file():
                model = _Model(directory, batch_window_s, idle_timeout_s)
                self.models[model.name] = model
        self._server = grpc.server(cf.ThreadPoolExecutor(max_workers=16))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.url = f"127.0.0.1:{self.port}"

    def start(self) -> FakeTriton:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=0).wait(timeout=5)
        for model in self.models.values():
            model.stop()

    def __enter__(self) -> FakeTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- RPCs --------------------------------------------------------------------------------------------------

    def _model(self, name: str, context, *, ready: bool = True) -> _Model:
        model = self.models.get(name)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found")
        if ready and not model.ready:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"Request for unknown model: '{name}' has no available "
                                                       f"versions: {'; '.join(model.problems)}")
        return model

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        model = self.models.get(request.name)
        return service_pb2.ModelReadyResponse(ready=bool(model and model.ready))

    def RepositoryIndex(self, request, context):
        return service_pb2.RepositoryIndexResponse(models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(
                name=m.name, version="1", state="READY" if m.ready else "UNAVAILABLE", reason="; ".join(m.problems))
            for m in self.models.values()])

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config=self._model(request.name, context, ready=False).config)

    def ModelMetadata(self, request, context):
        model = self._model(request.name, context)
        batch = [-1] if model.config.max_batch_size > 0 else []

        def tensors(entries):
            return [service_pb2.ModelMetadataResponse.TensorMetadata(
                name=e.name, datatype=mc.DataType.Name(e.data_type).removeprefix("TYPE_"), shape=batch + list(e.dims))
                for e in entries]

        return service_pb2.ModelMetadataResponse(name=model.name, versions=["1"], platform=model.config.platform,
                                                 inputs=tensors(model.config.input),
                                                 outputs=tensors(model.config.output))

    def ModelInfer(self, request, context):
        model = self._model(request.model_name, context)
        params = request.parameters
        sid = 0
        if "sequence_id" in params:  # tritonclient sends int64_param; other clients may send uint64_param
            sid = params["sequence_id"].int64_param or params["sequence_id"].uint64_param
        if model.is_sequence and not sid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inference request to model '{model.name}' must "
                                                            f"specify a non-zero or non-empty correlation ID")
        inputs = {}
        for i, tensor in enumerate(request.inputs):
            if i >= len(request.raw_input_contents):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this fake reads raw_input_contents only")
            dtype = triton_to_np_dtype(tensor.datatype)
            inputs[tensor.name] = np.frombuffer(request.raw_input_contents[i], dtype).reshape(list(tensor.shape))
        for entry in model.config.input:
            if entry.name not in inputs:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected input '{entry.name}' for model "
                                                                f"'{model.name}'")
            if list(inputs[entry.name].shape) != [1, *entry.dims]:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input '{entry.name}' has shape {list(inputs[entry.name].shape)}, expected "
                              f"[1, {', '.join(map(str, entry.dims))}] (sequence requests carry batch 1)")
        requested = [o.name for o in request.outputs] or [o.name for o in model.config.output]
        pending = _Pending(sid, bool(params["sequence_start"].bool_param) if "sequence_start" in params else False,
                           bool(params["sequence_end"].bool_param) if "sequence_end" in params else False,
                           inputs, requested)
        try:
            model.admit(pending)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            outputs = pending.future.result(timeout=30)
        except Exception as e:  # noqa: BLE001 (reported to the client)
            context.abort(grpc.StatusCode.INTERNAL, f"onnx runtime error: {e}")
        response = service_pb2.ModelInferResponse(model_name=model.name, model_version="1", id=request.id)
        for name, value in outputs.items():
            response.outputs.add(name=name, datatype=np_to_triton_dtype(value.dtype), shape=list(value.shape))
            response.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
        return response
