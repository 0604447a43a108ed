"""The optimization recipe of a training run: parameter groups (no weight decay on norms and biases), TSN's partial
BN, the learning-rate schedule (linear warm-up, then step or cosine) and the scheduler that applies it by epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError

SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum (the TSM recipe) or AdamW (``momentum`` is its beta1) over :func:`param_groups`."""
    if name == "sgd":
        return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(momentum, 0.999))
    raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def set_partial_bn(model: nn.Module) -> list[nn.Module]:
    """TSN's partial BN: freeze the statistics and affine parameters of every BN layer but the first.

    Returns the frozen layers; call :func:`apply_partial_bn` after every ``model.train()``.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns[1:]:
        for p in bn.parameters():
            p.requires_grad_(False)
    return bns[1:]


def apply_partial_bn(frozen: Sequence[nn.Module]) -> None:
    for bn in frozen:
        bn.eval()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only, not on BN parameters and biases (as in TSM's policies)."""
    decay, no_decay = [], []
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(epoch: float, epochs: int, schedule: str, lr_steps: Sequence[int], warmup_epochs: float) -> float:
    """Learning-rate multiplier at ``epoch`` (fractional): linear warm-up, then step (x0.1 at each of
    ``lr_steps``) or cosine to zero at ``epochs``."""
    warm = 1.0
    if warmup_epochs > 0 and epoch < warmup_epochs:
        warm = max(epoch / warmup_epochs, 1e-3)
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-8)
        progress = min(max(epoch - warmup_epochs, 0.0) / span, 1.0)
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    return warm * 0.1 ** sum(epoch >= s for s in lr_steps)


class EpochScheduler:
    """Sets every group's lr to ``base_lr * fn(progress)``, progress in epochs (fractional within an epoch).

    Progress rather than an iteration count, so that epochs of different lengths (matched warm-up batches,
    skipped videos) keep the schedule in epochs. Its state is plain numbers (weights_only checkpoints).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn) -> None:
        self.optimizer = optimizer
        self.fn = fn
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.progress = 0.0
        self.step(0.0)

    def step(self, progress: float) -> None:
        self.progress = float(progress)
        factor = self.fn(self.progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.step(state["progress"])
