"""The target / draft model behind one interface; hf.py adapts transformers models."""

from .base import AttentionMetadata, ModelOutput, TargetModel
from .hf import HFModel, check_supported
from .runner import PagedRunner

__all__ = ["AttentionMetadata", "HFModel", "ModelOutput", "PagedRunner", "TargetModel", "check_supported"]
