"""Draft proposers behind one protocol, registered by name."""

from .base import PROPOSERS, ProposeContext, Proposer, register_proposer, resolve_proposer
from .draft_model import DraftModel
from .eagle import Eagle
from .medusa import Medusa, default_choices
from .ngram import Ngram

__all__ = [
    "PROPOSERS",
    "DraftModel",
    "Eagle",
    "Medusa",
    "Ngram",
    "ProposeContext",
    "Proposer",
    "default_choices",
    "register_proposer",
    "resolve_proposer",
]
