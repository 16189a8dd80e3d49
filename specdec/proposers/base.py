"""The Proposer protocol, the context it is given each step, and the registry by name.

The engine never asks which proposer it runs: it calls `start`, `prefill`, `propose`, `update` and
`release`, and reads `needs` (the target outputs a proposer consumes).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..runtime.base import TargetModel
from ..sampling import RowSeeds, SamplingParams
from ..tree import DraftTree
from ..verify import VerifyResult

STREAM_DRAFT = 16  # uniform() streams 16, 17, ... are the proposers' (verification uses 1 and 2)


class Needs(enum.Flag):
    """The target outputs a proposer reads (its `needs`), combined with |.

    LAST_HIDDEN  the lm_head's input at the position whose logits produced the root (`ctx.hidden`)
    FEATURES     the layers of `feature_layers` at every prompt position (`prefill`) and at every
                 node of the verified tree (`update(..., features=)`)
    """

    NONE = 0
    LAST_HIDDEN = enum.auto()
    FEATURES = enum.auto()


@dataclass(slots=True)
class Ahead:
    """A step launched but not read back yet, whose output the next proposal starts from (the
    engine's pipelined speculative loop: the host never waits for it before drafting). Device
    tensors of B rows; `ProposeContext.histories` end before this step's tokens.

    tokens            [B, E] long   the tokens the step emits (accepted drafts, then the final
                                    token; -1 pads past count)
    count             [B] long      tokens it emits (accepted drafts + 1), 1 <= count <= E
    roots             [B] long      its last emitted token: the next tree's root
    accepted_indices  [B, K] long   the tree node accepted at depth 1..K (-1 past the path)
    features          [B, N, F]     the target's features at the step's nodes (Needs.FEATURES),
                      or None       valid until the next target forward is launched
    """

    tokens: torch.Tensor
    count: torch.Tensor
    roots: torch.Tensor
    accepted_indices: torch.Tensor
    features: torch.Tensor | None = None

    @property
    def max_emit(self) -> int:
        """E: the most tokens the step can emit (host-known: no sync)."""
        return self.tokens.shape[1]


@dataclass(slots=True)
class ProposeContext:
    """What a proposer sees at one step, for the B active rows.

    seq_ids     list[int]           engine ids of the rows
    histories   list[Tensor [L_b]]  every committed token of row b, prompt included; the last one is
                                    the root (the target has not seen its K/V yet)
    params      SamplingParams [B]  the target's sampling parameters (drafting may reuse them)
    rng         RowSeeds [B]        per-row randomness for this step (use streams >= STREAM_DRAFT)
    max_drafts  [B] long            more drafts than this cannot be emitted (remaining budget - 1)
    hidden      [B, E] or None      the target's final hidden state (the lm_head's input) at the
                                    position whose logits produced the root; given when the
                                    proposer's `needs` has Needs.LAST_HIDDEN
    ahead       Ahead or None       the step still in flight (only for proposers whose
                                    `pipelines` is True): the root and the last tokens are in it,
                                    on the device, not in histories
    """

    seq_ids: list[int]
    histories: list[torch.Tensor]
    params: SamplingParams
    rng: RowSeeds
    max_drafts: torch.Tensor
    hidden: torch.Tensor | None = None
    ahead: Ahead | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    def roots(self) -> torch.Tensor:
        """[B] the root of each row: the last committed token (on the host), or the in-flight
        step's last token (on the device) when the context is `ahead`."""
        if self.ahead is not None:
            return self.ahead.roots
        return torch.stack([h[-1] for h in self.histories])


class Proposer:
    """Base class of draft proposers; subclasses implement `propose` and register a name."""

    name: ClassVar[str] = "base"
    needs: ClassVar[Needs] = Needs.NONE
    # with Needs.FEATURES: the target layers to capture (runtime.hf.capture_features), set by start()
    feature_layers: tuple[int, ...] | None = None

    @property
    def max_nodes(self) -> int:
        """The most nodes (root included) one proposed tree can have; sizes the KV budget."""
        raise NotImplementedError(f"{type(self).__name__} must define max_nodes")

    @property
    def max_depth(self) -> int:
        """The deepest draft one proposed tree can hold (a step emits at most max_depth + 1 tokens)."""
        return self.max_nodes - 1

    @property
    def pipelines(self) -> bool:
        """propose() can start from a step not read back yet (`ProposeContext.ahead`, device
        tensors only), and update() then learns that its step's output was consumed by the
        proposal in flight (`VerifyResult.consumed`). The engine then launches step n + 1 before
        it reads step n back, so the host's work of one step overlaps the device's work of the next.
        Settled by start() (e.g. only with captured drafting)."""
        return False

    def start(self, target: TargetModel, *, block_size: int, num_blocks: int, max_blocks_per_row: int) -> None:
        """Called when generation starts: check compatibility with the target, allocate state.

        num_blocks is the target's pool size; max_blocks_per_row bounds one row's block table."""

    def prefill(
        self, seq_ids: list[int], prompts: list[torch.Tensor], features: list[torch.Tensor] | None = None
    ) -> None:
        """New rows joined with these prompts [L_b]; features [L_b, F] at every prompt position with
        Needs.FEATURES."""

    def propose(self, ctx: ProposeContext) -> DraftTree:
        raise NotImplementedError

    def update(
        self, ctx: ProposeContext, tree: DraftTree, result: VerifyResult, features: torch.Tensor | None = None
    ) -> None:
        """The target verified `tree`; adjust state (KV rollback, adaptive draft length, ...).
        features [B, N, F]: the target's features at every node of the tree, with Needs.FEATURES."""

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


def draft_chain(
    logits: torch.Tensor,
    num_tokens: int,
    ctx: ProposeContext,
    advance: Callable[[int, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draft a chain of num_tokens from a drafter, one token at a time (DraftModel, EAGLE chains).

    Greedy rows take the argmax of the drafter's processed q (POINT law); sampled rows draw from it
    with the row's own sampling parameters and seeds (IID law, verified with that q).

    Parameters
    ----------
    logits : [B, V] the drafter's logits for the first draft (target vocabulary).
    num_tokens : K >= 1 drafts.
    ctx : the step's context (sampling parameters, seeds).
    advance : advance(j, token [B]) -> [B, V] the drafter's logits for draft j + 1 after draft j.

    Returns
    -------
    drafts [B, K] long, q [B, K, V] (the processed distributions drawn from), law [B] (POINT / IID).
    """
    all_greedy = bool(ctx.params.greedy.all())  # host parameters: no sync
    return chain_draws(logits, num_tokens, ctx.params.to(logits.device), all_greedy, ctx.rng, advance)


def chain_draws(
    logits: torch.Tensor,
    num_tokens: int,
    params: SamplingParams,
    all_greedy: bool,
    rng,
    advance: Callable[[int, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`draft_chain` on parameters already on the logits' device, with the all-greedy flag given by
    the caller: no host read, so a CUDA graph can capture it (DraftModel's captured chain).

    Parameters
    ----------
    logits : [B, V] the drafter's logits for the first draft.
    num_tokens : K >= 1 drafts.
    params : SamplingParams of B rows on logits.device.
    all_greedy : every row has temperature 0 (then no coins are drawn).
    rng : RowSeeds of B rows (or a torch.Generator / None, eagerly only).
    advance : advance(j, token [B]) -> [B, V] logits for draft j + 1.

    Returns
    -------
    drafts [B, K] long, q [B, K, V], law [B] (POINT for greedy rows, IID for sampled ones).
    """
    from ..sampling import process_logits, sample_from_probs, uniform
    from ..tree import Law

    dev = logits.device
    greedy = params.greedy
    B = logits.shape[0]
    drafts, qs = [], []
    for j in range(num_tokens):
        q = process_logits(logits, params)  # [B, V]
        if all_greedy:  # no coins to draw: a greedy batch skips the sampler's ~40 small ops per draft
            tok = q.argmax(-1)
        else:
            u = uniform(rng, B, 1, STREAM_DRAFT + j, device=dev)[:, 0]
            tok = torch.where(greedy, q.argmax(-1), sample_from_probs(q, u))
        drafts.append(tok)
        qs.append(q)
        if j < num_tokens - 1:
            logits = advance(j, tok)
    law = torch.where(greedy, int(Law.POINT), int(Law.IID))
    return torch.stack(drafts, 1), torch.stack(qs, 1), law
