"""Plain decoding launches step k + 1 before reading step k back (Engine._plain_run): the same
tokens and the same coins as one step at a time, rows that finish mid-flight, waiting rows, and no
block left behind."""

import pytest
import torch
from models import tiny

import specdec
from specdec.cache import BlockManager

pytestmark = pytest.mark.gpu  # CI: eager on the CPU; `make test-gpu`: CUDA graphs, pinned copies and events


def _run(model, ids, mask, pipeline, **kw):
    engine = specdec.Engine(model, None, block_size=4, num_blocks=kw.pop("num_blocks", None))
    engine.pipeline = pipeline
    calls = {"plain": 0, "step": 0}
    plain, step = engine._plain_run, engine._step
    engine._plain_run = lambda *a: (calls.__setitem__("plain", calls["plain"] + 1), plain(*a))[1]
    engine._step = lambda *a: (calls.__setitem__("step", calls["step"] + 1), step(*a))[1]
    out = specdec.generate(model, ids, mask, engine=engine, return_dict_in_generate=True, **kw)
    assert engine.bm.num_free_blocks == engine.bm.num_blocks  # nothing stays allocated
    assert (calls["plain"] > 0, calls["step"] > 0) == (pipeline, not pipeline), calls
    return out


def _batch(B=4, T=9, V=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b in range(B):
        mask[b, : b * 2] = 0  # left padding: rows of different lengths
    return ids, mask


@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=False),
        dict(do_sample=True, temperature=0.9, top_k=20, seed=7),
        dict(do_sample=True, top_p=0.8, seed=3, min_new_tokens=6, eos_token_id=[5, 9, 11]),
    ],
    ids=["greedy", "sampled", "sampled-eos"],
)
def test_pipelined_plain_decoding_equals_one_step_at_a_time(settings):
    model = tiny("llama", vocab=96)
    ids, mask = _batch()
    kw = dict(max_new_tokens=14, **settings)
    one = _run(model, ids, mask, pipeline=False, **kw)
    two = _run(model, ids, mask, pipeline=True, **kw)
    assert torch.equal(one.sequences, two.sequences)
    assert one.stats.target_forwards <= two.stats.target_forwards  # at most one extra step per finish
    if "eos_token_id" in settings:  # rows finished early: some rows are shorter than max_new_tokens
        gen = one.sequences[:, ids.shape[1] :]
        assert any(int(t) in (5, 9, 11) for t in gen[:, 6:].flatten()), "no row met an EOS: the test is vacuous"
    if not settings["do_sample"]:
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
        assert torch.equal(two.sequences, ref)


def test_rows_that_wait_for_blocks_are_decoded_after_others_finish():
    """A pool that holds two rows at a time: rows finish, their blocks go, waiting rows start, and
    every row's tokens equal model.generate's."""
    model = tiny("qwen2", vocab=96)
    ids, mask = _batch(B=5, seed=2)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=11, do_sample=False)
    out = _run(model, ids, mask, pipeline=True, max_new_tokens=11, do_sample=False, num_blocks=12)
    assert torch.equal(out.sequences, ref)


def test_commit_keeps_the_slot_of_a_step_in_flight():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, [1, 2, 3])
    bm.commit(0, [1, 2, 3])
    bm.reserve(0, 2)  # position 3 (in flight) and position 4, in a second block
    table = bm.block_table(0)
    bm.commit(0, [7], keep=1)  # position 3 committed; position 4 is being written by the next step
    assert bm.block_table(0) == table and bm.num_tokens(0) == 4
    bm.commit(0, [8])  # nothing in flight any more: the rest goes
    assert bm.block_table(0) == table and bm.num_tokens(0) == 5
    bm.truncate(0, 4)
    assert bm.block_table(0) == table[:1]
