"""EAGLE: a one-layer drafter on the target's features, with EAGLE-2 dynamic trees or a chain.

State per row: the drafter's own paged KV (one layer, a BlockManager of its own) and the target
features it has not consumed yet. Drafter entry e reads (token x_{e+1}, target feature f_e) and
predicts x_{e+2}; a row with L committed tokens has L - 1 entries once caught up, the last of
which (the root's) predicts the first draft. Drafted nodes never enter the paged cache: their K/V
live for one proposal, and the accepted ones are recomputed from the target's true features on
the next catch-up (as in EAGLE), so rejected drafts need no rollback.

Trees (default): greedy rows get EAGLE-2's top-k expansion scored by the drafter's cumulative
log-probabilities (POINT law, exact verification against the target); when a row samples, the
tree's children are drawn without replacement from the drafter's processed q (WOR law, verified
with that q), which keeps acceptance at T > 0 (`sampled_trees=False` forces top-k trees). On a
GPU both kinds of tree are drafted inside one CUDA graph with the catch-up. Chain mode: argmax
drafts for greedy rows and, for sampled rows, draws from the drafter's processed q (IID law).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache.block_manager import BlockManager
from ..cache.paged_kv import PagedKVCache
from ..devices import to_device
from ..heads.eagle import EagleDrafter, load_eagle
from ..runtime import fusion
from ..runtime.base import AttentionMetadata, TargetModel
from ..runtime.fusion import fusable, fused_forwards
from ..runtime.graphs import BATCH_BUCKETS, GraphedCalls
from ..runtime.hf import paged_attention
from ..runtime.metadata import prefill_metadata, slots_of
from ..sampling import RowSeeds, SamplingParams, process_logits, uniform
from ..tree import DraftTree
from ..verify import VerifyResult
from .base import STREAM_DRAFT, Needs, ProposeContext, Proposer, chain_draws, register_proposer

STREAM_TREE = STREAM_DRAFT + 64  # the uniform() stream of the sampled trees' Gumbel noise (all levels)


class _TreeAttend:
    """Attention of drafted nodes: every committed drafter entry of the row, then the drafted nodes
    that a step's mask [B, T, M] marks (the node's ancestors and itself). Keys accumulate per call;
    `step(mask)` is the attention function of one drafter call."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        self.k, self.v, self.valid = k, v, valid  # [B, Hkv, P, D] x2, [B, P]

    def step(self, mask: torch.Tensor):
        return lambda module, q, k, v: self(module, q, k, v, mask)

    def __call__(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.k = torch.cat([self.k, k.to(self.k.dtype)], 2)
        self.v = torch.cat([self.v, v.to(self.v.dtype)], 2)
        B, Hq, T, _ = q.shape
        mask = torch.cat([self.valid[:, None, :].expand(B, T, -1), mask], 2)  # [B, T, P + M]
        rep = Hq // self.k.shape[1]
        keys, values = self.k.repeat_interleave(rep, 1), self.v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask[:, None], scale=module.scaling
        )
        return out.transpose(1, 2)


CATCH_UP_BUCKET = 8  # new drafter entries per row that a captured step takes (accepted path + root)


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Pending feature pieces [m_i, F] as one [m, F] (one piece, the common case: no copy)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _width_bucket(entries: int) -> int:
    """The gathered prefix width of a captured step: a power of two >= entries (at least 64)."""
    return max(64, 1 << (max(entries, 1) - 1).bit_length())


@register_proposer("eagle")
class Eagle(Proposer):
    """Draft with an EAGLE-1/2 or EAGLE-3 drafter (heads.eagle.EagleDrafter).

    Parameters
    ----------
    drafter : an EagleDrafter (see `from_pretrained` for checkpoint folders).
    depth : drafting steps (the deepest draft), >= 1.
    top_k : EAGLE-2 expansion width: children per expanded node and frontier size.
    total_tokens : draft nodes kept per tree (root excluded), <= top_k + (depth - 1) * top_k**2.
    chain : draft a chain of `depth` tokens instead of a tree (top_k / total_tokens unused).

    The defaults are the EAGLE repository's setting `depth=5, top_k=10, total_token=60`: its depth
    counts the expansions after the root's top-k, ours the tree levels. The tree has 61 nodes, which
    verification pads to 64.
    """

    needs = Needs.FEATURES

    def __init__(
        self,
        drafter: EagleDrafter,
        depth: int = 6,
        top_k: int = 10,
        total_tokens: int = 60,
        chain: bool = False,
    ):
        if not isinstance(drafter, EagleDrafter):
            raise TypeError(f"drafter must be an EagleDrafter, got {type(drafter).__name__}")
        if depth < 1 or top_k < 1:
            raise ValueError(f"need depth >= 1 and top_k >= 1; got depth={depth}, top_k={top_k}")
        pool = top_k + (depth - 1) * top_k * top_k
        if not chain and not 1 <= total_tokens <= pool:
            raise ValueError(f"total_tokens={total_tokens} must be in [1, {pool}] for depth={depth}, top_k={top_k}")
        if not chain and top_k > drafter.draft_vocab_size:
            raise ValueError(f"top_k={top_k} exceeds the draft vocabulary ({drafter.draft_vocab_size})")
        self.drafter = drafter
        self.depth, self.top_k, self.total_tokens, self.chain = depth, top_k, total_tokens, chain
        self.bm: BlockManager | None = None
        self.cache: PagedKVCache | None = None
        self.pending: dict[int, list[torch.Tensor]] = {}  # features not yet consumed, [m, F] pieces
        self.embed = None
        self.lm_head = None
        self.kernels = False
        # capture the drafting step on a CUDA device (settable: False runs it eagerly; a GraphedCalls
        # instance is used as it is, on any device: the CPU tests pass one with capture=False)
        self.graphs: bool | GraphedCalls = True
        # trees of sampled rows: True / None (default) draw children without replacement from q
        # (exact, keeps acceptance at T > 0); False keeps EAGLE-2's top-k trees at every temperature
        self.sampled_trees: bool | None = None
        self._draft_ids: torch.Tensor | None = None  # [Vd] target id of each draft id (EAGLE-3)
        # rows whose last catch-up was launched from a step in flight (`Ahead`): its entries are
        # reserved and written, and committed once that step's tokens are read back (`update`)
        self._inflight: set[int] = set()
        self._graphs: GraphedCalls | None = None  # the tree expansion's CUDA graphs (on a GPU)
        # the drafter's RMSNorms and SiLU MLP as the fused Triton kernels on a GPU (runtime.fusion),
        # and its cos / sin from a table (`EagleDrafter.use_rope_table`); settable, to measure them
        self.fuse = True
        self.rope_table = True
        self._fused: list = []
        self._fused_key: tuple | None = None  # what _fused was computed for (start recomputes it on a change)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        depth: int = 6,
        top_k: int = 10,
        total_tokens: int = 60,
        chain: bool = False,
        revision: str | None = None,
    ) -> Eagle:
        """A SafeAILab / vLLM / SGLang / specdec EAGLE folder, or a Hugging Face Hub id at `revision`;
        EAGLE-1/2 vs 3 is read from its config."""
        drafter = load_eagle(path, revision=revision)
        return cls(drafter, depth=depth, top_k=top_k, total_tokens=total_tokens, chain=chain)

    @property
    def version(self) -> int:
        return self.drafter.version

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def pipelines(self) -> bool:
        # a step in flight emits up to depth + 1 tokens: the captured catch-up takes that many
        return self._graphs is not None and self.depth + 1 <= CATCH_UP_BUCKET

    @property
    def max_nodes(self) -> int:
        if self.chain:
            return self.depth + 1
        if self.sampled_trees is False:
            return self.total_tokens + 1
        wide, children = self._sampled_shape()
        return max(self.total_tokens, self.top_k + (self.depth - 1) * wide * children) + 1

    def _sampled_shape(self) -> tuple[int, int]:
        """A sampled tree's shape after the root's top_k draws: each further level expands the
        `wide` best nodes so far with `children` draws each, within about total_tokens nodes."""
        per_level = max((self.total_tokens - self.top_k) // max(self.depth - 1, 1), 1)
        children = 2 if per_level >= 2 else 1
        return max(1, min(per_level // children, self.top_k)), children

    def _sampled(self, ctx: ProposeContext) -> bool:
        """Draw this step's tree from q (some row samples and sampled trees are on)."""
        if self.chain or self.sampled_trees is False:
            return False
        return not bool(ctx.params.greedy.all())  # host parameters: no sync

    # ----------------------------------------------------------------------------- lifecycle

    def start(self, target: TargetModel, *, block_size: int, num_blocks: int, max_blocks_per_row: int) -> None:
        model = target.model
        d = self.drafter
        H = int(model.config.hidden_size)
        if d.version == 1 and d.hidden_size != H:
            raise ValueError(f"EAGLE-1/2 drafter hidden size {d.hidden_size} != target hidden size {H}")
        if d.version == 3 and d.fc.in_features != 3 * H:
            raise ValueError(f"EAGLE-3 drafter fuses {d.fc.in_features // 3}-wide features; the target's are {H}")
        if int(d.config.vocab_size) != target.vocab_size:
            raise ValueError(f"EAGLE drafter vocabulary {d.config.vocab_size} != target vocabulary {target.vocab_size}")
        self.feature_layers = d.feature_layers(target.num_layers)
        param = next(model.parameters())
        d.to(device=param.device, dtype=param.dtype).eval()
        self.embed = d.embed_tokens if d.embed_tokens is not None else model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        if d.version == 3 and (self._draft_ids is None or self._draft_ids.device != param.device):
            # made once: a captured drafting step reads it (a new tensor each call left the graphs
            # of a reused proposer indexing freed memory: out-of-bounds asserts at T > 0 on the GPU)
            self._draft_ids = d.target_ids(torch.arange(d.draft_vocab_size, device=param.device))
        self.kernels = param.device.type == "cuda"
        if isinstance(self.graphs, GraphedCalls):
            self._graphs = self.graphs
        elif self.kernels and self.graphs:
            self._graphs = self._graphs or GraphedCalls()
        else:
            self._graphs = None
        if self.bm is None or self.bm.num_blocks < num_blocks or self.bm.block_size != block_size:
            self.bm = BlockManager(num_blocks, block_size)
            self.cache = PagedKVCache(1, num_blocks, block_size)
        # the deepest position a step reads: a full row, the catch-up's padding and the tree's levels
        positions = max_blocks_per_row * block_size + CATCH_UP_BUCKET + self.depth + 2
        old = d.cos_sin
        d.use_rope_table(positions if self.rope_table else None, param.dtype)
        own_graphs = self._graphs is not None and self._graphs is not self.graphs
        if old is not None and d.cos_sin is not old and own_graphs:
            self._graphs = GraphedCalls()  # graphs captured on the old table would read freed memory
        # the drafter itself, not its id: a freed drafter's id can be given to a new one
        key = (d, self.kernels, self.fuse, fusion.FUSE_ROPE)
        old_key = self._fused_key
        if old_key is None or old_key[0] is not d or old_key[1:] != key[1:]:  # a module walk and two
            # disassemblies: once, not at every call
            self._fused, self._fused_key = (fusable(d) if self.kernels and self.fuse else []), key

    def prefill(self, seq_ids: list[int], prompts: list[torch.Tensor], features=None) -> None:
        if features is None:
            raise RuntimeError("EAGLE needs the target's features at the prompt (the engine provides them)")
        for s, f in zip(seq_ids, features, strict=True):
            self.pending[s] = [f]  # consumed lazily by the first propose, once the first token is known

    def update(self, ctx: ProposeContext, tree: DraftTree, result: VerifyResult, features=None) -> None:
        """Keep the target's features [B, N, F] along the accepted path (root first): the next
        catch-up's input. When the proposal in flight already caught up on them (result.consumed),
        commit the drafter entries it wrote instead: one per token the step emitted."""
        if result.consumed:
            for s, emitted in zip(ctx.seq_ids, result.host_emitted, strict=True):
                if s not in self._inflight:
                    raise RuntimeError(f"EAGLE row {s}: a consumed step, but no catch-up in flight")
                self._inflight.discard(s)
                self.bm.commit(s, emitted)
            return
        feats = features
        if feats is None:
            raise RuntimeError("EAGLE needs the target's features of the verified tree (the engine provides them)")
        B, _, Fw = feats.shape
        acc = result.accepted_indices.to(feats.device).clamp(min=0)
        idx = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=feats.device), acc], 1)
        path = feats.gather(1, idx[:, :, None].expand(-1, -1, Fw))  # [B, E, F]
        for b, (s, n) in enumerate(zip(ctx.seq_ids, result.accepted_counts(), strict=True)):
            self.pending.setdefault(s, []).append(path[b, : n + 1])

    def release(self, seq_ids: list[int]) -> None:
        for s in seq_ids:
            self.pending.pop(s, None)
            self._inflight.discard(s)
            if s in self.bm:
                self.bm.free(s)

    def finish(self) -> None:
        self.pending.clear()
        self._inflight.clear()

    # ----------------------------------------------------------------------------- drafting

    def _catch_up(self, ctx: ProposeContext) -> torch.Tensor:
        """Run the drafter over every entry it has not seen (paged, committed); -> root hidden [B, H]."""
        dev = self.embed.weight.device
        seqs = ctx.seq_ids
        toks = [h[1:] for h in ctx.histories]  # entry e reads token e + 1
        feats = [torch.cat(self.pending.pop(s)) for s in seqs]
        done = []
        for s, t, f in zip(seqs, toks, feats, strict=True):
            n = len(t) - len(f)
            if s not in self.bm:
                self.bm.allocate(s, t.tolist(), share=False)
            else:
                _, copies = self.bm.reserve(s, len(f))
                self.cache.copy_blocks(copies)
            if self.bm.num_tokens(s) != n:
                raise RuntimeError(f"EAGLE row {s}: {self.bm.num_tokens(s)} entries cached, expected {n}")
            done.append(n)
        ids, pos, meta = prefill_metadata(self.cache, self.bm, seqs, toks, done, dev, self.kernels)
        B, T = ids.shape
        x = torch.zeros(B, T, feats[0].shape[-1], dtype=feats[0].dtype, device=dev)
        for b, f in enumerate(feats):
            x[b, T - len(f) :] = f

        def attend(module, q, k, v):
            return paged_attention(module, q, k, v, None, scaling=module.scaling, specdec_meta=meta)[0]

        h = self.drafter(self.embed(ids), x, pos, attend, from_target=True)
        for s, t, n in zip(seqs, toks, done, strict=True):
            self.bm.commit(s, t[n:].tolist())
        return h[:, -1]

    def _tree_attend(self, tables: torch.Tensor, committed: torch.Tensor, width: int) -> _TreeAttend:
        """The committed entries' K/V gathered once per proposal: tables [B, W] and committed [B] on
        the device, width >= the longest row (a bucket when graphed: padding entries are masked)."""
        B = committed.shape[0]
        pos = torch.arange(width, device=committed.device).expand(B, width)
        pos = torch.where(pos < committed[:, None], pos, -1)
        k, v = self.cache.gather(0, slots_of(tables, pos, self.bm.block_size))
        return _TreeAttend(k, v, pos >= 0)

    def _draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.drafter.logits(hidden, self.lm_head).float()

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., Vd] draft-vocabulary logits -> [..., V] (-inf outside the draft vocabulary)."""
        if self._draft_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], int(self.drafter.config.vocab_size)), float("-inf"))
        full[..., self._draft_ids] = logits
        return full

    @torch.inference_mode()
    def propose(self, ctx: ProposeContext) -> DraftTree:
        with fused_forwards(self._fused):  # captured graphs record the fused kernels
            return self._propose(ctx)

    def _propose(self, ctx: ProposeContext) -> DraftTree:
        dev = self.embed.weight.device
        B = ctx.batch_size
        roots = to_device(ctx.roots(), dev)
        if ctx.ahead is not None:  # the engine pipelines only when `pipelines`: captured, within the bucket
            return self._propose_graphed(ctx, roots, self._sampled(ctx))
        if int(ctx.max_drafts.max()) < 1:  # every row emits its last token: nothing to draft
            return DraftTree.chain(roots, torch.zeros(B, 0, dtype=torch.long, device=dev))
        new = [sum(len(f) for f in self.pending[s]) for s in ctx.seq_ids]
        sampled = self._sampled(ctx)
        draws = sampled or (self.chain and not bool(ctx.params.greedy.all()))  # host parameters: no sync
        if (
            self._graphs is not None
            and B <= BATCH_BUCKETS[-1]
            and (not draws or self._graphable_sampling(ctx))
            and max(new) <= CATCH_UP_BUCKET
            and all(s in self.bm for s in ctx.seq_ids)
        ):
            return self._propose_graphed(ctx, roots, sampled)
        h_root = self._catch_up(ctx)  # [B, H]
        lengths = [self.bm.num_tokens(s) for s in ctx.seq_ids]
        graphs = self._graphs if B <= BATCH_BUCKETS[-1] else None  # no graph takes more rows
        # graphed: the gathered prefix is padded to a power of two, so a few graphs serve every length
        width = max(lengths) if graphs is None else _width_bucket(max(lengths))
        inputs = {
            "h_root": h_root,
            "roots": roots,
            "committed": to_device(torch.tensor(lengths), dev),
            "tables": to_device(self.bm.block_tables(ctx.seq_ids, width=self.bm.blocks_needed(width)), dev),
        }
        if self.chain:
            return self._chain(ctx, inputs, width)
        if sampled:
            return self._sampled_tree(ctx, inputs, width)
        expand = self._expansion(width)
        if graphs is None:
            out = expand(inputs)
        else:
            key = ("tree", width, self.depth, self.top_k, self.total_tokens)
            out = graphs(key, expand, B, inputs, {}, owner=self.cache.k)
        return DraftTree.from_fields(out, self.depth, has_wor=False)

    @staticmethod
    def _graphable_sampling(ctx: ProposeContext) -> bool:
        """A sampled tree can be captured when its noise is a function of device tensors (RowSeeds,
        what the engine passes) and its processing of q has no transformers warper (host code)."""
        return isinstance(ctx.rng, RowSeeds) and not ctx.params.warpers

    def _propose_graphed(self, ctx: ProposeContext, roots: torch.Tensor, sampled: bool = False) -> DraftTree:
        """Catch-up and tree expansion as one CUDA graph per prefix-width bucket: every row has at
        most CATCH_UP_BUCKET new entries (after a step: the accepted path and the root). The host
        only reserves the entries' slots, pads them into [B, C] arrays and commits them after.
        sampled: the expansion draws children from q (`_sampled_tree`), its per-row parameters and
        RowSeeds counters are inputs of the graph, and one graph serves any mix of temperatures."""
        dev = roots.device
        B, C = ctx.batch_size, CATCH_UP_BUCKET
        seqs = ctx.seq_ids
        if ctx.ahead is not None:
            inputs, done, width = self._ahead_inputs(ctx)
        else:
            feats = [_joined(self.pending.pop(s)) for s in seqs]
            Fw = feats[0].shape[-1]
            tokens = torch.zeros(B, C, dtype=torch.long)
            x = torch.zeros(B, C, Fw, dtype=feats[0].dtype, device=dev)
            done, ends = [], []
            for b, (s, h, f) in enumerate(zip(seqs, ctx.histories, feats, strict=True)):
                m = len(f)
                n = len(h) - 1 - m  # entry e reads token e + 1: a row with L tokens has L - 1 entries
                self._reserve_entries(s, n, m)
                tokens[b, :m] = h[n + 1 :]
                x[b, :m] = f
                done.append(n)
                ends.append(n + m)
            width = _width_bucket(max(ends))
            # host tensors: GraphedCalls packs them per dtype into one transfer
            inputs = {
                "tokens": tokens,
                "feats": x,
                "done": torch.tensor(done),
                "count": torch.tensor([len(f) for f in feats]),
                "tables": self.bm.block_tables(seqs, width=self.bm.blocks_needed(width)),
                "roots": ctx.roots(),
            }
        filters, chain = None, None
        if self.chain:  # (drafts, all greedy): greedy batches draw no coins; always depth drafts (the
            # tree keeps max_drafts of them), so a call's last steps need no graphs of their own
            chain = (self.depth, bool(ctx.params.greedy.all()))
            inputs["max_drafts"] = ctx.max_drafts.long()
        if sampled or chain is not None:
            params = ctx.params
            rng = ctx.rng if isinstance(ctx.rng, RowSeeds) else RowSeeds(torch.zeros(B), torch.zeros(B))  # greedy
            inputs.update({f: getattr(params, f) for f in SamplingParams._TENSORS})
            inputs["seeds"] = rng.seeds.to(torch.long)
            inputs["steps"] = rng.step.to(torch.long)
            filters = params.filters
        key = ("step", width, C, self.depth, self.top_k, self.total_tokens, filters, chain)
        fn = self._catch_up_and_expand(width, filters, chain)
        out = self._graphs(key, fn, B, inputs, {}, owner=self.cache.k, device=dev)
        if ctx.ahead is None:
            for s, h, n in zip(seqs, ctx.histories, done, strict=True):
                self.bm.commit(s, h[n + 1 :].tolist())
        # else: the entries are committed when the step in flight is read back (`update`)
        if chain is not None:
            return DraftTree.from_fields(out, chain[0], has_wor=False)
        return DraftTree.from_fields(out, self.depth, has_wor=sampled)

    def _reserve_entries(self, s: int, n: int, m: int) -> None:
        """Room for m new drafter entries of row s after its n committed ones (a captured catch-up
        writes them; they are committed after it)."""
        if self.bm.num_tokens(s) != n:
            raise RuntimeError(f"EAGLE row {s}: {self.bm.num_tokens(s)} entries cached, expected {n}")
        _, copies = self.bm.reserve(s, m)
        self.cache.copy_blocks(copies)

    def _ahead_inputs(self, ctx: ProposeContext) -> tuple[dict[str, torch.Tensor], list[int], int]:
        """The captured step's inputs when the step before is still in flight (`ctx.ahead`): its
        emitted tokens, their count and the target's features along its accepted path (root first)
        stay on the device; the host knows where each row's new entries start (the histories end
        before the step in flight) and reserves room for the most the step can emit. Returns the
        inputs, each row's committed entries and the gathered prefix width."""
        a = ctx.ahead
        C, E = CATCH_UP_BUCKET, a.max_emit
        if E > C:
            raise RuntimeError(f"a step in flight emits up to {E} tokens; the captured catch-up takes {C}")
        done = []
        for s, h in zip(ctx.seq_ids, ctx.histories, strict=True):
            n = len(h) - 1  # entry e reads token e + 1: a row with L tokens has L - 1 entries
            self._reserve_entries(s, n, E)
            self._inflight.add(s)
            done.append(n)
        B, Fw = a.features.shape[0], a.features.shape[-1]
        path = torch.cat([a.accepted_indices.new_zeros(B, 1), a.accepted_indices.clamp(min=0)], 1)[:, :E]  # [B, E]
        feats = a.features.gather(1, path[:, :, None].expand(-1, -1, Fw))  # [B, E, F]
        width = _width_bucket(max(done) + E)
        inputs = {
            "tokens": F.pad(a.tokens.clamp(min=0), (0, C - E)),  # [B, C] on the device
            "feats": F.pad(feats, (0, 0, 0, C - E)),  # [B, C, F]
            "done": torch.tensor(done),
            "count": a.count,
            "tables": self.bm.block_tables(ctx.seq_ids, width=self.bm.blocks_needed(width)),
            "roots": a.roots,
        }
        return inputs, done, width

    def _catch_up_and_expand(
        self, width: int, filters: tuple[bool, bool, bool] | None = None, chain: tuple[int, bool] | None = None
    ):
        """The captured step of `_propose_graphed`: the drafter over each row's new entries
        (tokens, feats [B, C(, F)], right-padded to count [B], after done [B] committed ones;
        their K/V written into the drafter's pages, not in warm-up runs), then `_expansion`, or,
        with the rows' sampling filters, `_sampled_expansion`, or, chain = (drafts, all greedy),
        `_chain_drafts` (-> drafts [B, K], q [B, K, V])."""
        bs = self.bm.block_size
        expand = self._expansion(width)

        def run(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            tokens, done, count, tables = t["tokens"], t["done"], t["count"], t["tables"]
            B, C = tokens.shape
            col = torch.arange(C, device=tokens.device)
            valid = (col < count[:, None]) & t["live"][:, None]  # warm-up runs write nothing
            pos = done[:, None] + col
            slots = slots_of(tables, torch.where(valid, pos, -1), bs)
            causal = col[None, :, None] >= col[None, None, :]
            meta = AttentionMetadata(
                cache=self.cache,
                write_slots=slots,
                q_positions=pos,
                block_tables=tables.int(),
                prefix_lens=done.int(),
                new_slots=slots.int(),
                new_mask=causal & valid[:, None, :],
                max_prefix=tables.shape[1] * bs,
            )

            def attend(module, q, k, v):
                return paged_attention(module, q, k, v, None, scaling=module.scaling, specdec_meta=meta)[0]

            h = self.drafter(self.embed(tokens), t["feats"], pos, attend, from_target=True)  # [B, C, H]
            last = (count - 1).clamp(min=0)
            h_root = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
            u = {"h_root": h_root, "roots": t["roots"], "committed": done + count, "tables": tables}
            if filters is None:
                return expand(u)
            params = SamplingParams(*(t[f] for f in SamplingParams._TENSORS), filters=filters)
            rng = RowSeeds(t["seeds"], t["steps"])
            if chain is not None:
                K = chain[0]
                drafts, q, law = self._chain_drafts(u, width, K, params, chain[1], rng)
                num = t["max_drafts"].clamp(max=K)
                return DraftTree.chain(t["roots"], drafts, law, q, num_drafts=num, has_wor=False).bucket_fields()
            return self._sampled_expansion(u, width, params, rng)

        return run

    def _expansion(self, width: int):
        """EAGLE-2's tree expansion as a function of tensors (captured as one CUDA graph per prefix
        width on the GPU): root hidden [B, H], roots [B], committed [B], tables [B, W] -> the tree's
        tokens, parents, depth [B, N]."""

        def run(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            expand = self._expander(t, width, target_vocab=False)
            root_lp = torch.log_softmax(self._draft_logits(t["h_root"]), -1)
            tree = DraftTree.from_topk_expansion(t["roots"], root_lp, expand, self.depth, self.top_k, self.total_tokens)
            if self.drafter.version == 3:
                tree.tokens = torch.cat([tree.tokens[:, :1], self.drafter.target_ids(tree.tokens[:, 1:])], 1)
            return tree.bucket_fields()

        return run

    def _expander(self, t: dict[str, torch.Tensor], width: int, target_vocab: bool):
        """The drafter over a frontier: expand(tokens [B, k], parent slot in the last frontier [B, k])
        -> draft log-probs [B, k, Vd] of their children (tokens in draft ids), or, target_vocab, logits
        over the target's vocabulary [B, k, V] (tokens in target ids)."""
        h_root = t["h_root"]
        dev = h_root.device
        B, H = h_root.shape
        attend = self._tree_attend(t["tables"], t["committed"], width)
        root_pos = t["committed"] - 1
        state = {"hidden": h_root[:, None], "anc": torch.zeros(B, 1, 0, dtype=torch.bool, device=dev), "step": 0}

        def expand(tokens: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
            k = tokens.shape[1]
            state["step"] += 1
            feats = state["hidden"].gather(1, parent[:, :, None].expand(-1, -1, H))
            prev = state["anc"]
            anc = prev.gather(1, parent[:, :, None].expand(-1, -1, prev.shape[2]))
            anc = torch.cat([anc, torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)], 2)
            positions = (root_pos + state["step"])[:, None].expand(B, k)
            emb = self.embed(tokens if target_vocab else self.drafter.target_ids(tokens))
            h = self.drafter(emb, feats, positions, attend.step(anc), from_target=False)
            state["hidden"], state["anc"] = h, anc
            if target_vocab:
                return self._to_target_vocab(self._draft_logits(h))
            return torch.log_softmax(self._draft_logits(h), -1)

        return expand

    def _sampled_tree(self, ctx: ProposeContext, t: dict[str, torch.Tensor], width: int) -> DraftTree:
        """Children drawn without replacement from the drafter's processed q (the rows' own
        temperature / top-k / top-p) at T > 0, top-k at T = 0: `DraftTree.from_sampled_expansion`."""
        dev = t["roots"].device
        out = self._sampled_expansion(t, width, ctx.params.to(dev), ctx.rng)
        return DraftTree.from_fields(out, self.depth, has_wor=True)

    def _sampled_expansion(self, t: dict[str, torch.Tensor], width: int, params: SamplingParams, rng):
        """`_sampled_tree` as a function of tensors (root hidden [B, H], roots [B], committed [B],
        tables [B, W], the rows' parameters, RowSeeds counters or a generator) -> the tree's fields
        as a dict [B, ...]: captured in the drafting graph when rng is a RowSeeds."""
        dev = t["roots"].device
        B = t["roots"].shape[0]
        wide, children = self._sampled_shape()
        V = int(self.drafter.config.vocab_size)
        # every level's Gumbel noise in one draw (level 0: [B, 1, V], then [B, wide, V] per level):
        # one counter hash instead of one per level, ~60 fewer tiny kernels a level on the GPU
        sizes = [V] + [wide * V] * (self.depth - 1)
        u = uniform(rng, B, sum(sizes), STREAM_TREE, device=dev) + 2.0**-25  # [B, sum(sizes)] in (0, 1)
        gumbel = -torch.log(-torch.log(u)).float()

        def noise(level: int, shape: tuple[int, ...]) -> torch.Tensor:
            start = sum(sizes[:level])
            return gumbel[:, start : start + sizes[level]].reshape(shape)

        def process(logits: torch.Tensor) -> torch.Tensor:  # [B, m, V]: params [B] broadcast per row
            return process_logits(logits, params)

        root_logits = self._to_target_vocab(self._draft_logits(t["h_root"]))
        expand = self._expander(t, width, target_vocab=True)
        tree = DraftTree.from_sampled_expansion(
            t["roots"], root_logits, expand, process, noise, params.greedy, self.depth, self.top_k, wide, children
        )
        return tree.bucket_fields()

    def _chain(self, ctx: ProposeContext, t: dict[str, torch.Tensor], width: int) -> DraftTree:
        """The eager chain (no graphs, or a step the graph cannot take)."""
        dev = t["roots"].device
        K = self.depth  # as the captured chain: depth drafts, the tree keeps max_drafts of them
        all_greedy = bool(ctx.params.greedy.all())  # host parameters: no sync
        drafts, q, law = self._chain_drafts(t, width, K, ctx.params.to(dev), all_greedy, ctx.rng)
        num = to_device(ctx.max_drafts, dev).clamp(max=K)
        return DraftTree.chain(t["roots"], drafts, law, q, num_drafts=num, has_wor=False)

    def _chain_drafts(
        self, t: dict[str, torch.Tensor], width: int, K: int, params: SamplingParams, all_greedy: bool, rng
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K chained drafts from the root hidden state (t as in `_expansion`; parameters on the
        device): `chain_draws`' drafts [B, K], q [B, K, V] and law [B]; no host read (captured in the
        drafting graph when rng is a RowSeeds)."""
        h_root = t["h_root"]
        dev, B = h_root.device, h_root.shape[0]
        attend = self._tree_attend(t["tables"], t["committed"], width)
        root_pos = t["committed"] - 1
        state = {"h": h_root}

        def advance(j: int, tok: torch.Tensor) -> torch.Tensor:
            mask = torch.ones(B, 1, j + 1, dtype=torch.bool, device=dev)  # every earlier draft + itself
            emb = self.embed(tok[:, None])
            h = self.drafter(emb, state["h"][:, None], (root_pos + j + 1)[:, None], attend.step(mask), False)
            state["h"] = h[:, 0]
            return self._to_target_vocab(self._draft_logits(state["h"]))

        first = self._to_target_vocab(self._draft_logits(h_root))
        return chain_draws(first, K, params, all_greedy, rng, advance)
