"""The batched torch verifier: statistical exactness, the hard rules, modes and determinism."""

import math

import pytest
import torch
from scipy import stats

from specdec.sampling import RowSeeds, SamplingParams, process_logits
from specdec.tree import DraftTree, Law
from specdec.verify import TypicalParams, VerifyMode, process_tree_logits, typical_threshold, verify

V = 5
DELTA = 1e-6  # false-failure probability of each statistical test


def tv_bound(num_categories: int, n: int, delta: float = DELTA) -> float:
    """P(TV(empirical, true) >= t) <= 2^K exp(-2 n t^2) (Bretagnolle-Huber-Carol), solved for t."""
    return math.sqrt((num_categories * math.log(2) + math.log(1 / delta)) / (2 * n))


class Tables:
    """Target p and drafter q for every path of length <= 2 (row-independent)."""

    def __init__(self, seed: int, sparse_p: bool = True):
        g = torch.Generator().manual_seed(seed)
        d = torch.distributions.Dirichlet(torch.ones(V, dtype=torch.float64))
        torch.manual_seed(seed)
        self.P = [d.sample(), d.sample((V,)), d.sample((V, V))]  # [V], [V, V], [V, V, V]
        self.Q = [d.sample(), d.sample((V,))]
        if sparse_p:  # tokens the target never emits at some nodes
            self.P[0][int(torch.randint(V, (1,), generator=g))] = 0
            self.P[1][torch.arange(V), torch.randint(V, (V,), generator=g)] = 0
            self.P = [p / p.sum(-1, keepdim=True) for p in self.P]

    def law2(self) -> torch.Tensor:
        """[V, V] exact law of the first two tokens."""
        return self.P[0][:, None] * self.P[1]


def _draw(scheme: str, q: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    if scheme == "topk":
        return q.topk(k, dim=-1).indices
    if scheme == "wor":
        return torch.multinomial(q, k, replacement=False, generator=g)
    x = torch.multinomial(q, k, replacement=True, generator=g)
    if scheme == "iid_sorted":
        x = x.gather(1, q.gather(1, x).argsort(dim=1, descending=True, stable=True))
    return x


def build_batch(t: Tables, B: int, level1, level2, g: torch.Generator):
    """Trees root -> k1 children (scheme, law) -> k2 children each; returns (tree, target logits)."""
    (s1, law1, k1), (s2, law2, k2) = level1, level2
    N = 1 + k1 + k1 * k2
    tokens = torch.zeros(B, N, dtype=torch.long)
    parents = torch.full((B, N), -1, dtype=torch.long)
    depth = torch.zeros(B, N, dtype=torch.long)
    law = torch.zeros(B, N, dtype=torch.int8)
    q = torch.zeros(B, N, V, dtype=torch.float64)
    logits = torch.zeros(B, N, V, dtype=torch.float64)
    logits[:, 0] = t.P[0].log()
    first = _draw(s1, t.Q[0].expand(B, V), k1, g)
    for j in range(k1):
        i = 1 + j
        x = first[:, j]
        tokens[:, i], parents[:, i], depth[:, i], law[:, i] = x, 0, 1, int(law1)
        q[:, i] = t.Q[0]
        logits[:, i] = t.P[1][x].log()
        second = _draw(s2, t.Q[1][x], k2, g)
        for m in range(k2):
            c = 1 + k1 + j * k2 + m
            y = second[:, m]
            tokens[:, c], parents[:, c], depth[:, c], law[:, c] = y, i, 2, int(law2)
            q[:, c] = t.Q[1][x]
            logits[:, c] = t.P[2][x, y].log()
    tree = DraftTree(tokens, parents, depth, torch.full((B,), N), law, q)
    return tree, logits


def first_two_tokens(t: Tables, tree, res, g):
    """The first two emitted tokens; when only one was emitted the target samples the second."""
    out = res.emitted_tokens(tree)[:, :2].clone()
    short = res.num_accepted == 0
    out[short, 1] = torch.multinomial(t.P[1][out[short, 0]], 1, generator=g)[:, 0]
    return out


def empirical_tv(t: Tables, level1, level2, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tree, logits = build_batch(t, n, level1, level2, g)
    res = verify(tree.validate(), logits, SamplingParams.make(n), rng=g)
    two = first_two_tokens(t, tree, res, g)
    counts = torch.bincount(two[:, 0] * V + two[:, 1], minlength=V * V).double().view(V, V)
    return 0.5 * (counts / n - t.law2()).abs().sum().item(), res


CASES = {
    "topk/point": (("topk", Law.POINT, 3), ("topk", Law.POINT, 2)),
    "iid/iid": (("iid", Law.IID, 3), ("iid", Law.IID, 2)),
    "wor/wor": (("wor", Law.WOR, 3), ("wor", Law.WOR, 2)),
    "sorted/point": (("iid_sorted", Law.POINT, 2), ("iid_sorted", Law.POINT, 2)),
    "mixed": (("wor", Law.WOR, 2), ("topk", Law.POINT, 3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_walk_is_exact_statistically(case):
    n = 200_000
    t = Tables(seed=list(CASES).index(case))
    dist, res = empirical_tv(t, *CASES[case], n=n)
    assert dist < tv_bound(V * V, n), (case, dist)
    assert (res.num_accepted == 2).float().mean() > 0.05  # deep paths really were exercised


def test_statistical_test_detects_topk_children_verified_with_q():
    n = 200_000
    t = Tables(seed=0)
    dist, _ = empirical_tv(t, ("topk", Law.IID, 3), ("topk", Law.IID, 2), n=n)
    assert dist > 3 * tv_bound(V * V, n)


def test_draft_equal_to_target_is_always_accepted():
    B, K = 2000, 4
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, K + 1, V, generator=g)
    params = SamplingParams.make(B, temperature=0.8, top_p=0.9)
    p = process_logits(logits, params)
    # a chain sampled from q = p: path logits do not depend on the drawn tokens here
    drafts = torch.stack([torch.multinomial(p[:, d], 1, generator=g)[:, 0] for d in range(K)], 1)
    tree = DraftTree.chain(torch.zeros(B, dtype=torch.long), drafts, Law.IID, p[:, :K]).validate()
    res = verify(tree, logits, params, rng=g)
    assert (res.num_accepted == K).all() and res.is_bonus.all()
    # the first of several WOR siblings drawn from q = p is accepted too
    params = SamplingParams.make(B, temperature=0.8)  # full support: two distinct draws exist
    p = process_logits(logits, params)
    wor = DraftTree.from_parents([[0, 1, 2]] * B, [[-1, 0, 0]] * B, law=Law.WOR)
    wor.tokens[:, 1:] = torch.multinomial(p[:, 0], 2, replacement=False, generator=g)
    wor.draft_probs = p[:, :1].expand(B, 3, V).contiguous()
    res = verify(wor.validate(), logits[:, :3], params, rng=g)
    assert (res.accepted_indices[:, 0] == 1).all()


@pytest.mark.parametrize("mode", ["exact", "typical", "greedy"])
@pytest.mark.parametrize("law", [Law.POINT, Law.IID])
def test_zero_target_probability_is_never_accepted_nor_emitted(mode, law):
    B = 5000
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, 3, V, generator=g)
    logits[:, :, 3:] = float("-inf")  # C = {3, 4} has p = 0 at every node
    drafts = torch.randint(3, V, (B, 2), generator=g)
    q = torch.full((B, 2, V), 1.0 / V)
    tree = DraftTree.chain(torch.zeros(B, dtype=torch.long), drafts, law, q if law == Law.IID else None)
    res = verify(tree, logits, SamplingParams.make(B, temperature=1.0), mode=mode, rng=g)
    assert (res.num_accepted == 0).all()
    assert (res.next_tokens < 3).all()


def test_bonus_token_comes_from_the_processed_target():
    B = 100_000
    g = torch.Generator().manual_seed(3)
    params = SamplingParams.make(B, temperature=0.7, top_k=3, top_p=0.95)
    logits = torch.randn(1, 2, V, generator=g).expand(B, 2, V).contiguous()
    p = process_logits(logits, params)
    drafts = torch.multinomial(p[:, 0], 1, generator=g)  # q = p at the root: always accepted
    tree = DraftTree.chain(torch.zeros(B, dtype=torch.long), drafts, Law.IID, p[:, :1])
    res = verify(tree, logits, params, rng=g)
    assert res.is_bonus.all()
    counts = torch.bincount(res.next_tokens, minlength=V).double()
    want = p[0, 1].double()
    assert (counts[want == 0] == 0).all()
    keep = want > 0
    expected = want[keep] / want[keep].sum() * counts.sum()
    assert stats.chisquare(counts[keep].numpy(), expected.numpy()).pvalue > DELTA


@pytest.mark.parametrize("mode", list(VerifyMode))
def test_temperature_zero_follows_argmax_with_first_index_ties(mode):
    logits = torch.tensor([[[0.0, 2.0, 0.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0, 5.0], [0.0] * 5]])
    params = SamplingParams.make(1, temperature=0.0)
    for draft, accepted, nxt in [([3, 0], 0, 1), ([1, 4], 1, 0), ([1, 0], 2, 0)]:
        tree = DraftTree.chain(torch.tensor([0]), torch.tensor([draft]))
        res = verify(tree, logits, params, mode=mode, rng=torch.Generator().manual_seed(0))
        assert res.num_accepted.item() == accepted and res.next_tokens.item() == nxt, (mode, draft)


def test_greedy_rows_in_an_exact_batch_match_greedy_mode():
    B = 64
    g = torch.Generator().manual_seed(4)
    tree = DraftTree.from_parents([[0, 1, 2, 3, 4, 0, 1]] * B, [[-1, 0, 0, 1, 1, 2, 5]] * B)
    tree.tokens[:, 1:] = torch.randint(0, V, (B, 6), generator=g)
    logits = torch.randn(B, 7, V, generator=g)
    temps = torch.where(torch.arange(B) % 2 == 0, 0.0, 1.0)
    exact = verify(tree, logits, SamplingParams.make(B, temperature=temps), rng=g)
    greedy = verify(tree, logits, SamplingParams.make(B, temperature=0.0), mode="greedy")
    even = torch.arange(B) % 2 == 0
    assert torch.equal(exact.emitted_tokens(tree)[even], greedy.emitted_tokens(tree)[even])


def test_greedy_takes_the_deepest_of_duplicate_branches():
    # node 1 and node 2 both hold the argmax token; only node 2 has an accepted child
    tree = DraftTree.from_parents([[0, 1, 1, 2]], [[-1, 0, 0, 2]])
    logits = torch.zeros(1, 4, V)
    logits[0, 0, 1] = logits[0, 2, 2] = logits[0, 1, 4] = logits[0, 3, 3] = 5.0
    res = verify(tree, logits, SamplingParams.make(1, temperature=0), mode="greedy")
    assert res.accepted_indices.tolist() == [[2, 3]] and res.next_tokens.tolist() == [3]
    assert res.is_bonus.tolist() == [True]


def test_row_seeds_give_the_same_result_whatever_else_is_in_the_batch():
    g = torch.Generator().manual_seed(5)
    t = Tables(seed=5)
    tree, logits = build_batch(t, 6, ("iid", Law.IID, 3), ("wor", Law.WOR, 2), g)
    params = SamplingParams.make(6, temperature=[1.0, 0.5, 1.0, 0.9, 1.0, 1.0])
    seeds = RowSeeds(torch.arange(6) + 100, torch.full((6,), 9))
    full = verify(tree, logits, params, rng=seeds)
    pick = torch.tensor([4, 1])
    sub = DraftTree(
        *(x[pick] for x in (tree.tokens, tree.parents, tree.depth, tree.num_nodes, tree.law, tree.draft_probs))
    ).pad_to(16)
    sub_logits = torch.cat([logits[pick], torch.zeros(2, 16 - tree.width, V, dtype=logits.dtype)], 1)
    part = verify(
        sub,
        sub_logits,
        SamplingParams.make(2, temperature=[1.0, 0.5]),
        rng=RowSeeds(seeds.seeds[pick], seeds.step[pick]),
    )
    assert torch.equal(part.emitted_tokens(sub), full.emitted_tokens(tree)[pick])
    again = verify(tree, logits, params, rng=seeds)
    assert torch.equal(again.emitted_tokens(tree), full.emitted_tokens(tree))


def test_typical_acceptance_is_labelled_lossy_and_uses_medusa_threshold():
    p = torch.tensor([0.6, 0.25, 0.1, 0.04, 0.01], dtype=torch.float64)
    logits = p.log().expand(1, 3, V).clone()
    thr = typical_threshold(p, TypicalParams())
    assert 0.04 < thr < 0.1
    for draft, accepted in [([2, 0], 2), ([3, 0], 0), ([0, 4], 1)]:
        tree = DraftTree.chain(torch.tensor([0]), torch.tensor([draft]))
        res = verify(tree, logits, SamplingParams.make(1), mode="typical", rng=torch.Generator().manual_seed(0))
        assert res.lossy and res.num_accepted.item() == accepted
    many = verify(
        DraftTree.chain(torch.zeros(5000, dtype=torch.long), torch.full((5000, 1), 4)),
        logits[:, :2].expand(5000, 2, V),
        SamplingParams.make(5000),
        mode="typical",
    )
    assert set(many.next_tokens.tolist()) == {0, 1, 2}  # truncated below the threshold
    assert not verify(tree, logits, SamplingParams.make(1), mode="exact").lossy


def test_repetition_penalty_sees_committed_history_and_the_path():
    tree = DraftTree.from_parents([[0, 2, 3, 1]], [[-1, 0, 1, 0]])
    logits = torch.randn(1, 4, V)
    params = SamplingParams.make(1, temperature=0.9, repetition_penalty=1.7)
    presence = torch.zeros(1, V, dtype=torch.bool)
    presence[0, [0, 4]] = True
    got = process_tree_logits(tree, logits, params, presence)
    for node, path in [(0, []), (1, [2]), (2, [2, 3]), (3, [1])]:
        pres = presence.clone()
        pres[0, path] = True
        torch.testing.assert_close(got[0, node], process_logits(logits[:, node], params, pres)[0])


def test_result_shapes_and_accounting():
    g = torch.Generator().manual_seed(6)
    t = Tables(seed=6)
    tree, logits = build_batch(t, 300, ("iid", Law.IID, 2), ("topk", Law.POINT, 2), g)
    res = verify(tree, logits, SamplingParams.make(300), rng=g)
    assert res.accepted_indices.shape == (300, 2)
    assert torch.equal(res.accepted_per_depth.sum(1), res.num_accepted)
    for b in range(300):
        path = [int(i) for i in res.accepted_indices[b] if i >= 0]
        assert [int(tree.depth[b, i]) for i in path] == list(range(1, len(path) + 1))
        assert all(int(tree.parents[b, c]) == pa for pa, c in zip([0] + path, path, strict=False))
        assert bool(res.is_bonus[b]) == (len(path) == 2)


def test_bad_calls_are_named():
    tree = DraftTree.chain(torch.tensor([0]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="'fast' is not one of"):
        verify(tree, torch.zeros(1, 2, V), SamplingParams.make(1), mode="fast")
    with pytest.raises(ValueError, match="target_logits must be"):
        verify(tree, torch.zeros(1, 3, V), SamplingParams.make(1))
