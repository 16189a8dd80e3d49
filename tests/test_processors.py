"""Parity with `model.generate` for the settings that change the law per tree node: history-dependent
logits processors (transformers' own classes and a user's, called with each node's own history) and
the token bans (suppress / begin-suppress / min-new-tokens / min-length): greedy outputs equal
`model.generate` with the same settings for plain decoding and for every proposer on left-padded
batches; the sampled law at vocabulary 8 is the processed target law (false failure <= 1e-6 per
comparison); scores, logits and logprobs as transformers returns them. Each test has a negative
control that shows it can fail."""

import pytest
import torch
from models import noisy_copy, tiny
from test_faults import _proposer
from test_generate_sampling import N_RUNS, V, exact_law, law_proposer, tv_bound, tvs
from transformers import LogitsProcessor, LogitsProcessorList

import specdec
from specdec.sampling import SamplingParams

VOCAB = 96


class NoImmediateRepeat(LogitsProcessor):
    """A user's processor that reads the history: the last token may not come again."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))


@pytest.fixture(scope="module")
def model():
    return tiny("llama", vocab=VOCAB, init=0.08, eos_token_id=None)


def _batch():
    """Two left-padded rows with recurring n-grams (so that n-gram drafts get accepted)."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(3, 9, (4,), generator=g).repeat(4), torch.randint(3, 9, (3,), generator=g).repeat(3)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, 1
    return ids, mask


SETTINGS = {
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "bad_words_ids": None,  # words of the free output, set in the test
    "sequence_bias": dict(sequence_bias={(5,): 4.0, (6, 7): -3.0}),
    "forced_eos_token_id": dict(forced_eos_token_id=3),
    "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(3, 1.6), eos_token_id=3),
    "user processor": dict(logits_processor=LogitsProcessorList([NoImmediateRepeat()])),
    # the ban settings (device masks, not processors), built from the free output in the test
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_new_tokens": None,
    "min_length": None,
}


def _from_free(setting: str, free: torch.Tensor, T: int) -> dict:
    """Settings whose tokens come from the unconstrained output, so that they bind."""
    g = free[:, T:]
    return {
        "bad_words_ids": dict(bad_words_ids=[[int(g[0, 2])], g[1, 4:6].tolist(), [1, 2, 3]]),
        "suppress_tokens": dict(suppress_tokens=[int(g[0, 1]), int(g[1, 2])]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[int(g[0, 0]), int(g[1, 0])]),
        "min_new_tokens": dict(eos_token_id=int(g[0, 3]), min_new_tokens=8),
        "min_length": dict(eos_token_id=int(g[0, 3]), min_length=T + 8),
    }[setting]


@pytest.mark.parametrize("proposer", ["none", "ngram", "draft", "medusa", "eagle"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_output_is_transformers_output(model, setting, proposer):
    ids, mask = _batch()
    free = model.generate(ids, attention_mask=mask, max_new_tokens=18, do_sample=False, pad_token_id=0)
    T = ids.shape[1]
    setting_kw = SETTINGS[setting] or _from_free(setting, free, T)
    kw = dict(max_new_tokens=18, do_sample=False, pad_token_id=0, **setting_kw)
    ref = model.generate(ids, attention_mask=mask, **kw)
    assert not torch.equal(ref, free), "the setting must change the output, or the test cannot fail"
    prop = _proposer(proposer, model)
    out = specdec.generate(model, ids, mask, proposer=prop, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, ref), (setting, proposer)
    if proposer == "draft" and setting in ("no_repeat_ngram_size", "user processor", "min_new_tokens"):
        assert out.stats.accepted > 0  # drafts were verified under the processors


def test_forced_bos_after_a_one_token_prompt_and_begin_suppress_moves(model):
    """transformers forces the BOS as the first token of a 1-token prompt and then applies
    begin_suppress_tokens to the second generated token."""
    ids = torch.tensor([[5]])
    free = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, forced_bos_token_id=9,
              begin_suppress_tokens=[int(free[0, 2])])  # fmt: skip
    ref = model.generate(ids, **kw)
    assert int(ref[0, 1]) == 9 and not torch.equal(ref, free)
    for prop in (None, specdec.Ngram(num_tokens=2)):
        assert torch.equal(specdec.generate(model, ids, proposer=prop, **kw), ref)


def test_sequence_bias_with_a_repetition_penalty_is_refused(model):
    with pytest.raises(ValueError, match="sequence_bias with repetition_penalty"):
        specdec.generate(model, torch.tensor([[5, 6]]), max_new_tokens=3, sequence_bias={(5,): 1.0},
                         repetition_penalty=1.2)  # fmt: skip
    with pytest.raises(ValueError, match="logits_processor holds int"):
        specdec.generate(model, torch.tensor([[5, 6]]), max_new_tokens=3, logits_processor=[3])


class BanAfter(LogitsProcessor):
    """Bans tokens (last + 1) and (last + 2) mod V: a law that depends on every node's own last token."""

    def __call__(self, input_ids, scores):
        banned = (input_ids[:, -1:] + torch.tensor([[1, 2]])) % scores.shape[1]
        return scores.scatter(1, banned, float("-inf"))


@pytest.mark.parametrize("kind", ["draft", "tree", "eagle2"])
def test_the_sampled_law_is_the_processed_target_law(kind):
    """A user's history processor at T = 1 under a draft chain (IID), a random POINT tree and an
    EAGLE tree: the first three tokens follow the law with the processor applied to every prefix,
    which differs from the law without it by more than the bound (so the test can fail)."""
    target = tiny("llama", vocab=V, init=0.2, seed=3, eos_token_id=None)
    draft = noisy_copy(target, 0.3, seed=4)
    prompt = torch.tensor([[4, 6, 4, 5, 7, 2, 7, 5]])
    params = SamplingParams.make(1, temperature=1.0)
    law = exact_law(target, prompt, params, processors=BanAfter())
    bound = tv_bound(V * V, N_RUNS)
    assert 0.5 * (law.sum(2) - exact_law(target, prompt, params).sum(2)).abs().sum().item() > 3 * bound
    out = specdec.generate(target, prompt.expand(N_RUNS, -1), proposer=law_proposer(kind, draft), max_new_tokens=3,
                           do_sample=True, top_k=0, temperature=1.0, seed=99, logits_processor=[BanAfter()],
                           return_dict_in_generate=True)  # fmt: skip
    tv12, tv23 = tvs(out.sequences, prompt, law)
    assert tv12 < bound and tv23 < bound, (tv12, tv23, bound)
    assert out.stats.accepted > 0.05 * N_RUNS


@pytest.mark.parametrize("proposer", ["none", "ngram", "draft", "eagle"])
def test_scores_and_logits_are_transformers_scores_and_logits(model, proposer):
    """output_scores / output_logits with return_dict_in_generate: greedy, with a history processor,
    the same [B, V] per position as model.generate returns (fp32, tree steps vs one-token steps);
    finished rows hold -inf."""
    ids, mask = _batch()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, no_repeat_ngram_size=3, output_scores=True,
              output_logits=True, return_dict_in_generate=True)  # fmt: skip
    ref = model.generate(ids, attention_mask=mask, **kw)
    out = specdec.generate(model, ids, mask, proposer=_proposer(proposer, model), **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == 12 and len(out.logits) == 12
    for mine, theirs in zip(out.scores + out.logits, ref.scores + ref.logits, strict=True):
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(mine), finite)
        torch.testing.assert_close(mine[finite], theirs[finite], atol=2e-5, rtol=1e-5)


def test_sampled_scores_are_the_warped_scores_of_each_prefix(model):
    """Sampled (temperature 0.7, top-k 20): each position's scores are transformers' temperature
    and top-k warpers applied to the model's logits for the emitted prefix, and the logits are the
    raw ones (teacher-forced recomputation)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    ids = torch.randint(3, 9, (1, 10), generator=torch.Generator().manual_seed(2))
    out = specdec.generate(model, ids, proposer=specdec.Ngram(num_tokens=3), max_new_tokens=10, do_sample=True,
                           temperature=0.7, top_k=20, seed=5, output_scores=True, output_logits=True,
                           return_dict_in_generate=True)  # fmt: skip
    seq = out.sequences
    with torch.no_grad():
        full = model(seq).logits[0].float()
    for i in range(10):
        raw = full[ids.shape[1] - 1 + i][None]
        torch.testing.assert_close(out.logits[i], raw, atol=2e-5, rtol=1e-5)
        want = TopKLogitsWarper(20)(seq[:, : ids.shape[1] + i], TemperatureLogitsWarper(0.7)(None, raw))
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(out.scores[i]), finite)
        torch.testing.assert_close(out.scores[i][finite], want[finite], atol=5e-5, rtol=1e-5)
        token = seq[0, ids.shape[1] + i]
        assert abs(float(out.logprobs[0, i]) - float(torch.log_softmax(want, -1)[0, token])) < 1e-4
    # transformers' output object: key, index and attribute access
    assert out["sequences"] is out.sequences and out[0] is out.sequences
    assert list(out.keys()) == ["sequences", "stats", "scores", "logits", "logprobs"]
