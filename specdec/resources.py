"""Files that ship with specdec: the demo models (specdec.assets) and prompt sets (specdec.data),
found through importlib.resources (in a source checkout: assets/ and data/)."""

from __future__ import annotations

import os
from pathlib import Path


def demo_dir() -> Path:
    """The demo models: $SPECDEC_DEMO_DIR, else the copy installed with specdec (specdec.assets,
    which is assets/ of a source checkout)."""
    path = Path(os.environ.get("SPECDEC_DEMO_DIR") or _package_file("specdec.assets", "demo"))
    if not (path / "target" / "config.json").is_file():
        raise FileNotFoundError(
            f"no demo models at {path} (specdec installs them as package data; or set SPECDEC_DEMO_DIR)"
        )
    return path


def humaneval_path() -> Path:
    """HumanEval's 164 prompts (MIT, HumanEval.LICENSE beside them), installed with specdec."""
    return _package_file("specdec.data", "HumanEval.jsonl.gz")


def _package_file(package: str, name: str) -> Path:
    from importlib.resources import files

    return Path(str(files(package) / name))
