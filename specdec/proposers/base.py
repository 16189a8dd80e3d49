"""The Proposer protocol, the context it is given each step, and the registry by name.

The engine never asks which proposer it runs: it calls `start`, `prefill`, `propose`, `update` and
`release`, and reads `needs` (the target outputs a proposer consumes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..runtime.base import TargetModel
from ..sampling import RowSeeds, SamplingParams
from ..tree import DraftTree
from ..verify import VerifyResult

STREAM_DRAFT = 16  # uniform() streams 16, 17, ... are the proposers' (verification uses 1 and 2)


@dataclass(slots=True)
class ProposeContext:
    """What a proposer sees at one step, for the B active rows.

    seq_ids     list[int]           engine ids of the rows
    histories   list[Tensor [L_b]]  every committed token of row b, prompt included; the last one is
                                    the root (the target has not seen its K/V yet)
    params      SamplingParams [B]  the target's sampling parameters (drafting may reuse them)
    rng         RowSeeds [B]        per-row randomness for this step (use streams >= STREAM_DRAFT)
    max_drafts  [B] long            more drafts than this cannot be emitted (remaining budget - 1)
    hidden      [B, H] or None      the target's final hidden state (the lm_head's input) at the
                                    position whose logits produced the root; given when the
                                    proposer's `needs` has "last_hidden"
    features    [B, N, F] or None   set before `update`: the target's features (the proposer's
                                    `feature_layers`) at every node of the verified tree; given
                                    when `needs` has "features"
    """

    seq_ids: list[int]
    histories: list[torch.Tensor]
    params: SamplingParams
    rng: RowSeeds
    max_drafts: torch.Tensor
    hidden: torch.Tensor | None = None
    features: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    def roots(self) -> torch.Tensor:
        """[B] the last committed token of each row."""
        return torch.stack([h[-1] for h in self.histories])


class Proposer:
    """Base class of draft proposers; subclasses implement `propose` and register a name."""

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset()
    # with "features" in needs: the target layers to capture (runtime.hf.capture_features), set by start()
    feature_layers: tuple[int, ...] | None = None

    @property
    def max_nodes(self) -> int:
        """The most nodes (root included) one proposed tree can have; sizes the KV budget."""
        raise NotImplementedError(f"{type(self).__name__} must define max_nodes")

    def start(self, target: TargetModel, *, block_size: int, num_blocks: int, max_blocks_per_row: int) -> None:
        """Called when generation starts: check compatibility with the target, allocate state.

        num_blocks is the target's pool size; max_blocks_per_row bounds one row's block table."""

    def prefill(
        self, seq_ids: list[int], prompts: list[torch.Tensor], features: list[torch.Tensor] | None = None
    ) -> None:
        """New rows joined with these prompts [L_b]; features [L_b, F] at every prompt position when
        `needs` has "features"."""

    def propose(self, ctx: ProposeContext) -> DraftTree:
        raise NotImplementedError

    def update(self, ctx: ProposeContext, tree: DraftTree, result: VerifyResult) -> None:
        """The target verified `tree`; adjust state (KV rollback, adaptive draft length, ...)."""

    def release(self, seq_ids: list[int]) -> None:
        """Rows finished; free their state."""

    def finish(self) -> None:
        """Generation ended; drop per-call state (every row was released already)."""


PROPOSERS: dict[str, type[Proposer]] = {}


def register_proposer(name: str) -> Callable[[type[Proposer]], type[Proposer]]:
    """Class decorator: make a proposer available as `proposer="name"`."""

    def wrap(cls: type[Proposer]) -> type[Proposer]:
        cls.name = name
        PROPOSERS[name] = cls
        return cls

    return wrap


def resolve_proposer(proposer: Proposer | str | None) -> Proposer | None:
    """None, a Proposer instance, or a registered name usable with default arguments."""
    if proposer is None or isinstance(proposer, Proposer):
        return proposer
    if isinstance(proposer, str):
        if proposer not in PROPOSERS:
            raise ValueError(f"unknown proposer {proposer!r}; registered: {sorted(PROPOSERS)}")
        try:
            return PROPOSERS[proposer]()
        except TypeError as e:
            raise ValueError(f"proposer {proposer!r} needs arguments; build it directly ({e})") from None
    raise TypeError(f"proposer must be None, a name or a Proposer, got {type(proposer).__name__}")
