"""Ngram: prompt lookup. The longest recent suffix n-gram that occurred before proposes what followed it."""

from __future__ import annotations

import numpy as np
import torch

from ..tree import DraftTree, Law
from ..validation import require_int
from .base import ProposeContext, Proposer, register_proposer


def lookup(history: torch.Tensor, num_tokens: int, max_ngram: int, min_ngram: int = 1) -> torch.Tensor:
    """The continuation [<= num_tokens] of the most recent earlier match of the longest suffix n-gram.

    history [L] long. Returns an empty tensor when no suffix of length min_ngram..max_ngram recurs.

    Examples
    --------
    >>> lookup(torch.tensor([1, 2, 3, 9, 1, 2]), num_tokens=2, max_ngram=2).tolist()
    [3, 9]
    """
    L = history.shape[0]
    h = history.numpy()  # numpy's per-op cost is a few microseconds: this runs on the host every step
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        hits = h[: L - n] == h[L - n]  # window starts i < L - n: windows that end before the last token
        for k in range(1, n):
            hits &= h[k : L - n + k] == h[L - n + k]
        found = np.flatnonzero(hits)
        if found.size:
            start = int(found[-1]) + n
            return history[start : start + num_tokens]
    return history[:0]


@register_proposer("ngram")
class Ngram(Proposer):
    """Prompt lookup over prompt + output; drafts a chain (POINT law: the tokens are not sampled)."""

    def __init__(self, num_tokens: int = 4, max_ngram: int = 3, min_ngram: int = 1):
        require_int("num_tokens", num_tokens, 1)
        require_int("max_ngram", max_ngram, 1)
        require_int("min_ngram", min_ngram, 1)
        if not min_ngram <= max_ngram:
            raise ValueError(
                f"need num_tokens >= 1 and 1 <= min_ngram <= max_ngram; got {num_tokens}, {min_ngram}, {max_ngram}"
            )
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram

    @property
    def max_nodes(self) -> int:
        return self.num_tokens + 1

    def propose(self, ctx: ProposeContext) -> DraftTree:
        B, K = ctx.batch_size, self.num_tokens
        drafts = torch.zeros(B, K, dtype=torch.long)
        counts = torch.zeros(B, dtype=torch.long)
        for b, h in enumerate(ctx.histories):
            cont = lookup(h.cpu(), min(K, int(ctx.max_drafts[b])), self.max_ngram, self.min_ngram)
            drafts[b, : len(cont)] = cont
            counts[b] = len(cont)
        dev = ctx.params.temperature.device
        return DraftTree.chain(ctx.roots().to(dev), drafts.to(dev), Law.POINT, num_drafts=counts.to(dev))
