"""Where models, heads and targets come from: a local folder, or a Hugging Face Hub id resolved by
huggingface_hub (its cache, the revision, and offline mode: HF_HUB_OFFLINE=1 reads the cache only)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "true", "yes", "on"}


def resolve(location: str | Path, revision: str | None = None) -> Path:
    """A local folder as it is, or the local snapshot of Hub id `org/name` at `revision`.

    Parameters
    ----------
    location : a folder, or a Hub id such as "yuhuili/EAGLE-LLaMA3-Instruct-8B".
    revision : a branch, tag or commit of the Hub repository (default: main).

    Returns
    -------
    Path of a folder holding the repository's files.

    Raises
    ------
    FileNotFoundError naming the location: neither a folder nor an id, or an id the Hub (or, when
    offline, the local cache) cannot provide.

    Examples
    --------
    >>> resolve(".")
    PosixPath('.')
    """
    path = Path(location)
    if path.exists():
        return path
    name = str(location)
    if not _REPO_ID.match(name):
        raise FileNotFoundError(f"{name}: no such folder, and not a Hugging Face Hub id (org/name)")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE  # read now, not at import
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache, local_files_only=offline))
    except Exception as e:  # not found, no network, gated: one message with the cause
        where = "the local Hub cache (offline)" if offline else "the Hub"
        raise FileNotFoundError(
            f"{name}: not a local folder, and {where} could not provide it ({type(e).__name__}: {e})"
        ) from None
