"""Draft proposers behind one protocol, registered by name."""

from .base import PROPOSERS, Needs, ProposeContext, Proposer, draft_chain, register_proposer, resolve_proposer
from .draft_model import DraftModel
from .eagle import Eagle
from .medusa import Medusa, default_choices
from .ngram import Ngram

__all__ = [
    "PROPOSERS",
    "DraftModel",
    "Eagle",
    "Medusa",
    "Needs",
    "Ngram",
    "ProposeContext",
    "Proposer",
    "default_choices",
    "draft_chain",
    "register_proposer",
    "resolve_proposer",
]
