"""Model families, the registry and checkpoint loading."""

# Importing a family registers its configurations.
from . import non_local, tin, tsm, uniformer, x3d  # noqa: F401
from .checkpoint import load_checkpoint, load_model, read_checkpoint, save_checkpoint
from .registry import ModelConfig, create, get_spec, list_models
from .tsm import TSM

__all__ = ["TSM", "ModelConfig", "create", "get_spec", "list_models", "load_checkpoint", "load_model",
           "read_checkpoint", "save_checkpoint"]
