"""DraftModel: a small causal LM with the target's vocabulary drafts a chain on its own paged cache.

Greedy rows draft the argmax (POINT law); sampled rows draw from the draft's processed q with the
target's sampling parameters (IID law, verified with that true q). Rejected drafts are rolled back
by truncating the draft's cache. On a CUDA device a step's catch-up and its K drafts replay as one
CUDA graph (`_propose_graphed`): the host reserves slots and commits, the device does the rest.
With captured steps and a fixed num_tokens the proposer `pipelines`: the engine launches step
n + 1 before it reads step n back, and the captured catch-up takes step n's emitted tokens from the
device (`Ahead`); their K/V are committed when step n lands (`update`, `VerifyResult.consumed`).
"""

from __future__ import annotations

import collections
import dataclasses
import warnings

import torch

from ..devices import to_device
from ..runtime.base import AttentionMetadata, TargetModel
from ..runtime.graphs import BATCH_BUCKETS, GraphedCalls
from ..runtime.hf import HFModel
from ..runtime.metadata import slots_of
from ..runtime.runner import PagedRunner
from ..sampling import RowSeeds, SamplingParams
from ..tree import DraftTree, node_bucket
from ..validation import is_int, require_int
from ..verify import VerifyResult
from .base import ProposeContext, Proposer, chain_draws, draft_chain, register_proposer

VOCAB_PADDING = 0.01  # vocabulary sizes further apart than this fraction are different tokenizers
CATCH_UP_BUCKET = 8  # the most new tokens a captured step catches up per row (a longer catch-up runs eagerly)


@register_proposer("draft")
class DraftModel(Proposer):
    """Draft chains with a smaller transformers causal LM.

    Parameters
    ----------
    model : a transformers *ForCausalLM with the target's tokenizer. Its embedding matrix may be
        padded to another size than the target's (Qwen2.5-0.5B has 151936 rows, 7B 152064): its
        logits are cut or padded (-inf) to the target's width, and an id it has no row for (in
        the other model's padding, which the tokenizer never produces) is fed to it as id 0:
        that only changes its drafts, never the output law.
    num_tokens : tokens drafted per step, or "auto": start at 4, +2 after a fully accepted chain,
        -1 otherwise (transformers' assisted-generation heuristic), within [1, max_tokens].
    max_tokens : the ceiling for "auto".
    """

    def __init__(self, model: torch.nn.Module, num_tokens: int | str = 4, max_tokens: int = 16):
        if num_tokens != "auto" and (not is_int(num_tokens) or num_tokens < 1):
            raise ValueError(f"num_tokens must be an int >= 1 or 'auto', got {num_tokens!r}")
        require_int("max_tokens", max_tokens, 1, "the ceiling of num_tokens='auto'")
        self.model = model
        self.runner = PagedRunner(model)  # the drafter, its own pool and (on a GPU) its graphs
        self.adaptive = num_tokens == "auto"
        self.max_tokens = max_tokens
        self.num_tokens = min(4, max_tokens) if self.adaptive else num_tokens
        self._drafted = 0  # K of the last proposal
        self._target_vocab: int | None = None  # the target's logits width (set by start)
        # capture each step (catch-up + the chain) as one CUDA graph on a GPU (settable: False runs
        # it eagerly; a GraphedCalls instance is used as it is, on any device: the CPU tests pass
        # one with capture=False)
        self.graphs: bool | GraphedCalls = True
        self._graphs: GraphedCalls | None = None
        self._ks: collections.deque[int] = collections.deque()  # K of each proposal not updated yet, oldest first
        self._inflight: set[int] = set()  # rows whose captured catch-up of a step in flight awaits its commit

    @property
    def runtime(self) -> HFModel:
        return self.runner.model

    @property
    def bm(self):
        return self.runner.bm

    @property
    def kernels(self) -> bool:
        return self.runner.kernels

    @kernels.setter
    def kernels(self, value: bool) -> None:
        self.runner.kernels = value

    @property
    def max_nodes(self) -> int:
        return (self.max_tokens if self.adaptive else self.num_tokens) + 1

    @property
    def pipelines(self) -> bool:
        # the captured step catches up on the step in flight's tokens from the device; "auto"
        # changes K when a step lands, so a step drafted ahead would use another K: not pipelined
        return self._graphs is not None and not self.adaptive

    def start(self, target: TargetModel, *, block_size: int, num_blocks: int, max_blocks_per_row: int) -> None:
        Vd, V = self.runtime.vocab_size, target.vocab_size
        if abs(Vd - V) > VOCAB_PADDING * max(Vd, V):
            raise ValueError(
                f"draft vocabulary {Vd} != target vocabulary {V}: the draft model must share the target's tokenizer "
                f"(embedding matrices padded to sizes within {VOCAB_PADDING:.0%} of each other are accepted)"
            )
        self._target_vocab = V
        target_cfg = getattr(target, "model", None)
        for key in ("eos_token_id", "bos_token_id"):
            t = getattr(getattr(target_cfg, "config", None), key, None)
            d = getattr(self.model.config, key, None)
            if t is not None and d is not None and t != d:
                raise ValueError(f"draft {key}={d} but target {key}={t}: the models use different tokenizers")
        self._ks.clear()
        self._inflight.clear()
        self.runner.ensure_pool(num_blocks, block_size)  # the target's pool size: every row fits
        self.runner.set_outputs(max_blocks_per_row)
        if isinstance(self.graphs, GraphedCalls):
            self._graphs = self.graphs
        elif self.graphs and self.runner.cuda_graphs:
            self._graphs = self._graphs or GraphedCalls()
        else:
            self._graphs = None

    def _ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Target ids as the draft's inputs: an id beyond its embedding (padding) becomes 0."""
        n = self.runtime.input_vocab_size
        return ids if n >= self._target_vocab else torch.where(ids < n, ids, 0)

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., Vd] draft logits -> [..., V] the target's width (cut, or padded with -inf)."""
        V, Vd = self._target_vocab, logits.shape[-1]
        if Vd == V:
            return logits
        if Vd > V:
            return logits[..., :V]
        return torch.nn.functional.pad(logits, (0, V - Vd), value=float("-inf"))

    def prefill(self, seq_ids: list[int], prompts: list[torch.Tensor], features=None) -> None:
        self.runner.prefill(seq_ids, [self._ids(p) for p in prompts])

    def propose(self, ctx: ProposeContext) -> DraftTree:
        B = ctx.batch_size
        dev = self.runtime.device
        K = int(min(self.num_tokens, int(ctx.max_drafts.max())))
        self._ks.append(max(K, 0))
        roots = to_device(ctx.roots(), dev)
        if K < 1:  # (a step in flight: its tokens are caught up with the next proposal's history)
            return DraftTree.chain(roots, torch.zeros(B, 0, dtype=torch.long, device=dev))
        if self._capturable(ctx):
            try:
                # the graph always drafts num_tokens (the tree keeps max_drafts of them): one graph,
                # not one per draft count that a call's last steps leave room for
                self._ks[-1] = self.num_tokens
                return self._propose_graphed(ctx, roots, self.num_tokens)
            except RuntimeError as e:  # e.g. MoE experts that copy routing offsets from the host
                if "captur" not in str(e).lower():
                    raise
                self._graphs = None  # this call and later ones draft eagerly (each forward still tries its graph)
                self._inflight.difference_update(ctx.seq_ids)  # the eager path below commits its own catch-up
                warnings.warn(
                    f"the draft model's step cannot be captured in a CUDA graph ({str(e).splitlines()[0]}); "
                    "it runs eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if ctx.ahead is not None:  # no graph for this step: read the step in flight's tokens (one sync)
            a = ctx.ahead
            tokens, count = a.tokens.cpu(), a.count.cpu()
            histories = [torch.cat([h, tokens[b, : int(count[b])]]) for b, h in enumerate(ctx.histories)]
            ctx = dataclasses.replace(ctx, histories=histories, ahead=None)
        # 1. catch up: every committed token the draft has not seen, up to and including the root
        logits = self._logits(self.runner.extend(ctx.seq_ids, [self._ids(h) for h in ctx.histories]))  # [B, V]
        for s in ctx.seq_ids:
            self.runner.reserve(s, K - 1)  # the chain's own K/V; committed in update()

        # 2. one forward per draft after the first, into the reserved slots
        def advance(j: int, tok: torch.Tensor) -> torch.Tensor:
            step = DraftTree.chain(tok, torch.zeros(B, 0, dtype=torch.long, device=dev))
            out, _ = self.runner.forward_tree(ctx.seq_ids, step, offset=j, reserve=False)
            return self._logits(out.logits[:, -1])

        drafts, q, law = draft_chain(logits, K, ctx, advance)
        num = to_device(ctx.max_drafts, dev).clamp(max=K)
        return DraftTree.chain(roots, drafts, law, q, num_drafts=num, has_wor=False)

    def _capturable(self, ctx: ProposeContext) -> bool:
        """One graph can run this step: graphs on, a graph batch bucket, a short catch-up, counter
        randomness for sampled rows and no transformers warpers (objects a graph cannot take)."""
        if self._graphs is None or ctx.batch_size > BATCH_BUCKETS[-1] or ctx.params.warpers:
            return False
        if self.runner.graphs is not None and self.runner.graphs.uncapturable:
            return False
        if not (bool(ctx.params.greedy.all()) or isinstance(ctx.rng, RowSeeds)):  # host parameters: no sync
            return False
        done = [self.bm.num_tokens(s) for s in ctx.seq_ids]
        if ctx.ahead is not None:  # the step in flight's tokens, after every committed one the draft has seen
            seen = all(n == len(h) for h, n in zip(ctx.histories, done, strict=True))
            return seen and ctx.ahead.max_emit <= CATCH_UP_BUCKET
        return max(len(h) - n for h, n in zip(ctx.histories, done, strict=True)) <= CATCH_UP_BUCKET

    def _propose_graphed(self, ctx: ProposeContext, roots: torch.Tensor, K: int) -> DraftTree:
        """The catch-up and the K drafts as one CUDA graph per (batch bucket, K, catch-up bucket):
        the host reserves each row's slots (new tokens + K - 1 drafts), pads the new tokens into a
        [B, W] array and commits them after the launch; nothing waits for the device.

        With a step in flight (`ctx.ahead`) the new tokens are that step's emitted ones, on the
        device (the draft has seen every committed token: `update` committed the last catch-up);
        the host reserves room for the most it can emit, and `update` commits them when it lands."""
        dev = self.runtime.device
        seqs, B = ctx.seq_ids, ctx.batch_size
        done = [self.bm.num_tokens(s) for s in seqs]
        a = ctx.ahead
        if a is not None:
            for s, h, n in zip(seqs, ctx.histories, done, strict=True):
                if n != len(h):
                    raise RuntimeError(f"draft row {s}: {n} tokens cached, expected {len(h)} with a step in flight")
                self.runner.reserve(s, a.max_emit + K - 1)
                self._inflight.add(s)
            W = node_bucket(a.max_emit)
            tokens = torch.nn.functional.pad(a.tokens.clamp(min=0), (0, W - a.max_emit))  # [B, W] on the device
            count = a.count
        else:
            new = [h[n:] for h, n in zip(ctx.histories, done, strict=True)]
            # padded to what one step can emit: the key does not depend on how many were accepted
            W = node_bucket(max(K + 1, *(len(x) for x in new)))
            tokens = torch.zeros(B, W, dtype=torch.long)
            for b, (s, x) in enumerate(zip(seqs, new, strict=True)):
                self.runner.reserve(s, len(x) + K - 1)
                tokens[b, : len(x)] = x
            count = torch.tensor([len(x) for x in new])
        g = self.runner.graphs
        longest = max(len(self.bm.block_table(s)) for s in seqs)
        width = g.max_blocks if g is not None else self.runner.graph_width(longest)
        p = ctx.params
        zeros = torch.zeros(B, dtype=torch.long)
        seeds = ctx.rng if isinstance(ctx.rng, RowSeeds) else RowSeeds(zeros, zeros)  # greedy: no draws
        host = {
            "tokens": tokens,
            "done": torch.tensor(done),
            "count": count,
            "tables": self.bm.block_tables(seqs, width=width),
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
            "repetition_penalty": p.repetition_penalty,
            "seeds": seeds.seeds.long(), "step": seeds.step.long(),
            "roots": ctx.roots(), "max_drafts": ctx.max_drafts.long(),
        }  # fmt: skip
        # host tensors: GraphedCalls packs them per dtype into one transfer
        all_greedy = bool(p.greedy.all())  # host parameters: no sync
        key = ("chain", K, W, all_greedy, tuple(p.filters))
        fn = self._chain_step(K, all_greedy, tuple(p.filters))
        out = self._graphs(key, fn, B, host, {}, owner=self.runner.cache, device=dev)
        if a is None:
            for s, x in zip(seqs, new, strict=True):
                self.runner.commit(s, x.tolist(), keep=K - 1)  # the drafts' K-1 slots stay reserved
        return DraftTree.from_fields(out, K, has_wor=False)

    def _chain_step(self, K: int, all_greedy: bool, filters: tuple[bool, bool, bool]):
        """The captured function of `_propose_graphed`: the catch-up (tokens [B, W], right-padded to
        count [B], after done [B] committed tokens) and K - 1 one-token forwards, with the paged
        metadata derived on the device; K/V written and read only for live rows (warm-up runs write
        nothing; padding rows attend only to the committed prefix their copied inputs point at)."""
        cache, runtime, bs = self.runner.cache, self.runtime, self.bm.block_size

        def run(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            tokens, done, count, tables, live = t["tokens"], t["done"], t["count"], t["tables"], t["live"]
            W = tokens.shape[1]
            col = torch.arange(W, device=tokens.device)
            valid = (col < count[:, None]) & live[:, None]
            pos = done[:, None] + col
            slots = slots_of(tables, torch.where(valid, pos, -1), bs)
            causal = col[None, :, None] >= col[None, None, :]
            meta = AttentionMetadata(
                cache=cache, write_slots=slots, q_positions=pos, block_tables=tables.int(), prefix_lens=done.int(),
                new_slots=slots.int(), new_mask=causal & valid[:, None, :],
                max_prefix=tables.shape[1] * bs,
            )  # fmt: skip
            logits = runtime.forward(self._ids(tokens), pos, meta).logits  # [B, W, Vd]
            last = (count - 1).clamp(min=0)
            logits = self._logits(logits.gather(1, last[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0])
            # padding rows read no further than their catch-up's prefix (their drafts are never written)
            committed = torch.where(live, done + count, done)
            one = live[:, None, None]

            def advance(j: int, tok: torch.Tensor) -> torch.Tensor:
                at = (committed + j)[:, None]
                slot = slots_of(tables, torch.where(live[:, None], at, -1), bs)
                m = AttentionMetadata(
                    cache=cache, write_slots=slot, q_positions=at, block_tables=tables.int(),
                    prefix_lens=torch.where(live, committed + j, done).int(), new_slots=slot.int(), new_mask=one,
                    max_prefix=tables.shape[1] * bs,
                )  # fmt: skip
                return self._logits(runtime.forward(self._ids(tok[:, None]), at, m).logits[:, -1])

            params = SamplingParams(
                t["temperature"], t["top_k"], t["top_p"], t["min_p"], t["repetition_penalty"], filters=filters
            )
            drafts, q, law = chain_draws(logits, K, params, all_greedy, RowSeeds(t["seeds"], t["step"]), advance)
            num = t["max_drafts"].clamp(max=K)
            return DraftTree.chain(t["roots"], drafts, law, q, num_drafts=num, has_wor=False).bucket_fields()

        return run

    def update(self, ctx: ProposeContext, tree: DraftTree, result: VerifyResult, features=None) -> None:
        """Commit the K/V the draft wrote for this step's accepted tokens. When the proposal in
        flight already caught up on them (result.consumed), commit its catch-up instead: the
        tokens this step emitted, with that proposal's K - 1 draft slots kept after them."""
        K = self._ks.popleft() if self._ks else 0  # the engine pads the tree to a node bucket: its width is not K + 1
        if result.consumed:
            keep = max(self._ks[0] - 1, 0) if self._ks else 0  # the proposal in flight's drafts
            for s, emitted in zip(ctx.seq_ids, result.host_emitted, strict=True):
                if s in self._inflight:  # (a proposal that drafted nothing or read the tokens eagerly: none)
                    self._inflight.discard(s)
                    self.runner.commit(s, emitted, keep=keep)
            return
        accepted = result.accepted_counts()  # read back by the engine already: no device read
        fed = tree.tokens[:, 1:K].tolist() if K > 1 else [[] for _ in ctx.seq_ids]
        for s, n, drafts in zip(ctx.seq_ids, accepted, fed, strict=True):
            # valid draft K/V: the history, then the drafts it both fed itself and the target accepted
            self.runner.commit(s, drafts[: min(n, K - 1)])
        if self.adaptive and K > 0:
            full = all(n == int(m) - 1 for n, m in zip(accepted, tree.num_nodes.tolist(), strict=True))
            self.num_tokens = min(self.max_tokens, self.num_tokens + 2) if full else max(1, self.num_tokens - 1)

    def release(self, seq_ids: list[int]) -> None:
        self._inflight.difference_update(seq_ids)
        self.runner.free(seq_ids)  # a row whose prefill failed before its allocation has nothing to free

    def finish(self) -> None:
        self._ks.clear()
        self._inflight.clear()
