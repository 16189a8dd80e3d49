"""DraftTree: a batch of token trees as a struct of arrays, its derived masks, and its builders.

Node 0 of every row is the root: the last committed token, whose K/V the target has not seen yet.
The target's logits at node i give the distribution of i's children. Dims: B batch, N nodes,
V vocab, K draft depth, L leaves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch

from .devices import to_device


class Law(IntEnum):
    """How a node's token was drawn, given its parent and earlier siblings."""

    POINT = 0  # a fixed choice (top-k, n-gram, reranked or deduplicated samples)
    IID = 1  # an independent draw from draft_probs
    WOR = 2  # a draw from draft_probs without the tokens of earlier WOR siblings


DEFAULT_NODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def node_bucket(num_nodes: int, buckets: Sequence[int] = DEFAULT_NODE_BUCKETS) -> int:
    """The smallest bucket that holds `num_nodes` nodes (the static shape a tree is padded to)."""
    for b in sorted(buckets):
        if b >= num_nodes:
            return b
    raise ValueError(f"a tree of {num_nodes} nodes exceeds the largest node bucket {max(buckets)}")


TOPK_CHUNK = 1024  # `topk_last` splits a last dim longer than 4 chunks into chunks of this size


def topk_last(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, dim=-1)` (values descending, and their indices) for a long last dim over few
    rows, in two stages: the top k of every TOPK_CHUNK-wide chunk, then the top k of those winners.
    The values are torch.topk's; among equal values the indices may differ. On a GPU torch.topk
    gives each row one thread block, so [10, 16384] (an EAGLE level at vocabulary 16k) took 79 us;
    the chunks spread it over as many blocks as chunks.

    x [..., V] -> values, indices [..., k]."""
    V = x.shape[-1]
    if V <= 4 * TOPK_CHUNK or k > TOPK_CHUNK:
        return x.topk(k, dim=-1)
    pad = (-V) % TOPK_CHUNK
    if pad:  # -inf never outranks a real entry (V >= k of them)
        x = torch.nn.functional.pad(x, (0, pad), value=float("-inf"))
    S = x.shape[-1] // TOPK_CHUNK
    vals, idx = x.unflatten(-1, (S, TOPK_CHUNK)).topk(k, dim=-1)  # [..., S, k]
    idx = idx + torch.arange(0, S * TOPK_CHUNK, TOPK_CHUNK, device=x.device)[:, None]
    best, pick = vals.flatten(-2).topk(k, dim=-1)
    return best, idx.flatten(-2).gather(-1, pick)


@functools.lru_cache(maxsize=64)
def _choice_structure(depths: tuple, ranks: tuple, parents: tuple, k: int, device: torch.device):
    """A static tree's structure on the device, made once (a host list copied at every step would
    wait for the device): depth [N], index into the flattened candidates [N], parent [N]."""
    depth = torch.tensor(depths)
    index = (depth - 1).clamp(min=0) * k + torch.tensor(ranks)
    return tuple(to_device(t, device) for t in (depth, index, torch.tensor(parents)))


@dataclass(slots=True)
class DraftTree:
    """A batch of draft trees, padded to N nodes.

    tokens      [B, N] long   node 0 = root; padding nodes hold 0
    parents     [B, N] long   parents[:, 0] = -1, 0 <= parents[b, i] < i; padding nodes hold -1
    depth       [B, N] long   root 0, child = parent + 1; padding nodes hold 0
    num_nodes   [B]    long   valid nodes are 0 .. num_nodes[b] - 1
    law         [B, N] int8   Law of each node (root and padding: POINT)
    draft_probs [B, N, V] float | None   row i = the q node i was drawn from (needed for IID / WOR)

    Children of one node are verified in index order, which must be the order they were drawn in.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    num_nodes: torch.Tensor
    law: torch.Tensor
    draft_probs: torch.Tensor | None = None
    # derived once per tree (the structure is fixed after building): [B, N, N] and the max depth
    _ancestors: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _max_depth: int | None = field(default=None, repr=False, compare=False)
    _has_wor: bool | None = field(default=None, repr=False, compare=False)  # known by the builder

    def has_wor(self) -> bool:
        """Whether any node is a WOR draw (a host sync unless the builder knew)."""
        if self._has_wor is None:
            self._has_wor = self.draft_probs is not None and bool((self.law == Law.WOR).any())
        return self._has_wor

    # ----------------------------------------------------------------------------- properties

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        """N, the padded number of nodes per row."""
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def valid(self) -> torch.Tensor:
        """[B, N] bool: True for real nodes, False for padding."""
        return torch.arange(self.width, device=self.device) < self.num_nodes[:, None]

    def max_depth(self) -> int:
        """Deepest node over the batch (a host sync the first time)."""
        if self._max_depth is None:
            self._max_depth = int(self.depth.max()) if self.width > 1 else 0
        return self._max_depth

    # ----------------------------------------------------------------------------- derived

    def ancestor_mask(self) -> torch.Tensor:
        """[B, N, N] bool: mask[b, i, j] is True when j is i or an ancestor of i.

        This is the tree part of the attention mask (the committed prefix is visible to every node).
        """
        if self._ancestors is not None:
            return self._ancestors
        B, N = self.tokens.shape
        cols = torch.arange(N, device=self.device)
        node = cols.expand(B, N).clone()  # [B, N] the current ancestor of each node, -1 past the root
        mask = torch.zeros(B, N, N, dtype=torch.bool, device=self.device)
        for _ in range(self.max_depth() + 1):  # comparisons, not boolean indexing: no host sync
            mask |= node[:, :, None] == cols
            node = torch.where(node >= 0, self.parents.gather(1, node.clamp(min=0)), node)
        self._ancestors = mask
        return mask

    def positions(self, root_positions: torch.Tensor) -> torch.Tensor:
        """[B, N] position ids: root_positions [B] (position of the root token) + depth."""
        return root_positions[:, None] + self.depth

    def is_leaf(self) -> torch.Tensor:
        """[B, N] bool: valid nodes without valid children."""
        valid = self.valid()
        parent = torch.where(valid, self.parents, -1)
        num_children = torch.zeros_like(parent).scatter_add_(1, parent.clamp(min=0), (parent >= 0).long())
        return valid & (num_children == 0)

    def leaf_paths(self) -> torch.Tensor:
        """[B, L, D + 1] long: node indices from root to each leaf, by depth; -1 pads.

        L is the largest number of leaves in a row, D the largest depth; leaves are in index order.
        """
        B, N = self.tokens.shape
        leaf = self.is_leaf()
        num_leaves = leaf.sum(1)
        L = max(int(num_leaves.max()), 1)
        D = self.max_depth()
        # leaf_ids [B, L]: the node index of each row's l-th leaf (N where the row has fewer)
        order = torch.where(leaf, torch.arange(N, device=self.device), N).sort(dim=1).values[:, :L]
        anc = self.ancestor_mask()  # [B, N, N]
        anc_pad = torch.cat([anc, torch.zeros(B, 1, N, dtype=torch.bool, device=self.device)], 1)
        on_path = anc_pad.gather(1, order[:, :, None].expand(B, L, N))  # [B, L, N]
        slot = torch.where(on_path, self.depth[:, None, :], D + 1)  # [B, L, N]; D + 1 = discard
        paths = torch.full((B, L, D + 2), -1, dtype=torch.long, device=self.device)
        node_ids = torch.arange(N, device=self.device).expand(B, L, N)
        paths.scatter_(2, slot, torch.where(on_path, node_ids, -1))
        return paths[:, :, : D + 1]

    # ----------------------------------------------------------------------------- padding

    _FIELDS = ("tokens", "parents", "depth", "num_nodes", "law", "draft_probs")

    def bucket_fields(self) -> dict[str, torch.Tensor]:
        """The tree's tensors (tokens, parents, depth [B, N], num_nodes [B], law [B, N], draft_probs
        [B, N, V] when set), padded to its node bucket: what a captured drafting step returns, so
        the engine pads nothing (`from_fields` rebuilds the tree)."""
        tree = self.pad_to(node_bucket(self.width))
        return {f: getattr(tree, f) for f in self._FIELDS if getattr(tree, f) is not None}

    @classmethod
    def from_fields(cls, fields: dict[str, torch.Tensor], max_depth: int, has_wor: bool) -> DraftTree:
        """A tree from `bucket_fields`' tensors, cloned (a graph's outputs are static buffers that
        its next replay overwrites); max_depth (a bound) and has_wor are given, as reading them
        would sync."""
        return cls(**{f: x.clone() for f, x in fields.items()}, _max_depth=max_depth, _has_wor=has_wor)

    def pad_to(self, width: int) -> DraftTree:
        """The same trees padded to `width` nodes per row (a node bucket)."""
        if width < self.width:
            if bool((self.num_nodes > width).any()):
                raise ValueError(f"cannot pad a tree of {int(self.num_nodes.max())} nodes to width {width}")
            return self._slice(width)
        extra = width - self.width
        if extra == 0:
            return self

        def grow(t: torch.Tensor, fill) -> torch.Tensor:
            pad = torch.full((t.shape[0], extra, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
            return torch.cat([t, pad], dim=1)

        probs = None
        if self.draft_probs is not None:
            probs = grow(self.draft_probs, 0.0)
        return DraftTree(
            tokens=grow(self.tokens, 0),
            parents=grow(self.parents, -1),
            depth=grow(self.depth, 0),
            num_nodes=self.num_nodes,
            law=grow(self.law, int(Law.POINT)),
            draft_probs=probs,
            _max_depth=self._max_depth,  # padding nodes have depth 0: the same deepest node
            _has_wor=self._has_wor,
        )

    def _slice(self, width: int) -> DraftTree:
        probs = None if self.draft_probs is None else self.draft_probs[:, :width]
        return replace(
            self,
            tokens=self.tokens[:, :width],
            parents=self.parents[:, :width],
            depth=self.depth[:, :width],
            law=self.law[:, :width],
            draft_probs=probs,
            _ancestors=None if self._ancestors is None else self._ancestors[:, :width, :width],
        )

    # ----------------------------------------------------------------------------- validation

    def validate(self) -> DraftTree:
        """Check every invariant; raise ValueError naming the row, node and value. Returns self."""
        B, N = self.tokens.shape
        for name in ("parents", "depth", "law"):
            shape = tuple(getattr(self, name).shape)
            if shape != (B, N):
                raise ValueError(f"DraftTree.{name} has shape {shape}, expected (B, N) = {(B, N)}")
        if tuple(self.num_nodes.shape) != (B,):
            raise ValueError(f"DraftTree.num_nodes has shape {tuple(self.num_nodes.shape)}, expected ({B},)")
        bad = (self.num_nodes < 1) | (self.num_nodes > N)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"num_nodes[{b}] = {int(self.num_nodes[b])} must be in [1, {N}]")
        valid = self.valid()
        idx = torch.arange(N, device=self.device).expand(B, N)
        if bool((self.parents[:, 0] != -1).any()):
            b = int((self.parents[:, 0] != -1).nonzero()[0, 0])
            raise ValueError(f"row {b}: the root (node 0) must have parent -1, got {int(self.parents[b, 0])}")
        bad = valid & (idx > 0) & ((self.parents < 0) | (self.parents >= idx))
        self._raise_at(bad, "parent", self.parents, "must satisfy 0 <= parent[i] < i")
        parent_valid = valid.gather(1, self.parents.clamp(min=0))
        self._raise_at(valid & (idx > 0) & ~parent_valid, "parent", self.parents, "is a padding node")
        expected_depth = torch.where(idx > 0, self.depth.gather(1, self.parents.clamp(min=0)) + 1, 0)
        self._raise_at(valid & (self.depth != expected_depth), "depth", self.depth, "is not parent depth + 1")
        law = self.law.to(torch.long)
        self._raise_at(valid & ((law < 0) | (law > 2)), "law", law, "must be 0 (POINT), 1 (IID) or 2 (WOR)")
        sampled = valid & (idx > 0) & (law != Law.POINT)
        if self.draft_probs is None:
            self._raise_at(sampled, "law", law, "needs draft_probs (IID / WOR nodes are drawn from q)")
            return self
        if self.draft_probs.shape[:2] != (B, N):
            raise ValueError(
                f"draft_probs has shape {tuple(self.draft_probs.shape)}, expected (B, N, V) with B, N = {B}, {N}"
            )
        V = self.draft_probs.shape[2]
        self._raise_at(valid & ((self.tokens < 0) | (self.tokens >= V)), "token", self.tokens, f"not in [0, {V})")
        q_x = self.draft_probs.gather(2, self.tokens.clamp(0, V - 1)[:, :, None]).squeeze(2)
        self._raise_at(sampled & ~(q_x > 0), "token", self.tokens, "was drawn from q but has q(x) = 0")
        wor = sampled & (law == Law.WOR)
        same_parent = self.parents[:, :, None] == self.parents[:, None, :]
        earlier = idx[:, None, :] < idx[:, :, None]
        dup = same_parent & earlier & wor[:, None, :] & (self.tokens[:, :, None] == self.tokens[:, None, :])
        self._raise_at(wor & dup.any(2), "token", self.tokens, "repeats an earlier WOR sibling")
        return self

    @staticmethod
    def _raise_at(bad: torch.Tensor, what: str, values: torch.Tensor, rule: str) -> None:
        if bool(bad.any()):
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"row {b}, node {i}: {what} {int(values[b, i])} {rule}")

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def from_parents(
        cls,
        tokens: Sequence[Sequence[int]],
        parents: Sequence[Sequence[int]],
        law: Law = Law.POINT,
        device: torch.device | str | None = None,
    ) -> DraftTree:
        """Trees from per-row lists (node 0 = root with parent -1), padded to the longest row.

        Examples
        --------
        >>> t = DraftTree.from_parents([[9, 1, 2, 3]], [[-1, 0, 0, 1]])
        >>> t.depth.tolist()
        [[0, 1, 1, 2]]
        """
        if len(tokens) != len(parents) or len(tokens) == 0:
            raise ValueError(f"need one token list and one parent list per row; got {len(tokens)} and {len(parents)}")
        N = max(len(row) for row in tokens)
        B = len(tokens)
        tok = torch.zeros(B, N, dtype=torch.long)
        par = torch.full((B, N), -1, dtype=torch.long)
        dep = torch.zeros(B, N, dtype=torch.long)
        lw = torch.zeros(B, N, dtype=torch.int8)
        for b, (ts, ps) in enumerate(zip(tokens, parents, strict=True)):
            if len(ts) != len(ps) or len(ts) == 0:
                raise ValueError(f"row {b}: {len(ts)} tokens but {len(ps)} parents (need equal, >= 1)")
            for i, (t, pa) in enumerate(zip(ts, ps, strict=True)):
                if (i == 0 and pa != -1) or (i > 0 and not 0 <= pa < i):
                    raise ValueError(f"row {b}, node {i}: parent {pa} must be -1 for the root, else in [0, {i})")
                tok[b, i], par[b, i] = t, pa
                dep[b, i] = 0 if i == 0 else dep[b, pa] + 1
                lw[b, i] = 0 if i == 0 else int(law)
        num = torch.tensor([len(ts) for ts in tokens], dtype=torch.long)
        return cls(tok, par, dep, num, lw).to(device) if device is not None else cls(tok, par, dep, num, lw)

    def to(self, device: torch.device | str) -> DraftTree:
        target = torch.device(device)
        here = self.tokens.device
        if target.type == here.type and target.index in (None, here.index):
            return self
        if here.type == "cpu":  # read on the host now, where it costs no device sync later
            self.max_depth()
            self.has_wor()
        probs = None if self.draft_probs is None else to_device(self.draft_probs, target)
        return DraftTree(
            to_device(self.tokens, target),
            to_device(self.parents, target),
            to_device(self.depth, target),
            to_device(self.num_nodes, target),
            to_device(self.law, target),
            probs,
            _max_depth=self._max_depth,
            _has_wor=self._has_wor,
        )

    @classmethod
    def chain(
        cls,
        root_tokens: torch.Tensor,
        draft_tokens: torch.Tensor,
        law: Law | torch.Tensor = Law.POINT,
        draft_probs: torch.Tensor | None = None,
        num_drafts: torch.Tensor | None = None,
        has_wor: bool | None = None,
    ) -> DraftTree:
        """A chain root -> d_1 -> ... -> d_K.

        Parameters
        ----------
        root_tokens : [B] long, the last committed token of each row.
        draft_tokens : [B, K] long.
        law : Law.POINT for argmax / lookup drafts, Law.IID for a chain sampled from q; or [B] per row.
        draft_probs : [B, K, V], the q each draft was sampled from (IID).
        num_drafts : [B] long or None; rows may use fewer than K drafts (the rest is padding).
        has_wor : whether a per-row law holds Law.WOR (None: read from it when needed, a device
            sync; a caller whose laws are POINT / IID says False).

        Examples
        --------
        >>> t = DraftTree.chain(torch.tensor([5]), torch.tensor([[1, 2, 3]]))
        >>> t.parents.tolist(), t.depth.tolist()
        ([[-1, 0, 1, 2]], [[0, 1, 2, 3]])
        """
        if root_tokens.dim() != 1 or draft_tokens.dim() != 2 or draft_tokens.shape[0] != root_tokens.shape[0]:
            raise ValueError(
                f"chain needs root_tokens [B] and draft_tokens [B, K]; got {tuple(root_tokens.shape)} "
                f"and {tuple(draft_tokens.shape)}"
            )
        B, K = draft_tokens.shape
        dev = draft_tokens.device
        ar = torch.arange(K + 1, device=dev)
        n = torch.full((B,), K, dtype=torch.long, device=dev) if num_drafts is None else num_drafts.long()
        valid = ar[None, :] <= n[:, None]
        if isinstance(law, Law):
            row_law = torch.full((B,), int(law), dtype=torch.long, device=dev)
        else:
            row_law = torch.as_tensor(law, dtype=torch.long, device=dev).expand(B)
        probs = None
        if draft_probs is not None:
            if draft_probs.shape[:2] != (B, K):
                raise ValueError(f"draft_probs must be [B, K, V] = [{B}, {K}, V]; got {tuple(draft_probs.shape)}")
            probs = torch.cat([torch.zeros_like(draft_probs[:, :1]), draft_probs], 1)
        tree = cls(
            tokens=torch.where(valid, torch.cat([root_tokens[:, None], draft_tokens], 1), 0),
            parents=torch.where(valid, ar - 1, -1).expand(B, K + 1).clone(),
            depth=torch.where(valid, ar, 0).expand(B, K + 1).clone(),
            num_nodes=n + 1,
            law=torch.where(valid & (ar > 0), row_law[:, None], int(Law.POINT)).to(torch.int8),
            draft_probs=probs,
            _max_depth=K,
            _has_wor=(law == Law.WOR) if isinstance(law, Law) else has_wor,
        )
        return tree

    @classmethod
    def from_choices(
        cls,
        root_tokens: torch.Tensor,
        candidates: torch.Tensor,
        choices: Sequence[Sequence[int]],
        keep: list | None = None,
    ) -> DraftTree:
        """A static tree from Medusa-style choices: paths of top-k ranks, one list per node.

        Parameters
        ----------
        root_tokens : [B] long.
        candidates : [B, K, k] long; candidates[b, d, r] = rank-r token proposed for depth d + 1
            (Medusa head d's top-k).
        choices : e.g. [(0,), (1,), (0, 0), (0, 1)]; every prefix of a choice must be a choice too.
        keep : a list that receives the structure tensors the result was built from (cached per
            tree shape and device): a CUDA graph that captures this call reads them at every replay,
            so its owner keeps them (the cache may drop them).

        Returns
        -------
        DraftTree with 1 + len(choices) nodes, sorted by (depth, ranks); law POINT.

        Examples
        --------
        >>> cand = torch.tensor([[[10, 11], [20, 21]]])
        >>> t = DraftTree.from_choices(torch.tensor([1]), cand, [(0,), (1,), (0, 0)])
        >>> t.tokens.tolist(), t.parents.tolist()
        ([[1, 10, 11, 20]], [[-1, 0, 0, 1]])
        """
        if candidates.dim() != 3 or candidates.shape[0] != root_tokens.shape[0]:
            raise ValueError(f"candidates must be [B, K, k]; got {tuple(candidates.shape)}")
        B, K, k = candidates.shape
        paths = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
        if len(paths) != len(choices):
            raise ValueError("choices contain duplicates")
        index = {(): 0}
        parents, ranks, depths = [-1], [0], [0]
        for i, c in enumerate(paths, start=1):
            if len(c) == 0 or len(c) > K:
                raise ValueError(f"choice {list(c)} has depth {len(c)}; valid depths are 1..{K}")
            if any(r < 0 or r >= k for r in c):
                raise ValueError(f"choice {list(c)} has a rank outside [0, {k}) (candidates hold top-{k})")
            if c[:-1] not in index:
                raise ValueError(f"choice {list(c)} needs its prefix {list(c[:-1])} among the choices")
            index[c] = i
            parents.append(index[c[:-1]])
            ranks.append(c[-1])
            depths.append(len(c))
        dev = candidates.device
        N = len(paths) + 1
        structure = _choice_structure(tuple(depths), tuple(ranks), tuple(parents), k, dev)
        if keep is not None and all(x is not structure for x in keep):
            keep.append(structure)
        depth, flat_index, parent = structure
        gathered = candidates.reshape(B, K * k)[:, flat_index]
        tokens = torch.where(depth == 0, root_tokens[:, None], gathered)
        return cls(
            tokens=tokens,
            parents=parent.expand(B, N).clone(),
            depth=depth.expand(B, N).clone(),
            num_nodes=torch.full((B,), N, dtype=torch.long, device=dev),
            law=torch.zeros(B, N, dtype=torch.int8, device=dev),
            _max_depth=max(depths),
            _has_wor=False,
        )

    @classmethod
    def from_sampled_expansion(
        cls,
        root_tokens: torch.Tensor,
        root_logits: torch.Tensor,
        expand: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        process: Callable[[torch.Tensor], torch.Tensor],
        noise: Callable[[int, tuple[int, ...]], torch.Tensor],
        greedy: torch.Tensor,
        depth: int,
        first: int,
        width: int,
        children: int,
    ) -> DraftTree:
        """A dynamic tree whose children are drawn without replacement from the drafter's processed
        q (law WOR, verified with that q): exact at any temperature.

        Level 1: the root draws `first` children. Each later level: the `width` nodes of the level
        before with the best cumulative drafter log-probability (chosen from nodes already drawn,
        before their own children exist) each draw `children` children. Every drawn node is kept,
        in draw order (Gumbel-top-k: the first k of one sequential draw without replacement), so a
        node's number of children never depends on those children's values: the condition under
        which multi-draft rejection sampling stays exact. Greedy rows take the top-k of the drafter's
        logits instead (law POINT), and a draw past q's support (q(x) = 0) is a POINT node.

        Parameters
        ----------
        root_tokens : [B] long.
        root_logits : [B, V] the drafter's logits for the root's children.
        expand : (frontier_tokens [B, w], frontier_parent [B, w]) -> logits [B, w, V]; the parent
            indexes the previous frontier (0 = the root at level 2), as in `from_topk_expansion`.
        process : logits [B, ..., V] -> q [B, ..., V], the rows' processed draft distribution.
        noise : (level, shape) -> standard Gumbel noise of that shape (per-row seeded).
        greedy : [B] bool rows drafted by top-k (POINT).
        depth, first, width, children : levels, the root's children, nodes expanded per level and
            children per expanded node: 1 + first + (depth - 1) * width * children nodes.
        """
        B, V = root_logits.shape
        if depth < 1 or not 1 <= first <= V or not 1 <= children <= V or not 1 <= width <= first:
            raise ValueError(
                f"need depth >= 1, 1 <= first, children <= V={V} and 1 <= width <= first; got depth={depth}, "
                f"first={first}, width={width}, children={children}"
            )
        dev = root_logits.device

        def draw(logits: torch.Tensor, k: int, level: int):
            """logits [B, m, V] -> tokens, law, q rows and drafter log-probs [B, m, k] of k children each."""
            q = process(logits)
            logp = torch.log_softmax(logits.float(), -1)
            keys = torch.where(greedy[:, None, None], logp, torch.log(q.float()) + noise(level, tuple(q.shape)))
            tok = topk_last(keys, k)[1]  # draw order
            q_x = q.gather(-1, tok)
            law = torch.where(greedy[:, None, None] | (q_x <= 0), int(Law.POINT), int(Law.WOR))
            return tok, law.to(torch.int8), q, logp.gather(-1, tok)

        tok, law, q, lp = draw(root_logits[:, None], first, 0)  # [B, 1, first]
        tokens, laws, parents = [tok[:, 0]], [law[:, 0]], [torch.zeros(B, first, dtype=torch.long, device=dev)]
        probs = [q[:, 0, None].expand(B, first, V)]
        depths = [torch.ones(B, first, dtype=torch.long, device=dev)]
        level_ids = torch.arange(1, first + 1, device=dev).expand(B, first)  # node index of each level node
        level_tok, level_score = tok[:, 0], lp[:, 0]
        prev_slot = torch.zeros(B, first, dtype=torch.long, device=dev)  # parent's slot in the last frontier
        n = 1 + first
        for d in range(2, depth + 1):
            pick = level_score.topk(width, dim=-1).indices  # [B, w] best nodes of the last level
            f_tok, f_ids = level_tok.gather(1, pick), level_ids.gather(1, pick)
            f_score = level_score.gather(1, pick)
            logits = expand(f_tok, prev_slot.gather(1, pick))  # [B, w, V]
            tok, law, q, lp = draw(logits, children, d - 1)  # [B, w, c]
            m = width * children
            tokens.append(tok.reshape(B, m))
            laws.append(law.reshape(B, m))
            parents.append(f_ids.repeat_interleave(children, dim=1))
            probs.append(q.repeat_interleave(children, dim=1))
            depths.append(torch.full((B, m), d, dtype=torch.long, device=dev))
            level_ids = torch.arange(n, n + m, device=dev).expand(B, m)
            level_tok = tok.reshape(B, m)
            level_score = (f_score[:, :, None] + lp).reshape(B, m)
            prev_slot = torch.arange(width, device=dev).repeat_interleave(children).expand(B, m)
            n += m
        zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
        return cls(
            tokens=torch.cat([root_tokens[:, None], *tokens], 1),
            parents=torch.cat([zero - 1, *parents], 1),
            depth=torch.cat([zero, *depths], 1),
            num_nodes=torch.full((B,), n, dtype=torch.long, device=dev),
            law=torch.cat([torch.zeros(B, 1, dtype=torch.int8, device=dev), *laws], 1),
            draft_probs=torch.cat([torch.zeros(B, 1, V, dtype=probs[0].dtype, device=dev), *probs], 1),
            _max_depth=depth,
            _has_wor=True,
        )

    @classmethod
    def from_topk_expansion(
        cls,
        root_tokens: torch.Tensor,
        root_logprobs: torch.Tensor,
        expand: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        depth: int,
        top_k: int,
        total_tokens: int,
    ) -> DraftTree:
        """EAGLE-2 dynamic tree: expand the best top_k nodes per step, keep the global best nodes.

        Step 1 takes the root's top_k children. Each later step asks `expand` for the children of the
        current frontier (the top_k newest nodes by cumulative log-prob), scores top_k children per
        frontier node by cumulative log-prob, and takes the best top_k of those as the next frontier.
        Finally the `total_tokens` best nodes of all steps are kept. A child never outscores its
        parent and ties go to the shallower node, so the kept set is always a connected tree.

        Parameters
        ----------
        root_tokens : [B] long.
        root_logprobs : [B, V] draft log-probs of the root's children.
        expand : (frontier_tokens [B, top_k], frontier_parent [B, top_k]) -> logprobs [B, top_k, V].
            frontier_parent[b, j] indexes the previous frontier (0 for the root at step 1), so the
            drafter can gather its own state (e.g. EAGLE features) for each new node.
        depth : number of expansion steps (maximum draft depth), >= 1.
        top_k : children per expanded node and frontier size, >= 1.
        total_tokens : draft nodes kept, excluding the root; the tree has total_tokens + 1 nodes.

        Returns
        -------
        DraftTree with total_tokens + 1 nodes, depth-major, siblings by descending score; law POINT.
        """
        B, V = root_logprobs.shape
        pool_size = top_k + (depth - 1) * top_k * top_k
        if depth < 1 or top_k < 1 or top_k > V:
            raise ValueError(f"need depth >= 1 and 1 <= top_k <= V={V}; got depth={depth}, top_k={top_k}")
        if not 1 <= total_tokens <= pool_size:
            raise ValueError(
                f"total_tokens={total_tokens} must be in [1, {pool_size}] for depth={depth}, top_k={top_k}"
            )
        dev = root_logprobs.device
        scores, tokens = topk_last(root_logprobs, top_k)  # [B, k]
        pool_scores, pool_tokens = [scores], [tokens]
        pool_parent = [torch.full((B, top_k), -1, dtype=torch.long, device=dev)]
        frontier_ids = torch.arange(top_k, device=dev).expand(B, top_k)  # ids in the pool
        frontier_parent = torch.zeros(B, top_k, dtype=torch.long, device=dev)
        offset = top_k
        for _ in range(1, depth):
            logp = expand(tokens, frontier_parent)
            if logp.shape != (B, top_k, V):
                raise ValueError(f"expand returned shape {tuple(logp.shape)}, expected {(B, top_k, V)}")
            child_lp, child_tok = topk_last(logp, top_k)  # [B, k, k]
            cand = (scores[:, :, None] + child_lp).reshape(B, top_k * top_k)
            pool_scores.append(cand)
            pool_tokens.append(child_tok.reshape(B, top_k * top_k))
            pool_parent.append(frontier_ids.repeat_interleave(top_k, dim=1))
            scores, pick = cand.topk(top_k, dim=-1)
            tokens = child_tok.reshape(B, top_k * top_k).gather(1, pick)
            frontier_ids = offset + pick
            frontier_parent = pick // top_k
            offset += top_k * top_k
        all_scores = torch.cat(pool_scores, 1)  # [B, P]
        all_tokens = torch.cat(pool_tokens, 1)
        all_parents = torch.cat(pool_parent, 1)
        rank = all_scores.sort(dim=1, descending=True, stable=True).indices[:, :total_tokens]
        keep = rank.sort(dim=1).values  # [B, T] pool ids, depth-major
        # node index of every pool id (0 = not kept); kept pool id keep[b, t] becomes node t + 1
        node_of = torch.zeros(B, pool_size + 1, dtype=torch.long, device=dev)
        node_of.scatter_(1, keep + 1, torch.arange(1, total_tokens + 1, device=dev).expand(B, total_tokens))
        parents = node_of.gather(1, all_parents.gather(1, keep) + 1)
        orphan = (parents == 0) & (all_parents.gather(1, keep) >= 0)
        # checked where it costs nothing: on a CUDA device the check would add a host sync per step
        if orphan.device.type == "cpu" and bool(orphan.any()):
            raise ValueError(
                "from_topk_expansion kept a node without its parent: root_logprobs and expand must "
                "return log-probabilities (all <= 0), so that a child never outscores its parent"
            )
        depth_of_pool = torch.cat(
            [torch.ones(top_k, dtype=torch.long, device=dev)]
            + [torch.full((top_k * top_k,), d + 1, dtype=torch.long, device=dev) for d in range(1, depth)]
        )
        N = total_tokens + 1
        return cls(
            tokens=torch.cat([root_tokens[:, None], all_tokens.gather(1, keep)], 1),
            parents=torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=dev), parents], 1),
            depth=torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), depth_of_pool[keep]], 1),
            num_nodes=torch.full((B,), N, dtype=torch.long, device=dev),
            law=torch.zeros(B, N, dtype=torch.int8, device=dev),
            _max_depth=depth,  # a bound (as chain's K): reading the exact one would sync
            _has_wor=False,
        )
