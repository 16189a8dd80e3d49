"""Medusa: static sparse trees from K heads on the target's last hidden state (POINT law, exact).

Typical acceptance (Medusa's own rule) is available only as an explicit lossy option; it is then
recorded as lossy in the stats.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..devices import to_device
from ..heads.medusa import MedusaHeads, load_medusa
from ..hub import resolve
from ..runtime.base import TargetModel
from ..runtime.graphs import BATCH_BUCKETS, GraphedCalls
from ..sampling import RowSeeds, SamplingParams, process_logits, uniform
from ..tree import DraftTree, Law, topk_last
from ..validation import is_int, require_int
from .base import STREAM_DRAFT, Needs, ProposeContext, Proposer, register_proposer

# Assumed acceptance of the rank-r candidate of head d (for choosing default trees): decays with
# depth and rank, roughly what the Medusa paper reports for trained heads.
_HEAD_ACCEPT = (0.6, 0.45, 0.35, 0.3, 0.25)
_RANK_SHARE = (1.0, 0.35, 0.2, 0.12, 0.08, 0.06, 0.05, 0.04, 0.03, 0.03)


def assumed_acceptance(depth: int, rank: int) -> float:
    """P(the rank-th candidate of head `depth` is accepted | its parent was), assumed (no data)."""
    return _HEAD_ACCEPT[min(depth, len(_HEAD_ACCEPT) - 1)] * _RANK_SHARE[min(rank, len(_RANK_SHARE) - 1)]


def default_choices(num_nodes: int, num_heads: int, top_k: int = 10, acceptance=None) -> list[tuple[int, ...]]:
    """The num_nodes paths of ranks with the largest probability of being accepted.

    A path's value is the product over its depths of acceptance(depth, rank) (default: an assumed
    table; `specdec tune` passes measured values); a path is added only after its prefix, so the
    result is always a valid (prefix-closed) Medusa choice list. Its expected accepted length is the
    sum of the values (`expected_accepted`).
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    top_k = min(top_k, len(_RANK_SHARE))
    accept = acceptance or assumed_acceptance

    def value(path):
        v = 1.0
        for d, r in enumerate(path):
            v *= accept(d, r)
        return v

    chosen: list[tuple[int, ...]] = []
    frontier = {(r,) for r in range(top_k)}
    while len(chosen) < num_nodes and frontier:
        best = max(sorted(frontier), key=value)
        frontier.remove(best)
        chosen.append(best)
        if len(best) < num_heads:
            frontier.update(best + (r,) for r in range(top_k))
    return sorted(chosen, key=lambda c: (len(c), c))


def expected_accepted(choices, acceptance=None) -> float:
    """Expected accepted drafts of a static tree: the sum over its paths of their acceptance products."""
    accept = acceptance or assumed_acceptance
    total = 0.0
    for c in choices:
        v = 1.0
        for d, r in enumerate(c):
            v *= accept(d, r)
        total += v
    return total


@register_proposer("medusa")
class Medusa(Proposer):
    """Draft static trees with Medusa heads.

    Parameters
    ----------
    heads : MedusaHeads, or None with `path` (loaded when generation starts, checked against the target).
    tree : Medusa choices (paths of top-k ranks), or the number of draft nodes for a default tree
        (default 32).
    path : a checkpoint folder for `load_medusa`.
    """

    needs = Needs.LAST_HIDDEN

    def __init__(
        self,
        heads: MedusaHeads | None = None,
        tree: Sequence[Sequence[int]] | int | None = None,
        path: str | Path | None = None,
    ):
        if heads is None and path is None:
            raise ValueError("Medusa needs heads or a checkpoint path")
        self.heads, self.path = heads, path
        self._tree = tree
        self.choices: list[tuple[int, ...]] | None = None
        self._path_stats: dict[tuple[int, ...], tuple[int, int]] = {}  # choice -> (offered, accepted)
        self._counts: torch.Tensor | None = None  # [2, N - 1] offered / accepted per node, on the device
        self.lm_head = None
        # capture the proposal (heads, top-k, tree, sampled draws) on a CUDA device (settable: False
        # runs it eagerly; a GraphedCalls instance is used as it is, on any device: the CPU tests
        # pass one with capture=False)
        self.graphs: bool | GraphedCalls = True
        self._graphs: GraphedCalls | None = None
        self._held: dict[tuple, list] = {}  # per graph key: the tensors its graph reads, kept alive
        # trees of sampled rows: True / None (default) draw the children from each head's q without
        # replacement (exact, keeps acceptance at T > 0); False keeps top-k trees at every temperature
        self.sampled_trees: bool | None = None
        self._plan_key: tuple | None = None  # the sampled trees' draw plan (`_draw_plan`), per tree and device
        self._plan: dict = {}
        self._set_choices(heads.config.num_heads if heads is not None else None)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, tree: Sequence[Sequence[int]] | int | None = None, revision: str | None = None
    ) -> Medusa:
        """Heads from a FasterDecoding v1 / v2, vLLM or specdec checkpoint folder (see `load_medusa`),
        or a Hugging Face Hub id at `revision` (fetched now through huggingface_hub's cache)."""
        folder = resolve(path, revision)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder / 'config.json'} not found: pass a Medusa checkpoint folder")
        return cls(path=folder, tree=tree)

    def _set_choices(self, num_heads: int | None) -> None:
        """Resolve and check the tree; num_heads None (heads not loaded yet) checks its shape only."""
        tree = self._tree
        if tree is None or is_int(tree):
            require_int("tree", 32 if tree is None else tree, 1, "draft nodes of the default tree, or Medusa choices")
            if num_heads is None:
                return
            self.choices = default_choices(32 if tree is None else tree, num_heads)
        else:
            try:
                self.choices = [tuple(int(r) for r in c) for c in tree]
            except (TypeError, ValueError):
                msg = f"tree must be a node count or Medusa choices (lists of int ranks), got {tree!r}"
                raise ValueError(msg) from None
            if not self.choices:
                raise ValueError("tree=[] has no nodes: give choices such as [(0,), (1,), (0, 0)] or a node count")
        self.top_k = 1 + max((r for c in self.choices for r in c), default=0)
        depth = num_heads if num_heads is not None else max(len(c) for c in self.choices)
        # the tree builder's own checks (depth, rank range, prefixes, duplicates), now rather than mid-call
        candidates = torch.zeros(1, depth, self.top_k, dtype=torch.long)
        DraftTree.from_choices(torch.zeros(1, dtype=torch.long), candidates, self.choices)

    @property
    def max_nodes(self) -> int:
        if self.choices is None:
            return (self._tree if isinstance(self._tree, int) else len(self._tree or []) or 32) + 1
        return len(self.choices) + 1

    def start(self, target: TargetModel, *, block_size: int, num_blocks: int, max_blocks_per_row: int) -> None:
        model = target.model
        if self.heads is None:
            self.heads = load_medusa(self.path, model.config.hidden_size, target.vocab_size)
            self._set_choices(self.heads.config.num_heads)
        if self.top_k > target.vocab_size:
            raise ValueError(f"the Medusa tree uses rank {self.top_k - 1}; the vocabulary has {target.vocab_size}")
        if self.heads.config.vocab_size != target.vocab_size:
            raise ValueError(
                f"Medusa vocabulary {self.heads.config.vocab_size} != target vocabulary {target.vocab_size}"
            )
        param = next(model.parameters())
        self.heads.to(device=param.device, dtype=param.dtype).eval()
        lm_head = model.get_output_embeddings()
        if isinstance(self.graphs, GraphedCalls):
            self._graphs = self.graphs
        elif param.device.type == "cuda" and self.graphs:
            # graphs hold the weights' addresses: another target (or a moved one) gets new graphs
            if self._graphs is None or lm_head is not self.lm_head:
                self._graphs, self._held = GraphedCalls(), {}
        else:
            self._graphs = None
        self.lm_head = lm_head

    @property
    def max_depth(self) -> int:
        return max(len(c) for c in self.choices) if self.choices else self.max_nodes - 1

    @property
    def pipelines(self) -> bool:
        # the captured proposal reads only device tensors of the step before (hidden state, root)
        return self._graphs is not None

    @property
    def path_stats(self) -> dict[tuple[int, ...], tuple[int, int]]:
        """choice -> (offered, accepted): how often each node of the tree had its parent accepted
        and was accepted itself, the measured per-depth / per-rank acceptance that `specdec tune`
        builds trees from (counted on the device at every step, read here)."""
        if self._counts is not None:
            counts = self._counts.tolist()
            self._counts = None
            for i, choice in enumerate(self.choices):
                o, a = self._path_stats.get(choice, (0, 0))
                self._path_stats[choice] = (o + counts[0][i], a + counts[1][i])
        return self._path_stats

    def update(self, ctx: ProposeContext, tree: DraftTree, result, features=None) -> None:
        """Count, per choice, how often it was offered (its parent accepted) and accepted, on the
        device (no host read a step): `path_stats`."""
        B, N = tree.tokens.shape
        on_path = torch.zeros(B, N + 1, dtype=torch.bool, device=tree.device)
        on_path.scatter_(1, torch.where(result.accepted_indices >= 0, result.accepted_indices, N), True)
        on_path[:, 0] = True
        offered = on_path.gather(1, tree.parents.clamp(min=0)) & tree.valid()
        n = len(self.choices)
        counts = torch.stack([offered[:, 1 : n + 1].sum(0), on_path[:, 1 : n + 1].sum(0)])  # [2, n]
        self._counts = counts if self._counts is None else self._counts + counts

    @torch.inference_mode()
    def propose(self, ctx: ProposeContext) -> DraftTree:
        if ctx.hidden is None:
            raise RuntimeError("Medusa needs the target's last hidden state (the engine provides it)")
        dev = ctx.hidden.device
        sampled = self.sampled_trees is not False and not bool(ctx.params.greedy.all())  # host parameters: no sync
        graphable = self._graphs is not None and ctx.batch_size <= BATCH_BUCKETS[-1]
        if graphable and (not sampled or (isinstance(ctx.rng, RowSeeds) and not ctx.params.warpers)):
            return self._propose_graphed(ctx, sampled)
        roots = to_device(ctx.roots(), dev)
        logits = self.heads(ctx.hidden, self.lm_head)  # [B, K, V]
        candidates = topk_last(logits, self.top_k)[1]  # [B, K, top_k]
        tree = DraftTree.from_choices(roots, candidates, self.choices)
        if not sampled:
            return tree
        return self._sampled(tree, logits, ctx.params.to(dev), ctx.rng)

    def _propose_graphed(self, ctx: ProposeContext, sampled: bool) -> DraftTree:
        """The heads, their top-k, the tree and (sampled rows) its draws as one CUDA graph per
        (batch bucket, tree, sampling filters): the hidden state, roots and, when sampled, the rows'
        parameters and RowSeeds counters are its inputs; the tree comes out padded to its node
        bucket, so the engine pads nothing."""
        # host tensors (roots, parameters, counters): GraphedCalls packs them into one transfer
        rows = {"hidden": ctx.hidden, "roots": ctx.roots()}
        filters = None
        if sampled:
            p = ctx.params
            rows.update({f: getattr(p, f) for f in SamplingParams._TENSORS})
            rows["seeds"] = ctx.rng.seeds.to(torch.long)
            rows["steps"] = ctx.rng.step.to(torch.long)
            filters = p.filters
        key = ("medusa", tuple(self.choices), filters)
        held = self._held.setdefault(key, [])

        def run(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            logits = self.heads(t["hidden"], self.lm_head)  # [B, K, V]
            candidates = topk_last(logits, self.top_k)[1]
            tree = DraftTree.from_choices(t["roots"], candidates, self.choices, keep=held)
            if filters is not None:
                params = SamplingParams(*(t[f] for f in SamplingParams._TENSORS), filters=filters)
                tree = self._sampled(tree, logits, params, RowSeeds(t["seeds"], t["steps"]), keep=held)
            return tree.bucket_fields()

        out = self._graphs(key, run, ctx.batch_size, rows, {}, owner=self.lm_head, device=ctx.hidden.device)
        return DraftTree.from_fields(out, max(len(c) for c in self.choices), has_wor=sampled)

    def _draw_plan(self, width: int, dev: torch.device, keep: list | None = None) -> dict:
        """From the static choices, on the host once per (tree, device): for each node its parent's
        slot among the nodes with children and its draw number among its siblings; for each such
        parent the head whose q its children come from; the most draws any parent makes."""
        key = (tuple(self.choices), width, str(dev))
        if self._plan_key == key:
            if keep is not None and all(x is not self._plan for x in keep):
                keep.append(self._plan)
            return self._plan
        paths = sorted({tuple(c) for c in self.choices}, key=lambda c: (len(c), c))  # from_choices' order
        index, parent, depth = {(): 0}, [-1], [0]
        for i, c in enumerate(paths, start=1):
            index[c] = i
            parent.append(index[c[:-1]])
            depth.append(len(c))
        if len(parent) != width:
            raise RuntimeError(f"Medusa tree of {width} nodes, but its choices make {len(parent)}")
        holders = sorted(set(parent[1:]))
        slot = {p: j for j, p in enumerate(holders)}
        seen: dict[int, int] = {}
        sibling = []
        for p in parent:
            sibling.append(seen.get(p, 0))
            seen[p] = seen.get(p, 0) + 1
        long = dict(dtype=torch.long, device=dev)
        self._plan_key, self._plan = key, {
            "slot": torch.tensor([slot.get(p, 0) for p in parent], **long),
            "sibling": torch.tensor(sibling, **long),  # the root's 0: it draws nothing
            "holder_depth": torch.tensor([depth[p] for p in holders], **long),
            "draws": max(seen[p] for p in holders),
        }
        if keep is not None:  # a graph reads the plan: its owner keeps it past the next plan
            keep.append(self._plan)
        return self._plan

    def _sampled(
        self, tree: DraftTree, logits: torch.Tensor, params: SamplingParams, rng, keep: list | None = None
    ) -> DraftTree:
        """The same tree shape with the sampled rows' children drawn without replacement from each
        head's processed q (the row's temperature / top-k / top-p): the children of one node are the
        first draws of one Gumbel-top-k sequence, in sibling order (WOR law, verified with that q);
        greedy rows keep their top-k children (POINT). Noise and the top-k are drawn per node that
        has children ([B, P, V], P parents), not per node. params: on the logits' device; rng: the
        rows' RowSeeds (or a generator, eagerly); keep: see `_draw_plan`."""
        B, K, V = logits.shape
        dev = logits.device
        q = process_logits(logits, params)  # [B, K, V] head d's q for the nodes at depth d + 1
        plan = self._draw_plan(tree.width, dev, keep)
        P = plan["holder_depth"].shape[0]
        u = uniform(rng, B, P * V, STREAM_DRAFT + 32, device=dev).view(B, P, V) + 2.0**-25
        keys = torch.log(q[:, plan["holder_depth"]].float()) - torch.log(-torch.log(u)).float()  # [B, P, V]
        draws = topk_last(keys, plan["draws"])[1]  # [B, P, s]: each parent's draw order
        drawn = draws[:, plan["slot"], plan["sibling"]]  # [B, N]: node i = draw sibling[i] of its parent
        depth = tree.depth[0]
        node_q = q[:, (depth - 1).clamp(min=0)]  # [B, N, V]: the q each node is drawn from
        sampled = ~params.greedy[:, None] & (depth > 0)[None, :]
        tokens = torch.where(sampled, drawn, tree.tokens)
        q_x = node_q.gather(2, tokens[:, :, None])[:, :, 0]
        law = torch.where(sampled & (q_x > 0), int(Law.WOR), int(Law.POINT)).to(torch.int8)
        return DraftTree(
            tokens=tokens,
            parents=tree.parents,
            depth=tree.depth,
            num_nodes=tree.num_nodes,
            law=law,
            draft_probs=torch.where((depth > 0)[None, :, None], node_q, 0.0),
            _max_depth=tree._max_depth,
            _has_wor=True,
        )
