"""Triton Inference Server export: a model repository entry whose state (the cached folds) Triton keeps per camera.

``export_triton(model, "model_repository")`` writes::

    model_repository/<name>/config.pbtxt      sequence batcher with implicit state, filled in Triton's own protobuf
    model_repository/<name>/labels.txt        class names (``label_filename`` of ``logits``), when known
    model_repository/<name>/1/model.onnx      the online step graph with Triton's sequence controls as inputs

Each camera is one Triton *sequence* (its correlation id). Triton keeps the sequence's folds between requests
(implicit state), so a request carries one frame and gets back logits; the sequence batcher's ``oldest`` strategy
batches the requests of different cameras, from any number of clients, into one model execution.

What Triton's onnxruntime backend requires, and how the export meets it (from the backend's model loading code,
``ModelInstanceState`` in triton-inference-server/onnxruntime_backend ``src/onnxruntime.cc``, and the
``ModelSequenceBatching`` messages of ``model_config.proto``):

- The model's inputs must be exactly the config's ``input`` entries plus one per declared control plus one per
  ``state`` entry (it counts them). Implicit state tensors are named only in ``sequence_batching.state``, never in
  ``input``/``output`` (listing a state output there would send the folds back to the client on every request).
- Every declared ``control_input`` must be a model input, shaped ``[batch, 1]`` when ``max_batch_size > 0``, of
  the control's data type. So the graph served by Triton is a variant of :func:`streamtsm.export.onnx.export_onnx`'s
  step graph, with the controls wired in where they mean something::

      START   bool   [batch, 1]   state_i -> Where(START, 0, state_i): a starting sequence sees zero folds even
                                  without initial_state (Triton's default start state is uninitialized memory)
      END     bool   [batch, 1]   new_state_i -> Where(END, 0, new_state_i): a camera's features never outlive
                                  its sequence in a buffer Triton hands to the next one
      CORRID  uint64 [batch, 1]   echoed as output ``sequence_id`` [batch, 1]: the client checks that every
                                  response belongs to the sequence it sent

- ``initial_state { zero_data: true }`` also starts every sequence from zeros (the first guard; START is the
  second). READY is not declared: with the oldest strategy every request in a batch is ready (Triton's docs).
- With ``max_batch_size > 0`` all ``dims`` exclude the batch dimension, which must be dynamic in the graph.

Strategy: ``oldest``, not ``direct``. Direct pins each sequence to a batch slot of one instance, which only a
model holding per-slot state needs; with implicit state, oldest lets the dynamic batcher put whichever cameras
have a frame waiting into one batch (never two requests of one sequence), across clients. ``max_candidate_sequences``
is how many cameras one instance serves at once; more wait in Triton's backlog until a sequence ends or idles out
(``max_sequence_idle_microseconds``), so set it to at least the number of cameras.

``runtime="python"`` (``export-triton --runtime python``) writes the same graph for Triton's python backend, for
servers that have it but not the onnxruntime backend::

    model_repository/<name>/config.pbtxt      backend "python", the same sequence batcher, no ``state`` entries
    model_repository/<name>/1/model.py        :mod:`streamtsm.export.triton_python_model`: steps 1/model.onnx
                                              with onnxruntime, keeps each sequence's folds by correlation id
    model_repository/<name>/1/model.onnx      the served graph above

The config's ``streamtsm.triton`` parameter says who keeps the folds (``state_keeper``: ``triton`` or ``model``),
so the client accepts either repository without being told which backend runs it.

Only online models are exported this way: a clip model has no state to keep, so :func:`export_triton` refuses it
with a :class:`ConfigError` (serve its ``export-onnx`` file with Triton's dynamic batcher instead).

The streamtsm metadata travels twice: inside model.onnx (as from export-onnx, plus ``streamtsm.triton``) and in
the config's ``parameters`` (JSON strings), because a client can ask Triton for the config but not for the file.
:class:`streamtsm.engine.triton_engine.TritonOnlineEngine` builds everything from those parameters.

Importing this module needs neither torch nor tritonclient; exporting needs both (``pip install 'streamtsm[triton]'``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError
from ..formats import (BATCH, CORRID, END, FRAME, LOGITS, META_CONFIG, META_TRITON, PARAM_CONFIG,
                       PARAM_FORMAT_VERSION, PARAM_KIND, PARAM_PRECISION, PARAM_STATE, PARAM_TRITON, SEQUENCE_ID,
                       START, STATE_KEPT_BY_MODEL, STATE_KEPT_BY_TRITON, TRITON_FORMAT_VERSION, add_metadata,
                       read_metadata, write_metadata)
from .onnx import TOLERANCE, ExportError, ExportReport, cpu_session, export_onnx, is_online, save_checked

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
INSTANCE_KINDS = ("auto", "gpu", "cpu")
# Which Triton backend serves the step: "onnxruntime" (Triton keeps the folds as implicit state) or "python" (the
# python-backend model.py runs the same graph with onnxruntime and keeps the folds itself, by correlation id).
RUNTIMES = ("onnxruntime", "python")
PYTHON_MODEL_FILE = "model.py"
DEFAULT_IDLE_TIMEOUT_US = 5_000_000
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_SEQUENCES = 256

# Control name -> (ONNX element type name, Triton data type name); what the graph declares and the config says.
CONTROLS = {START: ("BOOL", "TYPE_BOOL"), END: ("BOOL", "TYPE_BOOL"), CORRID: ("UINT64", "TYPE_UINT64")}


def _tritonclient_protos():
    """Triton's config protobuf module (shipped in tritonclient), or a ConfigError saying how to get it."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ConfigError("Triton support needs tritonclient: pip install 'streamtsm[triton]' "
                          "(or tritonclient[grpc])") from None
    return model_config_pb2


@dataclass
class TritonExportReport:
    """What :func:`export_triton` wrote.

    Attributes:
        name: the model's name in the repository (what clients ask for).
        model_dir: ``repo_dir/<name>``.
        model_path: the served ``model.onnx``.
        config_path: ``config.pbtxt``.
        labels_path: ``labels.txt``, or None when the model has no class names.
        max_batch_size, idle_timeout_us, max_sequences: the sequence batcher's settings.
        num_state: state tensors Triton keeps per sequence.
        state_bytes: bytes of state per sequence (float32).
        onnx: the report of the underlying :func:`export_onnx` run, whose file was an intermediate step (None when
            exporting an existing file).
        max_abs_diff, max_scaled_diff: largest difference of the served graph from the reference (torch, or the
            export-onnx file); None when verification was skipped.
        verification: what was compared, or ``"skipped"``.
        runtime: the Triton backend that serves it (``"onnxruntime"`` or ``"python"``).
    """

    name: str
    model_dir: str
    model_path: str
    config_path: str
    labels_path: str | None
    max_batch_size: int
    idle_timeout_us: int
    max_sequences: int
    num_state: int
    state_bytes: int
    onnx: ExportReport | None
    max_abs_diff: float | None
    max_scaled_diff: float | None
    verification: str
    runtime: str = "onnxruntime"


# -- the served graph ---------------------------------------------------------------------------------------


def add_sequence_controls(model, state: list[dict]) -> None:
    """Wire Triton's START / END / CORRID controls into an online step graph (an onnx ModelProto), in place.

    Args:
        model: the step graph from :func:`export_onnx` (inputs ``frame``, ``state_i``; outputs ``logits``,
            ``new_state_i``).
        state: the file's ``streamtsm.state`` entries (``name``, ``output``, ``shape``).

    Raises:
        ExportError: the graph does not have the state inputs and outputs ``state`` names.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inputs = {v.name for v in graph.input}
    outputs = {v.name for v in graph.output}
    for s in state:
        if s["name"] not in inputs or s["output"] not in outputs:
            raise ExportError(f"graph has no state input {s['name']!r} / output {s['output']!r}; inputs "
                              f"{sorted(inputs)}, outputs {sorted(outputs)}")
        if s["name"] in outputs:
            raise ExportError(f"state {s['name']!r} is passed straight through to an output; cannot guard it")
    clash = {START, END, CORRID, SEQUENCE_ID} & (inputs | outputs | {n for node in graph.node for n in node.output})
    if clash:
        raise ExportError(f"graph already has tensors named {sorted(clash)}")

    def renamed(name: str) -> str:
        return f"triton/{name}"

    # [batch, 1] -> [batch, 1, 1, 1]: broadcasts against state [batch, fold, h, w] row by row.
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), renamed("row_shape")),
        numpy_helper.from_array(np.array(0.0, np.float32), renamed("zero")),
    ])
    nodes = [
        helper.make_node("Reshape", [START, renamed("row_shape")], [renamed("start_rows")], name=renamed("start_rows")),
        helper.make_node("Reshape", [END, renamed("row_shape")], [renamed("end_rows")], name=renamed("end_rows")),
        helper.make_node("Identity", [CORRID], [SEQUENCE_ID], name=renamed("echo_corrid")),
    ]
    state_in = {s["name"]: renamed(s["name"]) for s in state}
    state_out = {s["output"]: renamed(s["output"]) for s in state}
    producers = set()
    for node in graph.node:
        node.input[:] = [state_in.get(n, n) for n in node.input]  # consumers read the START-guarded state
        node.input[:] = [state_out.get(n, n) for n in node.input]
        for i, n in enumerate(node.output):
            if n in state_out:
                node.output[i] = state_out[n]  # the raw new state, before the END guard
                producers.add(n)
    missing = set(state_out) - producers
    if missing:
        raise ExportError(f"no node produces the state outputs {sorted(missing)}")
    for s in state:
        nodes.append(helper.make_node("Where", [renamed("start_rows"), renamed("zero"), s["name"]],
                                      [state_in[s["name"]]], name=renamed(f"start_guard_{s['name']}")))
        nodes.append(helper.make_node("Where", [renamed("end_rows"), renamed("zero"), state_out[s["output"]]],
                                      [s["output"]], name=renamed(f"end_guard_{s['output']}")))
    # Prepended: the topological order onnx requires holds since these read only graph inputs and initializers;
    # the END guards read node outputs, so they go last.
    head = [n for n in nodes if not n.name.startswith(renamed("end_guard"))]
    tail = [n for n in nodes if n.name.startswith(renamed("end_guard"))]
    all_nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(all_nodes)

    control_inputs = [helper.make_tensor_value_info(name, getattr(TensorProto, onnx_type), [BATCH, 1])
                      for name, (onnx_type, _) in CONTROLS.items()]
    first = list(graph.input[:1])  # frame first, then the controls, then the state: the order Triton lists them
    rest = list(graph.input[1:])
    del graph.input[:]
    graph.input.extend(first + control_inputs + rest)
    logits = [v for v in graph.output if v.name == LOGITS]
    others = [v for v in graph.output if v.name != LOGITS]
    del graph.output[:]
    graph.output.extend(logits + [helper.make_tensor_value_info(SEQUENCE_ID, TensorProto.UINT64, [BATCH, 1])]
                        + others)


def _triton_meta(state_keeper: str = STATE_KEPT_BY_TRITON) -> dict:
    """What ``streamtsm.triton`` records: the controls the graph takes, the output echoing CORRID, and who keeps the
    folds between requests (``state_keeper``: ``"triton"``, implicit state in the config; ``"model"``, the
    python-backend model by correlation id, so the config has no ``state`` entries)."""
    return {"format_version": TRITON_FORMAT_VERSION,
            "controls": {name: triton_type for name, (_, triton_type) in CONTROLS.items()},
            "sequence_id_output": SEQUENCE_ID, "state_keeper": state_keeper}


def _write_served_graph(plain: Path, out: Path) -> dict:
    """The Triton variant of the export-onnx file ``plain`` at ``out``; returns the file's metadata."""
    import onnx

    meta = read_metadata(plain)
    model = onnx.load(str(plain))
    add_sequence_controls(model, meta["state"])
    add_metadata(model, {META_TRITON: _triton_meta()})
    save_checked(model, out)
    return meta


# -- verification -------------------------------------------------------------------------------------------


def torch_reference(model):
    """``step(frames, state) -> (logits, new_state)`` in numpy through the torch model, the state a list in the
    order of the graph's state inputs: the reference :func:`verify_served_graph` compares the served graph with."""
    import torch

    device = next(model.parameters()).device

    def step(frames: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        with torch.no_grad():
            logits, new_state = model.step(torch.from_numpy(frames).to(device),
                                           tuple(torch.from_numpy(s).to(device) for s in state))
        return logits.cpu().numpy(), [s.cpu().numpy() for s in new_state]

    return step


def onnx_reference(path: Path, meta: dict):
    """``step(frames, state) -> (logits, new_state)`` through the export-onnx file on onnxruntime (CPU)."""
    session = cpu_session(path)
    names = [FRAME, *(s["name"] for s in meta["state"])]
    outputs = [LOGITS, *(s["output"] for s in meta["state"])]

    def step(frames: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *new_state = session.run(outputs, dict(zip(names, [frames, *state])))
        return logits, new_state

    return step


def verify_served_graph(reference, path: str | os.PathLike, meta: dict, *, steps: int = 5, batch: int = 3,
                        tolerance: float = TOLERANCE, seed: int = 0) -> dict:
    """Step the served graph with Triton's controls beside a reference step, row by row.

    ``batch`` streams are stepped ``steps`` times. Every row starts with START set and a NaN state (what Triton's
    uninitialized start state may hold), so the START guard must make it zeros; row 1 restarts (START) at step 2;
    every row ENDs at the last step, whose new state must be exactly zero. The CORRID inputs (values above 2**53,
    which a float would round) must come back unchanged as ``sequence_id``. Logits and the other new states are
    compared with the reference stepped from zeros, in units of max(1, max |reference|).

    Args:
        reference: ``step(frames, state) -> (logits, new_state)`` in numpy (torch or the export-onnx file).
        path: the served model.onnx.
        meta: its streamtsm metadata.

    Returns:
        ``{"max_abs_diff", "max_scaled_diff", "compared"}``.

    Raises:
        ExportError: a difference exceeds ``tolerance``, a guard or the echo does not hold.
    """
    session = cpu_session(path)
    cfg = ModelConfig.from_dict(meta["config"])
    size = cfg.input_size
    shapes = [tuple(s["shape"]) for s in meta["state"]]
    state_names = [s["name"] for s in meta["state"]]
    outputs = [LOGITS, SEQUENCE_ID, *(s["output"] for s in meta["state"])]
    rng = np.random.default_rng(seed)
    corrid = (np.uint64(2**63) + np.arange(1, batch + 1, dtype=np.uint64)).reshape(batch, 1)  # [B, 1]
    ref_state = [np.zeros((batch, *s), np.float32) for s in shapes]
    served_state = [np.full((batch, *s), np.nan, np.float32) for s in shapes]
    worst_abs, worst = 0.0, (0.0, "")
    for t in range(steps):
        start = np.zeros((batch, 1), bool)  # [B, 1]
        start[:, 0] = t == 0
        if t == 2 and batch > 1:
            start[1, 0] = True  # row 1 restarts: Triton hands it uninitialized memory again
            served_state = [s.copy() for s in served_state]
            for s in served_state:
                s[1] = np.nan
            for s in ref_state:
                s[1] = 0.0
        end = np.full((batch, 1), t == steps - 1)
        frames = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        feeds = {FRAME: frames, START: start, END: end, CORRID: corrid, **dict(zip(state_names, served_state))}
        logits, echoed, *new_state = session.run(outputs, feeds)
        ref_logits, ref_state = reference(frames, ref_state)
        if echoed.dtype != np.uint64 or not np.array_equal(echoed, corrid):
            raise ExportError(f"served graph echoes CORRID {corrid.ravel().tolist()} as "
                              f"{echoed.ravel().tolist()} ({echoed.dtype})")
        compared = [(LOGITS, logits, ref_logits)]
        if t == steps - 1:
            nonzero = [n for n, s in zip(state_names, new_state) if np.any(s != 0)]
            if nonzero:
                raise ExportError(f"END does not zero the new state of {nonzero}")
        else:
            compared += [(f"new_{n}", a, b) for n, a, b in zip(state_names, new_state, ref_state)]
        for name, a, b in compared:
            if not b.size:
                continue
            d = float(np.abs(a - b).max()) if np.isfinite(a).all() else float("inf")
            worst_abs = max(worst_abs, d)
            scaled = d / max(1.0, float(np.abs(b).max()))
            if scaled > worst[0] or not worst[1]:
                worst = (scaled, f"{name} at step {t}")
        served_state = new_state
    if worst[0] > tolerance:
        raise ExportError(f"served graph differs from the reference by {worst[0]:.3g} of the output's scale "
                          f"(> {tolerance:g}) in {worst[1]}; a control guard or the state wiring is wrong")
    return {"max_abs_diff": worst_abs, "max_scaled_diff": worst[0],
            "compared": f"{steps} steps of {batch} streams from NaN start state, START/END/CORRID exercised"}


# -- config -------------------------------------------------------------------------------------------------


def build_config(meta: dict, *, name: str, max_batch_size: int, idle_timeout_us: int, max_sequences: int,
                 queue_delay_us: int, instances: int, instance_kind: str, labels_file: str | None,
                 runtime: str = "onnxruntime"):
    """The ``ModelConfig`` protobuf message (tritonclient's model_config_pb2) for the served graph of ``meta``.

    ``runtime="python"``: the same sequence batcher (strategy, controls, idle timeout) for Triton's python backend,
    without ``state`` entries, since the python-backend model keeps the folds itself.
    """
    pb = _tritonclient_protos()
    cfg = ModelConfig.from_dict(meta["config"])
    size = cfg.input_size
    if runtime == "python":
        config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    else:
        config = pb.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime",
                                max_batch_size=max_batch_size)
    # With max_batch_size > 0 every dims below excludes the batch dimension.
    config.input.add(name=FRAME, data_type=pb.TYPE_FP32, dims=[3, size, size])
    logits = config.output.add(name=LOGITS, data_type=pb.TYPE_FP32, dims=[cfg.num_classes])
    if labels_file:
        logits.label_filename = labels_file
    config.output.add(name=SEQUENCE_ID, data_type=pb.TYPE_UINT64, dims=[1])

    seq = config.sequence_batching
    seq.max_sequence_idle_microseconds = idle_timeout_us
    seq.oldest.max_candidate_sequences = max_sequences
    seq.oldest.max_queue_delay_microseconds = queue_delay_us
    kind = pb.ModelSequenceBatching.Control
    for control_name, control_kind in ((START, kind.CONTROL_SEQUENCE_START), (END, kind.CONTROL_SEQUENCE_END)):
        control = seq.control_input.add(name=control_name).control.add(kind=control_kind)
        control.bool_false_true.extend([False, True])
    seq.control_input.add(name=CORRID).control.add(kind=kind.CONTROL_SEQUENCE_CORRID, data_type=pb.TYPE_UINT64)
    for s in meta["state"] if runtime != "python" else ():
        entry = seq.state.add(input_name=s["name"], output_name=s["output"], data_type=pb.TYPE_FP32,
                              dims=s["shape"])
        entry.initial_state.add(data_type=pb.TYPE_FP32, dims=s["shape"], zero_data=True, name="zeros")

    config.instance_group.add(
        kind={"auto": pb.ModelInstanceGroup.KIND_AUTO, "gpu": pb.ModelInstanceGroup.KIND_GPU,
              "cpu": pb.ModelInstanceGroup.KIND_CPU}[instance_kind], count=instances)
    for key, value in ((PARAM_CONFIG, meta["config"]), (PARAM_KIND, meta["kind"]), (PARAM_STATE, meta["state"]),
                       (PARAM_PRECISION, meta["precision"]), (PARAM_FORMAT_VERSION, meta["format_version"]),
                       (PARAM_TRITON, _triton_meta(STATE_KEPT_BY_MODEL if runtime == "python"
                                                   else STATE_KEPT_BY_TRITON))):
        config.parameters[key].string_value = json.dumps(value)
    return config


def python_model_source() -> str:
    """The python-backend ``model.py`` (:mod:`streamtsm.export.triton_python_model`, which imports nothing from
    streamtsm, so it runs in the server's own Python)."""
    return Path(__file__).with_name("triton_python_model.py").read_text(encoding="utf-8")


def write_config(config, path: str | os.PathLike) -> None:
    """Write a ModelConfig message as Triton's text format (``config.pbtxt``)."""
    from google.protobuf import text_format

    # proto3 text format leaves out fields at their default, which can puzzle a reader of the file.
    header = ("# Written by `streamtsm export-triton` from Triton's ModelConfig protobuf. Fields at their default\n"
              "# value are not printed: a control without `kind` is CONTROL_SEQUENCE_START, an instance_group\n"
              "# without `kind` is KIND_AUTO (GPU when present, else CPU), no max_queue_delay_microseconds is 0.\n")
    text = text_format.MessageToString(config, use_short_repeated_primitives=True)
    Path(path).write_text(header + text, encoding="utf-8")


def read_config(path: str | os.PathLike):
    """Parse a ``config.pbtxt`` into tritonclient's ModelConfig message (strict: unknown fields are errors)."""
    from google.protobuf import text_format

    pb = _tritonclient_protos()
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
    except FileNotFoundError:
        raise ConfigError(f"Triton model config not found: {path}") from None
    except text_format.ParseError as e:
        raise ConfigError(f"{path} is not a valid Triton model config: {e}") from None


# -- export -------------------------------------------------------------------------------------------------


def _check_settings(name: str, max_batch_size: int, idle_timeout_us: int, max_sequences: int, queue_delay_us: int,
                    instances: int, instance_kind: str, runtime: str = "onnxruntime") -> None:
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if not name or name.startswith(".") or any(c in name for c in "/\\ \t\n"):
        raise ConfigError(f"Triton model name must be a plain directory name, got {name!r}")
    for label, value, low in (("max_batch_size", max_batch_size, 1), ("idle_timeout_us", idle_timeout_us, 1),
                              ("max_sequences", max_sequences, 1), ("queue_delay_us", queue_delay_us, 0),
                              ("instances", instances, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise ConfigError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")


def _swap_in(built: Path, target: Path, work: Path) -> Path:
    """Move ``built`` to ``target``, replacing (and on failure restoring) a previous export there."""
    old = work / "previous"
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(built, target)
    except OSError:
        if old.exists():
            os.replace(old, target)
        raise
    return target


def export_triton(model_or_onnx, repo_dir: str | os.PathLike, *, name: str | None = None,
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, idle_timeout_us: int = DEFAULT_IDLE_TIMEOUT_US,
                  max_sequences: int = DEFAULT_MAX_SEQUENCES, queue_delay_us: int = 0, instances: int = 1,
                  instance_kind: str = "auto", input_size: int | None = None, labels: list[str] | None = None,
                  opset: int = 17, verify: bool = True, runtime: str = "onnxruntime") -> TritonExportReport:
    """Write an online model into a Triton model repository (see the module docstring for the layout).

    Args:
        model_or_onnx: an online model from :func:`streamtsm.models.create` (float32, weights loaded), or a file
            written by ``export-onnx`` (fp32 or int8) holding one.
        repo_dir: the model repository (created if missing); ``repo_dir/<name>`` is replaced.
        name: the model's name in the repository; the config's model name (e.g. ``tsm_mobilenetv2_online``) when
            None.
        max_batch_size: most cameras in one execution.
        idle_timeout_us: a sequence (camera) sending nothing for this long is dropped with its state.
        max_sequences: cameras one model instance serves at once (``max_candidate_sequences``); more wait in
            Triton's backlog.
        queue_delay_us: how long the batcher may hold a request to batch it with other cameras (0: never wait).
        instances: model instances (``instance_group.count``).
        instance_kind: ``auto`` (GPU when there is one, else CPU), ``gpu`` or ``cpu``.
        input_size, labels, opset: as :func:`export_onnx` (a file keeps its own; labels may replace its names).
        verify: compare the served graph, controls included, with torch (or with the export-onnx file).
        runtime: ``"onnxruntime"`` (Triton's onnxruntime backend loads ``1/model.onnx`` and keeps the folds as
            implicit state) or ``"python"`` (Triton's python backend runs ``1/model.py``, which steps the same
            ``1/model.onnx`` with onnxruntime and keeps each sequence's folds by correlation id: for servers without
            the onnxruntime backend). The sequence batcher and the client's view are the same.

    Returns:
        A :class:`TritonExportReport`.

    Raises:
        ConfigError: a clip model, a bad setting, labels of the wrong count, tritonclient missing.
        ExportError: the export or its verification failed.
    """
    _tritonclient_protos()  # fail before any work when tritonclient is missing
    repo_dir = Path(repo_dir)
    given_file = isinstance(model_or_onnx, (str, os.PathLike))
    if given_file:
        source = Path(model_or_onnx)
        meta = read_metadata(source)
        if meta["kind"] != "online":
            raise ConfigError(f"{source} holds a {meta['kind']} model; export-triton serves online models (Triton "
                              f"keeps their state per camera). Serve a clip model's .onnx with Triton's dynamic "
                              f"batcher instead")
        if input_size is not None and input_size != meta["config"]["input_size"]:
            raise ConfigError(f"{source} takes {meta['config']['input_size']}x{meta['config']['input_size']} "
                              f"frames; re-export it with export-onnx --input-size {input_size}")
        model_name = meta["config"]["name"]
    else:
        if not is_online(model_or_onnx):
            raise ConfigError(f"{model_or_onnx.cfg.name} is a clip model; export-triton serves online models "
                              f"(Triton keeps their state per camera). Use export-onnx for clip models")
        model_name = model_or_onnx.cfg.name
    name = name or model_name
    _check_settings(name, max_batch_size, idle_timeout_us, max_sequences, queue_delay_us, instances, instance_kind,
                    runtime)

    repo_dir.mkdir(parents=True, exist_ok=True)
    # Built beside the repository (same file system, so the final move is a rename), then swapped in: a server
    # polling the repository never sees half a model, nor a work directory it would try to load.
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}.{name}.", dir=repo_dir.resolve().parent))
    except OSError:  # the repository is a mount point whose parent is read-only
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo_dir))
    onnx_report = None
    try:
        plain = work / "plain.onnx"
        if given_file:
            if labels is not None:
                shutil.copyfile(source, plain)
                cfg = ModelConfig.from_dict(meta["config"])
                if len(labels) != cfg.num_classes:
                    raise ConfigError(f"{len(labels)} labels given for a model with {cfg.num_classes} classes")
                write_metadata(plain, {META_CONFIG: {**meta["config"], "labels": list(labels)}})
            else:
                plain = source
            reference = onnx_reference(plain, read_metadata(plain)) if verify else None
        else:
            onnx_report = export_onnx(model_or_onnx, plain, input_size=input_size, opset=opset, verify=verify,
                                      labels=labels)
            reference = torch_reference(model_or_onnx) if verify else None
        model_dir = work / "model"
        (model_dir / "1").mkdir(parents=True)
        served = model_dir / "1" / "model.onnx"
        meta = _write_served_graph(plain, served)
        diffs, what = (None, None), "skipped"
        if verify:
            was_training = getattr(model_or_onnx, "training", False)
            if not given_file:
                model_or_onnx.eval()
            try:
                check = verify_served_graph(reference, served, meta)
            finally:
                if not given_file:
                    model_or_onnx.train(was_training)
            diffs, what = (check["max_abs_diff"], check["max_scaled_diff"]), check["compared"]
        class_names = meta["config"].get("labels")
        if class_names:
            (model_dir / LABELS_FILE).write_text("".join(f"{label}\n" for label in class_names), encoding="utf-8")
        config = build_config(meta, name=name, max_batch_size=max_batch_size, idle_timeout_us=idle_timeout_us,
                              max_sequences=max_sequences, queue_delay_us=queue_delay_us, instances=instances,
                              instance_kind=instance_kind, labels_file=LABELS_FILE if class_names else None,
                              runtime=runtime)
        write_config(config, model_dir / "config.pbtxt")
        if runtime == "python":
            (model_dir / "1" / PYTHON_MODEL_FILE).write_text(python_model_source(), encoding="utf-8")
        read_config(model_dir / "config.pbtxt")  # what Triton will parse
        target = _swap_in(model_dir, repo_dir / name, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shapes = [s["shape"] for s in meta["state"]]
    report = TritonExportReport(
        name=name, model_dir=str(target), model_path=str(target / "1" / "model.onnx"),
        config_path=str(target / "config.pbtxt"), labels_path=str(target / LABELS_FILE) if class_names else None,
        max_batch_size=max_batch_size, idle_timeout_us=idle_timeout_us, max_sequences=max_sequences,
        num_state=len(shapes), state_bytes=int(sum(4 * np.prod(s) for s in shapes)), onnx=onnx_report,
        max_abs_diff=diffs[0], max_scaled_diff=diffs[1], verification=what, runtime=runtime)
    log.info("exported %s to Triton repository %s as %r (%d state tensors)", model_name, repo_dir, name, len(shapes))
    return report


__all__ = ["CONTROLS", "TritonExportReport", "add_sequence_controls", "build_config", "export_triton",
           "onnx_reference", "read_config", "torch_reference", "verify_served_graph", "write_config"]
