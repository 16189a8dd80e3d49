"""DraftModel: a small causal LM with the target's vocabulary drafts a chain on its own paged cache.

Greedy rows draft the argmax (POINT law); sampled rows draw from the draft's processed q with the
target's sampling parameters (IID law, verified with that true q). Rejected drafts are rolled back
by truncating the draft's cache.
"""

from __future__ import annotations

import torch

from ..cache.block_manager import BlockManager
from ..cache.paged_kv import PagedKVCache
from ..runtime.base import TargetModel
from ..runtime.graphs import GraphedForward
from ..runtime.hf import HFModel
from ..runtime.metadata import prefill_metadata, to_device, tree_metadata
from ..sampling import process_logits, sample_from_probs, uniform
from ..tree import DraftTree, Law
from ..validation import is_int, require_int
from ..verify import VerifyResult
from .base import STREAM_DRAFT, ProposeContext, Proposer, register_proposer


@register_proposer("draft")
class DraftModel(Proposer):
    """Draft chains with a smaller transformers causal LM.

    Parameters
    ----------
    model : a transformers *ForCausalLM with the target's vocabulary (same logits size).
    num_tokens : tokens drafted per step, or "auto": start at 4, +2 after a fully accepted chain,
        -1 otherwise (transformers' assisted-generation heuristic), within [1, max_tokens].
    max_tokens : the ceiling for "auto".
    """

    def __init__(self, model: torch.nn.Module, num_tokens: int | str = 4, max_tokens: int = 16):
        if num_tokens != "auto" and (not is_int(num_tokens) or num_tokens < 1):
            raise ValueError(f"num_tokens must be an int >= 1 or 'auto', got {num_tokens!r}")
        require_int("max_tokens", max_tokens, 1, "the ceiling of num_tokens='auto'")
        self.model = model
        self.runtime = HFModel(model)
        self.adaptive = num_tokens == "auto"
        self.max_tokens = max_tokens
        self.num_tokens = min(4, max_tokens) if self.adaptive else num_tokens
        self.bm: BlockManager | None = None
        self.cache: PagedKVCache | None = None
        self.kernels = self.runtime.device.type == "cuda"  # Triton paged attention on the GPU
        self.cuda_graphs = self.kernels
        self._graphed: GraphedForward | None = None  # the drafter's steps, captured on the GPU
        self._drafted = 0  # K of the last proposal

    @property
    def max_nodes(self) -> int:
        return (self.max_tokens if self.adaptive else self.num_tokens) + 1

    def start(self, target: TargetModel, *, block_size: int, num_blocks: int, max_blocks_per_row: int) -> None:
        if self.runtime.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft vocabulary {self.runtime.vocab_size} != target vocabulary {target.vocab_size}: "
                "the draft model must share the target's tokenizer"
            )
        target_cfg = getattr(target, "model", None)
        for key in ("eos_token_id", "bos_token_id"):
            t = getattr(getattr(target_cfg, "config", None), key, None)
            d = getattr(self.model.config, key, None)
            if t is not None and d is not None and t != d:
                raise ValueError(f"draft {key}={d} but target {key}={t}: the models use different tokenizers")
        if self.bm is None or self.bm.num_blocks < num_blocks or self.bm.block_size != block_size:
            self.bm = BlockManager(num_blocks, block_size)
            self.cache = self.runtime.new_cache(num_blocks, block_size)
            self._graphed = None
        g = self._graphed
        if self.cuda_graphs and (g is None or g.max_blocks < max_blocks_per_row):
            self._graphed = GraphedForward(self.runtime, self.cache, max_blocks_per_row)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """[B, T] -> logits of the last position [B, V]; through CUDA graphs on the GPU."""
        if self._graphed is not None:
            return self._graphed.forward(ids, positions, meta)[:, -1]
        return self.runtime.forward(ids, positions, meta, logits_to_keep=1).logits[:, -1]

    def prefill(self, seq_ids: list[int], prompts: list[torch.Tensor], features=None) -> None:
        dev = self.runtime.device
        cached = [self.bm.allocate(s, p.tolist()) for s, p in zip(seq_ids, prompts, strict=True)]
        ids, pos, meta = prefill_metadata(self.cache, self.bm, seq_ids, prompts, cached, dev, self.kernels)
        self.runtime.forward(ids, pos, meta, logits_to_keep=1)
        for s, p, c in zip(seq_ids, prompts, cached, strict=True):
            self.bm.commit(s, p[c:].tolist())

    def propose(self, ctx: ProposeContext) -> DraftTree:
        B = ctx.batch_size
        dev = self.runtime.device
        K = int(min(self.num_tokens, int(ctx.max_drafts.max())))
        self._drafted = max(K, 0)
        roots = to_device(ctx.roots(), dev)
        if K < 1:
            return DraftTree.chain(roots, torch.zeros(B, 0, dtype=torch.long, device=dev))
        params = ctx.params.to(dev)
        # 1. catch up: every committed token the draft has not seen, up to and including the root
        done = [self.bm.num_tokens(s) for s in ctx.seq_ids]
        for s, h, n in zip(ctx.seq_ids, ctx.histories, done, strict=True):
            _, copies = self.bm.reserve(s, len(h) - n)
            self.cache.copy_blocks(copies)
        graphed = self._graphed is not None
        ids, pos, meta = prefill_metadata(
            self.cache, self.bm, ctx.seq_ids, ctx.histories, done, dev, self.kernels, gathered=not graphed
        )
        logits = self._forward(ids, pos, meta)
        for s, h, n in zip(ctx.seq_ids, ctx.histories, done, strict=True):
            self.bm.commit(s, h[n:].tolist())
            _, copies = self.bm.reserve(s, K - 1)  # the chain's own K/V; committed in update()
            self.cache.copy_blocks(copies)
        # 2. draft K tokens, one forward per token after the first
        drafts, qs = [], []
        greedy = params.greedy
        for j in range(K):
            q = process_logits(logits, params)  # [B, V]
            u = uniform(ctx.rng, B, 1, STREAM_DRAFT + j, device=dev)[:, 0]
            tok = torch.where(greedy, q.argmax(-1), sample_from_probs(q, u))
            drafts.append(tok)
            qs.append(q)
            if j == K - 1:
                break
            step = DraftTree.chain(tok, torch.zeros(B, 0, dtype=torch.long, device=dev))
            positions, meta, _ = tree_metadata(
                self.cache, self.bm, ctx.seq_ids, step, dev, self.kernels, gathered=not graphed, offset=j
            )
            logits = self._forward(step.tokens, positions, meta)
        law = torch.where(greedy, int(Law.POINT), int(Law.IID))
        num = to_device(ctx.max_drafts, dev).clamp(max=K)
        return DraftTree.chain(roots, torch.stack(drafts, 1), law, torch.stack(qs, 1), num_drafts=num)

    def update(self, ctx: ProposeContext, tree: DraftTree, result: VerifyResult) -> None:
        K = self._drafted  # the engine pads the tree to a node bucket: its width is not K + 1
        accepted = result.num_accepted.tolist()  # the engine has synchronised already: no wait
        fed = tree.tokens[:, 1:K].tolist() if K > 1 else [[] for _ in ctx.seq_ids]
        for s, n, drafts in zip(ctx.seq_ids, accepted, fed, strict=True):
            # valid draft K/V: the history, then the drafts it both fed itself and the target accepted
            self.bm.commit(s, drafts[: min(n, K - 1)])
        if self.adaptive and K > 0:
            full = all(n == int(m) - 1 for n, m in zip(accepted, tree.num_nodes.tolist(), strict=True))
            self.num_tokens = min(self.max_tokens, self.num_tokens + 2) if full else max(1, self.num_tokens - 1)

    def release(self, seq_ids: list[int]) -> None:
        for s in seq_ids:  # a row whose prefill failed before its allocation has nothing to free
            if self.bm is not None and s in self.bm:
                self.bm.free(s)
