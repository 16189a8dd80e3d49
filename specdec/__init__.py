"""specdec: exact speculative decoding for Hugging Face causal LMs."""

from .sampling import RowSeeds, SamplingParams, process_logits, sample_from_probs
from .tree import DraftTree, Law, node_bucket
from .verify import TypicalParams, VerifyMode, VerifyResult, verify

__version__ = "0.1.0"

__all__ = [
    "DraftTree",
    "Law",
    "RowSeeds",
    "SamplingParams",
    "TypicalParams",
    "VerifyMode",
    "VerifyResult",
    "node_bucket",
    "process_logits",
    "sample_from_probs",
    "verify",
]
