"""Model families, the registry and checkpoint loading: :func:`load` is the one way to get a model."""

# Importing a family registers its configurations.
from . import non_local, tin, tsm, uniformer, x3d  # noqa: F401
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .loading import load
from .registry import ModelConfig, create, get_spec, list_models
from .tsm import TSM

__all__ = ["TSM", "ModelConfig", "create", "get_spec", "list_models", "load", "load_checkpoint",
           "read_checkpoint", "save_checkpoint"]
