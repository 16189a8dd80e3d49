"""Ngram: prompt lookup. The longest recent suffix n-gram that occurred before proposes what followed it."""

from __future__ import annotations

import numpy as np
import torch

from ..devices import to_device
from ..runtime.base import TargetModel
from ..runtime.graphs import BATCH_BUCKETS, GraphedCalls
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


def lookup_rows(
    history: torch.Tensor, length: torch.Tensor, num_tokens: int, max_ngram: int, min_ngram: int, limit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lookup` for B rows at once, on the tensors' device with no host read (a CUDA graph captures it).

    Parameters
    ----------
    history : [B, C] long; row b's tokens are history[b, :length[b]] (the rest is ignored).
    length : [B] long, 1 <= length[b] <= C.
    num_tokens : K, the most tokens drafted.
    max_ngram, min_ngram : the suffix lengths tried, longest first.
    limit : [B] long, at most this many drafts per row.

    Returns
    -------
    drafts [B, K] long (0 past count), count [B] long: row b's first count[b] drafts are
    `lookup(history[b, :length[b]], min(K, limit[b]), max_ngram, min_ngram)`.

    Examples
    --------
    >>> d, n = lookup_rows(torch.tensor([[1, 2, 3, 9, 1, 2, 0]]), torch.tensor([6]), 2, 2, 1, torch.tensor([4]))
    >>> d.tolist(), n.tolist()
    ([[3, 9]], [2])
    """
    B, C = history.shape
    dev = history.device
    idx = torch.arange(C, device=dev)
    start = torch.full((B,), -1, dtype=torch.long, device=dev)  # where the continuation begins (-1: no match)
    for n in range(max_ngram, min_ngram - 1, -1):
        W = C - n  # window starts i < W keep history[i + k], k < n, inside the buffer
        if W <= 0:
            continue
        suffix = history.gather(1, (length[:, None] - n + idx[:n]).clamp(min=0))  # [B, n]
        hits = idx[:W] < (length - n)[:, None]  # windows that end before the last token (none when n >= length)
        for k in range(n):
            hits &= history[:, k : k + W] == suffix[:, k : k + 1]
        last = torch.where(hits, idx[:W], -1).amax(1)  # the most recent match
        start = torch.where((start < 0) & (last >= 0), last + n, start)  # a longer n-gram found first wins
    count = torch.where(start >= 0, (length - start).clamp(max=num_tokens), 0)
    count = torch.minimum(count, limit.clamp(min=0))
    drafts = history.gather(1, (start[:, None] + idx[:num_tokens]).clamp(0, C - 1))
    return torch.where(idx[:num_tokens] < count[:, None], drafts, 0), count


@register_proposer("ngram")
class Ngram(Proposer):
    """Prompt lookup over prompt + output; drafts a chain (POINT law: the tokens are not sampled).

    On a CUDA device the lookup also runs on the device, as one CUDA graph per batch bucket, over
    each row's history kept there: it can then start from a step still in flight (`pipelines`),
    whose emitted tokens it appends on the device, so the engine launches the next step before it
    reads the last one back. The drafts are those of the host lookup (`lookup`).
    """

    def __init__(self, num_tokens: int = 4, max_ngram: int = 3, min_ngram: int = 1):
        require_int("num_tokens", num_tokens, 1)
        require_int("max_ngram", max_ngram, 1)
        require_int("min_ngram", min_ngram, 1)
        if not min_ngram <= max_ngram:
            raise ValueError(
                f"need num_tokens >= 1 and 1 <= min_ngram <= max_ngram; got {num_tokens}, {min_ngram}, {max_ngram}"
            )
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram
        # the device lookup as CUDA graphs on a GPU (settable: False looks up on the host only; a
        # GraphedCalls instance is used as it is, on any device: the CPU tests pass one with capture=False)
        self.graphs: bool | GraphedCalls = True
        self._graphs: GraphedCalls | None = None
        self._device: torch.device | None = None
        self._width = 0  # C: the device histories' length (every position a row can reach, and a step's tokens)
        self._rows: dict[int, tuple[torch.Tensor, int]] = {}  # seq id -> (history [C] on the device, tokens in it)

    @property
    def max_nodes(self) -> int:
        return self.num_tokens + 1

    @property
    def pipelines(self) -> bool:
        return self._graphs is not None

    def start(self, target: TargetModel, *, block_size: int, num_blocks: int, max_blocks_per_row: int) -> None:
        self._device = target.device
        self._rows.clear()
        # a row's positions, then room for the tokens of the step in flight
        self._width = max_blocks_per_row * block_size + 2 * (self.num_tokens + 1) + self.max_ngram
        if isinstance(self.graphs, GraphedCalls):
            self._graphs = self.graphs
        elif self.graphs and target.device.type == "cuda":
            self._graphs = self._graphs or GraphedCalls()
        else:
            self._graphs = None

    def release(self, seq_ids: list[int]) -> None:
        for s in seq_ids:
            self._rows.pop(s, None)

    def finish(self) -> None:
        self._rows.clear()

    def propose(self, ctx: ProposeContext) -> DraftTree:
        if ctx.ahead is not None:
            return self._propose_ahead(ctx)
        B, K = ctx.batch_size, self.num_tokens
        drafts = torch.zeros(B, K, dtype=torch.long)
        counts = torch.zeros(B, dtype=torch.long)
        for b, h in enumerate(ctx.histories):
            cont = lookup(h.cpu(), min(K, int(ctx.max_drafts[b])), self.max_ngram, self.min_ngram)
            drafts[b, : len(cont)] = cont
            counts[b] = len(cont)
        dev = ctx.params.temperature.device
        return DraftTree.chain(ctx.roots().to(dev), drafts.to(dev), Law.POINT, num_drafts=counts.to(dev))

    def _history(self, seq_id: int, tokens: torch.Tensor) -> torch.Tensor:
        """Row seq_id's device history [C], extended with the committed tokens it lacks (one small
        host-to-device copy per step: the tokens the last step emitted)."""
        buf, n = self._rows.get(seq_id, (None, 0))
        L = tokens.shape[0]
        if L + 2 * (self.num_tokens + 1) > self._width:
            raise RuntimeError(f"Ngram row {seq_id}: {L} tokens, more than the {self._width} start() sized for")
        if buf is None:
            buf = torch.zeros(self._width, dtype=torch.long, device=self._device)
        if L > n:  # pinned and non-blocking (to_device): the host must not wait for the step in flight
            buf[n:L].copy_(to_device(tokens[n:], self._device))
        self._rows[seq_id] = (buf, L)
        return buf

    def _propose_ahead(self, ctx: ProposeContext) -> DraftTree:
        """The lookup over each row's history and the step in flight's emitted tokens (appended on
        the device after the committed ones), and the chain, as one CUDA graph per batch bucket
        (eagerly, with no host read either, for more rows than the largest bucket)."""
        a = ctx.ahead
        K, E = self.num_tokens, a.max_emit
        history = torch.stack([self._history(s, h) for s, h in zip(ctx.seq_ids, ctx.histories, strict=True)])
        rows = {
            "history": history,  # [B, C] device
            "length": torch.tensor([len(h) for h in ctx.histories]),  # host: committed tokens
            "limit": ctx.max_drafts.long(),
            "tokens": a.tokens,
            "count": a.count,
            "roots": a.roots,
        }
        max_ngram, min_ngram = self.max_ngram, self.min_ngram

        def run(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            hist, length, count = t["history"], t["length"], t["count"]
            j = torch.arange(E, device=hist.device)
            pos = length[:, None] + j  # [B, E]: the step in flight's tokens go after the committed ones
            new = torch.where(j < count[:, None], t["tokens"], hist.gather(1, pos))
            hist = hist.scatter(1, pos, new)
            drafts, num = lookup_rows(hist, length + count, K, max_ngram, min_ngram, t["limit"])
            return DraftTree.chain(t["roots"], drafts, Law.POINT, num_drafts=num, has_wor=False).bucket_fields()

        if self._graphs is None or ctx.batch_size > BATCH_BUCKETS[-1]:  # more rows than a graph takes
            out = run({n: to_device(t, self._device) for n, t in rows.items()})  # the same function, eagerly
        else:
            out = self._graphs(("ngram", K, E), run, ctx.batch_size, rows, {}, device=self._device)
        return DraftTree.from_fields(out, K, has_wor=False)
