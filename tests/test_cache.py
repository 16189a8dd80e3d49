"""Paged KV cache: block bookkeeping, prefix sharing, copy-on-write, compaction, no leaks."""

import random

import pytest
import torch
from models import noisy_copy, tiny
from replay import ReplayTree

import specdec
from specdec import BlockManager, DraftModel, Engine, Ngram, OutOfBlocksError
from specdec.cache import PagedKVCache

V = 96


@pytest.mark.parametrize("bs", [1, 2, 16])
def test_block_manager_lifecycle(bs):
    bm = BlockManager(num_blocks=64, block_size=bs)
    prompt = list(range(3 * bs + 1))
    assert bm.allocate(0, prompt) == 0
    bm.commit(0, prompt)
    assert bm.num_tokens(0) == len(prompt)
    # a second sequence with the same prompt shares the full blocks but never the last token's block
    assert bm.allocate(1, prompt) == 3 * bs
    assert bm.block_table(1)[:3] == bm.block_table(0)[:3]
    slots, copies = bm.reserve(0, 5)
    assert len(slots) == 5 and copies == [] and slots == bm.slots(0, len(prompt), len(prompt) + 5)
    bm.commit(0, [7, 8])
    bm.truncate(0, len(prompt) + 1)
    assert bm.num_tokens(0) == len(prompt) + 1
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 64


def test_fork_copies_a_shared_partial_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, [1, 2, 3, 4, 5, 6])
    bm.commit(0, [1, 2, 3, 4, 5, 6])
    bm.fork(0, 1)
    assert bm.block_table(1) == bm.block_table(0)
    slots, copies = bm.reserve(1, 1)
    ((src, dst),) = copies
    assert src == bm.block_table(0)[1] and dst == bm.block_table(1)[1] and src != dst
    assert bm.block_table(1)[0] == bm.block_table(0)[0]  # the full block stays shared
    cache = PagedKVCache(1, 8, 4)
    k = torch.randn(1, 1, 6, 2)
    cache.write(0, torch.tensor([bm.slots(0, 0, 6)]), k, k)
    cache.copy_blocks(copies)
    assert torch.equal(cache.gather(0, torch.tensor([bm.slots(1, 0, 6)]))[0], k)
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 8


def test_running_out_of_blocks_is_a_clear_error_that_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate(0, list(range(8)))
    bm.commit(0, list(range(8)))
    table = bm.block_table(0)
    with pytest.raises(OutOfBlocksError, match="needs 2 blocks of 4 slots but only 1 of 3 are free"):
        bm.reserve(0, 5)
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks"):
        bm.allocate(1, list(range(100, 110)))
    assert bm.block_table(0) == table and bm.num_tokens(0) == 8 and bm.num_free_blocks == 1 and 1 not in bm


def test_rollback_unhashes_a_block_that_will_be_rewritten():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate(0, [1, 2, 3])
    bm.commit(0, [1, 2, 3])
    bm.reserve(0, 1)
    bm.commit(0, [4])  # block [3, 4] is full and hashed
    bm.truncate(0, 3)  # rolled back: the block will be overwritten
    assert bm.allocate(1, [1, 2, 3, 4, 5]) == 2  # only [1, 2] may be shared now


@pytest.mark.parametrize("bs", [1, 2, 16])
def test_tree_compaction_keeps_greedy_output_exact(bs):
    model = tiny("llama", vocab=V)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (3, 7), generator=g)
    ref = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    refs = {tuple(ids[b].tolist()): ref[b, 7:].tolist() for b in range(3)}
    engine = Engine(model, ReplayTree(refs, depth=3, vocab=V), block_size=bs)
    out = specdec.generate(
        model,
        ids,
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        engine=engine,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    assert out.stats.tau > 3.5  # every right branch accepted: nodes 2, 4, 6 moved to positions 1, 2, 3


def test_shared_system_prompt_shares_blocks_and_changes_no_output():
    model = tiny("qwen2", vocab=V)
    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, V, (37,), generator=g)
    rows = [torch.cat([system, torch.randint(3, V, (n,), generator=g)]) for n in (3, 6, 1, 4)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, 1
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    engine = Engine(model, DraftModel(noisy_copy(model, 0.1)), block_size=4)
    out = specdec.generate(
        model, ids, mask, max_new_tokens=10, do_sample=False, engine=engine, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref)
    assert out.stats.cached_prompt_tokens == 3 * 36  # rows 2-4 reuse row 1's 9 full blocks
    assert engine.bm.num_free_blocks == engine.bm.num_blocks


def test_rows_wait_for_blocks_and_finish_with_the_same_output():
    model = tiny("llama", vocab=V)
    ids = torch.randint(3, V, (6, 9), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    engine = Engine(model, Ngram(), block_size=4, num_blocks=16)  # about two rows at a time
    out = specdec.generate(model, ids, max_new_tokens=12, do_sample=False, engine=engine)
    assert torch.equal(out, ref)
    with pytest.raises(OutOfBlocksError, match="needs up to .* blocks .* pool has only 16"):
        specdec.generate(model, ids, max_new_tokens=100, do_sample=False, engine=engine)
    assert engine.bm.num_free_blocks == 16


def test_no_block_leaks_over_200_mixed_calls():
    model = tiny("llama", vocab=V, num_hidden_layers=1)
    draft = noisy_copy(model, 0.2)
    engines = [
        Engine(model, p, block_size=bs, num_blocks=n)
        for p, bs, n in [
            (None, 4, 80),
            (Ngram(), 2, 200),
            (DraftModel(draft, num_tokens="auto"), 4, 80),
            (DraftModel(draft, num_tokens=3), 1, 400),
        ]
    ]
    rng = random.Random(0)
    for call in range(200):
        engine = engines[call % len(engines)]
        B = rng.randint(1, 4)
        ids = torch.randint(3, V, (B, rng.randint(1, 12)), generator=torch.Generator().manual_seed(call))
        kw = dict(
            max_new_tokens=rng.randint(1, 8),
            do_sample=rng.random() < 0.5,
            seed=call,
            eos_token_id=rng.choice([None, 5, [5, 6]]),
            pad_token_id=0,
        )
        if rng.random() < 0.2:
            kw["repetition_penalty"] = 1.2
        out = specdec.generate(model, ids, engine=engine, **kw)
        assert out.shape[0] == B
        assert engine.bm.num_free_blocks == engine.bm.num_blocks, call
        dbm = getattr(engine.proposer, "bm", None)
        assert dbm is None or dbm.num_free_blocks == dbm.num_blocks, call


def test_a_prompt_block_is_shared_only_once_its_kv_is_written():
    """allocate() hashes prompt blocks for rows of the same prefill; if that prefill fails (its rows are
    freed before any commit) the hashes go too, so no later prompt reads K/V that were never computed."""
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    bm.allocate(0, prompt)
    assert bm.allocate(1, prompt) == 8  # same prefill: shares the pending blocks
    bm.free(0)
    bm.free(1)  # the forward failed: nothing was committed
    assert bm.allocate(2, prompt) == 0
    bm.commit(2, prompt)  # this time the prefill finished
    bm.free(2)
    assert bm.allocate(3, prompt) == 8  # written blocks stay cached after their holder is freed
