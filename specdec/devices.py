"""Host -> device copies that do not wait for the device's queued work."""

from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """x on `device`; a host tensor goes to a CUDA device through pinned staging, non-blocking, so
    the host does not wait for the work already queued there (a pageable copy would)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
