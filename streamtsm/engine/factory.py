"""Build the engine `streamtsm run` asks for: a registered model (with weights, or the shipped demo model) on
torch, an exported .onnx file on onnxruntime, or a model served by Triton (the last two never import torch)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ConfigError
from .base import Engine

log = logging.getLogger(__name__)

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "demo_model.pth"
DEFAULT_MODEL = "tsm_mobilenetv2_online"
BACKENDS = ("auto", "torch", "onnxruntime", "triton")
_BACKEND_ALIASES = {"onnx": "onnxruntime", "ort": "onnxruntime"}


def default_threads() -> int:
    """Intra-op threads for the model: all cores but one.

    The capture threads decode frames, and the pipeline preprocesses and publishes, on the same cores. When the
    model's threads take every core, each parallel region waits on a thread that was descheduled, and a step
    gets many times slower (measured here: 22 ms with 1 thread vs 511 ms with 2 on a loaded 2-core machine).
    """
    return max(1, (os.cpu_count() or 2) - 1)


def _resolve_backend(backend: str | None, onnx: str | None, url: str | None) -> str:
    """The backend ``backend`` names, or for ``auto``: triton with a url, onnxruntime with a file, else torch."""
    name = _BACKEND_ALIASES.get((backend or "auto").lower(), (backend or "auto").lower())
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if url else "onnxruntime" if onnx else "torch"
    return name


def _build_triton(url: str | None, triton_model: str | None, model: str | None, weights: str | None,
                  onnx: str | None, labels_file: str | None) -> Engine:
    if model or weights or onnx:
        raise ConfigError("--backend triton runs the model the server holds; drop --model/--weights/--onnx "
                          "(name it with --triton-model)")
    if not url or not triton_model:
        raise ConfigError("--backend triton needs --url HOST:PORT (the server's gRPC endpoint, e.g. "
                          "localhost:8001) and --triton-model NAME (the name given to export-triton)")
    from .triton_engine import TritonOnlineEngine

    return TritonOnlineEngine(url, triton_model, labels_file=labels_file)


def build_engine(*, model: str | None = None, weights: str | None = None, onnx: str | None = None,
                 labels_file: str | None = None, device: str = "cpu", providers: list[str] | None = None,
                 num_classes: int | None = None, threads: int | None = None, backend: str = "auto",
                 url: str | None = None, triton_model: str | None = None) -> Engine:
    """Build an engine from CLI-style choices.

    Args:
        model: registry name (default: the shipped demo model, or ``tsm_mobilenetv2_online`` if none is shipped).
        weights: a checkpoint: this package's format (model rebuilt from it) or a foreign one (needs ``model``);
            see :func:`streamtsm.models.load`.
        onnx: an exported .onnx file; excludes ``model`` and ``weights``.
        labels_file: class names, one per line; must match the model's class count.
        device: torch device (``cpu``, ``cuda``, ``cuda:N``).
        providers: onnxruntime execution providers for ``onnx``.
        num_classes: classifier size when building a registered model without a checkpoint of ours.
        threads: intra-op threads of the backend (default: :func:`default_threads`).
        backend: ``torch``, ``onnxruntime`` (``onnx``), ``triton``, or ``auto``: triton when ``url`` is given,
            onnxruntime when ``onnx`` is, torch otherwise.
        url: ``host:port`` of a Triton server's gRPC endpoint (``triton``).
        triton_model: the model's name on that server (``triton``).
    """
    chosen = _resolve_backend(backend, onnx, url)
    if chosen == "triton":
        return _build_triton(url, triton_model, model, weights, onnx, labels_file)
    if url or triton_model:
        raise ConfigError(f"--url and --triton-model are for --backend triton, not {chosen}")
    if chosen == "onnxruntime" and not onnx:
        raise ConfigError("--backend onnxruntime runs an exported file: give --onnx FILE (see export-onnx)")
    if chosen == "torch" and onnx:
        raise ConfigError("--onnx files run on onnxruntime; drop --backend torch (or use --backend onnxruntime)")
    threads = threads or default_threads()
    if onnx:
        if model or weights:
            raise ConfigError("--onnx runs the exported file alone; drop --model/--weights")
        from .onnxruntime_engine import load_onnx_engine

        return load_onnx_engine(onnx, providers=providers, threads=threads, labels_file=labels_file)

    import torch

    from ..models import load
    from .torch_engine import TorchClipEngine, TorchOnlineEngine

    if weights is None and model is None and DEMO_WEIGHTS.is_file():
        weights = str(DEMO_WEIGHTS)
    if not weights:
        model = model or DEFAULT_MODEL
        log.warning("no weights given: %s runs with random weights, its predictions mean nothing "
                    "(pass --weights, or train one with `streamtsm train`)", model)
    net = load(weights, model=model, num_classes=num_classes, labels_file=labels_file)
    torch.set_num_threads(threads)  # process-wide: torch has one intra-op pool
    engine_cls = TorchOnlineEngine if net.cfg.kind == "online" else TorchClipEngine
    return engine_cls(net, device=device, labels=net.cfg.labels)
