"""The transformers adapter on the paged cache gives the unmodified model's logits (fp32, atol 1e-5), through
the gathered torch attention and through the paged Triton kernel (interpreted on the CPU), including the
features some layers ask for: sliding windows (Mistral, Gemma2/3, GPT-OSS), softcapping (Gemma2), sinks
(GPT-OSS)."""

import pytest
import torch
from models import tiny
from transformers import T5Config, T5ForConditionalGeneration

from specdec.cache import BlockManager
from specdec.runtime import HFModel
from specdec.runtime.metadata import prefill_metadata, tree_metadata
from specdec.tree import DraftTree

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3", "gpt_oss"]
ATOL = 1e-5
CPU = torch.device("cpu")


def _plain_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
def test_prefill_decode_and_tree_match_the_unmodified_model(arch, block_size, kernels):
    if kernels and block_size == 4:
        pytest.skip("the kernel runs interpreted: two page sizes suffice")
    model = tiny(arch, sliding_window=4) if arch == "mistral" else tiny(arch)
    paged = dict(kernels=kernels, gathered=not kernels)  # gathered=False: only the kernel can attend
    rt = HFModel(model)
    bm = BlockManager(num_blocks=200, block_size=block_size)
    cache = rt.new_cache(200, block_size)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g) for n in (7, 12)]
    ids = [0, 1]
    cached = [bm.allocate(s, p.tolist()) for s, p in zip(ids, prompts, strict=True)]
    input_ids, pos, meta = prefill_metadata(cache, bm, ids, prompts, cached, torch.device("cpu"), **paged)
    out = rt.forward(input_ids, pos, meta).logits
    for b, p in enumerate(prompts):
        n = len(p)
        torch.testing.assert_close(out[b, -n:], _plain_logits(model, p), atol=ATOL, rtol=0)
        bm.commit(ids[b], p.tolist())
    # a tree step: root (the next token) + a small tree, different per row
    tree = DraftTree.from_parents([[5, 6, 7, 8, 9], [1, 2, 3, 4, 4]], [[-1, 0, 0, 1, 3], [-1, 0, 1, 0, 3]])
    for s in ids:
        bm.reserve(s, tree.width)
    positions, meta, _ = tree_metadata(cache, bm, ids, tree, torch.device("cpu"), **paged)
    logits = rt.forward(tree.tokens, positions, meta).logits
    anc = tree.ancestor_mask()
    for b, p in enumerate(prompts):
        for i in range(tree.width):
            path = tree.tokens[b][anc[b, i]]
            want = _plain_logits(model, torch.cat([p, path]))[-1]
            torch.testing.assert_close(logits[b, i], want, atol=ATOL, rtol=0)
    # decode: commit root + node 1 (a chain), then one token
    for b, s in enumerate(ids):
        bm.commit(s, [int(tree.tokens[b, 0]), int(tree.tokens[b, 1])])
    step = DraftTree.chain(torch.tensor([11, 12]), torch.zeros(2, 0, dtype=torch.long))
    for s in ids:
        bm.reserve(s, 1)
    positions, meta, _ = tree_metadata(cache, bm, ids, step, torch.device("cpu"), **paged)
    logits = rt.forward(step.tokens, positions, meta).logits
    for b, p in enumerate(prompts):
        seq = torch.cat([p, tree.tokens[b, :2], step.tokens[b]])
        torch.testing.assert_close(logits[b, 0], _plain_logits(model, seq)[-1], atol=ATOL, rtol=0)


def test_shared_prefix_blocks_are_read_in_the_same_prefill():
    model = tiny("llama")
    rt = HFModel(model)
    bm = BlockManager(num_blocks=50, block_size=4)
    cache = rt.new_cache(50, 4)
    system = torch.arange(10)
    prompts = [torch.cat([system, torch.tensor([20, 21])]), torch.cat([system, torch.tensor([30])])]
    cached = [bm.allocate(s, p.tolist()) for s, p in enumerate(prompts)]
    assert cached == [0, 8] and bm.block_table(0)[:2] == bm.block_table(1)[:2]
    input_ids, pos, meta = prefill_metadata(cache, bm, [0, 1], prompts, cached, torch.device("cpu"))
    out = rt.forward(input_ids, pos, meta, logits_to_keep=1).logits
    for b, p in enumerate(prompts):
        torch.testing.assert_close(out[b, -1], _plain_logits(model, p)[-1], atol=ATOL, rtol=0)


def test_unsupported_architectures_are_named():
    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        HFModel(t5)
    with pytest.raises(ValueError, match="Linear is not a transformers PreTrainedModel"):
        HFModel(torch.nn.Linear(2, 2))


def test_the_model_is_left_as_it_was():
    model = tiny("llama")
    before = model.config._attn_implementation
    rt = HFModel(model)
    bm = BlockManager(10, 16)
    bm.allocate(0, [1, 2, 3])
    cache = rt.new_cache(10, 16)
    rt.forward(*prefill_metadata(cache, bm, [0], [torch.tensor([1, 2, 3])], [0], torch.device("cpu")))
    assert model.config._attn_implementation == before


def test_attention_keywords_specdec_does_not_implement_are_refused():
    model = tiny("llama")
    rt = HFModel(model)
    bm = BlockManager(10, 16)
    bm.allocate(0, [1, 2, 3])
    cache = rt.new_cache(10, 16)
    ids, pos, meta = prefill_metadata(cache, bm, [0], [torch.tensor([1, 2, 3])], [0], torch.device("cpu"))
    with rt._paged_attention(), pytest.raises(ValueError, match="LlamaAttention passes attention keyword.* alibi"):
        model(input_ids=ids, position_ids=pos, use_cache=False, specdec_meta=meta, alibi=torch.ones(1))
    model.train()  # dropout would be applied by the model's own attention: refuse rather than ignore it
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"dropout 0.1 .* call model.eval\(\)"):
        rt.forward(ids, pos, meta)
    assert model.config._attn_implementation != "specdec"


def test_threads_sharing_one_model_get_their_own_outputs():
    """Engines in several threads on one model: specdec forwards take turns (the attention switch on
    the shared config is never flipped under another thread), so every output is the reference and the
    model is left as it was; a direct call of the model during a specdec forward raises."""
    import threading

    import specdec

    model = tiny("llama", vocab=96)
    before = model.config._attn_implementation
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (1, 6 + i), generator=g) for i in range(4)]
    refs = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=10, do_sample=False) for p in prompts]
    wrong, errors = [], []

    def worker(i):
        engine = specdec.Engine(model, specdec.Ngram(num_tokens=2) if i % 2 else None)
        try:
            for _ in range(6):
                out = specdec.generate(model, prompts[i], max_new_tokens=10, do_sample=False, engine=engine)
                if not torch.equal(out, refs[i]):
                    wrong.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert model.config._attn_implementation == before
    # a plain call that runs into a specdec forward (here: from a hook inside it) is refused clearly
    rt = HFModel(model)
    hook = model.model.layers[0].register_forward_hook(lambda *a: model(input_ids=torch.tensor([[1, 2]])))
    bm = BlockManager(10, 16)
    bm.allocate(0, [1, 2, 3])
    try:
        with pytest.raises(RuntimeError, match="called without specdec metadata"):
            rt.forward(*prefill_metadata(rt.new_cache(10, 16), bm, [0], [torch.tensor([1, 2, 3])], [0], CPU))
    finally:
        hook.remove()
    assert model.config._attn_implementation == before


def test_one_engine_refuses_a_second_concurrent_call():
    import threading

    import specdec

    model = tiny("llama", vocab=96)
    engine = specdec.Engine(model, None)
    started, release = threading.Event(), threading.Event()

    class Blocking:  # a streamer that holds the first call open
        def put(self, value):
            started.set()
            release.wait(30)

        def end(self):
            pass

    ids = torch.tensor([[1, 2]])
    first = threading.Thread(
        target=lambda: specdec.generate(model, ids, max_new_tokens=2, engine=engine, streamer=Blocking())
    )
    first.start()
    started.wait(30)
    try:
        with pytest.raises(RuntimeError, match="already generating"):
            specdec.generate(model, torch.tensor([[1, 2]]), max_new_tokens=2, engine=engine)
    finally:
        release.set()
        first.join()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.inference_mode()
def test_tree_graph_step_derives_the_same_metadata(arch):
    """The function a tree graph captures (metadata derived inside it from committed lengths, block
    tables, depth and ancestors), run eagerly with the interpreted kernels: the same logits and node
    slots as the host-built metadata, and a padding row (batch bucket 4 for 2 rows) writes nothing."""
    from specdec.runtime.graphs import GraphedForward

    model = tiny(arch, sliding_window=4) if arch == "mistral" else tiny(arch)
    rt = HFModel(model)
    bm = BlockManager(num_blocks=60, block_size=4)
    cache = rt.new_cache(60, 4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g) for n in (9, 5)]
    ids = [0, 1]
    cached = [bm.allocate(s, p.tolist()) for s, p in zip(ids, prompts, strict=True)]
    rt.forward(*prefill_metadata(cache, bm, ids, prompts, cached, CPU, kernels=True, gathered=False))
    for s, p in zip(ids, prompts, strict=True):
        bm.commit(s, p.tolist())
    tree = DraftTree.from_parents([[5, 6, 7, 8], [1, 2, 3, 4]], [[-1, 0, 0, 1], [-1, 0, 1, 2]])
    tree.num_nodes = torch.tensor([4, 3])  # row 1's last node is padding
    for s in ids:
        bm.reserve(s, tree.width)
    k_before = cache.k.clone()
    positions, meta, slots = tree_metadata(cache, bm, ids, tree, CPU, kernels=True, gathered=False)
    want = rt.forward(tree.tokens, positions, meta).logits
    k_host = cache.k.clone()
    cache.k.copy_(k_before)
    graphs = GraphedForward(rt, cache, max_blocks=16)
    c = graphs._static_tree(4, tree.width)
    c.input_ids.fill_(3)  # stale padding rows
    graphs._load_tree(
        c,
        tree.tokens,
        tree.depth,
        tree.parents,
        tree.num_nodes,
        [bm.num_tokens(s) for s in ids],
        [bm.block_table(s) for s in ids],
    )
    got = graphs._tree_step(c)().logits
    torch.testing.assert_close(got[:2], want, atol=ATOL, rtol=0)
    assert torch.equal(c.node_slots[:2], slots) and (c.node_slots[2:] == -1).all()
    assert torch.equal(cache.k, k_host)  # the same slots written, and none for the padding rows
    with pytest.raises(ValueError, match="exceeds the graphs' 2"):
        GraphedForward(rt, cache, max_blocks=2)._load_tree(
            graphs._static_tree(2, tree.width),
            tree.tokens,
            tree.depth,
            tree.parents,
            tree.num_nodes,
            [9, 5],
            [bm.block_table(s) for s in ids],
        )


def test_the_ancestor_closure_of_a_graph_is_the_trees_ancestor_mask():
    """Tree graphs derive the mask by matrix squaring: equal to DraftTree.ancestor_mask (masked by
    validity) for chains (the deepest case), bushy and ragged trees, and a root-only tree."""
    from specdec.runtime.graphs import ancestor_closure

    g = torch.Generator().manual_seed(4)
    for N in (1, 2, 5, 8, 33, 64):
        chain = [-1] + list(range(N - 1))
        bushy = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, N)]
        tree = DraftTree.from_parents([[0] * N, [0] * N], [chain, bushy])
        tree.num_nodes = torch.tensor([N, max(1, N // 2)])
        want = tree.ancestor_mask() & tree.valid()[:, None, :]
        assert torch.equal(ancestor_closure(tree.parents, tree.valid()), want), N


def test_graphed_calls_pack_host_rows_and_mark_the_live_rows():
    """GraphedCalls (capture=False: the captured function run eagerly on the static buffers): host
    rows of several dtypes, packed per dtype into one buffer, reach the function intact for the B
    real rows, the padding rows of the bucket hold row 0's values of this call, and `live` follows
    the batch size as it shrinks and grows again within one bucket."""
    from specdec.runtime.graphs import GraphedCalls

    calls = GraphedCalls(capture=False)
    seen = []

    def fn(t):
        seen.append({n: x.clone() for n, x in t.items()})
        return {"sum": t["a"].sum(1) + t["c"].float().sum((1, 2)), "live": t["live"].clone()}

    g = torch.Generator().manual_seed(0)
    for B in (3, 4, 3, 4):
        rows = {
            "a": torch.randint(0, 100, (B, 5), generator=g),
            "b": torch.rand(B, generator=g),
            "c": torch.randint(0, 9, (B, 2, 3), generator=g, dtype=torch.int32),
            "m": torch.rand(B, 4, generator=g) > 0.5,
            "d": torch.randint(0, 100, (B,), generator=g),  # a second long row, packed beside "a"
        }
        out = calls(("k",), fn, B, rows, {})
        t = seen[-1]
        for n, x in rows.items():
            assert torch.equal(t[n][:B], x), (B, n)
            assert all(torch.equal(t[n][i], x[0]) for i in range(B, 4)), (B, n)  # padding rows: row 0's
        assert t["live"].tolist() == [True] * B + [False] * (4 - B)
        assert torch.equal(out["sum"], rows["a"].sum(1) + rows["c"].float().sum((1, 2)))
        assert out["live"].all() and out["live"].shape == (B,)
    assert len(calls.calls) == 1  # one bucket, one entry
