"""Draft proposers behind one protocol, registered by name."""

from .base import PROPOSERS, ProposeContext, Proposer, register_proposer, resolve_proposer
from .draft_model import DraftModel
from .ngram import Ngram

__all__ = ["PROPOSERS", "DraftModel", "Ngram", "ProposeContext", "Proposer", "register_proposer", "resolve_proposer"]
