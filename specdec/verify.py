"""Tree verification: which drafted path the target accepts, and the token that follows it.

`exact` mode reproduces the target's processed sampling distribution token for token (multi-draft
rejection sampling over the tree, see DESIGN.md "Exactness"); `greedy` follows the argmax;
`typical` is Medusa's typical acceptance and is LOSSY (opt-in only). This torch code is the
reference that fused kernels are tested against. Dims: B batch, N nodes, V vocab, K depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from .sampling import (
    Rng,
    SamplingParams,
    greedy_tokens,
    process_logits,
    processed_scores,
    sample_from_probs,
    uniform,
)
from .tree import DraftTree, Law

STREAM_COINS = 1
STREAM_FINAL = 2


class VerifyMode(str, Enum):
    GREEDY = "greedy"
    EXACT = "exact"
    TYPICAL = "typical"  # lossy

    @classmethod
    def parse(cls, mode: VerifyMode | str) -> VerifyMode:
        try:
            return cls(mode)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"verify mode {mode!r} is not one of {valid}") from None


@dataclass(slots=True)
class TypicalParams:
    """Medusa's typical acceptance: accept x when p(x) > min(threshold, alpha * exp(-H(p)))."""

    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3


@dataclass(slots=True)
class VerifyResult:
    """The outcome of verifying one batch of trees.

    accepted_indices [B, K] long  node of the accepted path at depth d + 1; -1 beyond num_accepted
    num_accepted     [B]    long  accepted draft tokens (the root is not counted)
    next_tokens      [B]    long  the token after the accepted path: recovered (sampled from the
                                  residual after every child was rejected) or bonus (the path ended
                                  at a node with no children, sampled from its processed p)
    is_bonus         [B]    bool
    lossy            bool         True for typical acceptance
    host_accepted    list[int] | None   num_accepted on the host, once the engine has read it back
    host_emitted     list[list[int]] | None   the tokens each row emitted (accepted drafts, then
                                  next_token), on the host, once the engine has read them back
    consumed         bool         a proposal already launched started from this step's output on
                                  the device (`Proposer.pipelines`): what it consumed (features,
                                  the accepted path) must not be queued again
    """

    accepted_indices: torch.Tensor
    num_accepted: torch.Tensor
    next_tokens: torch.Tensor
    is_bonus: torch.Tensor
    lossy: bool = False
    host_accepted: list[int] | None = None
    host_emitted: list[list[int]] | None = None
    consumed: bool = False

    def accepted_counts(self) -> list[int]:
        """num_accepted as a host list (no device read when the engine has read it back already)."""
        return self.host_accepted if self.host_accepted is not None else self.num_accepted.tolist()

    @property
    def accepted_per_depth(self) -> torch.Tensor:
        """[B, K] bool: whether row b accepted a token at depth d + 1."""
        return self.accepted_indices >= 0

    def accepted_tokens(self, tree: DraftTree) -> torch.Tensor:
        """[B, K] long: the accepted draft tokens; -1 pads."""
        tok = tree.tokens.gather(1, self.accepted_indices.clamp(min=0))
        return torch.where(self.accepted_indices >= 0, tok, -1)

    def emitted_tokens(self, tree: DraftTree) -> torch.Tensor:
        """[B, K + 1] long: accepted tokens then next_tokens, -1 pads; row b emits num_accepted + 1."""
        acc = torch.cat([self.accepted_tokens(tree), torch.full_like(self.next_tokens[:, None], -1)], 1)
        return acc.scatter(1, self.num_accepted[:, None], self.next_tokens[:, None])


# ------------------------------------------------------------------------------------------
# One verification step at one node; shared by the batched walk and the enumeration tests.
# ------------------------------------------------------------------------------------------


def normalize(r: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """r / sum(r) over the last dim; rows whose mass is 0 (a rounding accident) keep `fallback`."""
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / torch.where(s > 0, s, 1), fallback)


def acceptance_probability(r_x: torch.Tensor, q_x: torch.Tensor, law: torch.Tensor) -> torch.Tensor:
    """P(accept child x) given residual r: POINT r(x); IID / WOR min(1, r(x) / q(x)).

    r_x, q_x, law: same shape (any). q_x is ignored for POINT nodes.
    """
    ratio = torch.where(q_x > 0, r_x / torch.where(q_x > 0, q_x, 1), 1.0).clamp(max=1.0)
    return torch.where(law == Law.POINT, r_x, ratio)


def residual_after_rejection(r: torch.Tensor, x: torch.Tensor, q: torch.Tensor, law: torch.Tensor) -> torch.Tensor:
    """The residual for the next sibling once child x was rejected.

    POINT: r with x removed, renormalised. IID / WOR: norm(max(0, r - q)).
    r, q [..., V]; x, law [...].
    """
    point = r.scatter(-1, x.unsqueeze(-1), 0.0)
    sampled = (r - q).clamp(min=0)
    new = torch.where((law == Law.POINT).unsqueeze(-1), point, sampled)
    return normalize(new, r)


def without_tokens(q: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """q [..., V] with the tokens where removed [..., V] is True set to 0, renormalised (WOR)."""
    return normalize(q.masked_fill(removed, 0.0), q)


# ------------------------------------------------------------------------------------------
# Target probabilities at every node
# ------------------------------------------------------------------------------------------


def process_tree_logits(
    tree: DraftTree,
    target_logits: torch.Tensor,
    params: SamplingParams,
    presence: torch.Tensor | None = None,
    suppress: torch.Tensor | None = None,
    processors=None,
) -> torch.Tensor:
    """Processed target distributions p at every node: [B, N, V].

    The history of node u is the committed sequence (presence [B, V] bool, root included) plus the
    draft tokens on the path to u; it matters only for the repetition penalty. suppress [B, N, V]
    bool bans tokens per node (EOS before min_new_tokens); processors (scores [B, N, V] -> the same)
    applies transformers' history processors with each node's own history.
    """
    presence = _node_presence(tree, target_logits, params, presence)
    return process_logits(target_logits, params, presence, suppress, processors)


def process_tree_scores(
    tree: DraftTree,
    target_logits: torch.Tensor,
    params: SamplingParams,
    presence: torch.Tensor | None = None,
    suppress: torch.Tensor | None = None,
    processors=None,
) -> torch.Tensor:
    """[B, N, V] the processed scores (before the softmax, see `sampling.processed_scores`) at every
    node, with the same arguments as `process_tree_logits`: what `output_scores` returns."""
    presence = _node_presence(tree, target_logits, params, presence)
    return processed_scores(target_logits, params, presence, suppress, processors)


def _node_presence(tree, target_logits, params, presence) -> torch.Tensor | None:
    """[B, N, V] bool: the committed history plus the draft tokens on the path to each node."""
    if presence is None or not bool((params.repetition_penalty != 1).any()):
        return None
    V = target_logits.shape[-1]
    path = tree.ancestor_mask().to(torch.float32)  # [B, N, N]
    one_hot = torch.nn.functional.one_hot(tree.tokens, V).to(torch.float32)  # [B, N, V]
    return presence[:, None, :] | (path @ one_hot > 0)


# ------------------------------------------------------------------------------------------
# The walks
# ------------------------------------------------------------------------------------------


def _path_of(tree: DraftTree, node: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K] the nodes from depth 1 to node [B] (ancestor chain), -1 padded."""
    B = tree.batch_size
    path = torch.full((B, K + 1), -1, dtype=torch.long, device=tree.device)
    cur = node.clone()
    for _ in range(K):
        d = tree.depth.gather(1, cur.clamp(min=0)[:, None]).squeeze(1)
        live = (cur > 0) & (d > 0)
        path.scatter_(1, torch.where(live, d - 1, K)[:, None], torch.where(live, cur, -1)[:, None])
        cur = torch.where(live, tree.parents.gather(1, cur.clamp(min=0)[:, None]).squeeze(1), cur)
    return path[:, :K]


def _deepest_accepted(tree: DraftTree, node_ok: torch.Tensor) -> torch.Tensor:
    """[B] the deepest node whose whole path is ok (first index among equals); node_ok [B, N]."""
    idx = torch.arange(tree.width, device=tree.device)
    ok = node_ok | (idx == 0)
    path_ok = ~(tree.ancestor_mask() & ~ok[:, None, :]).any(-1) & tree.valid()
    return torch.where(path_ok, tree.depth, -1).argmax(dim=1)


def _has_children(tree: DraftTree, node: torch.Tensor) -> torch.Tensor:
    """[B] bool: does node [B] have a valid child."""
    return ((tree.parents == node[:, None]) & tree.valid()).any(1)


def _finish_deterministic(
    tree: DraftTree, best: torch.Tensor, next_tokens: torch.Tensor, K: int, lossy: bool
) -> VerifyResult:
    path = _path_of(tree, best, K)
    return VerifyResult(
        accepted_indices=path,
        num_accepted=tree.depth.gather(1, best[:, None]).squeeze(1),
        next_tokens=next_tokens,
        is_bonus=~_has_children(tree, best),
        lossy=lossy,
    )


def _verify_greedy(tree: DraftTree, target: torch.Tensor, K: int) -> VerifyResult:
    """target [B, N]: the argmax token at every node (first index on ties)."""
    if tree.width == 1:  # plain decoding: nothing to walk
        none = torch.full((tree.batch_size, K), -1, dtype=torch.long, device=target.device)
        zero = torch.zeros(tree.batch_size, dtype=torch.long, device=target.device)
        return VerifyResult(none, zero, target[:, 0], torch.ones_like(zero, dtype=torch.bool))
    node_ok = tree.tokens == target.gather(1, tree.parents.clamp(min=0))
    best = _deepest_accepted(tree, node_ok)
    return _finish_deterministic(tree, best, target.gather(1, best[:, None]).squeeze(1), K, lossy=False)


def typical_threshold(p: torch.Tensor, typical: TypicalParams) -> torch.Tensor:
    """[...] Medusa's per-node threshold min(eps, alpha * exp(-H(p))), p [..., V]."""
    entropy = -(p * torch.log(p + 1e-5)).sum(-1)
    return torch.clamp(typical.posterior_alpha * torch.exp(-entropy), max=typical.posterior_threshold)


def _verify_typical(
    tree: DraftTree, p: torch.Tensor, K: int, typical: TypicalParams, final_u: torch.Tensor
) -> VerifyResult:
    threshold = typical_threshold(p, typical)  # [B, N]
    parent = tree.parents.clamp(min=0)
    p_x = p.gather(1, parent[:, :, None].expand_as(p)).gather(2, tree.tokens[:, :, None]).squeeze(2)
    node_ok = p_x > threshold.gather(1, parent)
    best = _deepest_accepted(tree, node_ok)
    B = tree.batch_size
    p_best = p[torch.arange(B, device=p.device), best]  # [B, V]
    thr_best = threshold.gather(1, best[:, None])
    truncated = normalize(p_best.masked_fill(p_best < thr_best, 0.0), p_best)
    return _finish_deterministic(tree, best, sample_from_probs(truncated, final_u), K, lossy=True)


def _verify_exact(tree: DraftTree, p: torch.Tensor, K: int, coins: torch.Tensor, final_u: torch.Tensor) -> VerifyResult:
    """Walk the tree in node order: a node is tested only while its parent is the current node."""
    B, N, V = p.shape
    dev = p.device
    valid = tree.valid()
    law = tree.law.to(torch.long)
    rows = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    r = p[:, 0].clone()  # [B, V] residual at the current node
    tested = torch.zeros(B, dtype=torch.bool, device=dev)
    path = torch.full((B, K + 1), -1, dtype=torch.long, device=dev)
    ones = torch.ones(B, dtype=p.dtype, device=dev)
    wor_any = tree.has_wor()
    for i in range(1, N):
        active = valid[:, i] & (tree.parents[:, i] == cur)
        x = tree.tokens[:, i]
        r_x = r.gather(1, x[:, None]).squeeze(1)
        if tree.draft_probs is None:
            q, q_x = r, ones
        else:
            q = tree.draft_probs[:, i].to(p.dtype)
            if wor_any:
                earlier = valid[:, :i] & (tree.parents[:, :i] == tree.parents[:, i : i + 1])
                earlier &= law[:, :i] == Law.WOR
                removed = torch.zeros(B, V, dtype=p.dtype, device=dev)
                removed.scatter_add_(1, tree.tokens[:, :i], earlier.to(p.dtype))
                q = torch.where((law[:, i] == Law.WOR)[:, None], without_tokens(q, removed > 0), q)
            q_x = q.gather(1, x[:, None]).squeeze(1)
        a = acceptance_probability(r_x, q_x, law[:, i])
        accept = active & (coins[:, i] < a.to(coins.dtype))  # strict: p(x) = 0 never passes
        reject = active & ~accept
        r_rejected = residual_after_rejection(r, x, q, law[:, i])
        r = torch.where(accept[:, None], p[:, i], torch.where(reject[:, None], r_rejected, r))
        cur = torch.where(accept, i, cur)
        d = tree.depth[:, i]
        path[rows, torch.where(accept, d - 1, K)] = torch.where(accept, i, path[rows, K])
        tested = (tested | reject) & ~accept
    return VerifyResult(
        accepted_indices=path[:, :K],
        num_accepted=tree.depth.gather(1, cur[:, None]).squeeze(1),
        next_tokens=sample_from_probs(r, final_u),
        is_bonus=~tested,
    )


def verify(
    tree: DraftTree,
    target_logits: torch.Tensor,
    params: SamplingParams,
    *,
    mode: VerifyMode | str = VerifyMode.EXACT,
    presence: torch.Tensor | None = None,
    rng: Rng = None,
    typical: TypicalParams | None = None,
    suppress: torch.Tensor | None = None,
    fused: bool | None = None,
    processors=None,
) -> VerifyResult:
    """Verify a batch of draft trees against the target's logits at every node.

    Parameters
    ----------
    tree : DraftTree with B rows of N nodes.
    target_logits : [B, N, V]; row i holds the target's logits for the children of node i.
    params : SamplingParams, per row; temperature-0 rows follow the argmax in every mode.
    mode : "exact" (default; the output law is the target's processed law), "greedy" (argmax,
        first index on ties), or "typical" (Medusa's typical acceptance, LOSSY).
    presence : [B, V] bool, tokens of the committed history (root included), for the repetition
        penalty; None when no penalty is used.
    rng : torch.Generator, RowSeeds (per-row seeds: same seed, same draws whatever the batch) or
        None (torch's global generator).
    typical : TypicalParams for mode="typical".
    suppress : [B, N, V] bool or None, tokens banned at each node (EOS before min_new_tokens).
    fused : walk the tree in one Triton program per row (the same rules; default: on a CUDA device).
        Off, the torch walk below is the reference.
    processors : scores [B, N, V] -> scores, or None: history-dependent logits processors, applied
        with every node's own history (see Engine); part of the target law.

    Returns
    -------
    VerifyResult with K = the tree's maximum depth.

    Examples
    --------
    >>> tree = DraftTree.chain(torch.tensor([0]), torch.tensor([[2, 1]]))
    >>> logits = torch.tensor([[[0.0, 0.0, 9.0], [0.0, 9.0, 0.0], [9.0, 0.0, 0.0]]])
    >>> res = verify(tree, logits, SamplingParams.make(1, temperature=0), mode="greedy")
    >>> res.num_accepted.tolist(), res.next_tokens.tolist()
    ([2], [0])
    """
    mode = VerifyMode.parse(mode)
    B, N = tree.tokens.shape
    if target_logits.dim() != 3 or target_logits.shape[:2] != (B, N):
        raise ValueError(f"target_logits must be [B, N, V] with B, N = {B}, {N}; got {tuple(target_logits.shape)}")
    if tree.draft_probs is not None and tree.draft_probs.shape[2] != target_logits.shape[2]:
        raise ValueError(
            f"draft_probs vocabulary {tree.draft_probs.shape[2]} != target vocabulary {target_logits.shape[2]}"
        )
    K = max(tree.max_depth(), 1)
    if mode is VerifyMode.GREEDY:
        node_presence = _node_presence(tree, target_logits, params, presence)
        return _verify_greedy(tree, greedy_tokens(target_logits, params, node_presence, suppress, processors), K)
    p = process_tree_logits(tree, target_logits, params, presence, suppress, processors)
    final_u = uniform(rng, B, 1, STREAM_FINAL, device=p.device)[:, 0]
    if mode is VerifyMode.TYPICAL:
        return _verify_typical(tree, p, K, typical or TypicalParams(), final_u)
    coins = uniform(rng, B, N, STREAM_COINS, device=p.device)
    if fused is None:
        fused = p.is_cuda
    if fused:
        from specdec.kernels.tree_sampling import fused_tree_walk

        path, last, next_tokens, is_bonus = fused_tree_walk(
            p.float().contiguous(),
            tree.tokens,
            tree.parents,
            tree.depth,
            tree.law,
            tree.num_nodes,
            coins,
            final_u,
            tree.draft_probs,
            K,
        )
        return VerifyResult(path, tree.depth.gather(1, last[:, None]).squeeze(1), next_tokens, is_bonus)
    return _verify_exact(tree, p, K, coins, final_u)
