"""The ``export-onnx``, ``quantize`` and ``export-triton`` commands (added to the ``streamtsm`` parser by
:func:`add_commands`).

    streamtsm export-onnx --model tsm_mobilenetv2_online --weights online.pth.tar --labels jester.txt -o m.onnx
    streamtsm export-onnx --weights run/best.pth --int8 --calib-source clips/door.mp4 -o door.onnx
    streamtsm quantize --onnx m.onnx -o m.int8.onnx --calib-source synthetic
    streamtsm export-triton --weights run/best.pth -o model_repository/ --name door --max-batch-size 32
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import ModelConfig, window_span
from ..errors import ConfigError
from ..settings import check_settings

log = logging.getLogger(__name__)

# Each command's numeric options, checked by the ranges of streamtsm.settings.RANGES before anything is loaded.
NUMERIC_OPTIONS = {
    "export-onnx": ("input_size", "num_classes", "opset", "calib_frames", "threads"),
    "quantize": ("calib_frames", "threads"),
    "export-triton": ("input_size", "num_classes", "opset", "max_batch_size", "idle_timeout", "max_sequences",
                      "queue_delay", "instances"),
}


def add_commands(subparsers) -> None:
    """Add ``export-onnx``, ``quantize`` and ``export-triton`` to an argparse subparsers object (each sets
    ``func``)."""
    p = subparsers.add_parser("export-onnx", help="export a model to a self-describing, verified ONNX file",
                              description="Export a model to ONNX (online models as one step with explicit state, "
                                          "clip models as clip -> logits), verify it against torch with "
                                          "onnxruntime, and optionally quantize it to int8.")
    p.add_argument("--model", help="registered model name (optional with a streamtsm checkpoint)")
    p.add_argument("--weights", help="a streamtsm checkpoint, or foreign weights (official TSM, mmaction2, "
                                     "pytorchvideo, UniFormer, plain) for --model; without it the model is exported "
                                     "with fresh weights")
    p.add_argument("--labels", help="label file, one class per line (count must equal the number of classes)")
    p.add_argument("--input-size", type=int, help="side of the square frames the graph takes (default: config)")
    p.add_argument("--num-classes", type=int, help="classifier size for --model (default: the model's)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check")
    _add_calibration_args(p, "also write an int8 copy beside the output, as NAME.int8.onnx")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.set_defaults(func=cmd_export_onnx)

    p = subparsers.add_parser("quantize", help="quantize an exported fp32 ONNX file to int8 (static, QDQ)",
                              description="Static int8 quantization (QDQ, per-channel weights) of a file from "
                                          "export-onnx, calibrated on preprocessed frames, with a top-1 agreement "
                                          "check against fp32 on held-out frames.")
    p.add_argument("--onnx", required=True, help="the fp32 file from export-onnx")
    _add_calibration_args(p, None)
    p.add_argument("-o", "--output", required=True, help="the int8 .onnx file to write")
    p.set_defaults(func=cmd_quantize)

    _add_triton_command(subparsers)


def _add_triton_command(subparsers) -> None:
    from .triton import DEFAULT_IDLE_TIMEOUT_US, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQUENCES, INSTANCE_KINDS, RUNTIMES

    p = subparsers.add_parser("export-triton", help="write an online model into a Triton Inference Server "
                                                    "model repository (server-side state per camera)",
                              description="Write an online model into a Triton model repository: the ONNX step "
                                          "graph with Triton's sequence controls, and a config.pbtxt whose "
                                          "sequence batcher keeps each camera's state on the server (implicit "
                                          "state, zero initial state) and batches cameras across clients. "
                                          "Run it with `streamtsm run --backend triton`.")
    p.add_argument("--model", help="registered model name (optional with a streamtsm checkpoint)")
    p.add_argument("--weights", help="a streamtsm checkpoint, or foreign weights for --model; without it the model "
                                     "is exported with fresh weights")
    p.add_argument("--onnx", help="an existing export-onnx file (fp32 or int8) to serve instead of --model/--weights")
    p.add_argument("--labels", help="label file, one class per line (count must equal the number of classes)")
    p.add_argument("--input-size", type=int, help="side of the square frames the graph takes (default: config)")
    p.add_argument("--num-classes", type=int, help="classifier size for --model (default: the model's)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the check of the served graph against torch")
    p.add_argument("-o", "--output", required=True, metavar="REPO_DIR",
                   help="the model repository (created if missing); REPO_DIR/NAME is replaced")
    p.add_argument("--name", help="the model's name on the server (default: the model's registry name)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"most cameras in one execution (default: {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_US / 1e6, metavar="SECONDS",
                   help="a camera silent this long loses its state on the server (default: "
                        f"{DEFAULT_IDLE_TIMEOUT_US / 1e6:g})")
    p.add_argument("--max-sequences", type=int, default=DEFAULT_MAX_SEQUENCES,
                   help="cameras one model instance serves at once; more wait in Triton's backlog "
                        f"(default: {DEFAULT_MAX_SEQUENCES})")
    p.add_argument("--queue-delay", type=float, default=0.0, metavar="MS",
                   help="how long a request may wait to be batched with other cameras (default: 0)")
    p.add_argument("--instances", type=int, default=1, help="model instances (default: 1)")
    p.add_argument("--instance-kind", choices=INSTANCE_KINDS, default="auto",
                   help="where instances run: auto (GPU when present, else CPU), gpu, cpu (default: auto)")
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                   help="the Triton backend that serves it: onnxruntime (default; Triton keeps the state) or python "
                        "(1/model.py runs the graph with onnxruntime and keeps each camera's state; for servers "
                        "without the onnxruntime backend, e.g. the nvidia-pytriton wheel's)")
    p.set_defaults(func=cmd_export_triton)


def _add_calibration_args(p: argparse.ArgumentParser, int8_help: str | None) -> None:
    if int8_help:
        p.add_argument("--int8", action="store_true", help=int8_help)
    p.add_argument("--calib-source", default="synthetic",
                   help="calibration frames: 'synthetic' (default) or a video file/URL")
    p.add_argument("--calib-frames", type=int, default=256, help="number of calibration frames (default: 256)")
    p.add_argument("--threads", type=int, help="onnxruntime threads for calibration (default: onnxruntime's)")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _load(args: argparse.Namespace):
    """The model --weights / --model / --num-classes / --labels name (:func:`streamtsm.models.load`), its class
    names in ``cfg.labels`` (from --labels, else the checkpoint, else None)."""
    from ..models import get_spec, load

    if args.model:
        get_spec(args.model)  # a mistyped name is the one line, before any warning
    if not args.weights and args.model:
        print(f"warning: no --weights: exporting {args.model} with freshly initialized weights", file=sys.stderr)
    return load(args.weights, model=args.model, num_classes=args.num_classes, labels_file=args.labels)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .onnx import export_onnx

    check_settings(vars(args), NUMERIC_OPTIONS["export-onnx"])

    model = _load(args)
    labels = model.cfg.labels
    report = export_onnx(model, args.output, input_size=args.input_size, opset=args.opset,
                         verify=not args.no_verify, labels=labels, progress=sys.stderr.isatty())
    size = report.input_size
    print(f"wrote {report.path}: {model.cfg.name}, {report.kind}, {model.cfg.num_classes} classes, {size}x{size}, "
          f"{_mb(report.size_bytes)}, opset {report.opset}, {len(report.inputs) - 1 if report.kind == 'online' else 0}"
          f" state tensors")
    if report.max_abs_diff is None:
        print("not verified (--no-verify)")
    else:
        print(f"verified with onnxruntime CPUExecutionProvider against torch: max abs diff {report.max_abs_diff:.2e}"
              f" ({report.max_scaled_diff:.2e} of the output scale; {report.verification})")
    if args.int8:
        out = Path(args.output)
        _quantize(out, out.with_name(out.name.removesuffix(".onnx") + ".int8.onnx"), args)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    check_settings(vars(args), NUMERIC_OPTIONS["quantize"])
    _quantize(Path(args.onnx), Path(args.output), args)
    return 0


def _quantize(fp32: Path, out: Path, args: argparse.Namespace) -> None:
    from ..formats import read_metadata
    from .quantize import calibration_frames, quantize_int8

    meta = read_metadata(fp32)
    cfg = ModelConfig.from_dict(meta["config"])
    # Online models: sequences of 32 frames stepped with their state. Clip models: each sequence must hold a whole
    # window (clip_len frames frame_interval apart), as the live ring samples it.
    length = min(32, args.calib_frames)
    if meta["kind"] == "clip":
        length = window_span(meta["io"]["inputs"]["clip"][1], cfg.frame_interval)
    frames = calibration_frames(cfg, args.calib_source, num_frames=max(args.calib_frames, length),
                                sequence_length=length)
    report = quantize_int8(fp32, out, frames, threads=args.threads, progress=sys.stderr.isatty())
    print(f"wrote {report['path']}: int8 QDQ (per-channel weights), {_mb(report['size_bytes'])} "
          f"(fp32 {_mb(report['fp32_size_bytes'])}), calibrated on {report['calibration_inputs']} inputs from "
          f"{args.calib_source}")
    print(f"top-1 agreement with fp32: {100 * report['top1_agreement']:.1f}% over {report['holdout_predictions']} "
          f"held-out predictions (max abs logit diff {report['max_abs_logit_diff']:.3g}); graph I/O float32")


def cmd_export_triton(args: argparse.Namespace) -> int:
    from ..labels import read_labels
    from .triton import export_triton

    check_settings(vars(args), NUMERIC_OPTIONS["export-triton"])
    if args.onnx:
        if args.model or args.weights or args.num_classes:
            raise ConfigError("--onnx serves that file as it is; drop --model/--weights/--num-classes")
        source, labels, what = args.onnx, None, args.onnx
        if args.labels:
            from ..formats import read_metadata

            labels = read_labels(args.labels, read_metadata(args.onnx)["config"]["num_classes"])
    else:
        source = _load(args)
        labels, what = source.cfg.labels, source.cfg.name
    report = export_triton(source, args.output, name=args.name, max_batch_size=args.max_batch_size,
                           idle_timeout_us=max(1, round(args.idle_timeout * 1e6)),
                           max_sequences=args.max_sequences, queue_delay_us=round(args.queue_delay * 1e3),
                           instances=args.instances, instance_kind=args.instance_kind, input_size=args.input_size,
                           labels=labels, opset=args.opset, verify=not args.no_verify, runtime=args.runtime)
    python = report.runtime == "python"
    print(f"wrote {report.model_dir}: {what} as Triton model {report.name!r} (config.pbtxt, "
          f"{'1/model.py, ' if python else ''}1/model.onnx{', labels.txt' if report.labels_path else ''}); "
          f"{report.runtime} backend, sequence batching (oldest), max batch "
          f"{report.max_batch_size}, up to {report.max_sequences} cameras per instance, {report.num_state} state "
          f"tensors ({report.state_bytes / 1e3:.1f} kB per camera) kept by "
          f"{'the python model' if python else 'Triton'}, idle timeout {report.idle_timeout_us / 1e6:g} s")
    if report.max_abs_diff is None:
        print("not verified (--no-verify)")
    else:
        print(f"verified the served graph (controls included) against "
              f"{'the .onnx file' if args.onnx else 'torch'}: max abs diff {report.max_abs_diff:.2e} "
              f"({report.max_scaled_diff:.2e} of the output scale; {report.verification})")
    print(f"serve it: tritonserver --model-repository={Path(args.output).resolve()}; run it: streamtsm run "
          f"--backend triton --url HOST:8001 --triton-model {report.name}")
    return 0
