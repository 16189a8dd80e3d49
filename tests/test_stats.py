"""SpecStats per sequence: each row's own steps, tau and acceptance add up to the call's counters,
and rows of one batch get their own numbers."""

import torch
from models import tiny

import specdec
from specdec.metrics import SpecStats


def test_per_sequence_counts_add_up_and_differ_by_row():
    model = tiny("llama", vocab=96)
    g = torch.Generator().manual_seed(4)
    noisy = torch.randint(3, 96, (16,), generator=g)
    loop = torch.randint(3, 12, (4,), generator=g).repeat(4)  # recurring 4-grams: lookups hit
    ids = torch.stack([noisy, loop])
    out = specdec.generate(model, ids, proposer=specdec.Ngram(num_tokens=3), max_new_tokens=24, do_sample=False,
                           return_dict_in_generate=True)  # fmt: skip
    s = out.stats
    rows = s.per_sequence
    assert len(rows) == 2
    assert sum(r["steps"] for r in rows) == s.steps
    assert sum(r["accepted"] for r in rows) == s.accepted and sum(r["drafted"] for r in rows) == s.drafted
    assert sum(r["generated_tokens"] for r in rows) == s.generated_tokens
    assert sum(s.accepted_lengths) == s.steps
    assert sum(n * c for n, c in enumerate(s.accepted_lengths)) == s.accepted
    assert rows[0]["tau"] != rows[1]["tau"]  # each row its own numbers, not the batch's
    merged = SpecStats.merge([s, s])
    assert len(merged.per_sequence) == 4 and merged.accepted_lengths == [2 * c for c in s.accepted_lengths]
    d = s.as_dict()
    assert d["per_sequence"] == rows and d["accepted_length_histogram"] == s.accepted_lengths


def test_plain_rows_count_one_token_a_step():
    model = tiny("qwen2", vocab=96)
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    out = specdec.generate(model, ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    for r in out.stats.per_sequence:
        assert r["generated_tokens"] == 9 and r["steps"] == 8 and r["tau"] == 1.0 and r["drafted"] == 0
