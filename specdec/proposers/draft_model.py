"""DraftModel: a small causal LM with the target's vocabulary drafts a chain on its own paged cache.

Greedy rows draft the argmax (POINT law); sampled rows draw from the draft's processed q with the
target's sampling parameters (IID law, verified with that true q). Rejected drafts are rolled back
by truncating the draft's cache.
"""

from __future__ import annotations

import torch

from ..devices import to_device
from ..runtime.base import TargetModel
from ..runtime.hf import HFModel
from ..runtime.runner import PagedRunner
from ..tree import DraftTree
from ..validation import is_int, require_int
from ..verify import VerifyResult
from .base import ProposeContext, Proposer, draft_chain, register_proposer

VOCAB_PADDING = 0.01  # vocabulary sizes further apart than this fraction are different tokenizers


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
        self.runner.ensure_pool(num_blocks, block_size)  # the target's pool size: every row fits
        self.runner.set_outputs(max_blocks_per_row)

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
        self._drafted = max(K, 0)
        roots = to_device(ctx.roots(), dev)
        if K < 1:
            return DraftTree.chain(roots, torch.zeros(B, 0, dtype=torch.long, device=dev))
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
        return DraftTree.chain(roots, drafts, law, q, num_drafts=num)

    def update(self, ctx: ProposeContext, tree: DraftTree, result: VerifyResult, features=None) -> None:
        K = self._drafted  # the engine pads the tree to a node bucket: its width is not K + 1
        accepted = result.num_accepted.tolist()  # the engine has synchronised already: no wait
        fed = tree.tokens[:, 1:K].tolist() if K > 1 else [[] for _ in ctx.seq_ids]
        for s, n, drafts in zip(ctx.seq_ids, accepted, fed, strict=True):
            # valid draft K/V: the history, then the drafts it both fed itself and the target accepted
            self.runner.commit(s, drafts[: min(n, K - 1)])
        if self.adaptive and K > 0:
            full = all(n == int(m) - 1 for n, m in zip(accepted, tree.num_nodes.tolist(), strict=True))
            self.num_tokens = min(self.max_tokens, self.num_tokens + 2) if full else max(1, self.num_tokens - 1)

    def release(self, seq_ids: list[int]) -> None:
        self.runner.free(seq_ids)  # a row whose prefill failed before its allocation has nothing to free
