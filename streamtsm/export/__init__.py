"""ONNX export and verification, int8 quantization, and the ``export-onnx`` / ``quantize`` commands.

Importing this package does not import torch; only :func:`export_onnx` and :func:`verify_onnx` do, when called.
"""

from .onnx import (ExportError, ExportReport, calibration_frames, export_onnx, quantize_int8, read_metadata,
                   verify_onnx)

__all__ = ["ExportError", "ExportReport", "calibration_frames", "export_onnx", "quantize_int8", "read_metadata",
           "verify_onnx"]
