"""ONNX export and verification, int8 quantization, and the ``export-onnx`` / ``quantize`` commands.

Importing this package does not import torch; only :func:`export_onnx` and :func:`verify_onnx` do, when called.
What an exported file holds is :mod:`streamtsm.formats` (``read_metadata`` is re-exported here for callers).
"""

from ..formats import read_metadata
from .onnx import ExportError, ExportReport, export_onnx, verify_onnx
from .quantize import calibration_frames, quantize_int8

__all__ = ["ExportError", "ExportReport", "calibration_frames", "export_onnx", "quantize_int8", "read_metadata",
           "verify_onnx"]
