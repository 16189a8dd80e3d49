"""Learning-rate schedules and the optimiser step shared by the head trainers: warm-up, then constant,
linear or cosine decay to `min_lr_ratio` of the peak; gradient accumulation and clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, total: int, lr: float, warmup_steps: int = 0, schedule: str = "constant", min_ratio: float = 0.0):
    """The learning rate of optimiser step `step` (0-based) of `total`.

    Warm-up: linear from lr / warmup_steps to lr over the first warmup_steps steps. Then
    constant: lr; linear / cosine: from lr down to min_ratio * lr at the last step.

    Examples
    --------
    >>> [round(lr_at(s, 10, 1.0, 2, "linear"), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.0]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1; got {warmup_steps}, {min_ratio}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(total - 1 - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_ratio + (1.0 - min_ratio) * shape)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def clip(params, max_norm: float) -> float | None:
    """Clip the gradients' global norm to max_norm (0: off); returns the norm before clipping."""
    if not max_norm:
        return None
    return float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))


PRECISIONS = ("fp32", "bf16")


@dataclass(slots=True)
class OptimSettings:
    """The schedule, clipping, accumulation and precision settings both head trainers take (their
    configs extend this)."""

    warmup_steps: int = 0  # linear warm-up of the learning rate
    schedule: str = "constant"  # then constant, linear or cosine decay (lr_at)
    min_lr_ratio: float = 0.0  # the decay's floor, as a fraction of lr
    grad_clip: float = 0.0  # max global gradient norm (0: no clipping)
    accumulation: int = 1  # micro-batches of batch_size per optimiser step
    precision: str = "fp32"  # or bf16: forward and loss under bf16 autocast (weights and optimiser fp32)


def check_precision(precision: str) -> str:
    """fp32 or bf16 (the heads' forward and loss under bf16 autocast); anything else is an error
    that names the value."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """The context a training step's forward and loss run in: bf16 autocast on the device (CPU
    too), or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=check_precision(precision) == "bf16")
