"""Device names (auto / cpu / cuda[:N]) and host -> device copies that do not wait for the device's
queued work."""

from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """x on `device`; a host tensor goes to a CUDA device through pinned staging, non-blocking, so
    the host does not wait for the work already queued there (a pageable copy would)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when there is one, else cpu; a CUDA name on a machine without CUDA, or a name
    that is no device, is a ValueError that says what would be valid (the caller names the value)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError("not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("this machine has no CUDA device; use cpu or auto")
    return dev
