"""The decoding loop: propose -> score the tree -> verify -> commit -> update, for ragged batches.

Rows are admitted while the block pool can hold their worst case (prompt + max_new_tokens + the
proposer's widest tree), so a running row never runs out of blocks; the others wait. Every block
goes back to the pool when a row finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache.block_manager import BlockManager, OutOfBlocksError
from .cache.paged_kv import PagedKVCache
from .devices import to_device
from .metrics import SpecStats, sync_time
from .proposers.base import Ahead, Needs, ProposeContext, Proposer, resolve_proposer
from .runtime.base import ModelOutput
from .runtime.graphs import BATCH_BUCKETS, GraphedCalls, GraphedForward
from .runtime.runner import PagedRunner
from .sampling import RowSeeds, SamplingParams
from .tree import DraftTree, node_bucket
from .validation import require_int
from .verify import TypicalParams, VerifyMode, VerifyResult, process_tree_scores, verify


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
    suppress_tokens: tuple[int, ...] = ()  # never drawn (transformers' suppress_tokens)
    begin_suppress_tokens: tuple[int, ...] = ()  # not drawn as the begin_index-th generated token
    begin_index: int = 1  # 2 when transformers forces a BOS first (a 1-token prompt, forced_bos_token_id)
    # transformers LogitsProcessors called with each tree node's own history (input_ids [n, T] =
    # history_prefix[row] + the row's tokens + the node's path, scores [n, V]) after the repetition
    # penalty: no_repeat_ngram_size, bad_words_ids, forced BOS / EOS, the length penalty, the user's
    processors: tuple = ()
    history_prefix: list[list[int]] | None = None  # per row: the left padding transformers would see
    # output_scores / output_logits: filled per row index with the processed scores and the raw
    # logits ([V] fp32 tensors on the device) of every emitted token, as transformers returns them
    outputs: dict[int, dict[str, list[torch.Tensor]]] | None = None
    output_scores: bool = False
    output_logits: bool = False


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
    emitted: int = 0  # tokens its steps emitted (bonus included; steps = step - 1): its own tau
    drafted: int = 0
    accepted: int = 0


@dataclass(slots=True)
class _Flight:
    """A speculative step launched on the device and not read back yet (`Engine._launch`)."""

    ctx: ProposeContext | None
    tree: DraftTree
    out: ModelOutput  # the target's outputs: static buffers, valid until its next forward
    res: VerifyResult  # kept (cloned) when a later step may be launched before this one lands
    pack: torch.Tensor  # see Engine._pack (kept: cloned)
    host: torch.Tensor | None  # the pack's pinned host copy, in flight (None: read pack itself)
    event: object | None  # a torch.cuda.Event after that copy
    final: torch.Tensor | None  # [B, H] the final hidden states (kept: cloned)
    outputs: list | None  # output_scores / output_logits of the step
    max_emit: int  # E: the most tokens a row emits in this step (K + 1)
    advance: int = 0  # the tree sits after a step in flight that emits up to this many tokens


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
        self.runner = PagedRunner(model, cuda_graphs)  # the target, its pool and its graphs
        self.target = self.runner.model
        self.proposer = resolve_proposer(proposer)
        self._busy = threading.Lock()  # one run at a time: an Engine's pool and proposer are not shared
        self.block_size = block_size
        self.fixed_blocks = num_blocks
        self._next_seq = 0
        self._proposer_rows: set[int] = set()
        self.time_split = not self.runner.kernels if time_split is None else time_split
        self._hidden = self.proposer is not None and Needs.LAST_HIDDEN in self.proposer.needs
        self._features: tuple[int, ...] | None = None  # the proposer's feature layers (set per call)
        # this call's params on the device: sampling, seeds, all greedy, and [3, V] bool token masks
        # (EOS for min_new_tokens, suppress_tokens, begin_suppress_tokens)
        self._call: tuple[SamplingParams, torch.Tensor, bool, torch.Tensor] | None = None
        # plain decoding launches step k + 1 before reading step k's token back (see _plain_run);
        # settable, e.g. to measure what the overlap saves
        self.pipeline = True
        self._root_trees: dict[int, DraftTree] = {}  # root-only tree structure per batch size
        # the step tail (verify, K/V moves, read-back pack) as CUDA graphs after a graphed forward;
        # settable, e.g. to measure what it saves
        self.tail_graphs = True
        self._tails = GraphedCalls()

    @property
    def bm(self) -> BlockManager | None:
        return self.runner.bm

    @property
    def cache(self) -> PagedKVCache | None:
        return self.runner.cache

    @property
    def kernels(self) -> bool:
        """Triton paged attention (on by default on a CUDA device; settable to test it interpreted)."""
        return self.runner.kernels

    @kernels.setter
    def kernels(self, value: bool) -> None:
        self.runner.kernels = value

    @property
    def cuda_graphs(self) -> bool:
        return self.runner.cuda_graphs

    # ----------------------------------------------------------------------------- pool

    def _row_need(self, prompt_len: int, max_new: int) -> int:
        width = max_tree_nodes(self.proposer)
        return -(-(prompt_len + max_new + width) // self.block_size) + 1  # +1: copy-on-write

    def _ensure_pool(self, needs: list[int]) -> None:
        """Make the pool hold these rows' worst cases at once (a fixed pool: at least the largest);
        an unsized pool grows (PagedRunner.ensure_pool), a fixed one is checked."""
        if self.fixed_blocks is None:
            self.runner.ensure_pool(sum(needs), self.block_size, grow=True)
            return
        if max(needs) > self.fixed_blocks:
            raise OutOfBlocksError(
                f"one sequence needs up to {max(needs)} blocks of {self.block_size} tokens but the pool has only "
                f"{self.fixed_blocks}; raise num_blocks or lower max_new_tokens / the prompt length"
            )
        self.runner.ensure_pool(self.fixed_blocks, self.block_size)

    def _graph_width(self, needs: list[int]) -> int:
        return self.runner.graph_width(max(needs), max_tree_nodes(self.proposer))

    def warmup(
        self,
        max_prompt_tokens: int,
        max_new_tokens: int = 128,
        *,
        batch_sizes: tuple[int, ...] | list[int] = (1,),
        **generate_kwargs,
    ) -> int:
        """Pay a first call's one-time costs before serving: size the KV pool for the largest batch
        of rows with max_prompt_tokens + max_new_tokens, compile the kernels and capture the step
        graphs, with short calls on dummy prompts (random ids, fixed seed). A proposer whose graphs
        depend on the context length (EAGLE's drafting step, one graph per power-of-two prefix
        width) gets one call across each width up to the longest row, so later calls within these
        shapes capture nothing (`SpecStats.graph_captures`) and every call runs at steady-state TPOT.

        generate_kwargs are `specdec.generate`'s (do_sample, temperature, top_p, ...): pass those of
        the calls to serve, since sampled and greedy steps are different graphs. On the CPU there are
        no graphs: the calls only allocate the pool. Returns the number of graphs captured.
        Rows of a batch that finish early run in smaller batch buckets: list those in batch_sizes.
        """
        from .api import generate

        require_int("max_prompt_tokens", max_prompt_tokens, 1, "the longest prompt to serve, in tokens")
        require_int("max_new_tokens", max_new_tokens, 1, "the most tokens a call generates")
        for b in batch_sizes:
            require_int("batch_sizes entry", b, 1, "rows per call")
        sizes = sorted(set(batch_sizes), reverse=True)
        if not sizes:
            raise ValueError("batch_sizes is empty; give the batch sizes to serve, e.g. (1,)")
        total = max_prompt_tokens + max_new_tokens
        limit = self.target.max_positions
        if limit is not None and total > limit:
            raise ValueError(
                f"max_prompt_tokens {max_prompt_tokens} + max_new_tokens {max_new_tokens} = {total} exceeds the "
                f"model's {limit} positions (max_position_embeddings)"
            )
        self._ensure_pool([self._row_need(max_prompt_tokens, max_new_tokens)] * sizes[0])
        short = min(16, total - 1)  # tokens per warm-up call: each call crosses one width boundary
        # a prompt of a few tokens (EAGLE catches up on it inside its captured step), the longest,
        # then one call across each prefix width
        lengths, w = {min(4, total - short), min(max_prompt_tokens, total - short)}, 64
        while w // 2 < total:
            lengths.add(max(1, min(w - short // 2, total - short)))
            w *= 2
        g = torch.Generator().manual_seed(0)
        V, dev = self.target.input_vocab_size, self.target.device
        kw = {"min_new_tokens": short, **generate_kwargs, "max_new_tokens": short, "engine": self}
        kw["return_dict_in_generate"] = True
        captures = 0
        for B in sizes:
            for n in sorted(lengths):
                ids = torch.randint(0, V, (B, n), generator=g).to(dev)
                captures += generate(self.target.model, ids, **kw).stats.graph_captures
        return captures

    @torch.inference_mode()
    def step_costs(self, sizes: list[int], context: int = 128, reps: int = 5) -> dict[int, float]:
        """Median seconds of one target step over a chain of n nodes after `context` committed tokens,
        for each n in sizes: the verify-cost curve that tree tuning needs (device-synchronised)."""
        dev = self.target.device
        need = -(-(context + max(sizes)) // self.block_size) + 2
        self._ensure_pool([need])
        self.runner.set_outputs(self._graph_width([need]))
        sid = -1
        try:
            self.runner.prefill([sid], [torch.randint(0, self.target.vocab_size, (context,))])
            costs = {}
            for n in sizes:
                tree = DraftTree.from_parents([[0] * n], [[-1] + list(range(n - 1))], device=dev)
                times = []
                for _ in range(reps + 1):
                    t0 = sync_time(dev)
                    self.runner.forward_tree([sid], tree)
                    times.append(sync_time(dev) - t0)
                costs[n] = sorted(times[1:])[reps // 2]
            return costs
        finally:
            self.runner.free([sid])

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
            with torch.inference_mode():  # the pool's tensors are inference tensors, moved in place
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
        t_call, captures = time.perf_counter(), GraphedForward.captures
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
            if Needs.FEATURES in self.proposer.needs:
                if not self.proposer.feature_layers:
                    raise RuntimeError(f"{type(self.proposer).__name__} needs features but set no feature_layers")
                self._features = tuple(self.proposer.feature_layers)
        self.runner.set_outputs(self._graph_width(needs), self._hidden, self._features)
        use_presence = bool((gp.sampling.repetition_penalty != 1).any())
        if use_presence:
            for r in rows:
                r.presence = torch.zeros(self.target.vocab_size, dtype=torch.bool, device=dev)
                r.presence[r.prompt.to(dev)] = True
        V = self.target.vocab_size
        masks = torch.zeros(3, V, dtype=torch.bool)  # EOS (min_new_tokens), always banned, banned first
        for i, ids in enumerate((gp.eos_token_ids, gp.suppress_tokens, gp.begin_suppress_tokens)):
            masks[i, [t for t in ids if 0 <= t < V]] = True
        self._call = (gp.sampling.to(dev), gp.seeds.to(dev), bool(gp.sampling.greedy.all()), masks.to(dev))
        t_start = sync_time(dev)
        stats.setup_time_s = t_start - t_call
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
                    # pipelined steps run ahead of the host's histories and outputs
                    pipelined = self.pipeline and not use_presence and not gp.processors and gp.outputs is None
                    if live and self.proposer is None and pipelined:
                        self._plain_run(live, gp, stats, streamer)
                    elif live and pipelined and self._spec_pipelines(gp, len(live)):
                        self._spec_run(live, gp, stats, streamer)
                    elif live:
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
        stats.graph_captures = GraphedForward.captures - captures
        stats.generated_tokens = sum(len(r.generated) for r in rows)
        stats.ttft_s = [r.t_first - t_start for r in rows]
        stats.tpot_s = [(r.t_last - r.t_first) / (len(r.generated) - 1) for r in rows if len(r.generated) > 1]
        stats.per_sequence = [
            {
                "generated_tokens": len(r.generated),
                "steps": r.step - 1,
                "tau": r.emitted / (r.step - 1) if r.step > 1 else 0.0,
                "drafted": r.drafted,
                "accepted": r.accepted,
                "acceptance_rate": r.accepted / r.drafted if r.drafted else 0.0,
                "ttft_ms": 1e3 * (r.t_first - t_start),
                "tokens_per_s": len(r.generated) / (r.t_last - t_start) if r.t_last > t_start else 0.0,
            }
            for r in rows
        ]
        if streamer is not None:
            streamer.end()
        return [r.generated for r in rows], stats

    def _finish(self, r: _Row) -> None:
        self.runner.free([r.seq_id])
        if r.seq_id in self._proposer_rows:
            self._proposer_rows.discard(r.seq_id)
            self.proposer.release([r.seq_id])
        r.done = True

    # ----------------------------------------------------------------------------- prefill

    def _prefill(self, rows: list[_Row], gp: GenerationParams, stats: SpecStats, t_start: float, streamer) -> None:
        dev = self.target.device
        t0 = sync_time(dev)
        prompts = [r.prompt for r in rows]
        # a proposer that reads features at every prompt position needs every position computed
        out, cached = self.runner.prefill([r.seq_id for r in rows], prompts, share=self._features is None)
        logits = out.logits  # [B, 1, V]
        if self._hidden:
            for b, r in enumerate(rows):
                r.hidden = out.last_hidden[b, -1]
        stats.target_forwards += 1
        stats.prompt_tokens += sum(len(p) for p in prompts)
        stats.cached_prompt_tokens += sum(cached)
        # the first token: verify a root-only tree whose root is the last prompt token
        roots = to_device(torch.tensor([r.tokens[-1] for r in rows]), dev)
        tree = DraftTree.chain(roots, torch.zeros(len(rows), 0, dtype=torch.long, device=dev))
        res = self._verify(rows, tree, logits, gp)
        outputs = self._path_outputs(rows, tree, logits, res, gp) if gp.outputs is not None else None
        if streamer is not None and len(rows) == 1:
            streamer.put(rows[0].prompt[None])
        t1 = sync_time(dev)
        stats.prefill_time_s += t1 - t0
        for b, r in enumerate(rows):
            kept = self._emit(r, [int(res.next_tokens[b])], gp)
            if outputs is not None:
                self._keep_outputs(r, gp, outputs[b], len(kept))
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

    def _verify_inputs(
        self,
        rows: list[_Row],
        gp: GenerationParams,
        ahead: int = 0,
        host: bool = False,
        made: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The per-row tensors verification reads, on the device: the rows' sampling parameters and
        seeds; their step counters (coins) unless every row is greedy; the tokens each has made
        when min_new_tokens / begin_suppress_tokens need it; the presence masks for the penalty.
        ahead > 0: the step runs that many steps after the rows' host state (a pipelined plain step).
        host: the counters stay on the host (a captured tail packs host inputs into one transfer).
        made [B] (device): tokens a speculative step in flight emits before this one (instead of
        `ahead` in the generated-token count)."""
        dev = self.target.device
        sampling, seeds, all_greedy, _ = self._call
        index = [r.index for r in rows]
        if index != list(range(sampling.batch_size)):  # some rows finished or wait: pick the live ones
            idx = torch.tensor(index, device=dev)
            sampling, seeds = sampling.select(idx), seeds[idx]
        t = {f: getattr(sampling, f) for f in SamplingParams._TENSORS}
        t["seeds"] = seeds
        move = (lambda x: x) if host else (lambda x: to_device(x, dev))
        if self._verify_mode(gp) is not VerifyMode.GREEDY:
            t["steps"] = move(torch.tensor([r.step + ahead for r in rows]))
        if (gp.min_new_tokens > 0 and gp.eos_token_ids) or gp.begin_suppress_tokens:
            if made is None:
                t["made"] = move(torch.tensor([len(r.generated) + ahead for r in rows]))
            else:  # the host's count (packed with the other host rows) + the in-flight count on the device
                t["made"] = move(torch.tensor([len(r.generated) for r in rows]))
                t["made_ahead"] = made
        if rows[0].presence is not None:
            t["presence"] = torch.stack([r.presence for r in rows])
        return t

    def _ban_masks(self, gp: GenerationParams) -> dict[str, torch.Tensor]:
        """This call's [3, V] token masks (EOS for min_new_tokens, suppressed, suppressed first) when
        any is used: an input of the step tail, never a tensor its graph holds (a later call's
        masks are new tensors)."""
        if gp.suppress_tokens or (gp.min_new_tokens > 0 and gp.eos_token_ids) or gp.begin_suppress_tokens:
            return {"masks": self._call[3]}
        return {}

    def _verify_mode(self, gp: GenerationParams) -> VerifyMode:
        if gp.mode is VerifyMode.EXACT and self._call[2]:
            return VerifyMode.GREEDY  # every row greedy: the same tokens, without coins or residuals
        return gp.mode

    def _verify_tensors(
        self,
        tree: DraftTree,
        logits: torch.Tensor,
        t: dict[str, torch.Tensor],
        gp: GenerationParams,
        processors=None,
    ) -> VerifyResult:
        """Verify a scored tree from `_verify_inputs`' tensors (a pure function of them: captured
        in the step tail's graph)."""
        sampling = self._sampling(t)
        rng = RowSeeds(t["seeds"], t["steps"]) if "steps" in t else None
        return verify(
            tree,
            logits,
            sampling,
            mode=self._verify_mode(gp),
            presence=t.get("presence"),
            rng=rng,
            typical=gp.typical,
            suppress=self._suppress(tree, logits, t, gp),
            processors=processors,
        )

    def _sampling(self, t: dict[str, torch.Tensor]) -> SamplingParams:
        sampling_all = self._call[0]
        return SamplingParams(
            *(t[f] for f in SamplingParams._TENSORS), filters=sampling_all.filters, warpers=sampling_all.warpers
        )

    @staticmethod
    def _suppress(tree: DraftTree, logits: torch.Tensor, t: dict[str, torch.Tensor], gp: GenerationParams):
        """[B, N, V] bool tokens banned at each node (suppress_tokens, EOS before min_new_tokens,
        begin_suppress_tokens), or None; from the call's device masks: no host index list, no sync."""
        masks = t.get("masks")
        bans = [masks[1]] if gp.suppress_tokens else []  # [V]
        if "made" in t:
            made = t["made"] + t["made_ahead"] if "made_ahead" in t else t["made"]  # [B]
            number = made[:, None] + tree.depth + 1  # [B, N]: the generated token a node's children are
            if gp.min_new_tokens > 0 and gp.eos_token_ids:
                bans.append((number <= gp.min_new_tokens)[:, :, None] & masks[0])  # [B, N, V]
            if gp.begin_suppress_tokens:
                bans.append((number == gp.begin_index)[:, :, None] & masks[2])
        return functools.reduce(torch.logical_or, bans).expand(logits.shape) if bans else None

    def _path_outputs(
        self, rows: list[_Row], tree: DraftTree, logits: torch.Tensor, res: VerifyResult, gp: GenerationParams
    ) -> list[dict[str, torch.Tensor]]:
        """output_scores / output_logits of one verified step: per row, the raw logits and the
        processed scores [n + 1, V] (fp32) at the nodes the emitted tokens were drawn at (the root,
        then the accepted path)."""
        t = {**self._verify_inputs(rows, gp), **self._ban_masks(gp)}
        path = torch.cat([torch.zeros_like(res.num_accepted)[:, None], res.accepted_indices.clamp(min=0)], 1)
        out = []
        scores = None
        if gp.output_scores:
            scores = process_tree_scores(
                tree,
                logits,
                self._sampling(t),
                t.get("presence"),
                self._suppress(tree, logits, t, gp),
                self._node_processors(rows, tree, gp),
            )
        for b in range(len(rows)):
            row = {}
            if gp.output_logits:
                row["logits"] = logits[b, path[b]].float()
            if scores is not None:
                row["scores"] = scores[b, path[b]].float()
            out.append(row)
        return out

    @staticmethod
    def _keep_outputs(r: _Row, gp: GenerationParams, step: dict[str, torch.Tensor], kept: int) -> None:
        slot = gp.outputs.setdefault(r.index, {"scores": [], "logits": []})
        for name, rows in step.items():
            slot[name].extend(rows[:kept].unbind(0))

    def _node_processors(self, rows: list[_Row], tree: DraftTree, gp: GenerationParams):
        """scores [B, N, V] -> scores with gp.processors applied at every valid node, each called
        with the node's own history: the row's tokens (root last), then the drafted tokens on the
        path to the node; nodes of one row and depth share one call. Reads the tree on the host
        (one sync a step) and calls each processor ~depth times per row: the price of exactness."""
        if not gp.processors:
            return None
        tokens, parents, num = tree.tokens.tolist(), tree.parents.tolist(), tree.num_nodes.tolist()

        def apply(scores: torch.Tensor) -> torch.Tensor:
            out = scores.clone()
            for b, r in enumerate(rows):
                history = (gp.history_prefix[r.index] if gp.history_prefix else []) + r.tokens
                paths: list[list[int]] = [[]]
                groups: dict[int, list[int]] = {0: [0]}
                for i in range(1, num[b]):
                    paths.append(paths[parents[b][i]] + [tokens[b][i]])
                    groups.setdefault(len(paths[i]), []).append(i)
                for nodes in groups.values():
                    ids = torch.tensor([history + paths[i] for i in nodes], dtype=torch.long, device=scores.device)
                    x = out[b, nodes]
                    for proc in gp.processors:
                        x = proc(ids, x)
                    out[b, nodes] = x
            return out

        return apply

    def _verify(self, rows: list[_Row], tree: DraftTree, logits: torch.Tensor, gp: GenerationParams) -> VerifyResult:
        """Verify a scored tree for these rows, eagerly (the prefill's first token)."""
        t = {**self._verify_inputs(rows, gp), **self._ban_masks(gp)}
        return self._verify_tensors(tree, logits, t, gp, self._node_processors(rows, tree, gp))

    # ----------------------------------------------------------------------------- the step tail

    _TREE_FIELDS = DraftTree._FIELDS

    def _tail_fn(self, tree: DraftTree, gp: GenerationParams, processors=None):
        """The step after the target's forward, as a function of tensors: verify, move the accepted
        path's K/V, pick the final hidden state, and pack what the host reads back. Captured as one
        graph per (batch bucket, tree shape, settings) when the forward ran in a graph."""
        K_bound, has_wor = tree._max_depth, tree._has_wor
        hidden = self._hidden

        def run(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            tr = DraftTree(*(t.get(f) for f in self._TREE_FIELDS), _max_depth=K_bound, _has_wor=has_wor)
            res = self._verify_tensors(tr, t["logits"], t, gp, processors)
            N = tr.width
            acc = res.accepted_indices[:, : N - 1]  # [B, K]; a root-only tree accepts nothing
            slots = t["node_slots"]
            src = torch.where((acc >= 0) & t["live"][:, None], slots.gather(1, acc.clamp(min=0)), -1)
            self.runner.compact(src, slots[:, 1 : acc.shape[1] + 1])
            out = {
                "accepted_indices": res.accepted_indices,
                "num_accepted": res.num_accepted,
                "next_tokens": res.next_tokens,
                "is_bonus": res.is_bonus,
                "pack": self._pack(tr, res),
            }
            if hidden:
                last = res.accepted_indices.gather(1, (res.num_accepted - 1).clamp(min=0)[:, None]).squeeze(1)
                end = torch.where(res.num_accepted > 0, last, 0)
                out["final"] = t["last_hidden"][torch.arange(tr.batch_size, device=end.device), end]
            return out

        return run

    @staticmethod
    def _pack(tree: DraftTree, res: VerifyResult) -> torch.Tensor:
        """[B, 3 K + 3] long, the step's read-back per row: emitted tokens [K + 1] (-1 pads),
        accepted count, drafted count, drafted nodes per depth 1..K, accepted per depth 1..K."""
        B, E = tree.batch_size, res.accepted_indices.shape[1] + 1
        depth = torch.where(tree.valid(), tree.depth, 0).clamp(max=E - 1)
        per_depth = torch.zeros(B, E, dtype=torch.long, device=depth.device).scatter_add_(
            1, depth, torch.ones_like(depth)
        )
        return torch.cat(
            [
                res.emitted_tokens(tree),
                res.num_accepted[:, None],
                (tree.num_nodes.to(depth.device) - 1)[:, None],
                per_depth[:, 1:],
                res.accepted_per_depth.long(),
            ],
            1,
        )

    def _tail(
        self,
        rows: list[_Row],
        tree: DraftTree,
        out: ModelOutput,
        node_slots: torch.Tensor,
        gp: GenerationParams,
        ahead: int = 0,
        made: torch.Tensor | None = None,
    ) -> tuple[VerifyResult, torch.Tensor, torch.Tensor | None]:
        """Run the step tail: through a captured graph after a graphed forward, else eagerly
        (`ahead`, `made`: see `_verify_inputs`). Returns the VerifyResult (graphed: static buffers, valid
        until the next replay), the pack (see `_pack`) and the final hidden states [B, H] (or None)."""
        c = self.runner.captured
        sampling = self._call[0]
        # eager: a forward that ran eagerly, the repetition penalty (its presence masks grow per
        # token on the host side), transformers' warpers (objects the key cannot see into) and
        # history processors (called on the host's token lists)
        eager = c is None or rows[0].presence is not None or sampling.warpers or gp.processors or not self.tail_graphs
        t = self._verify_inputs(rows, gp, ahead, host=not eager, made=made)
        for f in self._TREE_FIELDS:
            if getattr(tree, f) is not None:
                t[f] = getattr(tree, f)
        tree.max_depth(), tree.has_wor()  # known by the builders; else a sync here, not in the graph
        fn = self._tail_fn(tree, gp, self._node_processors(rows, tree, gp))
        if eager:
            live = torch.ones(len(rows), dtype=torch.bool, device=node_slots.device)
            fixed = {"logits": out.logits, "node_slots": node_slots, "live": live}
            if self._hidden:
                fixed["last_hidden"] = out.last_hidden
            o = fn({**t, **fixed, **self._ban_masks(gp)})
        else:
            fixed = {"logits": c.logits, "node_slots": c.node_slots}
            if self._hidden:
                fixed["last_hidden"] = c.hidden
            key = (
                self._verify_mode(gp),
                None if gp.typical is None else (gp.typical.posterior_threshold, gp.typical.posterior_alpha),
                sampling.filters,
                bool(gp.suppress_tokens),
                gp.min_new_tokens if gp.eos_token_ids else 0,
                gp.begin_index if gp.begin_suppress_tokens else 0,
                tree._max_depth,
                tree._has_wor,
                self._hidden,
            )
            o = self._tails(key, fn, len(rows), t, fixed, self._ban_masks(gp), owner=self.runner.graphs)
        res = VerifyResult(
            o["accepted_indices"],
            o["num_accepted"],
            o["next_tokens"],
            o["is_bonus"],
            lossy=gp.mode is VerifyMode.TYPICAL,
        )
        return res, o["pack"], o.get("final")

    def _step(self, rows: list[_Row], gp: GenerationParams, stats: SpecStats, streamer) -> None:
        """One speculative step for the live rows: propose, score, verify, commit, update, emit."""
        self._land(rows, self._launch(rows, gp, stats), gp, stats, streamer)

    def _launch(
        self, rows: list[_Row], gp: GenerationParams, stats: SpecStats, prev: _Flight | None = None, keep: bool = False
    ) -> _Flight:
        """Propose, score and verify one step; the device works on, the host reads nothing back.

        prev: a step still in flight that this one follows (the proposer drafts from its device
        outputs, the tree sits after the tokens it will commit: `PagedRunner.forward_tree`'s
        advance). keep: a later step may be launched before this one lands, so the outputs the
        landing reads (and the next launch starts from) are copied out of the graphs' static buffers.
        """
        clock = sync_time if self.time_split else (lambda _dev: time.perf_counter())
        dev = self.target.device
        t0 = clock(dev)
        ctx, tree = self._propose(rows, gp, prev)
        t1 = clock(dev)
        stats.draft_time_s += t1 - t0
        seq_ids = [r.seq_id for r in rows]
        count = None
        if prev is None:
            out, node_slots = self.runner.forward_tree(seq_ids, tree)  # score: [B, N, V]
        else:
            count = ctx.ahead.count  # the tokens the step in flight commits first
            out, node_slots = self.runner.forward_tree(seq_ids, tree, advance=count, max_advance=prev.max_emit)
        res, pack, final = self._tail(rows, tree, out, node_slots, gp, ahead=int(prev is not None), made=count)
        outputs = self._path_outputs(rows, tree, out.logits, res, gp) if gp.outputs is not None else None
        stats.target_forwards += 1
        host = event = None
        if keep:  # the tail's outputs are static buffers that the next launch's replay overwrites
            res = VerifyResult(
                res.accepted_indices.clone(),
                res.num_accepted.clone(),
                res.next_tokens.clone(),
                res.is_bonus.clone(),
                lossy=res.lossy,
            )
            pack = pack.clone()
            final = final.clone() if final is not None else None
            if pack.device.type == "cuda":
                host = torch.empty(pack.shape, dtype=pack.dtype, pin_memory=True)
                host.copy_(pack, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        stats.verify_time_s += clock(dev) - t1
        E = res.accepted_indices.shape[1] + 1  # the most tokens a row emits: the accepted path and one more
        advance = prev.max_emit if prev is not None else 0
        return _Flight(ctx, tree, out, res, pack, host, event, final, outputs, E, advance)

    def _land(
        self,
        rows: list[_Row],
        f: _Flight,
        gp: GenerationParams,
        stats: SpecStats,
        streamer,
        follow: _Flight | None = None,
    ) -> None:
        """Read a launched step back (its one sync), then update the proposer, emit, commit. Rows
        already done (a row that finished while this step was in flight) take nothing from it.
        follow: the step launched after this one, which already consumed its outputs on the device:
        each row keeps that step's reserved slots, and the proposer is told (`VerifyResult.consumed`)."""
        t0 = time.perf_counter()
        if f.event is not None:
            f.event.synchronize()  # this step only: the one launched after it keeps running
        live = [b for b, r in enumerate(rows) if not r.done]
        emitted, num_acc, drafted = self._read_back(f.tree, f.pack if f.host is None else f.host, stats, live)
        res = f.res
        res.host_accepted = num_acc  # proposers read the counts without another device read
        res.host_emitted = [e[: n + 1] for e, n in zip(emitted, num_acc, strict=True)]
        res.consumed = follow is not None
        t_emit = time.perf_counter()  # the read-back waited for the device
        if f.final is not None:
            final = f.final if follow is not None else f.final.clone()  # kept, or a static buffer of the tail
            for b, r in enumerate(rows):
                r.hidden = final[b]
        if self.proposer is not None:  # features only for proposers that declared them (not yet consumed)
            extra = {"features": None if follow is not None else f.out.features} if self._features is not None else {}
            self.proposer.update(f.ctx, f.tree, res, **extra)
        for b in live:
            r = rows[b]
            root, n = r.tokens[-1], num_acc[b]
            new = res.host_emitted[b]
            kept = self._emit(r, new, gp)
            if f.outputs is not None:
                self._keep_outputs(r, gp, f.outputs[b], len(kept))
            r.step += 1
            r.emitted += n + 1  # this row's own tau and acceptance (SpecStats.per_sequence)
            r.drafted += drafted[b]
            r.accepted += n
            r.t_last = t_emit
            if not r.done:
                # a step in flight writes (up to) follow.advance + its nodes after the old length
                ahead = 0 if follow is None else follow.advance + follow.tree.width - (n + 1)
                self.runner.commit(r.seq_id, [root] + new[:n], keep=ahead)
            if streamer is not None and len(rows) == 1 and kept:
                streamer.put(torch.tensor(kept))
        stats.verify_time_s += time.perf_counter() - t0

    # ----------------------------------------------------------------------------- speculative steps, pipelined

    def _spec_pipelines(self, gp: GenerationParams, batch: int) -> bool:
        """Speculative steps may be launched ahead of the host: the proposer drafts from device
        outputs, and no host code needs the tokens of the step before (transformers' warpers run
        on the host). Not for more rows than the largest graph bucket: the captured proposals that
        start from a step in flight take at most that many."""
        return self.proposer.pipelines and not self._call[0].warpers and batch <= BATCH_BUCKETS[-1]

    def _spec_run(self, rows: list[_Row], gp: GenerationParams, stats: SpecStats, streamer) -> None:
        """Speculative steps until a row finishes, each launched before the previous one is read
        back: the proposer drafts step n + 1 from step n's outputs on the device (`Ahead`), the
        target scores its tree after the tokens step n will commit (a device-side advance of the
        committed length), and the host lands step n (read back, update, emit, commit) while the
        device works on step n + 1. The trees, tokens and coins are those of `_step`, one step at a
        time: step n + 1 is launched only while every row has room for both steps' tokens, so its
        drafts are never cut by max_new_tokens (the drafting limit is the same in both loops).

        At most one step is in flight. When a row finishes, the step in flight still lands for the
        other rows (the finished row's share is dropped: it wrote only into its own slots)."""
        room = self.proposer.max_depth + 1  # the most tokens one more step emits
        flight = self._launch(rows, gp, stats, keep=True)
        while True:
            follow = None
            if all(len(r.generated) + flight.max_emit + room <= gp.max_new_tokens for r in rows):
                follow = self._launch(rows, gp, stats, prev=flight, keep=True)
            self._land(rows, flight, gp, stats, streamer, follow)
            if follow is None:
                break
            if any(r.done for r in rows):
                self._land(rows, follow, gp, stats, streamer)  # the running rows take its tokens
                break
            flight = follow

    # ----------------------------------------------------------------------------- plain decoding, pipelined

    def _root_tree(self, roots: torch.Tensor) -> DraftTree:
        """The root-only tree of plain decoding: its structure is built once per batch size."""
        B = roots.shape[0]
        base = self._root_trees.get(B)
        if base is None or base.device != roots.device:
            zeros = torch.zeros(B, dtype=torch.long, device=roots.device)
            base = DraftTree.chain(zeros, zeros[:, None][:, :0])
            base.ancestor_mask()  # cached on the structure
            self._root_trees[B] = base
        return dataclasses.replace(base, tokens=roots[:, None])

    def _plain_run(self, rows: list[_Row], gp: GenerationParams, stats: SpecStats, streamer) -> None:
        """Plain decoding steps until a row finishes, each launched before the previous one's token
        is read back: the step's root is the previous step's output on the device, so the host's
        bookkeeping of step k (commit, emit, stop checks) overlaps the device's work on step k + 1.

        At most one step is in flight. When a row finishes, the step in flight still lands for the
        other rows (the finished row's share is dropped: it wrote one K/V slot of its own, freed
        with the row). The tokens and coins are those of `_step`: step k + 1 draws with counter
        r.step + 1 (`_verify`'s ahead).
        """
        t0 = time.perf_counter()
        roots = to_device(torch.tensor([r.tokens[-1] for r in rows]), self.target.device)
        flight = self._launch_plain(rows, roots, gp, stats, ahead=0)
        while True:
            # room for two more tokens in every row: launch the next step before landing this one
            follow = None
            if all(len(r.generated) + 2 <= gp.max_new_tokens for r in rows):
                follow = self._launch_plain(rows, flight[0], gp, stats, ahead=1)
            self._land_plain(rows, flight, gp, stats, streamer, ahead=follow is not None)
            if follow is None:
                break
            if any(r.done for r in rows):
                self._land_plain(rows, follow, gp, stats, streamer, ahead=False)  # the running rows take its token
                break
            flight = follow
        stats.verify_time_s += time.perf_counter() - t0

    def _launch_plain(self, rows: list[_Row], roots: torch.Tensor, gp: GenerationParams, stats: SpecStats, ahead: int):
        """Enqueue one plain step for roots [B] (device) at `ahead` uncommitted positions after each
        row's committed tokens; returns (next tokens [B] on the device, their host copy, its event)."""
        for r in rows:
            self.runner.reserve(r.seq_id, ahead + 1)
        tree = self._root_tree(roots)
        out, node_slots = self.runner.forward_tree([r.seq_id for r in rows], tree, offset=ahead, reserve=False)
        # the step tail's graph (sampled rows: the sampler's few dozen small ops as one replay);
        # its outputs are static buffers, the next launch reads this step's tokens
        res, _, _ = self._tail(rows, tree, out, node_slots, gp, ahead=ahead)
        tokens = res.next_tokens.clone()
        stats.target_forwards += 1
        if tokens.device.type != "cuda":
            return tokens, tokens, None
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return tokens, host, event

    def _land_plain(
        self, rows: list[_Row], flight, gp: GenerationParams, stats: SpecStats, streamer, ahead: bool
    ) -> None:
        """Wait for a launched plain step, then commit each running row's root and emit its token;
        ahead: a later step is in flight, so its reserved slot stays."""
        _, host, event = flight
        if event is not None:
            event.synchronize()  # this step only: the one launched after it keeps running
        tokens = host.tolist()
        t = time.perf_counter()
        live = [b for b, r in enumerate(rows) if not r.done]
        stats.record_step([], [], len(live), len(live), [0] * len(live))
        for b in live:
            r = rows[b]
            root = r.tokens[-1]
            kept = self._emit(r, [tokens[b]], gp)
            r.step += 1
            r.emitted += 1
            r.t_last = t
            if not r.done:
                self.runner.commit(r.seq_id, [root], keep=int(ahead))
            if streamer is not None and len(rows) == 1 and kept:
                streamer.put(torch.tensor(kept))

    # ----------------------------------------------------------------------------- speculative steps

    def _propose(
        self, rows: list[_Row], gp: GenerationParams, prev: _Flight | None = None
    ) -> tuple[ProposeContext | None, DraftTree]:
        """The proposer's tree on the device, padded to its node bucket (plain decoding: the roots);
        prev: the step in flight it starts from (`_launch`)."""
        dev = self.target.device
        if self.proposer is None:  # plain decoding: no history tensors, no context to build
            roots = to_device(torch.tensor([r.tokens[-1] for r in rows]), dev)
            return None, DraftTree.chain(roots, torch.zeros(len(rows), 0, dtype=torch.long, device=dev))
        idx = torch.tensor([r.index for r in rows])
        ahead, hidden, E = None, None, 0
        if prev is not None:
            E = prev.max_emit  # every row has room for E more tokens: the same drafting limit as `_step`'s
            res = prev.res
            ahead = Ahead(
                tokens=prev.pack[:, :E],  # [B, K + 1]: the pack's emitted tokens
                count=res.num_accepted + 1,
                roots=res.next_tokens,
                accepted_indices=res.accepted_indices,  # [B, K]
                features=prev.out.features if self._features is not None else None,
            )
            hidden = prev.final
        elif self._hidden:
            hidden = torch.stack([r.hidden for r in rows])
        ctx = ProposeContext(
            seq_ids=[r.seq_id for r in rows],
            histories=[torch.tensor(r.tokens) for r in rows],
            params=gp.sampling.select(idx),
            rng=RowSeeds(gp.seeds[idx], torch.tensor([r.step + int(prev is not None) for r in rows])),
            max_drafts=torch.tensor([gp.max_new_tokens - len(r.generated) - E - 1 for r in rows]).clamp(min=0),
            hidden=hidden,
            ahead=ahead,
        )
        tree = self.proposer.propose(ctx).to(dev)
        if rows[0].step == 1:  # each call's first tree is checked: a plugin's malformed tree is an error
            tree.validate()
        # trees built on the device are padded by their width: reading num_nodes would sync
        widest = tree.width if tree.num_nodes.device.type == "cuda" else int(tree.num_nodes.max())
        return ctx, tree.pad_to(node_bucket(widest))

    def _read_back(
        self, tree: DraftTree, pack: torch.Tensor, stats: SpecStats, live: list[int] | None = None
    ) -> tuple[list[list[int]], list[int], list[int]]:
        """The step's one device -> host transfer (the pack, see `_pack`, or its pinned copy):
        emitted tokens [B][E], accepted counts [B], drafted counts [B]; the per-depth counts of the
        live rows (default: all) go to the stats."""
        K = (pack.shape[1] - 3) // 3
        every = pack.tolist()
        emitted = [row[: K + 1] for row in every]
        num_acc = [row[K + 1] for row in every]
        row_drafted = [row[K + 2] for row in every]
        flat = every if live is None or len(live) == len(every) else [every[b] for b in live]
        num_live = [row[K + 1] for row in flat]
        B = len(flat)
        if tree.width > 1:
            drafted = [sum(row[K + 3 + d] for row in flat) for d in range(K)]
            accepted = [sum(row[2 * K + 3 + d] for row in flat) for d in range(K)]
            stats.record_step(drafted, accepted, B, sum(n + 1 for n in num_live), num_live)
        else:
            stats.record_step([], [], B, B, num_live)
        return emitted, num_acc, row_drafted

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
