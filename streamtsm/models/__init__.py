"""Model families, the registry and checkpoint loading."""

from . import tsm  # noqa: F401  (registers the TSM configurations)
from .checkpoint import load_checkpoint, load_model, read_checkpoint, save_checkpoint
from .registry import ModelConfig, create, get_spec, list_models
from .tsm import TSM

__all__ = ["TSM", "ModelConfig", "create", "get_spec", "list_models", "load_checkpoint", "load_model",
           "read_checkpoint", "save_checkpoint"]
