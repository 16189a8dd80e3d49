"""BlockManager: the bookkeeping of a paged KV cache (pages, refcounts, prefix hashing, forks).

A sequence owns a block table; position t of the sequence lives in slot
`table[t // block_size] * block_size + t % block_size`. Only full prompt / committed blocks are hashed
and shared; speculative (reserved) slots never are. A prompt block is hashed when it is allocated (so
rows of the same prefill share it) but is *pending* until a commit says its K/V were written: a
pending block whose last holder lets go (the prefill forward failed) loses its hash, so no later
prompt can read K/V that were never computed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class OutOfBlocksError(RuntimeError):
    """Raised before any state changes when the pool cannot hold a request."""


@dataclass(slots=True)
class _Block:
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    written: bool = False  # its K/V were computed (a commit covered it); False: pending


@dataclass(slots=True)
class _Seq:
    table: list[int] = field(default_factory=list)
    num_tokens: int = 0  # committed tokens: their K/V are valid
    token_ids: list[int] = field(default_factory=list)  # committed ids, for hashing full blocks
    hashes: list[int] = field(default_factory=list)  # chained hash of each full block so far
    shared: bool = True  # publish full blocks for prefix sharing
    num_written: int = 0  # leading blocks known to hold computed K/V (marked written)


def _chain_hash(prev: int, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


class BlockManager:
    """Pages of `block_size` slots shared by reference count; prefix blocks found by chained hash.

    Examples
    --------
    >>> bm = BlockManager(num_blocks=8, block_size=4)
    >>> bm.allocate(0, [1, 2, 3, 4, 5])   # no cached prefix yet
    0
    >>> bm.commit(0, [1, 2, 3, 4, 5]); bm.num_tokens(0)
    5
    >>> bm.allocate(1, [1, 2, 3, 4, 9])   # shares the first block
    4
    """

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1; got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self._seqs: dict[int, _Seq] = {}

    # ----------------------------------------------------------------------------- queries

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_tokens(self, seq_id: int) -> int:
        return self._seq(seq_id).num_tokens

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).table)

    def block_tables(self, seq_ids: Sequence[int], width: int | None = None, device=None) -> torch.Tensor:
        """[B, max_blocks] long block tables, padded with 0 (padding is never addressed)."""
        tables = [self._seq(s).table for s in seq_ids]
        width = max(width or 0, max(len(t) for t in tables))
        out = torch.zeros(len(tables), width, dtype=torch.long)
        for b, t in enumerate(tables):
            out[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        return out.to(device) if device is not None else out

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Physical slots of positions [start, end) of a sequence (all must be allocated)."""
        seq = self._seq(seq_id)
        bs = self.block_size
        if end > len(seq.table) * bs:
            raise IndexError(f"sequence {seq_id}: positions up to {end} but only {len(seq.table) * bs} allocated")
        return [seq.table[t // bs] * bs + t % bs for t in range(start, end)]

    def _seq(self, seq_id: int) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id}") from None

    # ----------------------------------------------------------------------------- pool

    def _check_free(self, needed: int, what: str) -> None:
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(
                f"{what} needs {needed} blocks of {self.block_size} slots but only {self.num_free_blocks} of "
                f"{self.num_blocks} are free; give the engine more blocks or fewer / shorter sequences"
            )

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)  # least recently freed first
        block = self._blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]  # evict its cached contents
        block.hash, block.token_ids, block.ref_count, block.written = None, (), 1, False
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released twice"
        if block.ref_count == 0:
            if block.hash is not None and not block.written:  # its prefill never finished: forget it
                self._unhash(block_id)
            self._free[block_id] = None

    def _unhash(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
        block.hash, block.token_ids = None, ()

    # ----------------------------------------------------------------------------- lifecycle

    def allocate(self, seq_id: int, token_ids: Sequence[int], share: bool = True) -> int:
        """Create a sequence with room for `token_ids`; return how many leading tokens are cached.

        Full blocks of the prompt are hashed now, so later sequences of the same prefill share
        them; they stay pending (shareable, never written) until `commit` covers them, and lose
        their hash if every holder is freed first. The caller must compute every token at or after
        the returned count, in one forward with the other rows allocated since the last commit.
        At least the last token is always left to compute (its logits are needed). share=False neither reuses
        nor publishes blocks (returns 0): for callers that need every position computed, e.g. a
        proposer that reads the target's features at every prompt position.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        if len(token_ids) == 0:
            raise ValueError("cannot allocate an empty sequence")
        bs = self.block_size
        ids = [int(t) for t in token_ids]
        num_full = (len(ids) - 1) // bs  # never share the block holding the last token
        hits: list[int] = []
        hashes: list[int] = []
        h = 0
        for i in range(num_full if share else 0):
            chunk = tuple(ids[i * bs : (i + 1) * bs])
            h = _chain_hash(h, chunk)
            block_id = self._by_hash.get(h)
            if block_id is None or self._blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
            hashes.append(h)
        fresh = self.blocks_needed(len(ids)) - len(hits)
        reusable = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        self._check_free(fresh + reusable, f"sequence {seq_id} ({len(ids)} tokens)")
        seq = _Seq()
        for block_id in hits:
            self._ref(block_id)
            seq.table.append(block_id)
        seq.table += [self._take_free() for _ in range(fresh)]
        seq.num_tokens = len(hits) * bs
        seq.num_written = len(hits)
        seq.token_ids = ids[: seq.num_tokens]
        seq.hashes = hashes
        seq.shared = share
        self._seqs[seq_id] = seq
        # hash the prompt's remaining full blocks now: they are computed by this prefill
        if share:
            self._hash_full_blocks(seq, ids, upto=num_full)
        return seq.num_tokens

    def _hash_full_blocks(self, seq: _Seq, ids: list[int], upto: int) -> None:
        bs = self.block_size
        h = seq.hashes[-1] if seq.hashes else 0
        for i in range(len(seq.hashes), upto):
            chunk = tuple(ids[i * bs : (i + 1) * bs])
            h = _chain_hash(h, chunk)
            block = self._blocks[seq.table[i]]
            block.hash, block.token_ids = h, chunk
            self._by_hash.setdefault(h, seq.table[i])
            seq.hashes.append(h)

    def reserve(self, seq_id: int, num_slots: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Make room for `num_slots` more positions after the committed ones (lookahead).

        Returns the physical slots of positions [num_tokens, num_tokens + num_slots) and the block
        copies (src, dst) the KV cache must perform first (copy-on-write of a shared last block).
        """
        seq = self._seq(seq_id)
        bs = self.block_size
        need_blocks = self.blocks_needed(seq.num_tokens + num_slots)
        grow = max(0, need_blocks - len(seq.table))
        partial = seq.num_tokens // bs
        cow = seq.num_tokens % bs != 0 and partial < len(seq.table) and self._blocks[seq.table[partial]].ref_count > 1
        self._check_free(grow + int(cow), f"sequence {seq_id} (lookahead of {num_slots})")
        copies = []
        if cow:
            old = seq.table[partial]
            new = self._take_free()
            seq.table[partial] = new
            self._unref(old)
            copies.append((old, new))
        seq.table += [self._take_free() for _ in range(grow)]
        return self.slots(seq_id, seq.num_tokens, seq.num_tokens + num_slots), copies

    def commit(self, seq_id: int, token_ids: Sequence[int], keep: int = 0) -> None:
        """Mark the next len(token_ids) reserved positions as committed; hash newly full blocks;
        release blocks beyond the committed length plus `keep` reserved positions (a step already
        launched writes there)."""
        seq = self._seq(seq_id)
        n = len(token_ids)
        if seq.num_tokens + n > len(seq.table) * self.block_size:
            raise ValueError(f"sequence {seq_id}: committing {n} tokens beyond its reserved slots")
        seq.token_ids += [int(t) for t in token_ids]
        seq.num_tokens += n
        full = seq.num_tokens // self.block_size
        for i in range(seq.num_written, full):  # their K/V are computed now: safe to share later
            self._blocks[seq.table[i]].written = True
        seq.num_written = max(seq.num_written, full)
        if seq.shared:
            self._hash_full_blocks(seq, seq.token_ids, upto=seq.num_tokens // self.block_size)
        self.truncate(seq_id, seq.num_tokens, keep)

    def truncate(self, seq_id: int, num_tokens: int, keep: int = 0) -> None:
        """Keep only the first `num_tokens` positions (KV rollback); free the blocks past them, except
        those holding the next `keep` reserved positions."""
        seq = self._seq(seq_id)
        if num_tokens > seq.num_tokens:
            raise ValueError(f"sequence {seq_id}: cannot truncate to {num_tokens} > {seq.num_tokens} committed")
        seq.num_tokens = num_tokens
        del seq.token_ids[num_tokens:]
        keep = self.blocks_needed(num_tokens + keep)
        for block_id in seq.table[keep:]:
            self._unref(block_id)
        del seq.table[keep:]
        del seq.hashes[num_tokens // self.block_size :]
        seq.num_written = min(seq.num_written, num_tokens // self.block_size)
        if num_tokens % self.block_size:  # the last block is partial again and will be written
            block_id = seq.table[-1]
            block = self._blocks[block_id]
            if block.hash is not None and block.ref_count == 1:
                self._unhash(block_id)
                block.written = False

    def fork(self, src_id: int, dst_id: int) -> None:
        """dst shares every block of src (copy-on-write on its next reserve)."""
        if dst_id in self._seqs:
            raise ValueError(f"sequence {dst_id} is already allocated")
        src = self._seq(src_id)
        for block_id in src.table:
            self._ref(block_id)
        self._seqs[dst_id] = _Seq(
            list(src.table), src.num_tokens, list(src.token_ids), list(src.hashes), src.shared, src.num_written
        )

    def free(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id}")
        for block_id in seq.table:
            self._unref(block_id)

    def free_all(self) -> None:
        for seq_id in list(self._seqs):
            self.free(seq_id)
