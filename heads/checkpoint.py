"""Reading head checkpoints: config.json and weights (safetensors, or `torch.load(weights_only=True)`),
with errors that name the file and what was wrong with it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..validation import read_json


def read_config(path: Path, what: str) -> dict:
    """The JSON object in path / config.json; FileNotFoundError / ValueError naming the file."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {what} checkpoint is a folder with config.json")
    cfg = read_json(file)
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def read_weights(path: Path, names: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """The first of `names` that exists in the folder (.safetensors, else a weights-only torch file)."""
    for name in names:
        file = path / name
        if not file.exists():
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or a pickle that is not plain tensors
            raise ValueError(f"{file}: cannot read {what} weights ({type(e).__name__}: {e})") from None
    raise FileNotFoundError(f"no {what} weights in {path}: expected one of {', '.join(names)}")
