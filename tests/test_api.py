"""generate(): defaults, return types, seeds, bad input with clear errors, stats."""

import pytest
import torch
from models import noisy_copy, tiny

import specdec
from specdec import DraftModel, Ngram

V = 96


@pytest.fixture(scope="module")
def model():
    return tiny("llama", vocab=V)


def test_defaults_come_from_generation_config(model):
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(0))
    model.generation_config.max_new_tokens = 7
    try:
        out = specdec.generate(model, ids)  # greedy by default, 7 new tokens
        assert torch.equal(out, model.generate(ids, attention_mask=torch.ones_like(ids)))
        assert out.shape == (1, 13)
    finally:
        model.generation_config.max_new_tokens = None


def test_return_dict_and_stats(model):
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(1))
    out = specdec.generate(
        model, ids, proposer=DraftModel(noisy_copy(model, 0.05)), max_new_tokens=10, return_dict_in_generate=True
    )
    s = out.stats
    assert out.sequences.shape == (2, 16) and s.generated_tokens == 20 and s.proposer == "draft"
    assert s.tau == s.emitted / s.steps and 1 <= s.tau <= 5
    assert s.accepted == sum(s.accepted_per_depth) and s.drafted == sum(s.drafted_per_depth)
    assert len(s.ttft_s) == 2 and s.ttft_ms > 0 and s.tpot_ms > 0
    text = str(s)
    assert "tau" in text and "acceptance" in text and "bonus included" in text
    d = s.as_dict()
    assert {"tau", "acceptance_rate", "tpot_ms", "ttft_ms", "per_depth"} <= set(d)


def test_a_rows_output_does_not_depend_on_the_batch(model):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (3, 6), generator=g)
    kw = dict(do_sample=True, temperature=0.9, max_new_tokens=12, proposer=None)
    alone = specdec.generate(model, ids[1:2], seed=[77], **kw)
    together = specdec.generate(model, ids, seed=[5, 77, 9], **kw)
    assert torch.equal(together[1], alone[0])
    with_draft = specdec.generate(model, ids, seed=[5, 77, 9], **{**kw, "proposer": Ngram()})
    again = specdec.generate(model, ids, seed=[5, 77, 9], **{**kw, "proposer": Ngram()})
    assert torch.equal(with_draft, again)


def test_proposer_by_name(model):
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(3))
    out = specdec.generate(model, ids, proposer="ngram", max_new_tokens=5)
    assert torch.equal(out, model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5))
    with pytest.raises(ValueError, match="unknown proposer 'medusa2'"):
        specdec.generate(model, ids, proposer="medusa2", max_new_tokens=5)
    with pytest.raises(ValueError, match="proposer 'draft' needs arguments"):
        specdec.generate(model, ids, proposer="draft", max_new_tokens=5)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(attention_mask=torch.tensor([[0, 0, 0]])), "empty prompt: row 0"),
        (dict(input_ids=torch.zeros(1, 600, dtype=torch.long)), "prompt length 600 .* 512 positions"),
        (dict(max_new_tokens=0), "max_new_tokens.* 0"),
        (dict(do_sample=True, temperature=-0.5), "temperature=-0.5"),
        (dict(do_sample=True, top_p=0.0), "top_p=0.0"),
        (dict(do_sample=True, top_p=1.5), "top_p=1.5"),
        (dict(seed=[1, 2]), "one value per row"),
        (dict(stop_strings=["x"]), "stop_strings needs tokenizer"),
        (dict(verify_mode="fast"), "'fast' is not one of"),
        (dict(input_ids=torch.zeros(3, dtype=torch.long)), r"shape \[B, T\]"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_value(model, kwargs, fragment):
    args = dict(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        specdec.generate(model, **args)


def test_draft_vocabulary_mismatch_is_named(model):
    other = tiny("llama", vocab=V + 4)
    with pytest.raises(ValueError, match=f"draft vocabulary {V + 4} != target vocabulary {V}"):
        specdec.generate(model, torch.tensor([[5, 6, 7]]), proposer=DraftModel(other), max_new_tokens=4)
    eos_other = tiny("llama", vocab=V, eos_token_id=9)
    with pytest.raises(ValueError, match="draft eos_token_id=9 but target eos_token_id=2"):
        specdec.generate(model, torch.tensor([[5, 6, 7]]), proposer=DraftModel(eos_other), max_new_tokens=4)


def test_bad_proposer_settings_are_named():
    with pytest.raises(ValueError, match="num_tokens must be an int >= 1 or 'auto', got 0"):
        DraftModel(tiny("llama"), num_tokens=0)
    with pytest.raises(ValueError, match="num_tokens must be an int >= 1, got 0"):
        Ngram(num_tokens=0)


def test_typical_mode_is_marked_lossy(model):
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(4))
    out = specdec.generate(
        model,
        ids,
        proposer=Ngram(),
        max_new_tokens=6,
        do_sample=True,
        seed=1,
        verify_mode="typical",
        return_dict_in_generate=True,
    )
    assert out.stats.lossy and "LOSSY" in str(out.stats)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: DraftModel(tiny("llama"), num_tokens="auto", max_tokens=0), "max_tokens must be an int >= 1"),
        (lambda: DraftModel(tiny("llama"), num_tokens=2.5), "num_tokens must be an int >= 1 or 'auto', got 2.5"),
        (lambda: Ngram(num_tokens=2.5), "num_tokens must be an int >= 1, got 2.5"),
        (lambda: specdec.Medusa(_medusa_heads(), tree=[]), r"tree=\[\] has no nodes"),
        (lambda: specdec.Medusa(_medusa_heads(), tree=[(0,), (-1,)]), r"rank outside \[0, 1\)"),
        (lambda: specdec.Medusa(_medusa_heads(), tree=[(0, 0, 0)]), "valid depths are 1..2"),
        (lambda: specdec.Medusa(_medusa_heads(), tree=[(1, 0)]), r"needs its prefix \[1\]"),
        (lambda: specdec.Medusa(_medusa_heads(), tree=0), "tree must be an int >= 1"),
        (lambda: specdec.Engine(tiny("llama"), block_size=0), "block_size must be an int >= 1"),
        (lambda: specdec.Engine(tiny("llama"), num_blocks=2.0), "num_blocks must be an int >= 1"),
    ],
)
def test_bad_settings_fail_where_they_are_given(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()


def _medusa_heads():
    from specdec.heads.medusa import MedusaConfig, MedusaHeads

    return MedusaHeads(MedusaConfig(2, 1, 64, V, own_lm_head=False))


def test_the_auto_draft_length_starts_within_its_ceiling():
    assert DraftModel(tiny("llama"), num_tokens="auto", max_tokens=2).num_tokens == 2


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(input_ids=torch.tensor([[5, V, 7]])), r"row 0: token id 96 at position 1 .* vocabulary \[0, 96\)"),
        (dict(input_ids=torch.tensor([[5, 6, 7], [1, -3, 2]])), r"row 1: token id -3 at position 1"),
        (dict(eos_token_id=-1, min_new_tokens=2), r"eos_token_id -1 is outside the model's vocabulary \[0, 96\)"),
        (dict(eos_token_id=V + 5, min_new_tokens=2), "eos_token_id 101 is outside"),
        (dict(eos_token_id=2.5), "eos_token_id must be an int or a list of ints"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 1, got 2.5"),
        (dict(min_new_tokens=-1), "min_new_tokens must be an int >= 0"),
    ],
)
def test_ids_and_lengths_are_checked_where_they_enter(model, kwargs, fragment):
    """Out-of-range ids would be an IndexError deep in torch on the CPU and a device-side assert (which
    breaks every later CUDA call of the process) on a GPU; eos_token_id=-1 would ban token V - 1."""
    args = dict(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        specdec.generate(model, **args)


def test_a_module_that_is_not_a_transformers_model_is_named():
    with pytest.raises(ValueError, match="Linear is not a transformers PreTrainedModel"):
        specdec.generate(torch.nn.Linear(2, 2), torch.tensor([[1, 2]]), max_new_tokens=2)


def test_a_text_iterator_streamer_ends_when_generation_fails(model):
    """A consumer iterating a TextIteratorStreamer in another thread must not hang on an error."""
    import threading

    from test_generate_greedy import byte_bpe_tokenizer
    from transformers import TextIteratorStreamer

    tok = byte_bpe_tokenizer()
    streamer = TextIteratorStreamer(tok, timeout=30)
    chunks = []
    consumer = threading.Thread(target=lambda: chunks.extend(streamer))
    consumer.start()
    with pytest.raises(ValueError, match="token id 500"):
        specdec.generate(model, torch.tensor([[5, 500]]), max_new_tokens=4, streamer=streamer)
    consumer.join(timeout=30)
    assert not consumer.is_alive()


def test_an_eos_id_beyond_the_vocabulary_is_harmless_without_min_new_tokens(model):
    """As in transformers (GPT-2 configs carry eos 50256 whatever their vocabulary): never drawn."""
    ids = torch.tensor([[5, 6, 7]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, eos_token_id=V + 5)
    assert torch.equal(specdec.generate(model, ids, max_new_tokens=4, eos_token_id=V + 5), ref)


def test_a_malformed_plugin_tree_is_an_error_not_a_wrong_walk(model):
    """Each call's first tree passes DraftTree.validate (here a node whose parent comes after it)."""
    from specdec import DraftTree, Proposer

    class Backwards(Proposer):
        max_nodes = 3

        def propose(self, ctx):
            B = ctx.batch_size
            tokens = ctx.roots()[:, None].repeat(1, 3)
            parents = torch.tensor([[-1, 2, 0]] * B)  # node 1's parent is node 2
            depth = torch.tensor([[0, 2, 1]] * B)
            return DraftTree(tokens, parents, depth, torch.full((B,), 3), torch.zeros(B, 3, dtype=torch.int8))

    with pytest.raises(ValueError, match="parent"):
        specdec.generate(model, torch.tensor([[5, 6, 7]]), proposer=Backwards(), max_new_tokens=4)


@pytest.mark.parametrize("extra", [4, -3])
def test_a_draft_padded_to_another_vocabulary_size_drafts_for_the_target(extra):
    """A draft whose embedding matrix has more (or fewer) rows than the target's, same tokenizer
    (Qwen2.5-0.5B 151936 vs 7B 152064): greedy equal to the target alone, drafts accepted; an id the
    draft has no row for is fed to it as 0 (only its drafts change)."""
    target = tiny("llama", vocab=400, init=0.06, eos_token_id=None)
    import copy

    draft = copy.deepcopy(target)  # the target's weights (acceptance shows the padding is handled), own config
    draft.resize_token_embeddings(400 + extra)
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(4))
    if extra < 0:
        ids[1, 3] = 399  # a prompt id beyond the draft's embedding
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    out = specdec.generate(target, ids, proposer=DraftModel(draft, 3), max_new_tokens=16, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and out.stats.accepted > 0
    sampled = specdec.generate(target, ids, proposer=DraftModel(draft, 3), max_new_tokens=8, do_sample=True, seed=1)
    assert sampled.shape == (2, 20) and int(sampled.max()) < 400


def test_warmup_sizes_the_pool_and_changes_no_output(model):
    """Engine.warmup's dummy calls leave nothing allocated, size the pool for the shape it was
    given (no later call of that shape grows it) and do not change what a call generates."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, V, (1, n), generator=g) for n in (5, 40, 90)]
    kw = dict(max_new_tokens=12, do_sample=False)
    fresh = [specdec.generate(model, p, proposer=Ngram(num_tokens=3), **kw) for p in prompts]
    engine = specdec.Engine(model, Ngram(num_tokens=3))
    assert engine.warmup(90, 12, batch_sizes=(2, 1), do_sample=False) == 0  # no graphs on the CPU
    pool = engine.bm
    assert pool.num_blocks >= 2 * engine._row_need(90, 12) and pool.num_free_blocks == pool.num_blocks
    for p, ref in zip(prompts, fresh, strict=True):
        assert torch.equal(specdec.generate(model, p, engine=engine, **kw), ref)
    assert engine.bm is pool  # the pool was not re-made


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        ((0,), {}, "max_prompt_tokens"),
        ((8, 0), {}, "max_new_tokens"),
        ((8,), {"batch_sizes": (1, 0)}, "batch_sizes entry"),
        ((8,), {"batch_sizes": ()}, "batch_sizes is empty"),
        ((500, 100), {}, "exceeds the model's"),
    ],
)
def test_warmup_names_bad_settings(model, args, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        specdec.Engine(model).warmup(*args, **kwargs)
