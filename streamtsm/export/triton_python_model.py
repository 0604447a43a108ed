"""Triton python-backend model for a streamtsm online step: ``export-triton --runtime python`` copies this file to
``<repo>/<name>/1/model.py`` beside the served ONNX step graph (``1/model.onnx``, the same graph the onnxruntime
backend would load: inputs ``frame``, ``START``, ``END``, ``CORRID``, ``state_i``; outputs ``logits``,
``sequence_id``, ``new_state_i``).

It runs where Triton's python backend stub runs, not where streamtsm is installed, so it imports nothing from
streamtsm: only numpy, onnxruntime and (inside Triton) ``triton_python_backend_utils``.

Why it keeps the folds itself: the config is the onnxruntime-backend repository's sequence batcher (oldest
strategy, the same START / END / CORRID control inputs, the same idle timeout) without ``state`` entries, so Triton
hands this model each request with its control tensors (``START`` / ``END`` bool ``[1, 1]``, ``CORRID`` uint64
``[1, 1]``: the sequence batcher adds them to the request as ordinary inputs) and the model keeps each sequence's
state in :class:`SequenceStates`, keyed by correlation id:

- START: the sequence starts from zeros, whatever was held for that id;
- END: the state is dropped after the request is answered;
- idle: a sequence not seen for the config's ``max_sequence_idle_microseconds`` is dropped. When Triton's batcher
  gives up an idle sequence (oldest strategy) no request reaches the model (observed on Triton 2.51: nothing is
  executed after the timeout), so the model evicts by last-seen time itself, at each execution.
- a request continuing a sequence the model does not hold (idled out here) is answered with an error naming the
  sequence; the client restarts it with START (what a Triton batcher answers for a sequence it has dropped).

All requests of one execution (one per sequence: the oldest strategy never batches two requests of one sequence)
run as one onnxruntime call.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

FRAME, LOGITS, SEQUENCE_ID = "frame", "logits", "sequence_id"
START, END, CORRID = "START", "END", "CORRID"
PARAM_STATE = "streamtsm.state"
DEFAULT_IDLE_TIMEOUT_US = 1_000_000  # Triton's default when the config leaves the idle timeout at 0


class SequenceError(Exception):
    """A request this model cannot serve (its other requests are still answered)."""


class SequenceStates:
    """The state of every live sequence, by correlation id, with eviction after ``idle_timeout_s`` unseen.

    Args:
        shapes: each state tensor's shape without the batch dimension (``streamtsm.state`` order).
        idle_timeout_s: a sequence unseen this long is dropped.
        clock: ``time.monotonic`` (tests pass their own).
    """

    def __init__(self, shapes: list[tuple[int, ...]], idle_timeout_s: float, clock=time.monotonic) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.idle_timeout_s = float(idle_timeout_s)
        self.clock = clock
        self._held: dict[int, tuple[list[np.ndarray], float]] = {}  # corrid -> (state rows, last seen)
        self._lock = threading.Lock()  # execute() may be called from more than one thread (decoupled or not)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, corrid: int) -> bool:
        return corrid in self._held

    def evict_idle(self) -> list[int]:
        """Drop the sequences unseen for longer than the idle timeout; returns their ids."""
        now = self.clock()
        with self._lock:
            gone = [cid for cid, (_, seen) in self._held.items() if now - seen > self.idle_timeout_s]
            for cid in gone:
                del self._held[cid]
        return gone

    def take(self, corrid: int, start: bool) -> list[np.ndarray]:
        """The state rows (each ``[1, *shape]``) to step ``corrid`` with: zeros on START.

        Raises:
            SequenceError: not START and the sequence is not held.
        """
        if start:
            return [np.zeros((1, *s), np.float32) for s in self.shapes]
        with self._lock:
            held = self._held.get(corrid)
        if held is None:
            raise SequenceError(f"sequence {corrid} is not held by this model (never started, ended, or idle for "
                                f"more than {self.idle_timeout_s:g} s); send it again with START to restart it")
        return held[0]

    def put(self, corrid: int, state: list[np.ndarray], end: bool) -> None:
        """Keep ``state`` for ``corrid``, or drop the sequence on END."""
        with self._lock:
            if end:
                self._held.pop(corrid, None)
            else:
                self._held[corrid] = (state, self.clock())


def run_requests(session, states: SequenceStates, state_names: list[str], new_state_names: list[str],
                 requests: list[dict]) -> list:
    """Step a batch of requests through ``session``, one sequence each.

    Args:
        session: an onnxruntime session of the served step graph.
        states: the held sequences.
        state_names, new_state_names: the graph's state inputs and outputs, in ``streamtsm.state`` order.
        requests: ``{"frame": [1, 3, S, S] float32, "START", "END": [1, 1] bool, "CORRID": [1, 1] uint64}`` each.

    Returns:
        For each request, ``(logits [1, K], sequence_id [1, 1])`` or a :class:`SequenceError`.
    """
    states.evict_idle()
    results: list = [None] * len(requests)
    rows, feeds = [], []
    for i, request in enumerate(requests):
        try:
            frame = np.asarray(request[FRAME], np.float32)
            if frame.ndim != 4 or frame.shape[0] != 1:
                raise SequenceError(f"expected one frame per request ([1, 3, S, S]), got shape {list(frame.shape)}")
            corrid = int(np.asarray(request[CORRID]).reshape(-1)[0])
            start = bool(np.asarray(request[START]).reshape(-1)[0])
            end = bool(np.asarray(request[END]).reshape(-1)[0])
            if corrid == 0:
                raise SequenceError("request without a correlation id (sequence_id 0)")
            state = states.take(corrid, start)
        except SequenceError as e:
            results[i] = e
            continue
        rows.append((i, corrid, start, end))
        feeds.append((frame, state))
    if not rows:
        return results
    inputs = {FRAME: np.concatenate([f for f, _ in feeds]),  # [n, 3, S, S]
              START: np.array([[r[2]] for r in rows], bool),  # [n, 1]
              END: np.array([[r[3]] for r in rows], bool),
              CORRID: np.array([[r[1]] for r in rows], np.uint64)}
    for k, name in enumerate(state_names):
        inputs[name] = np.concatenate([s[k] for _, s in feeds])  # [n, *shape_k]
    logits, echoed, *new_state = session.run([LOGITS, SEQUENCE_ID, *new_state_names], inputs)
    for b, (i, corrid, _, end) in enumerate(rows):
        # copies: a row view would keep the whole batch's buffer alive for as long as the sequence lives
        states.put(corrid, [s[b : b + 1].copy() for s in new_state], end)
        results[i] = (logits[b : b + 1], echoed[b : b + 1])
    return results


def make_session(path: str, instance_kind: str = "CPU", device_id: int = 0):
    """An onnxruntime session of the served graph: CUDA on a GPU instance when this onnxruntime has it."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if instance_kind == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
    return ort.InferenceSession(path, providers=providers)


def read_model_config(model_config: dict) -> tuple[list[str], list[str], list[tuple[int, ...]], float]:
    """(state inputs, state outputs, shapes, idle timeout in seconds) from the model's config (as JSON)."""
    params = model_config.get("parameters", {})
    state = json.loads(params[PARAM_STATE]["string_value"])
    idle_us = int(model_config.get("sequence_batching", {}).get("max_sequence_idle_microseconds") or 0)
    return ([s["name"] for s in state], [s["output"] for s in state], [tuple(s["shape"]) for s in state],
            (idle_us or DEFAULT_IDLE_TIMEOUT_US) / 1e6)


class TritonPythonModel:
    """The entry point Triton's python backend looks for."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.state_names, self.new_state_names, shapes, idle_s = read_model_config(config)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = make_session(path, args.get("model_instance_kind", "CPU"),
                                    int(args.get("model_instance_device_id", 0) or 0))
        self.states = SequenceStates(shapes, idle_s)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        wanted = (FRAME, START, END, CORRID)
        unpacked = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in wanted}
            missing = [name for name, t in tensors.items() if t is None]
            unpacked.append(SequenceError(f"request lacks input(s) {missing}") if missing
                            else {name: t.as_numpy() for name, t in tensors.items()})
        good = [u for u in unpacked if not isinstance(u, SequenceError)]
        stepped = iter(run_requests(self.session, self.states, self.state_names, self.new_state_names, good))
        responses = []
        for u in unpacked:
            result = u if isinstance(u, SequenceError) else next(stepped)
            if isinstance(result, SequenceError):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(result))))
            else:
                logits, echoed = result
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(LOGITS, np.ascontiguousarray(logits, np.float32)),
                    pb_utils.Tensor(SEQUENCE_ID, np.ascontiguousarray(echoed, np.uint64))]))
        return responses

    def finalize(self) -> None:
        self.session = None
