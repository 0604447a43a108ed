"""Model registry: every named configuration, its builder and its data settings.

``create("tsm_mobilenetv2_online", num_classes=27)`` builds a model and attaches its :class:`ModelConfig` as
``model.cfg``; ``list_models()`` lists the names. Each model family registers its configurations at the bottom of
its own file.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import IMAGENET_MEAN, IMAGENET_STD, MODEL_KINDS, ModelConfig
from ..errors import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelConfig", "create", "get_spec", "list_models", "register"]

_CFG_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "kind", "arch", "num_classes"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    description: str
    builder: Callable[..., nn.Module]
    defaults: dict


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, kind: str, description: str, **defaults) -> Callable:
    """Decorator registering ``builder(num_classes, **arch_kwargs) -> nn.Module`` under ``name``.

    ``defaults`` holds the config's values: architecture arguments of the builder and :class:`ModelConfig`
    fields (num_segments may be both).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, kind, description, builder, dict(defaults))
        return builder

    return wrap


def list_models(kind: str | None = None) -> list[str]:
    """Registered model names, sorted; only those of ``kind`` when given."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; {_hint(name)}expected one of: {', '.join(list_models())}") from None


def _hint(name: object) -> str:
    """"did you mean ...? " for a typo of a registered name, or the way to use a catalog entry's name; else ""."""
    if not isinstance(name, str):
        return ""
    from ..hub import catalog  # the catalog reads no model code; imported here only when a name is wrong

    if catalog.is_entry_name(name):
        return f"{name} is a published checkpoint: pass it as --weights {name} (weights=...); "
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}? " if close else ""


def create(name: str, num_classes: int | None = None, *, pretrained: str | None = None, **overrides) -> nn.Module:
    """Build a registered model with fresh weights, or with published ones.

    Args:
        name: a name from :func:`list_models`.
        num_classes: classifier size (the config's default when None).
        pretrained: a catalog entry's name (``streamtsm models``) or a checkpoint path: the model is then
            ``streamtsm.models.load(pretrained, model=name, num_classes=num_classes, **overrides)``, the one
            loading path (``reset_head=True`` among the overrides fine-tunes on another class count).
        **overrides: architecture arguments of the family (e.g. ``width_mult``, ``shift_div``, ``num_segments``)
            or :class:`ModelConfig` fields (``input_size``, ``mean``, ...).

    Returns:
        The model in eval mode, with ``model.cfg`` set.
    """
    if pretrained is not None:
        from .loading import load  # the loader builds through this function: imported here, not at the top

        return load(pretrained, model=name, num_classes=num_classes, **overrides)
    spec = get_spec(name)
    values = {**spec.defaults, **overrides}
    if num_classes is None:
        num_classes = values.pop("num_classes")
    values.pop("num_classes", None)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    signature = inspect.signature(spec.builder).parameters
    arch_params = set(signature) - {"num_classes"}
    unknown = set(overrides) - arch_params - _CFG_FIELDS
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)} for model {name!r}; expected any of "
            f"{sorted(arch_params | _CFG_FIELDS)}"
        )
    # Record every architecture argument, defaults included, so a checkpoint says exactly what was built.
    arch = {k: p.default for k, p in signature.items() if k in arch_params and p.default is not p.empty}
    arch.update({k: v for k, v in values.items() if k in arch_params})
    try:
        model = spec.builder(num_classes=num_classes, **arch)
    except ValueError as e:
        raise ConfigError(f"cannot build {name!r}: {e}") from None
    cfg_values = {k: v for k, v in values.items() if k in _CFG_FIELDS}
    if "num_segments" in arch and "clip_len" not in overrides:
        # A segment-based model (TSM, TIN, NL-TSM) classifies windows of exactly num_segments frames.
        cfg_values["clip_len"] = arch["num_segments"]
    # The built network decides its kind where it can tell: tsm_r18 built with shift_mode="unidirectional" has a step
    # form and runs frame by frame, and tsm_mobilenetv2_online built bi-directional has none.
    kind = spec.kind if not hasattr(model, "online") else ("online" if model.online else "clip")
    model.cfg = ModelConfig(name=name, kind=kind, num_classes=num_classes, arch=arch, **cfg_values)
    return model.eval()
