"""The Triton backend: an online model served by Triton Inference Server, which keeps each stream's state.

The server holds the folds (implicit state of a model written by ``streamtsm export-triton``, named as the ONNX
graph's state inputs: :attr:`TritonOnlineEngine.server_state_spec`; or, for ``export-triton --runtime python``,
the python-backend model keeps them by sequence id, which the config's ``streamtsm.triton`` parameter says and the
engine needs to know nothing more of), so the engine's state of a stream is a small
client-side token: the stream's Triton sequence id and whether its next request starts the sequence. The state
mapping has one entry, ``"sequence"`` (:data:`SEQUENCE_STATE`), a list of one token per stream::

    zero_state(B)   B fresh tokens (new random 63-bit sequence ids, start=True); nothing is sent
    step(frames)    one request per row, sequence_id = the row's token, all B in flight at once (async_infer), so
                    Triton's sequence batcher can batch them with each other and with other clients' cameras;
                    waits for all (bounded by ``timeout_s``) -> logits [B, K] float32, tokens with start=False
    stack / split   join / split the token lists

Sequences end three ways:

- A stream that is reset (its source reconnected, or a step failed) gets a fresh token from ``zero_state``; its old
  sequence is left to Triton's idle timeout (``max_sequence_idle_microseconds``) while the engine runs: the engine
  is not told which token was dropped, and an END costs an inference.
- :meth:`TritonOnlineEngine.close` sends an END request (a zero frame) for every sequence stepped within the idle
  timeout, replaced ones included, so a recognizer that stops frees its cameras' state on the server at once.
- A token whose last step is older than the idle timeout (less a margin) is restarted with a new sequence id before
  sending: Triton has dropped (or is about to drop) that state anyway, and a request continuing a sequence Triton
  no longer knows is an error.

Sequence ids are random 63-bit integers (tritonclient sends them as int64), so recognizers on many machines can
share one server without coordinating. Every response must echo its sequence id (output ``sequence_id``, the
CONTROL_SEQUENCE_CORRID input copied through the graph); one that does not is an error.

Everything the engine needs (input size, mean/std, labels, class count) comes from the model's config on the
server (its ``streamtsm.*`` parameters), so ``streamtsm run --backend triton --url HOST:8001 --triton-model NAME``
needs no model file locally. This module must not import torch (tested).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, replace

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, StreamTSMError, first_line
from ..formats import (FRAME, LOGITS, PARAM_CONFIG, PARAM_KIND, PARAM_STATE, PARAM_TRITON, SEQUENCE_ID,
                       STATE_KEPT_BY_MODEL, STATE_KEPT_BY_TRITON)
from ..labels import resolve_labels
from .base import OnlineEngine, State, StateSpec, check_frames

log = logging.getLogger(__name__)

# A token idle for more than this fraction of the server's idle timeout starts a new sequence: the request would
# otherwise race Triton's own timeout.
IDLE_MARGIN = 0.9
DEFAULT_IDLE_TIMEOUT_S = 1.0  # Triton's default when the config leaves max_sequence_idle_microseconds at 0
SEQUENCE_STATE = "sequence"  # the one entry of the engine's state: a list of SequenceTokens, one per stream


class TritonError(StreamTSMError):
    """A request to the Triton server failed; the message names the rows and sequences."""


@dataclass(frozen=True)
class SequenceToken:
    """A stream's handle on its state in Triton.

    Attributes:
        sequence_id: the Triton correlation id (1 .. 2**63 - 1).
        start: the next request starts the sequence (Triton gives it zero state).
        last_step: ``time.monotonic()`` of the last request, 0 before the first.
    """

    sequence_id: int
    start: bool = True
    last_step: float = 0.0


def new_sequence_id() -> int:
    """A random correlation id in 1 .. 2**63 - 1 (0 means "no sequence" to Triton; tritonclient sends int64)."""
    while True:
        value = secrets.randbits(63)
        if value:
            return value


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
    except ImportError:
        raise ConfigError("--backend triton needs tritonclient: pip install 'streamtsm[triton]' "
                          "(or tritonclient[grpc])") from None
    return grpcclient, InferenceServerException


def _check_url(url: str) -> str:
    url = (url or "").strip()
    host, sep, port = url.rpartition(":")
    if "://" in url or not sep or not host or not port.isdigit():
        raise ConfigError(f"Triton url must be HOST:PORT of its gRPC endpoint (e.g. localhost:8001), got {url!r}")
    return url


class TritonOnlineEngine(OnlineEngine):
    """An online model exported with ``export-triton``, stepped on a Triton server over gRPC.

    Args:
        url: ``host:port`` of the server's gRPC endpoint (Triton's default port is 8001).
        model_name: the model's name in the server's repository.
        labels, labels_file: class names, or a file of them; the config's when neither is given, else numbered
            (see :func:`streamtsm.labels.resolve_labels`).
        timeout_s: longest wait for one step (all rows), and each request's gRPC deadline.
        connect_timeout_s: longest wait for each of the checks made when the engine is built.
        model_version: a version to pin, or "" for the server's choice.

    Raises:
        ConfigError: tritonclient missing, a malformed url, the server unreachable, the model unknown or not ready,
            or the model not an online model exported by ``streamtsm export-triton``.
    """

    backend = "triton"
    state_spec = (StateSpec(SEQUENCE_STATE, (), "object"),)
    host_cpu = False  # the server computes; it batches the requests of every lane and client itself

    def __init__(self, url: str, model_name: str, *, labels: Sequence[str] | None = None,
                 labels_file: str | os.PathLike | None = None, timeout_s: float = 10.0,
                 connect_timeout_s: float = 5.0, model_version: str = "") -> None:
        grpcclient, server_error = _grpc()
        self._grpc, self._server_error = grpcclient, server_error
        self.url = _check_url(url)
        if not model_name:
            raise ConfigError("name the model on the Triton server (--triton-model NAME, the name given to "
                              "export-triton)")
        self.triton_model = model_name
        self.model_version = model_version
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._live: dict[int, float] = {}  # sequence id -> last step (monotonic), sequences Triton may still hold
        try:
            self._client = grpcclient.InferenceServerClient(self.url)
        except Exception as e:  # tritonclient raises its own exception or ValueError for a bad target
            raise ConfigError(f"cannot connect to Triton at {self.url}: {first_line(e)}") from None
        try:
            self._load_config(connect_timeout_s)
            self.labels = resolve_labels(self.cfg.num_classes, labels_file=labels_file, given=labels,
                                         saved=self.cfg.labels)
        except BaseException:
            self._client.close()
            self._client = None
            raise

    # -- the model's config, from the server ------------------------------------------------------------------

    def _load_config(self, timeout: float) -> None:
        where = f"Triton at {self.url}"
        try:
            live = self._client.is_server_live(client_timeout=timeout)
        except self._server_error as e:
            raise ConfigError(f"{where} is unreachable: {first_line(e)}") from None
        if not live:
            raise ConfigError(f"{where} answers but is not live")
        name = self.triton_model
        try:
            ready = self._client.is_model_ready(name, self.model_version, client_timeout=timeout)
        except self._server_error as e:
            raise ConfigError(f"{where}: cannot ask whether model {name!r} is ready: {first_line(e)}") from None
        if not ready:
            raise ConfigError(f"{where} has no ready model {name!r}{self._available(timeout)}")
        try:
            config = self._client.get_model_config(name, self.model_version, client_timeout=timeout).config
        except self._server_error as e:
            raise ConfigError(f"{where}: cannot read the config of model {name!r}: {first_line(e)}") from None
        self.config = config
        params = {key: value.string_value for key, value in config.parameters.items()}
        not_ours = (f"model {name!r} on {where} is not an online streamtsm model written by `streamtsm "
                    f"export-triton`")
        if PARAM_CONFIG not in params or PARAM_KIND not in params:
            raise ConfigError(f"{not_ours} (its config has no {PARAM_CONFIG} parameter)")
        try:
            kind = json.loads(params[PARAM_KIND])
            self.cfg = ModelConfig.from_dict(json.loads(params[PARAM_CONFIG]))
            triton_meta = json.loads(params.get(PARAM_TRITON, "{}"))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{not_ours}: unreadable streamtsm parameters ({first_line(e)})") from None
        if kind != "online":
            raise ConfigError(f"{not_ours}: it is a {kind} model")
        if not config.HasField("sequence_batching"):
            raise ConfigError(f"{not_ours}: its config has no sequence_batching (Triton would not route a "
                              f"camera's frames as one sequence)")
        # Who keeps the folds: Triton (implicit state, listed in the config) or the python-backend model.py of
        # `export-triton --runtime python` (by correlation id; the config then lists no state). The engine steps
        # both the same way.
        keeper = triton_meta.get("state_keeper", STATE_KEPT_BY_TRITON) if isinstance(triton_meta, dict) else None
        if keeper == STATE_KEPT_BY_TRITON and not config.sequence_batching.state:
            raise ConfigError(f"{not_ours}: its config's sequence_batching has no `state` entries, so Triton would "
                              f"not keep a camera's folds between frames (re-export it with `streamtsm "
                              f"export-triton`, or `--runtime python` for a model that keeps them itself)")
        if keeper not in (STATE_KEPT_BY_TRITON, STATE_KEPT_BY_MODEL):
            raise ConfigError(f"{not_ours}: its {PARAM_TRITON} parameter names state_keeper {keeper!r}, expected "
                              f"{STATE_KEPT_BY_TRITON!r} or {STATE_KEPT_BY_MODEL!r}")
        inputs = {i.name: list(i.dims) for i in config.input}
        outputs = {o.name: list(o.dims) for o in config.output}
        size = self.cfg.input_size
        if inputs != {FRAME: [3, size, size]} or outputs.get(LOGITS) != [self.cfg.num_classes]:
            raise ConfigError(f"{not_ours}: expected input {FRAME} [3, {size}, {size}] alone and output {LOGITS} "
                              f"[{self.cfg.num_classes}], found inputs {inputs} and outputs {outputs}")
        if config.max_batch_size < 1:
            raise ConfigError(f"{not_ours}: max_batch_size is {config.max_batch_size}, expected >= 1")
        # What the server keeps per sequence, named as the ONNX graph's state inputs (see streamtsm.formats).
        if keeper == STATE_KEPT_BY_TRITON:
            self.server_state_spec = tuple(StateSpec(s.input_name, tuple(s.dims))
                                           for s in config.sequence_batching.state)
        else:
            try:
                self.server_state_spec = tuple(StateSpec(s["name"], tuple(s["shape"]))
                                               for s in json.loads(params[PARAM_STATE]))
            except (KeyError, ValueError, TypeError) as e:
                raise ConfigError(f"{not_ours}: its model keeps the state but the {PARAM_STATE} parameter is "
                                  f"missing or unreadable ({first_line(e)})") from None
        self.state_keeper = keeper
        self._echo = triton_meta.get("sequence_id_output", SEQUENCE_ID) if SEQUENCE_ID in outputs else None
        idle_us = config.sequence_batching.max_sequence_idle_microseconds
        self.idle_timeout_s = idle_us / 1e6 if idle_us else DEFAULT_IDLE_TIMEOUT_S
        self.max_batch_size = config.max_batch_size
        self._outputs = [self._grpc.InferRequestedOutput(LOGITS)]
        if self._echo:
            self._outputs.append(self._grpc.InferRequestedOutput(self._echo))
        log.info("%s: model %r (%s, %d classes, %dx%d), sequences idle out after %.1f s", where, name, self.cfg.name,
                 self.cfg.num_classes, size, size, self.idle_timeout_s)

    def _available(self, timeout: float) -> str:
        """``"; available: a, b"`` from the server's repository index (best effort, for error messages)."""
        try:
            index = self._client.get_model_repository_index(client_timeout=timeout)
        except Exception:  # noqa: BLE001 (only decorates another error)
            return ""
        names = sorted(m.name + ("" if m.state in ("", "READY") else f" ({m.state})") for m in index.models)
        return f"; the server has: {', '.join(names)}" if names else "; the server has no models"

    # -- stepping ---------------------------------------------------------------------------------------------

    def zero_state(self, batch: int) -> State:
        if batch < 0:
            raise ValueError(f"batch must be >= 0, got {batch}")
        return {SEQUENCE_STATE: [SequenceToken(new_sequence_id()) for _ in range(batch)]}

    def _current(self, token, now: float) -> SequenceToken:
        if not isinstance(token, SequenceToken):
            raise ValueError(f"a Triton engine state holds SequenceTokens (from zero_state/step), got "
                             f"{type(token).__name__}")
        if not token.start and now - token.last_step > IDLE_MARGIN * self.idle_timeout_s:
            log.info("sequence %d idle for %.1f s (server drops it after %.1f s): restarting it from zeros",
                     token.sequence_id, now - token.last_step, self.idle_timeout_s)
            return SequenceToken(new_sequence_id())
        return token

    def _send(self, frames: np.ndarray, tokens: list[SequenceToken], *, end: bool = False,
              timeout: float | None = None) -> list:
        """One request per row, all in flight at once; results in row order, or a TritonError naming the rows."""
        timeout = self.timeout_s if timeout is None else timeout
        futures: list[Future] = []
        for b, token in enumerate(tokens):
            future: Future = Future()
            futures.append(future)

            def done(result, error, future=future) -> None:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            frame = self._grpc.InferInput(FRAME, [1, *frames.shape[1:]], "FP32")
            frame.set_data_from_numpy(frames[b : b + 1])  # [1, 3, S, S]: one sequence per request
            try:
                self._client.async_infer(self.triton_model, [frame], done, model_version=self.model_version,
                                         outputs=self._outputs, request_id=str(b), sequence_id=token.sequence_id,
                                         sequence_start=token.start, sequence_end=end, client_timeout=timeout)
            except Exception as e:  # noqa: BLE001 (reported with its row below)
                future.set_exception(e)
        # The gRPC deadline bounds each request; the extra second covers callbacks that arrive just after it.
        _, pending = wait_all(futures, timeout=timeout + 1.0)
        failures, results = [], []
        for b, (token, future) in enumerate(zip(tokens, futures)):
            if future in pending:
                failures.append(f"row {b} (sequence {token.sequence_id}): no answer within {timeout:g} s")
                continue
            error = future.exception()
            if error is not None:
                failures.append(f"row {b} (sequence {token.sequence_id}): {first_line(error)}")
                continue
            results.append(future.result())
        if failures:
            raise TritonError(f"Triton model {self.triton_model!r} at {self.url} failed for {len(failures)} of "
                              f"{len(tokens)} streams: {'; '.join(failures)}")
        return results

    def step(self, frames: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        frames = check_frames(frames, self.cfg.input_size)
        state = self.check_state(state)[SEQUENCE_STATE]
        if len(state) != frames.shape[0]:
            raise ValueError(f"state holds {len(state)} streams but the frame batch has {frames.shape[0]}")
        if not len(state):
            return np.zeros((0, self.cfg.num_classes), np.float32), {SEQUENCE_STATE: []}
        now = time.monotonic()
        tokens = [self._current(t, now) for t in state]
        ids = [t.sequence_id for t in tokens]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a sequence appears twice in one batch ({ids}); each stream needs its own token")
        results = self._send(frames, tokens)
        logits = []
        for b, (token, result) in enumerate(zip(tokens, results)):
            if self._echo:
                echoed = result.as_numpy(self._echo)
                if echoed is None or int(echoed.reshape(-1)[0]) != token.sequence_id:
                    got = None if echoed is None else int(echoed.reshape(-1)[0])
                    raise TritonError(f"Triton answered row {b} (sequence {token.sequence_id}) with the output of "
                                      f"sequence {got}")
            out = result.as_numpy(LOGITS)
            if out is None or out.shape != (1, self.cfg.num_classes):
                raise TritonError(f"Triton answered row {b} (sequence {token.sequence_id}) with logits of shape "
                                  f"{None if out is None else out.shape}, expected (1, {self.cfg.num_classes})")
            logits.append(out)
        done = time.monotonic()
        with self._lock:
            for sid, last in list(self._live.items()):
                if done - last > self.idle_timeout_s:
                    del self._live[sid]  # the server has dropped it: nothing to end at close
            self._live.update((sid, done) for sid in ids)
        return (np.concatenate(logits).astype(np.float32, copy=False),
                {SEQUENCE_STATE: [replace(t, start=False, last_step=done) for t in tokens]})

    def stack(self, states: Sequence[State]) -> State:
        return {SEQUENCE_STATE: [token for state in states for token in state[SEQUENCE_STATE]]}

    def split(self, state: State, batch: int) -> list[State]:
        tokens = state[SEQUENCE_STATE]
        if len(tokens) != batch:
            raise ValueError(f"state holds {len(tokens)} streams, cannot split it into {batch}")
        return [{SEQUENCE_STATE: [token]} for token in tokens]

    def close(self) -> None:
        """END every sequence the server may still hold (a zero frame each, briefly), then close the channel."""
        client = getattr(self, "_client", None)
        if client is None:
            return
        try:
            now = time.monotonic()
            with self._lock:
                live = [SequenceToken(sid, start=False, last_step=t) for sid, t in self._live.items()
                        if now - t < self.idle_timeout_s]
                self._live.clear()
            if live:
                size = self.cfg.input_size
                zeros = np.zeros((len(live), 3, size, size), np.float32)
                try:
                    self._send(zeros, live, end=True, timeout=min(self.timeout_s, 2.0))
                    log.info("ended %d sequences on %s", len(live), self.url)
                except TritonError as e:
                    log.info("could not end every sequence (the server drops them after %.1f s idle): %s",
                             self.idle_timeout_s, e)
        finally:
            self._client = None
            client.close()
