"""PagedRunner: the one owner of a model, its BlockManager, its PagedKVCache and its CUDA graphs.

Its clients (the engine for the target, DraftModel for its drafter, `Engine.step_costs`) prefill
prompts, score trees over reserved slots, commit, compact and free; a graphed call returns the same
`ModelOutput` as an eager one, so no caller branches on graphs, kernels or the metadata's form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cache.block_manager import BlockManager
from ..cache.paged_kv import PagedKVCache
from ..tree import DEFAULT_NODE_BUCKETS, DraftTree, node_bucket
from .base import ModelOutput
from .graphs import GraphedForward
from .hf import HFModel
from .metadata import prefill_metadata, tree_metadata

DEFAULT_POOL_TOKENS = 65536  # a graphed runner's first KV pool, in tokens (capped by free memory)


class PagedRunner:
    """A transformers causal LM on a paged KV pool, eager or through CUDA graphs.

    Parameters
    ----------
    model : a transformers causal LM, or an HFModel around one.
    cuda_graphs : capture the step forward per (batch bucket, token bucket); default: on when the
        model is on a CUDA device (where the Triton kernels are used too).

    Examples
    --------
    >>> runner = PagedRunner(model)                               # doctest: +SKIP
    >>> runner.ensure_pool(num_blocks=64, block_size=16)          # doctest: +SKIP
    >>> out, cached = runner.prefill([0], [torch.tensor([5, 6, 7])])  # out.logits [1, 1, V]  # doctest: +SKIP
    >>> out, slots = runner.forward_tree([0], tree)               # out.logits [1, N, V]  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module | HFModel, cuda_graphs: bool | None = None):
        self.model = model if isinstance(model, HFModel) else HFModel(model)
        self.device = self.model.device
        self.kernels = self.device.type == "cuda"  # Triton paged attention on the GPU
        self.cuda_graphs = self.kernels if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not self.kernels:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.bm: BlockManager | None = None
        self.cache: PagedKVCache | None = None
        self.graphs: GraphedForward | None = None
        self.last_hidden = False  # also return the lm_head's input
        self.features: tuple[int, ...] | None = None  # also return these layers' features
        # the tree graph that ran the latest forward_tree (None: it ran eagerly): its static
        # buffers (logits [Bb, N, V], node_slots, hidden) feed graphs captured after it
        self.captured = None

    # ----------------------------------------------------------------------------- pool and graphs

    def ensure_pool(self, num_blocks: int, block_size: int, grow: bool = False) -> bool:
        """At least num_blocks pages of block_size tokens; True when a new (empty) pool was made.

        A new pool has new K/V tensors, so graphs captured on the old one go. grow=True (a pool
        sized by demand): a graphed runner's first pool holds DEFAULT_POOL_TOKENS (within a quarter
        of the free device memory) and a full one doubles, so a long-lived runner re-captures a few
        times in its life rather than at every longer prompt.
        """
        same = self.bm is not None and self.bm.block_size == block_size
        if same and self.bm.num_blocks >= num_blocks:
            return False
        if grow and self.cuda_graphs:
            num_blocks = max(num_blocks, 2 * self.bm.num_blocks if same else self._default_blocks(block_size))
        self.bm = BlockManager(num_blocks, block_size)
        self.cache = self.model.new_cache(num_blocks, block_size)
        self.graphs = None
        return True

    def _default_blocks(self, block_size: int) -> int:
        blocks = DEFAULT_POOL_TOKENS // block_size
        per_token = self.model.kv_bytes_per_token()
        if per_token:
            free, _ = torch.cuda.mem_get_info(self.device)
            blocks = min(blocks, int(free // 4 // (per_token * block_size)))
        return max(blocks, 1)

    def graph_width(self, row_blocks: int, extra_tokens: int = 0) -> int:
        """Block-table width for graphs: the longest row the model's positions allow (plus
        extra_tokens of lookahead), so a longer prompt needs no new graphs; at most the pool."""
        limit = self.model.max_positions
        if limit is None:
            return self.bm.num_blocks
        longest = self.bm.blocks_needed(limit + extra_tokens) + 1
        return min(max(row_blocks, longest), self.bm.num_blocks)

    def set_outputs(self, width: int, last_hidden: bool = False, features: tuple[int, ...] | None = None) -> None:
        """What every forward returns besides logits, and (graphed) the block-table width of the
        graphs; graphs are kept while the pool, the outputs and the width still fit."""
        self.last_hidden, self.features = last_hidden, features
        if not self.cuda_graphs:
            return
        g = self.graphs
        if (
            g is None
            or g.cache is not self.cache
            or g.max_blocks < width
            or g.last_hidden != last_hidden
            or g.feature_layers != features
        ):
            self.graphs = GraphedForward(self.model, self.cache, width, last_hidden, features)

    # ----------------------------------------------------------------------------- sequences

    def __contains__(self, seq_id: int) -> bool:
        return self.bm is not None and seq_id in self.bm

    def prefill(
        self, seq_ids: list[int], prompts: list[torch.Tensor], share: bool = True
    ) -> tuple[ModelOutput, list[int]]:
        """New rows with these prompts [P_b]: allocate (sharing cached prefix blocks unless share is
        False), compute the rest in one eager left-padded forward, commit.

        Returns the output at each row's last position (logits [B, 1, V]; features at every position
        [B, T, F], left-padded, when set) and the prompt tokens each row found cached.
        """
        cached = [self.bm.allocate(s, p.tolist(), share=share) for s, p in zip(seq_ids, prompts, strict=True)]
        ids, pos, meta = prefill_metadata(self.cache, self.bm, seq_ids, prompts, cached, self.device, self.kernels)
        out = self.model.forward(ids, pos, meta, logits_to_keep=1, last_hidden=self.last_hidden, features=self.features)
        for s, p, c in zip(seq_ids, prompts, cached, strict=True):
            self.bm.commit(s, p[c:].tolist())
        return out, cached

    def extend(self, seq_ids: list[int], histories: list[torch.Tensor]) -> torch.Tensor:
        """Rows already allocated: compute and commit every token of histories[b] [L_b] the pool
        has not seen (at least one each); returns the last position's logits [B, V].

        Graphed, the catch-up is left-padded to a node bucket (1, 2, 4, 8, ...), so the few catch-up
        lengths a drafter meets share a few graphs instead of capturing one per length mid-call.
        """
        done = [self.bm.num_tokens(s) for s in seq_ids]
        for s, h, n in zip(seq_ids, histories, done, strict=True):
            self.reserve(s, len(h) - n)
        width, longest = None, max(len(h) - n for h, n in zip(histories, done, strict=True))
        if self.graphs is not None and longest <= DEFAULT_NODE_BUCKETS[-1]:
            width = node_bucket(longest)
        ids, pos, meta = prefill_metadata(
            self.cache,
            self.bm,
            seq_ids,
            histories,
            done,
            self.device,
            self.kernels,
            gathered=self.graphs is None,
            width=width,
        )
        logits = self._forward(ids, pos, meta, logits_to_keep=1).logits[:, -1]
        for s, h, n in zip(seq_ids, histories, done, strict=True):
            self.bm.commit(s, h[n:].tolist())
        return logits

    def reserve(self, seq_id: int, num_slots: int) -> None:
        """Room for num_slots positions after the committed ones (copy-on-write done here)."""
        _, copies = self.bm.reserve(seq_id, num_slots)
        self.cache.copy_blocks(copies)

    def forward_tree(
        self,
        seq_ids: list[int],
        tree: DraftTree,
        offset: int = 0,
        reserve: bool = True,
        advance: torch.Tensor | None = None,
        max_advance: int = 0,
    ) -> tuple[ModelOutput, torch.Tensor]:
        """Score tree [B, N] after each row's committed tokens (and `offset` lookahead positions
        already written: a chain drafted one step at a time); reserve=True reserves its slots
        first. advance [B] (device, 1 <= advance <= max_advance): positions a step still in flight
        will commit before the tree, known only on the device (no sync: the pipelined speculative
        loop). Returns the output (logits [B, N, V]; last_hidden / features when set; graphed
        outputs are static buffers: use them before the next call) and node_slots [B, N]."""
        if reserve:
            for s in seq_ids:
                self.reserve(s, tree.width + (max_advance if advance is not None else 0))
        self.captured = None
        if self.graphs is not None and self.graphs.capturable(len(seq_ids)):
            done = self.graphs.forward_tree(
                tree.tokens,
                tree.depth,
                tree.parents,
                tree.num_nodes,
                [self.bm.num_tokens(s) + offset for s in seq_ids],
                [self.bm.block_table(s) for s in seq_ids],
                advance,
            )
            if done is not None:
                self.captured = self.graphs.last
                return done
        positions, meta, node_slots = tree_metadata(
            self.cache,
            self.bm,
            seq_ids,
            tree,
            self.device,
            self.kernels,
            gathered=self.graphs is None,
            offset=offset,
            advance=advance,
            max_advance=max_advance,
        )
        return self._forward(tree.tokens, positions, meta), node_slots

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta, logits_to_keep: int = 0) -> ModelOutput:
        if self.graphs is not None:
            return self.graphs.forward(ids, positions, meta)
        return self.model.forward(
            ids, positions, meta, logits_to_keep=logits_to_keep, last_hidden=self.last_hidden, features=self.features
        )

    def commit(self, seq_id: int, token_ids: Sequence[int], keep: int = 0) -> None:
        """Commit the next tokens' K/V; keep > 0 holds that many reserved positions after them."""
        self.bm.commit(seq_id, token_ids, keep)

    def compact(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move slot src[b, k] to dst[b, k] in every layer (src < 0: nothing), src, dst [B, K]."""
        self.cache.compact(src, dst)

    def free(self, seq_ids: list[int]) -> None:
        """Release these rows' blocks; rows never allocated (a prefill that failed first) are skipped."""
        for s in seq_ids:
            if s in self:
                self.bm.free(s)
