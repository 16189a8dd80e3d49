"""specdec: exact speculative decoding for Hugging Face causal LMs."""

from .api import GenerateOutput, custom_generate, custom_generate_repo, generate
from .cache import BlockManager, OutOfBlocksError, PagedKVCache
from .engine import Engine
from .metrics import SpecStats
from .proposers import DraftModel, Eagle, Medusa, Ngram, Proposer, register_proposer
from .sampling import RowSeeds, SamplingParams, process_logits, sample_from_probs
from .tree import DraftTree, Law, node_bucket
from .verify import TypicalParams, VerifyMode, VerifyResult, verify

__version__ = "0.1.0"

__all__ = [
    "BlockManager",
    "DraftModel",
    "DraftTree",
    "Eagle",
    "Engine",
    "GenerateOutput",
    "Law",
    "Medusa",
    "Ngram",
    "OutOfBlocksError",
    "PagedKVCache",
    "Proposer",
    "RowSeeds",
    "SamplingParams",
    "SpecStats",
    "TypicalParams",
    "VerifyMode",
    "VerifyResult",
    "custom_generate",
    "custom_generate_repo",
    "generate",
    "node_bucket",
    "process_logits",
    "register_proposer",
    "sample_from_probs",
    "verify",
]
