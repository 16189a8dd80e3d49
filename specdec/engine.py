"""The decoding loop: propose -> score the tree -> verify -> commit -> update, for ragged batches.

Rows are admitted while the block pool can hold their worst case (prompt + max_new_tokens + the
proposer's widest tree), so a running row never runs out of blocks; the others wait. Every block
goes back to the pool when a row finishes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache.block_manager import BlockManager, OutOfBlocksError
from .cache.paged_kv import PagedKVCache
from .metrics import SpecStats, sync_time
from .proposers.base import ProposeContext, Proposer, resolve_proposer
from .runtime.graphs import GraphedForward
from .runtime.hf import HFModel
from .runtime.metadata import prefill_metadata, to_device, tree_metadata
from .sampling import RowSeeds, SamplingParams
from .tree import DraftTree, node_bucket
from .validation import require_int
from .verify import TypicalParams, VerifyMode, VerifyResult, verify


@dataclass(slots=True)
class GenerationParams:
    """Resolved per-call settings (api.generate builds them from the user's arguments).

    sampling  SamplingParams [B]; seeds [B] long; stop(row, generated ids) -> bool for stop strings.
    """

    max_new_tokens: int
    sampling: SamplingParams
    seeds: torch.Tensor
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    mode: VerifyMode = VerifyMode.EXACT
    typical: TypicalParams | None = None
    stop: Callable[[int, list[int]], bool] | None = None


@dataclass(slots=True)
class _Row:
    index: int
    seq_id: int
    prompt: torch.Tensor  # [P] long, CPU
    tokens: list[int] = field(default_factory=list)  # prompt + generated; the last is the root
    generated: list[int] = field(default_factory=list)
    presence: torch.Tensor | None = None  # [V] bool, for the repetition penalty
    step: int = 0
    budget: int = 0  # blocks reserved for the worst case
    done: bool = False
    t_first: float = 0.0
    t_last: float = 0.0
    hidden: torch.Tensor | None = None  # [H] the target's final hidden state that produced the root


DEFAULT_POOL_TOKENS = 65536  # a graphed Engine's first KV pool, in tokens (capped by free memory)


def max_tree_nodes(proposer: Proposer | None) -> int:
    """The widest tree (root included, after bucketing) a proposer may draft."""
    return 1 if proposer is None else node_bucket(proposer.max_nodes)


class Engine:
    """Speculative generation for one target model, with a paged KV pool that lives across calls.

    Parameters
    ----------
    model : a transformers causal LM (see runtime.hf.check_supported).
    proposer : None (plain decoding through the same engine), a Proposer or a registered name.
    block_size : KV page size in tokens.
    num_blocks : pool size; None sizes it per call to hold every row at once.
    cuda_graphs : capture the step forward per (batch, tree) bucket; default: on when the model is
        on a CUDA device (the Triton kernels are used there too).
    time_split : synchronise the device around drafting and verification so that SpecStats splits
        the time exactly; default: off on a CUDA device, where a step then syncs once (reading the
        accepted tokens) and the split shows host-side times.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        proposer: Proposer | str | None = None,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        cuda_graphs: bool | None = None,
        time_split: bool | None = None,
    ):
        require_int("block_size", block_size, 1, "tokens per KV page")
        if num_blocks is not None:
            require_int("num_blocks", num_blocks, 1, "or None: sized per call")
        self.target = HFModel(model)
        self.proposer = resolve_proposer(proposer)
        self._busy = threading.Lock()  # one run at a time: an Engine's pool and proposer are not shared
        self.block_size = block_size
        self.fixed_blocks = num_blocks
        self.bm: BlockManager | None = None
        self.cache: PagedKVCache | None = None
        self._next_seq = 0
        self._proposer_rows: set[int] = set()
        self.kernels = self.target.device.type == "cuda"  # Triton paged attention on the GPU
        self.cuda_graphs = self.kernels if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not self.kernels:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self._graphed: GraphedForward | None = None
        self.time_split = not self.kernels if time_split is None else time_split
        self._hidden = self.proposer is not None and "last_hidden" in self.proposer.needs
        self._features: tuple[int, ...] | None = None  # the proposer's feature layers (set per call)
        self._call: tuple[SamplingParams, torch.Tensor, bool] | None = None  # this call's params on the device

    # ----------------------------------------------------------------------------- pool

    def _row_need(self, prompt_len: int, max_new: int) -> int:
        width = max_tree_nodes(self.proposer)
        return -(-(prompt_len + max_new + width) // self.block_size) + 1  # +1: copy-on-write

    def _ensure_pool(self, needs: list[int]) -> None:
        """Make the pool hold these rows' worst cases at once (fixed pools: at least the largest).

        A new pool means new K/V tensors, and CUDA graphs captured on the old ones must be captured
        again; so on a CUDA device an unsized pool starts at DEFAULT_POOL_TOKENS (within a quarter
        of the free memory) and grows by doubling: a reused Engine re-captures O(log) times in its
        life, not at every longer prompt."""
        if self.fixed_blocks is not None:
            total = self.fixed_blocks
            worst = max(needs)
            if worst > total:
                raise OutOfBlocksError(
                    f"one sequence needs up to {worst} blocks of {self.block_size} tokens but the pool has only "
                    f"{total}; raise num_blocks or lower max_new_tokens / the prompt length"
                )
        else:
            total = sum(needs)
            if self.bm is not None and self.bm.num_blocks >= total:
                return
            if self.cuda_graphs:
                grown = 2 * self.bm.num_blocks if self.bm is not None else self._default_blocks()
                total = max(total, grown)
        if self.bm is None or self.bm.num_blocks < total:
            self.bm = BlockManager(total, self.block_size)
            self.cache = self.target.new_cache(total, self.block_size)

    def _default_blocks(self) -> int:
        """The first pool of a graphed Engine: DEFAULT_POOL_TOKENS, or what a quarter of the free
        device memory holds if that is less."""
        blocks = DEFAULT_POOL_TOKENS // self.block_size
        per_token = self.target.kv_bytes_per_token()
        if per_token:
            free, _ = torch.cuda.mem_get_info(self.target.device)
            blocks = min(blocks, int(free // 4 // (per_token * self.block_size)))
        return max(blocks, 1)

    def _graph_width(self, needs: list[int]) -> int:
        """Block-table width of the captured graphs: the longest row the model's positions allow
        (so a longer prompt never needs new graphs), at most the pool."""
        limit = self.target.max_positions
        if limit is None:
            return self.bm.num_blocks
        longest = self.bm.blocks_needed(limit + max_tree_nodes(self.proposer)) + 1
        return min(max(max(needs), longest), self.bm.num_blocks)

    @torch.inference_mode()
    def step_costs(self, sizes: list[int], context: int = 128, reps: int = 5) -> dict[int, float]:
        """Median seconds of one target step over a chain of n nodes after `context` committed tokens,
        for each n in sizes: the verify-cost curve that tree tuning needs (device-synchronised)."""
        dev = self.target.device
        self._ensure_pool([-(-(context + max(sizes)) // self.block_size) + 2])
        sid = -1
        prompt = torch.randint(0, self.target.vocab_size, (context,))
        cached = self.bm.allocate(sid, prompt.tolist())
        try:
            ids, pos, meta = prefill_metadata(self.cache, self.bm, [sid], [prompt], [cached], dev, self.kernels)
            self.target.forward(ids, pos, meta, logits_to_keep=1)
            self.bm.commit(sid, prompt[cached:].tolist())
            graphed = (
                GraphedForward(self.target, self.cache, self.bm.blocks_needed(context + max(sizes)) + 1)
                if self.cuda_graphs
                else None
            )
            costs = {}
            for n in sizes:
                self.bm.reserve(sid, n)
                tree = DraftTree.from_parents([[0] * n], [[-1] + list(range(n - 1))], device=dev)
                positions, meta, _ = tree_metadata(
                    self.cache, self.bm, [sid], tree, dev, self.kernels, gathered=graphed is None
                )
                times = []
                for _ in range(reps + 1):
                    t0 = sync_time(dev)
                    if graphed is not None:
                        graphed.forward(tree.tokens, positions, meta)
                    else:
                        self.target.forward(tree.tokens, positions, meta)
                    times.append(sync_time(dev) - t0)
                costs[n] = sorted(times[1:])[reps // 2]
            return costs
        finally:
            self.bm.free(sid)

    # ----------------------------------------------------------------------------- main loop

    def run(
        self, prompts: list[torch.Tensor], gp: GenerationParams, streamer=None
    ) -> tuple[list[list[int]], SpecStats]:
        """Generate for every prompt [P_b] (CPU long tensors); returns the new tokens per row and the stats.

        One call at a time: a second call while one runs (another thread, or a streamer calling
        back in) raises RuntimeError instead of sharing the pool. Several Engines may run in
        threads of their own, also on one model (their forwards take turns, see runtime.hf).
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "this Engine is already generating (in another thread, or re-entered from a streamer); an Engine "
                "serves one call at a time: build one Engine per thread"
            )
        try:
            self._check_ids(prompts, gp)
            return self._run(prompts, gp, streamer)
        except BaseException:
            if streamer is not None:  # a consumer waiting on the stream (TextIteratorStreamer) must wake up
                with contextlib.suppress(Exception):
                    streamer.end()
            raise
        finally:
            self._busy.release()

    def _check_ids(self, prompts: list[torch.Tensor], gp: GenerationParams) -> None:
        """Token ids must index the embedding and EOS ids the logits: out of range, torch fails deep
        inside (an IndexError on the CPU, a device-side assert that breaks the process's CUDA on a GPU)."""
        V_in, V_out = self.target.input_vocab_size, self.target.vocab_size
        for b, p in enumerate(prompts):
            bad = ((p < 0) | (p >= V_in)).nonzero()
            if len(bad):
                t = int(bad[0, 0])
                raise ValueError(
                    f"row {b}: token id {int(p[t])} at position {t} of its prompt (padding excluded) is outside "
                    f"the model's vocabulary [0, {V_in})"
                )
        for e in gp.eos_token_ids:
            # an id >= V can never be drawn (harmless, as in transformers) unless min_new_tokens must ban it
            if e < 0 or (e >= V_out and gp.min_new_tokens > 0):
                raise ValueError(f"eos_token_id {e} is outside the model's vocabulary [0, {V_out})")

    def _run(
        self, prompts: list[torch.Tensor], gp: GenerationParams, streamer=None
    ) -> tuple[list[list[int]], SpecStats]:
        dev = self.target.device
        stats = SpecStats(
            proposer=self.proposer.name if self.proposer else "none",
            lossy=gp.mode is VerifyMode.TYPICAL,
            num_sequences=len(prompts),
        )
        rows = []
        for b, p in enumerate(prompts):
            rows.append(_Row(index=b, seq_id=self._next_seq, prompt=p, tokens=p.tolist()))
            self._next_seq += 1
        needs = [self._row_need(len(p), gp.max_new_tokens) for p in prompts]
        self._ensure_pool(needs)
        if self.proposer is not None:
            self.proposer.start(
                self.target,
                block_size=self.block_size,
                num_blocks=self.bm.num_blocks,
                max_blocks_per_row=self._graph_width(needs),
            )
            if "features" in self.proposer.needs:
                if not self.proposer.feature_layers:
                    raise RuntimeError(f"{type(self.proposer).__name__} needs features but set no feature_layers")
                self._features = tuple(self.proposer.feature_layers)
        if self.cuda_graphs:
            g = self._graphed
            if (
                g is None
                or g.cache is not self.cache
                or g.max_blocks < max(needs)
                or g.last_hidden != self._hidden
                or g.feature_layers != self._features
            ):
                self._graphed = GraphedForward(
                    self.target, self.cache, self._graph_width(needs), self._hidden, self._features
                )
        use_presence = bool((gp.sampling.repetition_penalty != 1).any())
        if use_presence:
            for r in rows:
                r.presence = torch.zeros(self.target.vocab_size, dtype=torch.bool, device=dev)
                r.presence[r.prompt.to(dev)] = True
        self._call = (gp.sampling.to(dev), gp.seeds.to(dev), bool(gp.sampling.greedy.all()))
        t_start = sync_time(dev)
        waiting, active, used = deque(zip(rows, needs, strict=True)), [], 0
        try:
            while waiting or active:
                new = []
                while waiting and used + waiting[0][1] <= self.bm.num_blocks:
                    row, need = waiting.popleft()
                    row.budget, used = need, used + need
                    new.append(row)
                if new:
                    self._prefill(new, gp, stats, t_start, streamer)
                    active += new
                if active:
                    live = [r for r in active if not r.done]
                    if live:
                        self._step(live, gp, stats, streamer)
                    for r in active:
                        if r.done:
                            self._finish(r)
                            used -= r.budget
                    active = [r for r in active if not r.done]
        finally:
            for r in rows:  # normally a no-op; after an error nothing stays allocated
                self._finish(r)
            if self.proposer is not None:
                self.proposer.finish()
        stats.total_time_s = sync_time(dev) - t_start
        stats.generated_tokens = sum(len(r.generated) for r in rows)
        stats.ttft_s = [r.t_first - t_start for r in rows]
        stats.tpot_s = [(r.t_last - r.t_first) / (len(r.generated) - 1) for r in rows if len(r.generated) > 1]
        if streamer is not None:
            streamer.end()
        return [r.generated for r in rows], stats

    def _finish(self, r: _Row) -> None:
        if r.seq_id in self.bm:
            self.bm.free(r.seq_id)
        if r.seq_id in self._proposer_rows:
            self._proposer_rows.discard(r.seq_id)
            self.proposer.release([r.seq_id])
        r.done = True

    # ----------------------------------------------------------------------------- prefill

    def _prefill(self, rows: list[_Row], gp: GenerationParams, stats: SpecStats, t_start: float, streamer) -> None:
        dev = self.target.device
        t0 = sync_time(dev)
        ids = [r.seq_id for r in rows]
        # a proposer that reads features at every prompt position needs every position computed
        share = self._features is None
        cached = [self.bm.allocate(r.seq_id, r.tokens, share=share) for r in rows]
        prompts = [r.prompt for r in rows]
        input_ids, pos, meta = prefill_metadata(self.cache, self.bm, ids, prompts, cached, dev, self.kernels)
        out = self.target.forward(
            input_ids, pos, meta, logits_to_keep=1, last_hidden=self._hidden, features=self._features
        )
        logits = out.logits  # [B, 1, V]
        if self._hidden:
            for b, r in enumerate(rows):
                r.hidden = out.last_hidden[b, -1]
        for r, c in zip(rows, cached, strict=True):
            self.bm.commit(r.seq_id, r.tokens[c:])
        stats.target_forwards += 1
        stats.prompt_tokens += sum(len(p) for p in prompts)
        stats.cached_prompt_tokens += sum(cached)
        # the first token: verify a root-only tree whose root is the last prompt token
        roots = to_device(torch.tensor([r.tokens[-1] for r in rows]), dev)
        tree = DraftTree.chain(roots, torch.zeros(len(rows), 0, dtype=torch.long, device=dev))
        res = self._verify(rows, tree, logits, gp)
        if streamer is not None and len(rows) == 1:
            streamer.put(rows[0].prompt[None])
        t1 = sync_time(dev)
        stats.prefill_time_s += t1 - t0
        for b, r in enumerate(rows):
            kept = self._emit(r, [int(res.next_tokens[b])], gp)
            r.step = 1  # step 0's draws made the first token; every step draws fresh uniforms
            r.t_first = r.t_last = t1
            if streamer is not None and len(rows) == 1 and kept:
                streamer.put(torch.tensor(kept))
        if self.proposer is not None:
            live = [r for r in rows if not r.done]
            if live:
                feats = None
                if self._features is not None:  # left-padded [B, T, F]: row b's prompt is its last P_b
                    T = out.features.shape[1]
                    feats = [out.features[r_i, T - len(r.prompt) :] for r_i, r in enumerate(rows) if not r.done]
                # registered first: a prefill that fails half-way is still released by _finish
                self._proposer_rows.update(r.seq_id for r in live)
                self.proposer.prefill([r.seq_id for r in live], [r.prompt for r in live], features=feats)

    # ----------------------------------------------------------------------------- one step

    def _verify(self, rows: list[_Row], tree: DraftTree, logits: torch.Tensor, gp: GenerationParams) -> VerifyResult:
        dev = logits.device
        sampling, seeds, all_greedy = self._call
        index = [r.index for r in rows]
        if index != list(range(sampling.batch_size)):  # some rows finished or wait: pick the live ones
            idx = torch.tensor(index, device=dev)
            sampling, seeds = sampling.select(idx), seeds[idx]
        mode = gp.mode
        if mode is VerifyMode.EXACT and all_greedy:
            mode = VerifyMode.GREEDY  # the same tokens, without coins or residuals
        steps = None if mode is VerifyMode.GREEDY else to_device(torch.tensor([r.step for r in rows]), dev)
        rng = None if steps is None else RowSeeds(seeds, steps)
        presence = torch.stack([r.presence for r in rows]) if rows[0].presence is not None else None
        suppress = None
        if gp.min_new_tokens > 0 and gp.eos_token_ids:
            made = to_device(torch.tensor([len(r.generated) for r in rows]), dev)
            # the token drawn at a node of depth d is generated token number made + d + 1
            banned = (made[:, None] + tree.depth + 1) <= gp.min_new_tokens  # [B, N]
            suppress = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
            suppress[:, :, list(gp.eos_token_ids)] = banned[:, :, None]
        return verify(
            tree, logits, sampling, mode=mode, presence=presence, rng=rng, typical=gp.typical, suppress=suppress
        )

    def _step(self, rows: list[_Row], gp: GenerationParams, stats: SpecStats, streamer) -> None:
        dev = self.target.device
        B = len(rows)
        clock = sync_time if self.time_split else (lambda _dev: time.perf_counter())
        t0 = clock(dev)
        seq_ids = [r.seq_id for r in rows]
        ctx = None
        if self.proposer is None:  # plain decoding: no history tensors, no context to build
            roots = to_device(torch.tensor([r.tokens[-1] for r in rows]), dev)
            tree = DraftTree.chain(roots, torch.zeros(B, 0, dtype=torch.long, device=dev))
        else:
            idx = torch.tensor([r.index for r in rows])
            ctx = ProposeContext(
                seq_ids=seq_ids,
                histories=[torch.tensor(r.tokens) for r in rows],
                params=gp.sampling.select(idx),
                rng=RowSeeds(gp.seeds[idx], torch.tensor([r.step for r in rows])),
                max_drafts=torch.tensor([gp.max_new_tokens - len(r.generated) - 1 for r in rows]).clamp(min=0),
                hidden=torch.stack([r.hidden for r in rows]) if self._hidden else None,
            )
            tree = self.proposer.propose(ctx).to(dev)
        # trees built on the device are padded by their width: reading num_nodes would sync
        widest = tree.width if tree.num_nodes.device.type == "cuda" else int(tree.num_nodes.max())
        tree = tree.pad_to(node_bucket(widest))
        N = tree.width
        t1 = clock(dev)
        stats.draft_time_s += t1 - t0
        for r in rows:
            _, copies = self.bm.reserve(r.seq_id, N)
            self.cache.copy_blocks(copies)
        graphed = self._graphed
        positions, meta, node_slots = tree_metadata(
            self.cache, self.bm, seq_ids, tree, dev, self.kernels, gathered=graphed is None
        )
        if graphed is not None:
            logits = graphed.forward(tree.tokens, positions, meta)  # [B, N, V]
            hidden, features = graphed.hidden, graphed.features
        else:
            out = self.target.forward(tree.tokens, positions, meta, last_hidden=self._hidden, features=self._features)
            logits, hidden, features = out.logits, out.last_hidden, out.features
        res = self._verify(rows, tree, logits, gp)
        stats.target_forwards += 1
        if self._hidden:  # the hidden state at the end of the accepted path produced the next root
            last = res.accepted_indices.gather(1, (res.num_accepted - 1).clamp(min=0)[:, None]).squeeze(1)
            end = torch.where(res.num_accepted > 0, last, 0)
            final = hidden[torch.arange(B, device=dev), end].clone()
            for b, r in enumerate(rows):
                r.hidden = final[b]
        # compaction: accepted node at depth d moves to logical position L + d
        acc = res.accepted_indices[:, : N - 1]  # [B, K]; a root-only tree accepts nothing
        K = acc.shape[1]
        src = node_slots.gather(1, acc.clamp(min=0))
        dst = node_slots[:, 1 : K + 1]
        self.cache.compact(torch.where(acc >= 0, src, -1), dst)
        t2 = clock(dev)
        stats.verify_time_s += t2 - t1
        # one device -> host transfer for everything the host needs from this step
        E = res.accepted_indices.shape[1] + 1
        depth = torch.where(tree.valid(), tree.depth, 0).flatten().clamp(max=E - 1)
        drafted = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, depth, torch.ones_like(depth))[1:]
        flat = torch.cat(
            [res.emitted_tokens(tree).flatten(), res.num_accepted, drafted, res.accepted_per_depth.sum(0)]
        ).tolist()
        emitted = [flat[b * E : (b + 1) * E] for b in range(B)]
        num_acc = flat[B * E : B * E + B]
        per_depth = flat[B * E + B :]
        t_emit = time.perf_counter()  # the tolist above waited for the device
        if tree.width > 1:
            stats.record_step(per_depth[: E - 1], per_depth[E - 1 :], B, sum(n + 1 for n in num_acc))
        else:
            stats.record_step([], [], B, B)
        if self.proposer is not None:
            ctx.features = features
            self.proposer.update(ctx, tree, res)
        for b, r in enumerate(rows):
            n = num_acc[b]
            new = emitted[b][: n + 1]
            root = r.tokens[-1]
            kept = self._emit(r, new, gp)
            r.step += 1
            r.t_last = t_emit
            if not r.done:
                self.bm.commit(r.seq_id, [root] + new[:n])
            if streamer is not None and B == 1 and kept:
                streamer.put(torch.tensor(kept))

    def _emit(self, r: _Row, tokens: list[int], gp: GenerationParams) -> list[int]:
        """Append tokens until a stop condition; returns the tokens kept."""
        kept = []
        for t in tokens:
            kept.append(t)
            r.generated.append(t)
            r.tokens.append(t)
            if r.presence is not None:
                r.presence[t] = True
            if (
                len(r.generated) >= gp.max_new_tokens
                or t in gp.eos_token_ids
                or (gp.stop is not None and gp.stop(r.index, r.generated))
            ):
                r.done = True
                break
        return kept
