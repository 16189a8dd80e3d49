"""DraftTree: builders, derived masks and paths, padding and validation (hypothesis properties)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.tree import DraftTree, Law, node_bucket


@st.composite
def parent_lists(draw, max_nodes=12):
    n = draw(st.integers(1, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


@st.composite
def tree_batches(draw):
    rows = draw(st.lists(parent_lists(), min_size=1, max_size=4))
    tokens = [[draw(st.integers(0, 50)) for _ in ps] for ps in rows]
    return tokens, rows


def _chain_of(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out


@settings(max_examples=60, deadline=None)
@given(tree_batches(), st.integers(0, 100))
def test_masks_positions_and_paths_agree_with_the_parent_lists(batch, root_pos):
    tokens, parents = batch
    tree = DraftTree.from_parents(tokens, parents).validate()
    anc = tree.ancestor_mask()
    pos = tree.positions(torch.full((tree.batch_size,), root_pos))
    paths = tree.leaf_paths()
    for b, ps in enumerate(parents):
        n = len(ps)
        for i in range(n):
            chain = _chain_of(ps, i)
            assert set(anc[b, i].nonzero().flatten().tolist()) == set(chain)
            assert pos[b, i] == root_pos + len(chain) - 1 == root_pos + tree.depth[b, i]
        leaves = [i for i in range(n) if i not in ps[1:]]
        got = [[j for j in row if j >= 0] for row in paths[b].tolist() if row[0] >= 0]
        assert got == [list(reversed(_chain_of(ps, leaf))) for leaf in leaves]
        assert tree.is_leaf()[b, :n].tolist() == [i in leaves for i in range(n)]


@settings(max_examples=30, deadline=None)
@given(tree_batches(), st.integers(0, 6))
def test_padding_keeps_every_real_node(batch, extra):
    tokens, parents = batch
    tree = DraftTree.from_parents(tokens, parents)
    wide = tree.pad_to(tree.width + extra).validate()
    assert wide.width == tree.width + extra
    N = tree.width
    assert torch.equal(
        wide.ancestor_mask()[:, :N, :N] & tree.valid()[:, :, None], tree.ancestor_mask() & tree.valid()[:, :, None]
    )
    assert not wide.valid()[:, N:].any()
    assert torch.equal(wide.leaf_paths(), tree.leaf_paths())


def test_node_bucket():
    assert [node_bucket(n) for n in (1, 3, 8, 9, 60)] == [1, 4, 8, 16, 64]
    with pytest.raises(ValueError, match="300 nodes"):
        node_bucket(300)


def test_chain_builder_with_ragged_lengths_and_iid_probs():
    q = torch.full((2, 3, 5), 0.2)
    tree = DraftTree.chain(
        torch.tensor([4, 4]), torch.tensor([[1, 2, 3], [0, 1, 2]]), Law.IID, q, num_drafts=torch.tensor([3, 1])
    ).validate()
    assert tree.num_nodes.tolist() == [4, 2]
    assert tree.parents.tolist() == [[-1, 0, 1, 2], [-1, 0, -1, -1]]
    assert tree.law.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert tree.leaf_paths().tolist() == [[[0, 1, 2, 3]], [[0, 1, -1, -1]]]


@st.composite
def choice_sets(draw):
    K, k = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    choices = set()
    for _ in range(draw(st.integers(1, 12))):
        path = tuple(draw(st.integers(0, k - 1)) for _ in range(draw(st.integers(1, K))))
        choices.update(path[:d] for d in range(1, len(path) + 1))
    return K, k, sorted(choices)


@settings(max_examples=40, deadline=None)
@given(choice_sets())
def test_from_choices_places_each_rank_at_its_path(spec):
    K, k, choices = spec
    B = 2
    cand = torch.arange(B * K * k).view(B, K, k) + 100
    tree = DraftTree.from_choices(torch.tensor([1, 2]), cand, choices).validate()
    assert tree.width == len(choices) + 1
    index = {}
    for i in range(1, tree.width):
        d = int(tree.depth[0, i])
        parent = int(tree.parents[0, i])
        path = (index[parent] if parent > 0 else ()) + (int((tree.tokens[0, i] - 100) % k),)
        index[i] = path
        assert len(path) == d
        assert tree.tokens[1, i] == cand[1, d - 1, path[-1]]
    assert sorted(index.values()) == sorted(choices)
    assert list(index.values()) == sorted(index.values(), key=lambda c: (len(c), c))


@pytest.mark.parametrize(
    "choices, fragment",
    [
        ([(0, 0)], "prefix"),
        ([(0,), (3,)], "rank"),
        ([(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)], "depth 4"),
        ([(0,), (0,)], "duplicates"),
    ],
)
def test_from_choices_rejects_bad_choices(choices, fragment):
    with pytest.raises(ValueError, match=fragment):
        DraftTree.from_choices(torch.tensor([0]), torch.zeros(1, 3, 2, dtype=torch.long), choices)


def _reference_expansion(root_lp, table, depth, top_k, total):
    """Plain-python EAGLE-2: returns the kept token paths. table[d][parent_token] -> logprobs [V]."""
    pool = []  # (score, order, path)
    frontier = [(float(root_lp[t]), (int(t),)) for t in root_lp.topk(top_k).indices]
    pool += frontier
    for d in range(1, depth):
        cands = []
        for score, path in frontier:
            lp = table[d][path[-1]]
            for t in lp.topk(top_k).indices:
                cands.append((score + float(lp[t]), path + (int(t),)))
        pool += cands
        frontier = sorted(cands, key=lambda c: -c[0])[:top_k]
    ranked = sorted(range(len(pool)), key=lambda i: (-pool[i][0], i))[:total]
    return {pool[i][1] for i in ranked}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 10_000), st.data())
def test_topk_expansion_matches_a_plain_python_reference(depth, top_k, seed, data):
    V = 6
    top_k = min(top_k, V)
    pool_size = top_k + (depth - 1) * top_k * top_k
    total = data.draw(st.integers(1, pool_size))
    g = torch.Generator().manual_seed(seed)
    B = 2
    root_lp = torch.randn(B, V, generator=g, dtype=torch.float64).log_softmax(-1)
    # the drafter's log-probs depend on (step, row, parent token): tables [depth][B][V, V]
    tables = torch.randn(depth, B, V, V, generator=g, dtype=torch.float64).log_softmax(-1)
    state = {"step": 0}

    def expand(tokens, frontier_parent):
        state["step"] += 1
        return tables[state["step"], torch.arange(B)[:, None], tokens]

    tree = DraftTree.from_topk_expansion(torch.tensor([0, 0]), root_lp, expand, depth, top_k, total).validate()
    assert tree.width == total + 1
    for b in range(B):
        want = _reference_expansion(root_lp[b], [None] + [tables[d, b] for d in range(1, depth)], depth, top_k, total)
        got = {
            tuple(tree.tokens[b, j].item() for j in list(reversed(_chain_of(tree.parents[b].tolist(), i)))[1:])
            for i in range(1, tree.width)
        }
        assert got == want


def test_topk_expansion_rejects_logits_instead_of_logprobs():
    root = torch.tensor([[0.0, -1.0, -2.0]])
    with pytest.raises(ValueError, match="log-probabilities"):
        DraftTree.from_topk_expansion(
            torch.tensor([0]),
            root,
            lambda t, p: torch.full((1, 2, 3), 5.0) + torch.arange(3.0),
            depth=2,
            top_k=2,
            total_tokens=4,
        )


def _tree(**over):
    base = dict(tokens=[[0, 1, 2]], parents=[[-1, 0, 1]])
    t = DraftTree.from_parents(base["tokens"], base["parents"])
    for k, v in over.items():
        setattr(t, k, torch.tensor(v))
    return t


@pytest.mark.parametrize(
    "over, fragment",
    [
        (dict(parents=[[-1, 0, 2]]), "parent 2 must satisfy"),
        (dict(parents=[[0, 0, 1]]), "root"),
        (dict(depth=[[0, 1, 1]]), "depth 1 is not parent depth"),
        (dict(num_nodes=[4]), "num_nodes"),
        (dict(law=[[0, 1, 0]]), "needs draft_probs"),
        (dict(law=[[0, 3, 0]]), "law 3"),
    ],
)
def test_validation_names_the_bad_node(over, fragment):
    with pytest.raises(ValueError, match=fragment):
        _tree(**over).validate()


def test_validation_of_sampled_nodes():
    q = torch.tensor([[[0.0, 0.5, 0.5]] * 3])
    t = DraftTree.chain(torch.tensor([0]), torch.tensor([[0, 1]]), Law.IID, q[:, :2])
    with pytest.raises(ValueError, match="q\\(x\\) = 0"):
        t.validate()
    wor = DraftTree.from_parents([[0, 1, 1]], [[-1, 0, 0]], law=Law.WOR)
    wor.draft_probs = q
    with pytest.raises(ValueError, match="repeats an earlier WOR sibling"):
        wor.validate()
    with pytest.raises(ValueError, match="parent 1 must be -1"):
        DraftTree.from_parents([[0, 1]], [[1, 0]])


def test_ngram_lookup_is_the_most_recent_match_of_the_longest_suffix():
    """specdec.proposers.ngram.lookup against a direct statement of its rule (every window that ends
    before the last token, longest suffix first, the latest match wins) on 2000 random histories."""
    from specdec.proposers.ngram import lookup

    def rule(h: list[int], k: int, longest: int, shortest: int) -> list[int]:
        L = len(h)
        for n in range(min(longest, L - 1), shortest - 1, -1):
            starts = [i for i in range(L - n) if h[i : i + n] == h[L - n :]]
            if starts:
                return h[starts[-1] + n : starts[-1] + n + k]
        return []

    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(2000):
        L, V = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
        h = torch.randint(0, V, (L,), generator=g)
        longest = int(torch.randint(1, 5, (1,), generator=g))
        shortest = int(torch.randint(1, longest + 1, (1,), generator=g))
        want = rule(h.tolist(), 3, longest, shortest)
        assert lookup(h, 3, longest, shortest).tolist() == want, (h.tolist(), longest, shortest)
        hits += bool(want)
    assert 500 < hits < 2000  # both outcomes are exercised


def test_batched_device_lookup_equals_the_host_lookup():
    """lookup_rows (the Ngram graph's lookup: B rows, padded buffers, no host read) returns, row by
    row, what lookup returns on that row's history, with each row's draft limit; 300 batches of 5
    rows of random lengths, vocabularies and n-gram ranges."""
    from specdec.proposers.ngram import lookup, lookup_rows

    g = torch.Generator().manual_seed(1)
    hits = cut = 0
    for _ in range(300):
        B, C, K = 5, 48, int(torch.randint(1, 6, (1,), generator=g))
        V = int(torch.randint(2, 7, (1,), generator=g))
        longest = int(torch.randint(1, 5, (1,), generator=g))
        shortest = int(torch.randint(1, longest + 1, (1,), generator=g))
        history = torch.randint(0, V, (B, C), generator=g)  # past each length: other tokens, to be ignored
        length = torch.randint(1, C - longest, (B,), generator=g)
        limit = torch.randint(0, K + 2, (B,), generator=g)
        drafts, count = lookup_rows(history, length, K, longest, shortest, limit)
        for b in range(B):
            want = lookup(history[b, : length[b]], min(K, int(limit[b])), longest, shortest).tolist()
            n = int(count[b])
            assert drafts[b, :n].tolist() == want and n == len(want), (b, history[b].tolist(), int(length[b]))
            assert not drafts[b, n:].any()
            hits += n > 0
            cut += n == int(limit[b]) < K
    assert hits > 500 and cut > 50  # matches, and drafts cut by the limit, are both exercised


@pytest.mark.parametrize("V", [4096, 5000, 16384, 20001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_last_matches_torch_topk(V, dtype):
    """The two-stage top-k (chunks, then the chunks' winners) gives torch.topk's values in its
    order, indices that point at them and never at padding, for [B, m, V] rows with ties (bf16
    rounding) and a last dim that is not a multiple of the chunk; short dims are torch.topk itself."""
    from specdec.tree import topk_last

    g = torch.Generator().manual_seed(V)
    x = torch.randn(2, 3, V, generator=g).to(dtype)
    x[0, 0, V - 7 :] = 50.0  # winners in the last, padded chunk (ties among them)
    for k in (1, 10, 37):
        vals, idx = topk_last(x, k)
        ref = x.topk(k, dim=-1).values
        assert torch.equal(vals, ref), (k, V)
        assert torch.equal(x.gather(-1, idx), vals) and int(idx.max()) < V
        assert all(len(set(r)) == k for r in idx.flatten(0, 1).tolist())  # k distinct entries a row
