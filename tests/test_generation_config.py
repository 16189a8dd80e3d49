"""generate() resolves its configuration as the installed transformers does, and refuses what it would
silently ignore: defaults (top_k=50, max_length=20), the merge of generation_config with the model's,
transformers' spellings of assisted generation, and an output that autograd accepts."""

import math

import pytest
import torch
from models import noisy_copy, tiny
from transformers import GenerationConfig

import specdec
from specdec import process_logits
from specdec.sampling import SamplingParams

V = 96


@pytest.fixture(scope="module")
def model():
    return tiny("llama", vocab=V, init=0.05)


def test_do_sample_alone_follows_transformers_default_law(model):
    """Only do_sample=True: transformers applies its global top_k=50 (and temperature 1, top_p 1).
    The first token's law is compared with that processed law (false failure <= 1e-6); no draw may
    fall outside the top 50."""
    n = 20_000
    prompt = torch.tensor([[5, 9, 14, 3, 7, 22]])
    out = specdec.generate(model, prompt.expand(n, -1), do_sample=True, max_new_tokens=1, seed=0)
    with torch.no_grad():
        logits = model(prompt).logits[:, -1].double()
    p = process_logits(logits, SamplingParams.make(1, temperature=1.0, top_k=50, top_p=1.0))[0]
    emp = torch.bincount(out[:, -1], minlength=V).double() / n
    bound = math.sqrt((V * math.log(2) + math.log(1e6)) / (2 * n))
    assert 0.5 * (emp - p).abs().sum().item() < bound
    assert bool((p[out[:, -1]] > 0).all()), "a token outside transformers' top 50 was drawn"
    assert (p > 0).sum() == 50  # the test can fail: without top-k, 46 more tokens would be drawn


def test_the_length_rule_and_its_error_are_transformers(model):
    """No length set: transformers' default max_length (20) counts new tokens; a max_length that is
    set counts the prompt, and a prompt that long is an error in both."""
    long = torch.randint(3, V, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = model.generate(long, attention_mask=torch.ones_like(long), do_sample=False)
    assert torch.equal(specdec.generate(model, long), ref) and ref.shape[1] == 24 + 20
    ref = model.generate(long, attention_mask=torch.ones_like(long), do_sample=False, max_length=30)
    assert torch.equal(specdec.generate(model, long, max_length=30), ref) and ref.shape[1] == 30
    with pytest.raises(ValueError, match="Input length of input_ids is 24, but `max_length` is set to 20"):
        specdec.generate(model, long, max_length=20)


def test_generation_config_is_merged_with_the_models(model):
    """A generation_config= with only a length keeps the model's EOS (it was dropped)."""
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(3))
    free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    eos = int(free[0, 7 + 4])
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        gc = GenerationConfig(max_new_tokens=16)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc, pad_token_id=0)
        out = specdec.generate(model, ids, generation_config=gc, pad_token_id=0)
        assert torch.equal(out, ref) and out.shape[1] < 7 + 16
    finally:
        model.generation_config.eos_token_id = old


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_beams", 4),
        ("guidance_scale", 1.5),
    ],
)
@pytest.mark.parametrize("via", ["keyword", "generation_config", "model.generation_config"])
def test_a_field_specdec_does_not_implement_is_refused_by_name(model, field, value, via):
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(max_new_tokens=4, do_sample=field in ("typical_p", "epsilon_cutoff", "eta_cutoff"))
    if field in ("output_scores", "output_logits"):
        kw["return_dict_in_generate"] = True
    if via == "keyword":
        call = lambda: specdec.generate(model, ids, **kw, **{field: value})  # noqa: E731
    elif via == "generation_config":
        call = lambda: specdec.generate(model, ids, generation_config=GenerationConfig(**{field: value}), **kw)  # noqa: E731
    else:
        call = lambda: specdec.generate(model, ids, **kw)  # noqa: E731
    gc = model.generation_config
    saved = getattr(gc, field, None)
    if via == "model.generation_config":
        setattr(gc, field, value)
    try:
        with pytest.raises(ValueError, match=field):
            call()
    finally:
        setattr(gc, field, saved)


def test_an_unknown_keyword_is_named(model):
    with pytest.raises(ValueError, match="keyword.*topk"):
        specdec.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, topk=5)


def test_transformers_spellings_of_assisted_generation(model):
    ids = torch.randint(3, 12, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    draft = noisy_copy(model, 0.05)
    out = specdec.generate(model, ids, assistant_model=draft, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and out.stats.proposer == "draft"
    out = specdec.generate(model, ids, prompt_lookup_num_tokens=3, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and out.stats.proposer == "ngram"
    with pytest.raises(ValueError, match="give one of proposer, assistant_model"):
        specdec.generate(model, ids, proposer="ngram", assistant_model=draft, max_new_tokens=4)


def test_the_output_can_be_trained_on(model):
    """transformers' generate runs under no_grad: RL loops backpropagate through a forward of its output."""
    out = specdec.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    assert not out.is_inference()
    loss = model(out, labels=out).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad()


def test_transformers_entry_point_runs_specdecs_loop(model):
    """model.generate(custom_generate=specdec.custom_generate(proposer)) and the repository folder form."""
    ids = torch.randint(3, 12, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    seen = []

    class Watch(specdec.Ngram):
        def propose(self, ctx):
            seen.append(ctx.batch_size)
            return super().propose(ctx)

    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, custom_generate=specdec.custom_generate(Watch(3)))
    assert torch.equal(out, ref) and seen, "specdec's loop ran"
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, custom_generate=specdec.custom_generate_repo(),
        trust_remote_code=True, proposer=specdec.Ngram(3), return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, ref) and out.stats.proposer == "ngram"
    from transformers import LogitsProcessorList, NoBadWordsLogitsProcessor

    # a user's own processor reaches specdec's loop and is applied at every node (none was: refused before)
    user = LogitsProcessorList([NoBadWordsLogitsProcessor([[int(ref[0, 9])]], eos_token_id=None)])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, logits_processor=user)
    assert not torch.equal(want, ref)
    for custom in (specdec.custom_generate(specdec.Ngram(3)), specdec.custom_generate_repo()):
        extra = dict(trust_remote_code=True, proposer=specdec.Ngram(3)) if isinstance(custom, str) else {}
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, logits_processor=user,
                             custom_generate=custom, **extra)  # fmt: skip
        assert torch.equal(out, want)


class _StopAfter:
    """A user's criterion: stop a row once it has emitted one of `tokens` after the prompt."""

    def __init__(self, prompt_len: int, tokens: set[int]):
        self.prompt_len, self.tokens = prompt_len, tokens

    def __call__(self, input_ids, scores, **kwargs):
        tail = input_ids[:, self.prompt_len :]
        return torch.tensor([bool(set(row.tolist()) & self.tokens) for row in tail])


@pytest.mark.parametrize("proposer", [None, "ngram"])
def test_user_stopping_criteria_stop_where_transformers_stops(model, proposer):
    """A user's StoppingCriteria: the same sequences as model.generate with it, for plain decoding and
    for a proposer whose steps emit several tokens (the criterion is checked after each one)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Criterion(_StopAfter, StoppingCriteria):
        pass

    ids = torch.randint(3, 12, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    gen = free[:, 9:]
    stop_at = {int(gen[0, 5]), int(gen[1, 3])}  # tokens each row meets before its end
    crit = StoppingCriteriaList([Criterion(9, stop_at)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, stopping_criteria=crit,
                         pad_token_id=0)  # fmt: skip
    assert ref.shape[1] < free.shape[1]  # the criterion stopped both rows early: the test can fail
    prop = specdec.Ngram(num_tokens=3) if proposer else None
    out = specdec.generate(model, ids, mask, proposer=prop, max_new_tokens=16, do_sample=False,
                           stopping_criteria=crit, pad_token_id=0)  # fmt: skip
    assert torch.equal(out, ref)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, stopping_criteria=crit, pad_token_id=0,
                         custom_generate=specdec.custom_generate(prop))  # fmt: skip
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="stopping_criteria holds int, which is not callable"):
        specdec.generate(model, ids, mask, max_new_tokens=4, stopping_criteria=[3])


def test_min_length_counts_the_prompt_like_transformers(model):
    """min_length bans EOS while prompt + generated < min_length (the padded prompt, as transformers)."""
    ids = torch.randint(3, 12, (2, 6), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    eos = int(free[0, 6])  # row 0's first generated token: an EOS it must not emit before min_length
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ref = model.generate(ids, min_length=10, **kw)
    assert ref[0, 6] != eos  # the ban changed the output: the comparison can fail
    assert torch.equal(specdec.generate(model, ids, min_length=10, **kw), ref)
    assert torch.equal(specdec.generate(model, ids, min_length=10, proposer=specdec.Ngram(3), **kw), ref)


def test_max_time_stops_every_row():
    """max_time: transformers' MaxTimeCriteria, checked per emitted token; a zero budget stops after one."""
    model = __import__("models").tiny("llama", vocab=96)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    out = specdec.generate(model, ids, max_new_tokens=30, do_sample=False, max_time=0.0, pad_token_id=0,
                           eos_token_id=None)  # fmt: skip
    assert out.shape[1] == 5 + 1
    out = specdec.generate(model, ids, max_new_tokens=30, do_sample=False, max_time=60.0, eos_token_id=None)
    assert out.shape[1] == 5 + 30


def test_num_return_sequences_repeats_rows_with_their_own_draws(model):
    ids = torch.randint(3, 12, (2, 5), generator=torch.Generator().manual_seed(9))
    out = specdec.generate(model, ids, max_new_tokens=12, do_sample=True, num_return_sequences=3, seed=1,
                           eos_token_id=None)  # fmt: skip
    assert out.shape == (6, 17)
    assert torch.equal(out[:, :5], ids.repeat_interleave(3, dim=0))  # transformers' row order
    assert len({tuple(r) for r in out[:3, 5:].tolist()}) > 1  # the repeats are separate draws
    with pytest.raises(ValueError, match="num_return_sequences"):  # transformers words it
        specdec.generate(model, ids, max_new_tokens=4, do_sample=False, num_return_sequences=2)


@pytest.mark.parametrize("proposer", [None, "ngram"])
def test_suppress_tokens_like_transformers(model, proposer):
    """suppress_tokens (never) and begin_suppress_tokens (not as the first token): the same sequences as
    model.generate, with tokens chosen from the free output so that the bans bite."""
    ids = torch.randint(3, 12, (2, 6), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    free = model.generate(ids, **kw)[:, 6:]
    never, first = [int(free[0, 2]), int(free[1, 4])], [int(free[0, 0]), int(free[1, 0])]
    ref = model.generate(ids, suppress_tokens=never, begin_suppress_tokens=first, **kw)
    assert not torch.equal(ref[:, 6:], free)  # the bans changed the output: the comparison can fail
    prop = specdec.Ngram(num_tokens=3) if proposer else None
    out = specdec.generate(model, ids, proposer=prop, suppress_tokens=never, begin_suppress_tokens=first, **kw)
    assert torch.equal(out, ref)
    sampled = specdec.generate(model, ids, proposer=prop, suppress_tokens=never, begin_suppress_tokens=first,
                               **{**kw, "do_sample": True, "seed": 3})  # fmt: skip
    gen = sampled[:, 6:]
    assert not any(t in never for t in gen.flatten().tolist()) and not any(t in first for t in gen[:, 0].tolist())
    with pytest.raises(ValueError, match="suppress_tokens holds -3: token ids must be >= 0"):
        specdec.generate(model, ids, suppress_tokens=[-3], **kw)


def test_warpers_are_transformers_own_in_its_order():
    """process_logits with typical / epsilon / eta gives what transformers' processor list gives."""
    from transformers import GenerationConfig
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper

    from specdec import SamplingParams, process_logits
    from specdec.api import _warpers

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 3
    gc = GenerationConfig(do_sample=True, temperature=0.8, typical_p=0.7, epsilon_cutoff=0.01, eta_cutoff=0.02)
    warpers = _warpers(gc, "cpu")
    assert [type(w).__name__ for w in warpers] == ["TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper"]
    theirs = LogitsProcessorList([TemperatureLogitsWarper(0.8), *warpers])(None, logits.clone()).softmax(-1)
    ours = process_logits(logits, SamplingParams.make(4, temperature=0.8, warpers=warpers))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours == 0).sum() > (process_logits(logits, SamplingParams.make(4, temperature=0.8)) == 0).sum()


def test_top_h_is_refused_where_transformers_has_it(model):
    if not hasattr(GenerationConfig(), "top_h"):
        pytest.skip("this transformers has no top_h")
    with pytest.raises(ValueError, match="top_h"):
        specdec.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=True, top_h=0.5)
