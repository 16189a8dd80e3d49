"""Every Triton kernel against its plain-torch reference (interpreter on the CPU, small shapes)."""

import pytest
import torch

from specdec.kernels import (
    compact_kv,
    compact_kv_reference,
    paged_tree_attention,
    paged_tree_attention_reference,
    store_kv,
    store_kv_reference,
)
from specdec.kernels.paged_attention import Tiles
from specdec.tree import DraftTree, Law

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu  # CI: Triton's interpreter; `make test-gpu`: compiled for the card


def _layout(B, prefix, T, page, num_pages, g):
    """Random page tables and the slots of the T new tokens after each row's prefix."""
    tables = torch.stack([torch.randperm(num_pages, generator=g)[: num_pages // B] for _ in range(B)]).int()
    pos = prefix[:, None] + torch.arange(T)
    new_slots = (tables.long().gather(1, pos // page) * page + pos % page).int()
    return tables, new_slots


def _tree_problem(B, T, H, Hkv, D, page, prefixes, seed, pages_per_row=64):
    """paged_tree_attention's positional arguments for random pools, pages and trees (on DEV)."""
    g = torch.Generator().manual_seed(seed)
    num_pages = B * pages_per_row
    k = torch.randn(num_pages * page, Hkv, D, generator=g).to(DEV)
    v = torch.randn(num_pages * page, Hkv, D, generator=g).to(DEV)
    prefix = torch.tensor(prefixes)
    tables, new_slots = _layout(B, prefix, T, page, num_pages, g)
    parents = [[-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)] for _ in range(B)]
    mask = DraftTree.from_parents([[0] * T] * B, parents).ancestor_mask()
    q = torch.randn(B, T, H, D, generator=g).to(DEV)
    return q, k, v, tables.to(DEV), prefix.int().to(DEV), new_slots.to(DEV), mask.to(DEV), D**-0.5, page


@pytest.mark.parametrize(
    "B, T, H, Hkv, D, page, prefixes, splits",
    [
        (1, 1, 4, 4, 16, 16, [37], 1),  # plain decode, MHA
        (2, 1, 8, 2, 32, 4, [0, 21], 3),  # GQA, an empty prefix, several splits
        (2, 7, 4, 2, 16, 2, [9, 30], 2),  # a tree step
        (3, 16, 2, 1, 16, 1, [5, 0, 12], None),  # page size 1, a 16-node tree
    ],
)
def test_paged_tree_attention_matches_reference(B, T, H, Hkv, D, page, prefixes, splits):
    args = _tree_problem(B, T, H, Hkv, D, page, prefixes, seed=T * 31 + D)
    out = paged_tree_attention(*args, max_prefix=max(prefixes), num_splits=splits)
    ref = paged_tree_attention_reference(*args)
    assert out.shape == (B, T, H, D)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "tiles",
    [
        Tiles(16, 16, 16),  # more query tiles and key steps than the default
        Tiles(32, 128, 16, num_warps=8, num_stages=2),  # one key step wider than the prefix
        Tiles(128, 32, 64, num_splits=3),  # one query tile for all rows, the splits fixed
    ],
    ids=str,
)
def test_every_tile_shape_gives_the_same_attention(tiles):
    """The tile shapes bench_attention.py sweeps are layouts of one computation, not new results."""
    args = _tree_problem(2, 20, 4, 2, 16, 4, [45, 3], seed=5, pages_per_row=32)
    out = paged_tree_attention(*args, max_prefix=45, tiles=tiles)
    torch.testing.assert_close(out, paged_tree_attention_reference(*args), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("field, value", [("block_m", 8), ("block_n", 48), ("block_t", 0), ("num_splits", 0)])
def test_tiles_refuse_shapes_the_kernel_cannot_take(field, value):
    good = dict(block_m=16, block_n=32, block_t=16)
    with pytest.raises(ValueError, match=f"Tiles.{field}={value}"):
        Tiles(**{**good, field: value})
    Tiles(**good)  # the same shape with a valid value is taken


@pytest.mark.parametrize(
    "B, T, H, Hkv, D, page, prefixes, window, softcap, sinks",
    [
        (2, 5, 4, 2, 16, 4, [9, 30], 6, None, False),  # a window shorter than the prefix
        (2, 5, 4, 2, 16, 4, [9, 30], None, 0.7, False),  # Gemma2's soft cap
        (2, 5, 4, 2, 16, 4, [9, 0], None, None, True),  # GPT-OSS sinks, an empty prefix
        (1, 3, 4, 1, 16, 2, [20], 2, 1.5, True),  # all three; a window of 2 hides most keys
        (2, 4, 4, 2, 24, 4, [7, 13], None, None, False),  # a head size that is no power of two
        (1, 80, 4, 1, 16, 8, [10], None, None, False),  # T x G = 320 query rows: two query tiles, 2 key tiles
    ],
)
def test_window_softcap_sinks_and_shapes_match_reference(B, T, H, Hkv, D, page, prefixes, window, softcap, sinks):
    g = torch.Generator().manual_seed(T * 7 + D)
    num_pages = B * 64
    k = torch.randn(num_pages * page, Hkv, D, generator=g).to(DEV)
    v = torch.randn(num_pages * page, Hkv, D, generator=g).to(DEV)
    prefix = torch.tensor(prefixes)
    tables, new_slots = _layout(B, prefix, T, page, num_pages, g)
    parents = [[-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)] for _ in range(B)]
    tree = DraftTree.from_parents([[0] * T] * B, parents)
    q_pos = tree.positions(prefix).to(DEV)  # node i sits at prefix + its depth
    q = torch.randn(B, T, H, D, generator=g).to(DEV)
    sink = (2 * torch.randn(H, generator=g)).to(DEV) if sinks else None
    args = (q, k, v, tables.to(DEV), prefix.int().to(DEV), new_slots.to(DEV), tree.ancestor_mask().to(DEV), 0.3, page)
    extra = dict(q_positions=q_pos, sliding_window=window, softcap=softcap, sinks=sink)
    out = paged_tree_attention(*args, max_prefix=max(prefixes), **extra)
    ref = paged_tree_attention_reference(*args, **extra)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    if window is not None or softcap is not None or sinks:  # the feature changed the result
        assert not torch.allclose(out, paged_tree_attention_reference(*args, q_positions=q_pos), atol=1e-3)


def test_the_prefix_spreads_over_splits_sized_for_a_longer_one():
    """CUDA graphs size the split grid for the longest prefix a graph may see; a shorter prefix must
    still give the same result (each row divides its own prefix among the splits)."""
    g = torch.Generator().manual_seed(4)
    B, T, H, D, page = 2, 2, 2, 16, 4
    k = torch.randn(512, H, D, generator=g).to(DEV)
    v = torch.randn(512, H, D, generator=g).to(DEV)
    prefix = torch.tensor([3, 70])
    tables, new_slots = _layout(B, prefix, T, page, 128, g)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, T, T).contiguous()
    q = torch.randn(B, T, H, D, generator=g).to(DEV)
    args = (q, k, v, tables.to(DEV), prefix.int().to(DEV), new_slots.to(DEV), mask.to(DEV), 0.25, page)
    out = paged_tree_attention(*args, max_prefix=256, num_splits=8)
    torch.testing.assert_close(out, paged_tree_attention_reference(*args), atol=2e-5, rtol=1e-4)


def test_paged_tree_attention_causal_prefill_chunk():
    g = torch.Generator().manual_seed(5)
    B, T, H, D, page = 2, 6, 2, 16, 4
    k = torch.randn(256, H, D, generator=g).to(DEV)
    v = torch.randn(256, H, D, generator=g).to(DEV)
    prefix = torch.tensor([8, 0])  # row 0 had 8 tokens cached, row 1 none
    tables, new_slots = _layout(B, prefix, T, page, 64, g)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, T, T).clone()
    causal[1, :, :2] = False  # row 1 is left-padded by 2: nobody attends to the padding
    q = torch.randn(B, T, H, D, generator=g).to(DEV)
    args = (q, k, v, tables.to(DEV), prefix.int().to(DEV), new_slots.to(DEV), causal.to(DEV), 0.3, page)
    out = paged_tree_attention(*args, max_prefix=8, num_splits=2)
    torch.testing.assert_close(out[:, :], paged_tree_attention_reference(*args), atol=2e-5, rtol=1e-4)


def test_padding_tokens_without_slots_are_never_read():
    g = torch.Generator().manual_seed(9)
    B, T, H, D, page = 2, 4, 2, 16, 4
    k = torch.randn(128, H, D, generator=g).to(DEV)
    v = torch.randn(128, H, D, generator=g).to(DEV)
    prefix = torch.tensor([5, 0])
    tables, new_slots = _layout(B, prefix, T, page, 32, g)
    new_slots[1, :2] = -1  # row 1: two padding tokens, no slot
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, T, T).clone()
    mask[1, :, :2] = False
    mask[1, :2, :] = False  # padding queries see nothing: their output is 0
    q = torch.randn(B, T, H, D, generator=g).to(DEV)
    args = (q, k, v, tables.to(DEV), prefix.int().to(DEV), new_slots.to(DEV), mask.to(DEV), 0.25, page)
    out = paged_tree_attention(*args, max_prefix=5, num_splits=2)
    torch.testing.assert_close(out, paged_tree_attention_reference(*args), atol=2e-5, rtol=1e-4)
    assert torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))


def test_store_kv_matches_reference():
    g = torch.Generator().manual_seed(1)
    B, T, Hkv, D = 2, 5, 2, 16
    k_new = torch.randn(B, Hkv, T, D, generator=g).transpose(1, 2).to(DEV)  # HF's [B, H, T, D] transposed
    v_new = torch.randn(B, Hkv, T, D, generator=g).transpose(1, 2).to(DEV)
    slots = torch.tensor([[3, 9, -1, 12, 0], [40, 41, 42, -1, 7]], dtype=torch.int32, device=DEV)
    caches = [torch.randn(64, Hkv, D, generator=g).to(DEV) for _ in range(2)]
    ref = [c.clone() for c in caches]
    store_kv(k_new, v_new, caches[0], caches[1], slots)
    store_kv_reference(k_new, v_new, ref[0], ref[1], slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])


def test_compaction_across_all_layers_in_place():
    g = torch.Generator().manual_seed(2)
    L, S, Hkv, D = 3, 64, 2, 16
    k = torch.randn(L, S, Hkv, D, generator=g).to(DEV)
    v = torch.randn(L, S, Hkv, D, generator=g).to(DEV)
    # row 0 accepted nodes 2, 3, 5 after root slot 10 -> positions 11, 12, 13 (overlapping moves)
    src = torch.tensor([[12, 13, 15], [30, -1, -1]], dtype=torch.int32, device=DEV)
    dst = torch.tensor([[11, 12, 13], [30, 31, 32]], dtype=torch.int32, device=DEV)
    rk, rv = k.clone(), v.clone()
    compact_kv(k, v, src, dst)
    compact_kv_reference(rk, rv, src, dst)
    assert torch.equal(k, rk) and torch.equal(v, rv)
    assert torch.equal(k[:, 11], rk[:, 11])


def test_engine_with_kernels_matches_model_generate():
    """The whole engine on the Triton path (interpreted on the CPU): greedy equality still holds."""
    from models import noisy_copy, tiny
    from replay import ReplayTree

    import specdec

    model = tiny("llama", vocab=64, num_hidden_layers=1)
    draft = noisy_copy(model, 0.0).to(DEV)
    model = model.to(DEV)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEV)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    refs = {tuple(ids[b].tolist()): ref[b, 6:].tolist() for b in range(2)}
    for proposer in (None, ReplayTree(refs, depth=2, vocab=64), specdec.DraftModel(draft, 2)):
        engine = specdec.Engine(model, proposer, block_size=4)
        engine.kernels = True
        if proposer is not None and hasattr(proposer, "kernels"):
            proposer.kernels = True
        out = specdec.generate(model, ids, max_new_tokens=6, do_sample=False, engine=engine)
        assert torch.equal(out, ref), type(proposer).__name__


@pytest.mark.parametrize("shape", ["chain", "tree", "wor", "wide-wor"])
def test_fused_tree_walk_matches_the_torch_walk(shape):
    """Same coins, same rules: the fused walk makes the reference walk's choices row for row.

    "wor" / "wide-wor": every law mixed among siblings (POINT, IID and WOR, siblings distinct as
    WOR needs); "wide-wor" has five children per node, so later WOR siblings are tested after
    several rejections and their q is renormalised without up to four tokens.
    """
    from specdec.kernels.tree_sampling import fused_tree_walk
    from specdec.verify import _verify_exact

    seeds = {"chain": 11, "tree": 12, "wor": 14, "wide-wor": 15}
    g = torch.Generator().manual_seed(seeds[shape])
    B, V = 256 if shape == "wide-wor" else 96, 40  # wide-wor: enough rows to meet the renormalisation
    parents = {
        "chain": [-1, 0, 1, 2, 3, 4],
        "tree": [-1, 0, 0, 1, 1, 2, 3, 3],
        "wor": [-1, 0, 0, 0, 1, 1, 2, 3, 3, 3],
        "wide-wor": [-1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2],
    }[shape]
    N = len(parents)
    q = torch.softmax(torch.randn(B, N, V, generator=g) * 2, -1)
    if "wor" in shape:  # siblings share their parent's q, as proposers' trees do
        q = q[:, [max(j, 0) for j in parents]]
    # each parent's children: a draw without replacement from its q (Gumbel top-k), so siblings are
    # distinct and the earlier ones carry much of q's mass (what the renormalisation must remove)
    order = (q.log() - torch.empty_like(q).exponential_(generator=g).log()).argsort(-1, descending=True)
    first = [min(j for j in range(N) if parents[j] == parents[i]) for i in range(N)]  # one draw per parent
    rank = [sum(parents[j] == parents[i] for j in range(1, i)) for i in range(N)]
    tokens = torch.stack([order[:, first[i], rank[i]] for i in range(N)], 1)
    tree = DraftTree.from_parents(tokens.tolist(), [parents] * B)
    tree.num_nodes = torch.randint(1, N + 1, (B,), generator=g)  # ragged: padding nodes are skipped
    laws = 3 if "wor" in shape else 2
    tree.law = torch.randint(0, laws, (B, N), generator=g).to(torch.int8)
    tree.law[:, 0] = 0
    tree.draft_probs = q
    if "wor" in shape:
        tree.validate()
        assert tree.has_wor()
    p = torch.softmax(torch.randn(B, N, V, generator=g) * 2, -1)
    p[:, :, :3] = 0  # tokens the target never emits
    p = p / p.sum(-1, keepdim=True)
    coins = torch.rand(B, N, generator=g, dtype=torch.float64)
    final = torch.rand(B, generator=g, dtype=torch.float64)
    K = tree.max_depth()
    ref = _verify_exact(tree, p, K, coins, final)
    args = [t.to(DEV) for t in (p, tree.tokens, tree.parents, tree.depth, tree.law, tree.num_nodes, coins, final)]
    path, last, nxt, bonus = fused_tree_walk(*args, tree.draft_probs.to(DEV), K)
    assert torch.equal(path.cpu(), ref.accepted_indices)
    assert torch.equal(nxt.cpu(), ref.next_tokens) and torch.equal(bonus.cpu(), ref.is_bonus)
    assert (nxt >= 3).all()
    assert 0 < int(ref.num_accepted.sum()) < B * K  # accepts and rejects both happened
    if "wor" in shape:  # the case that needs the renormalised q: a WOR node tested after a WOR rejection
        law, par = tree.law.long(), tree.parents
        later = [
            (law[:, i] == Law.WOR) & (law[:, j] == Law.WOR) & (par[:, i] == par[:, j])
            for i in range(N)
            for j in range(1, i)
        ]
        assert torch.stack(later).any()


def test_verify_uses_the_fused_walk_with_the_same_results():
    from specdec import RowSeeds, SamplingParams, verify

    g = torch.Generator().manual_seed(13)
    B, V = 32, 24
    q = torch.softmax(torch.randn(B, 4, V, generator=g), -1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(B, 4)
    tree = DraftTree.chain(torch.zeros(B, dtype=torch.long), drafts, Law.IID, q).to(DEV)
    logits = torch.randn(B, 5, V, generator=g).to(DEV)
    params = SamplingParams.make(B, temperature=0.9, top_p=0.95, device=DEV)
    rng = RowSeeds(torch.arange(B, device=DEV), torch.zeros(B, dtype=torch.long, device=DEV))
    fused = verify(tree, logits, params, rng=rng, fused=True)
    torch_walk = verify(tree, logits, params, rng=rng, fused=False)
    assert torch.equal(fused.emitted_tokens(tree), torch_walk.emitted_tokens(tree))
    assert torch.equal(fused.num_accepted, torch_walk.num_accepted)


def test_tree_tiles_take_64_query_rows():
    """Trees up to 64 nodes get 64-row query tiles (128-row ones took twice the time on an H100 at
    the 8B shape), decode 16-row ones, and longer prefill chunks 128-row ones."""
    from specdec.kernels.paged_attention import tile_config

    assert tile_config(1, 4, 128).block_m == 16
    assert tile_config(32, 4, 128).block_m == tile_config(64, 4, 128).block_m == 64
    assert tile_config(512, 4, 128).block_m == 128
