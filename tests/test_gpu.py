"""On a CUDA device (`make test-gpu`): every proposer under CUDA graphs and the compiled Triton kernels
keeps greedy equality with `model.generate` (fp32) on architectures with sliding windows (Mistral,
Gemma2/3, GPT-OSS), softcapping (Gemma2) and sinks (GPT-OSS), and the sampled law of every proposer;
batches beyond the largest graph bucket run eagerly on the same metadata."""

import pytest
import torch
from models import noisy_copy, tiny
from replay import ReplayTree
from test_faults import _proposer
from test_generate_sampling import CASES, SETTINGS, WORLDS, exact_law, law_proposer, tv_bound, tvs

import specdec
from specdec import DraftModel, Ngram, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
V = 96


def _prompts(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [21, 9, 14][:B]
    T = max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(3, 12, (4,), generator=g).repeat(n // 4 + 1)[:n]  # recurring n-grams
        mask[b, T - n :] = 1
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "gemma3", "gpt_oss"])
@pytest.mark.parametrize("name", ["none", "ngram", "draft", "medusa", "eagle", "replay"])
def test_greedy_equality_under_graphs(arch, name):
    over = dict(sliding_window=4) if arch == "mistral" else {}
    model = tiny(arch, vocab=V, eos_token_id=None, **over).cuda()
    ids, mask = _prompts()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    if name == "replay":
        refs = {tuple(ids[b][mask[b].bool()].tolist()): ref[b, ids.shape[1] :].tolist() for b in range(len(ids))}
        proposer = ReplayTree(refs, depth=3, vocab=V)
    elif name == "draft":
        proposer = DraftModel(noisy_copy(model, 0.05).cuda(), num_tokens=3)
    elif arch != "llama" and name in ("medusa", "eagle"):
        pytest.skip("random Medusa / EAGLE heads are built for the Llama target's hidden size")
    else:
        proposer = _proposer(name, model)
    engine = specdec.Engine(model, proposer)
    assert engine.cuda_graphs
    for _ in range(2):  # the second call replays the graphs captured by the first
        out = specdec.generate(model, ids, mask, engine=engine, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, ref), (arch, name)
    assert engine.bm.num_free_blocks == engine.bm.num_blocks


def test_a_batch_beyond_the_largest_graph_bucket_runs_eagerly():
    model = tiny("llama", vocab=V).cuda()
    ids = torch.randint(3, V, (200, 5), generator=torch.Generator().manual_seed(1)).cuda()
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(specdec.generate(model, ids, proposer=Ngram(num_tokens=2), max_new_tokens=6), ref)


N_CALLS, ROWS = 60, 128  # 7680 draws per case, batches of one graph bucket


@pytest.mark.parametrize("kind, world", [c for c in CASES if c != ("draft", "peaky")])
def test_the_sampled_law_under_graphs(kind, world):
    """As test_generate_sampling, on the GPU; false failure <= 1e-6 per comparison."""
    w = WORLDS[world]
    target = tiny("llama", vocab=8, init=w["init"], seed=3, eos_token_id=None)
    prompt = torch.tensor(w["prompt"])
    law = exact_law(target, prompt, SamplingParams.make(1, top_k=0, **SETTINGS["t1"]))
    draft = noisy_copy(target, 0.3, seed=4).cuda()
    target = target.cuda()
    proposer = law_proposer(kind, draft)
    engine = specdec.Engine(target, proposer)
    seqs, accepted = [], 0
    for c in range(N_CALLS):
        out = specdec.generate(
            target, prompt.expand(ROWS, -1).cuda(), engine=engine, max_new_tokens=3, do_sample=True, top_k=0,
            seed=torch.arange(ROWS) + c * ROWS, return_dict_in_generate=True, **SETTINGS["t1"],
        )  # fmt: skip
        seqs.append(out.sequences.cpu())
        accepted += out.stats.accepted
    bound = tv_bound(64, N_CALLS * ROWS)
    tv12, tv23 = tvs(torch.cat(seqs), prompt, law)
    assert tv12 < bound and tv23 < bound, (tv12, tv23, bound)
    assert accepted > 0.05 * N_CALLS * ROWS


@pytest.mark.parametrize("name", ["none", "draft"])
def test_a_reused_engine_keeps_its_pool_and_graphs_for_longer_prompts(name):
    """Graphs hold the pool's tensors and the block-table width: a longer prompt must not rebuild
    either (it did: 15 tokens/s for prompts of varying length through one Engine)."""
    model = tiny("llama", vocab=V, eos_token_id=None).cuda()
    proposer = DraftModel(noisy_copy(model, 0.05).cuda(), num_tokens=3) if name == "draft" else None
    engine = specdec.Engine(model, proposer)
    g = torch.Generator().manual_seed(2)
    seen = None
    for n in (5, 40, 150, 400, 17):
        ids = torch.randint(3, V, (1, n), generator=g).cuda()
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert torch.equal(specdec.generate(model, ids, engine=engine, max_new_tokens=12), ref)
        runners = [engine.runner] + ([proposer.runner] if proposer is not None else [])
        now = [x for r in runners for x in (r.cache, r.graphs)]
        assert seen is None or all(a is b for a, b in zip(now, seen, strict=True)), f"rebuilt at prompt length {n}"
        seen = now


@pytest.mark.parametrize("name", ["ngram", "draft", "medusa", "eagle", "eagle3", "eagle-chain"])
def test_the_step_tail_graphs_draw_what_the_eager_tail_draws(name):
    """The step tail (verify, K/V moves, read-back pack), EAGLE's tree expansion and the draft
    model's chain replayed from their graphs give the tokens and counts of the eager ones: a
    greedy row beside sampled ones (top-p), rows that stop at different steps (the batch
    shrinks), min_new_tokens and suppress_tokens bans. A second call with the same shapes captures nothing."""
    from specdec.engine import GenerationParams

    model = tiny("llama", vocab=V, eos_token_id=None).cuda()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 12, (4,), generator=g).repeat(n)[: 3 * n] for n in (7, 3, 5)]
    sampling = SamplingParams.make(3, temperature=[0.0, 0.9, 1.3], top_p=0.95, device="cuda")
    gp = GenerationParams(
        max_new_tokens=24, sampling=sampling, seeds=torch.tensor([11, 12, 13]), min_new_tokens=4,
        eos_token_ids=(5,), suppress_tokens=(7,),
    )  # fmt: skip
    results = {}
    for graphs in (False, True):
        proposer = _proposer(name, model)
        if name == "draft":
            proposer = DraftModel(noisy_copy(model, 0.05).cuda(), num_tokens=3)
        if name in ("ngram", "medusa", "eagle", "eagle3", "eagle-chain", "draft"):
            proposer.graphs = graphs  # the captured proposal: lookup, Medusa, EAGLE (tree or chain), draft model
        engine = specdec.Engine(model, proposer)
        engine.tail_graphs = graphs
        out, stats = engine.run(prompts, gp)
        again, stats2 = engine.run(prompts, gp)
        assert again == out
        if graphs:
            assert stats.graph_captures > 0 and stats2.graph_captures == 0
            assert engine._tails.calls, "no step tail was captured"
        results[graphs] = (out, stats.accepted, stats.drafted, stats.target_forwards)
        assert engine.bm.num_free_blocks == engine.bm.num_blocks
    assert results[True] == results[False]


@pytest.mark.parametrize("name", ["none", "ngram", "draft", "medusa", "eagle", "eagle-chain"])
def test_after_warmup_calls_of_other_lengths_capture_nothing(name):
    """Engine.warmup captures every graph that calls within its shape need (EAGLE's per prefix
    width too): prompts of very different lengths then run without a capture, and their output is
    a fresh engine's."""
    model = tiny("llama", vocab=V, eos_token_id=None).cuda()
    engine = specdec.Engine(model, _proposer(name, model))
    assert engine.warmup(300, 24, do_sample=False) > 0
    g = torch.Generator().manual_seed(3)
    for n in (3, 70, 140, 300):
        ids = torch.randint(3, V, (1, n), generator=g).cuda()
        out = specdec.generate(
            model, ids, engine=engine, max_new_tokens=24, do_sample=False, return_dict_in_generate=True
        )
        assert out.stats.graph_captures == 0, (name, n)
        ref = specdec.generate(model, ids, proposer=_proposer(name, model), max_new_tokens=24, do_sample=False)
        assert torch.equal(out.sequences, ref), (name, n)
