"""ONNX export of streamtsm models: one self-describing file, verified against torch.

The file's layout and metadata (what a runtime reads, and needs nothing else) are written down in
:mod:`streamtsm.formats`; int8 quantization of an exported file is :mod:`streamtsm.export.quantize`.

Export uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the torch.export-based one
needs onnxscript, which this package does not depend on. The shift is plain Slice/Concat on the channel axis, so
nothing in the graph is specialised to the batch the trace ran with; verification runs a different batch than the
trace to catch it if a model ever does.

This module imports torch only inside the functions that export or verify.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ConfigError, StreamTSMError, first_line
from ..formats import (BATCH, CLIP, FORMAT_VERSION, FRAME, LOGITS, META_CONFIG, META_FORMAT_VERSION, META_IO,
                       META_KIND, META_PRECISION, META_STATE, add_metadata, state_names)

log = logging.getLogger(__name__)

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


def is_online(model) -> bool:
    """Whether ``model`` exports as an online step graph: an online config and a step form."""
    return model.cfg.kind == "online" and bool(getattr(model, "online", False))


def clip_len_of(model) -> int:
    """Frames per clip T: ``num_segments`` for TSM, ``cfg.clip_len`` for families without segments."""
    return int(getattr(model, "num_segments", None) or model.cfg.clip_len)


def _io_spec(kind: str, size: int, num_classes: int, state_shapes: list[tuple[int, int, int]],
             clip_len: int) -> tuple[dict, list[dict]]:
    """(``{"inputs": {name: shape}, "outputs": {...}}``, state entries) with ``BATCH`` for the dynamic axis."""
    logits = {LOGITS: [BATCH, num_classes]}
    if kind == "clip":
        return {"inputs": {CLIP: [BATCH, clip_len, 3, size, size]}, "outputs": logits}, []
    state = []
    for i, shape in enumerate(state_shapes):
        name, output = state_names(i)
        state.append({"name": name, "output": output, "shape": list(shape)})
    inputs = {FRAME: [BATCH, 3, size, size], **{s["name"]: [BATCH, *s["shape"]] for s in state}}
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
                verify: bool = True, labels: list[str] | None = None, progress: bool = False) -> ExportReport:
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
        progress: a progress bar on stderr while verifying.

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
    online = is_online(model)
    kind = "online" if online else "clip"
    out_cfg = dataclasses.replace(cfg, kind=kind, input_size=size, resize_size=max(cfg.resize_size, size),
                                  labels=labels)
    clip_len = clip_len_of(model)
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
                    raise ExportError(f"torch.onnx.export failed for {cfg.name}: {first_line(e)}") from e
        graph_file = onnx.load(str(tmp))
        _declare_io_shapes(graph_file, io)
        add_metadata(graph_file, {
            META_CONFIG: out_cfg.to_dict(),
            META_KIND: kind,
            META_STATE: state,
            META_IO: io,
            META_PRECISION: "fp32",
            META_FORMAT_VERSION: FORMAT_VERSION,
        })
        save_checked(graph_file, tmp)
        diffs, what = (None, None), "skipped"
        if verify:
            check = verify_onnx(model, tmp, input_size=size, progress=progress)
            diffs, what = (check["max_abs_diff"], check["max_scaled_diff"]), check["compared"]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    report = ExportReport(str(path), kind, EXPORTER, opset, size, list(io["inputs"]), list(io["outputs"]),
                          path.stat().st_size, *diffs, what)
    log.info("exported %s to %s (%s, max abs diff %s)", cfg.name, path, kind, diffs[0])
    return report


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


def save_checked(model, path: str | os.PathLike) -> None:
    """Save an onnx ModelProto to ``path`` once ``onnx.checker`` (full check) accepts it.

    Raises:
        ExportError: the checker refuses the graph.
    """
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # ValidationError, InferenceError
        raise ExportError(f"exported graph fails onnx.checker: {first_line(e)}") from e
    onnx.save(model, str(path))


def cpu_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime session on the CPU provider, all graph optimizations on: what verification and calibration
    run, whatever the machine has."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(model, path: str | os.PathLike, *, input_size: int | None = None, steps: int = 6, batch: int = 2,
                tolerance: float = TOLERANCE, seed: int = 0, progress: bool = False) -> dict:
    """Compare onnxruntime (CPU) running ``path`` with ``model`` in torch on random input (``progress``: a bar on
    stderr, one tick per comparison).

    Online: ``steps`` frames of ``batch`` streams stepped one by one, each side feeding its own state back, every
    logit and state output compared; then two steps at another batch (batch + 1). Clip: random clips at batch 1
    and ``batch + 1``.

    Returns:
        ``{"max_abs_diff", "max_scaled_diff", "worst", "compared"}``: the largest absolute difference, the largest
        difference in units of max(1, max |torch output|) of its tensor (see ``TOLERANCE``), where the latter
        occurred, and what was compared.

    Raises:
        ExportError: a scaled difference exceeds ``tolerance``, or an output of either side is NaN or infinite.
    """
    import torch

    size = int(input_size or model.cfg.input_size)
    session = cpu_session(path)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    worst_abs, worst = 0.0, (-1.0, "")  # (max scaled difference, where)
    bar = tqdm(total=steps + 2 if is_online(model) else 2, desc="verifying", unit="step", leave=False,
               disable=not progress)

    def compare(where: str, ours: list[np.ndarray], theirs) -> None:
        nonlocal worst_abs, worst
        bar.update()
        for name, a, b in zip([o.name for o in session.get_outputs()], ours, theirs):
            if not a.size:
                continue
            b = b.detach().cpu().numpy()
            # NaN compares false with everything: without this an all-NaN graph would pass with a difference of 0.
            for side, values in (("onnxruntime", a), ("torch", b)):
                if not np.isfinite(values).all():
                    raise ExportError(f"{side} output {name} at {where} holds NaN or infinity; the model is not "
                                      "usable (bad weights or an overflow), expected finite outputs")
            d = float(np.abs(a - b).max())
            worst_abs = max(worst_abs, d)
            scaled = d / max(1.0, float(np.abs(b).max()))
            if scaled > worst[0]:
                worst = (scaled, f"{name} at {where} (abs {d:.3g}, max |torch| {np.abs(b).max():.3g})")

    with torch.no_grad():
        if is_online(model):
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
            t = clip_len_of(model)
            for b in (1, batch + 1):
                clip = rng.standard_normal((b, t, 3, size, size), dtype=np.float32)
                logits = model(torch.from_numpy(clip).to(device))
                compare(f"batch {b}", session.run(None, {CLIP: clip}), (logits,))
            what = f"clip: batches 1 and {batch + 1} of {t}-frame clips"
    bar.close()
    if worst[0] > tolerance:
        raise ExportError(f"onnxruntime differs from torch by {worst[0]:.3g} of the output's scale (> {tolerance:g})"
                          f" in {worst[1]}; the exported graph is not faithful to the model")
    return {"max_abs_diff": worst_abs, "max_scaled_diff": max(worst[0], 0.0), "worst": worst[1], "compared": what}
