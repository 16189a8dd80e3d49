"""sampling.py against transformers' own logits processors, plus the greedy, RNG and input rules."""

import math

import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec.sampling import RowSeeds, SamplingParams, process_logits, sample_from_probs, uniform

ROWS = [  # (temperature, top_k, top_p, min_p, repetition_penalty)
    (1.0, 0, 1.0, 0.0, 1.0),
    (0.7, 0, 0.8, 0.0, 1.0),
    (1.3, 5, 1.0, 0.0, 1.2),
    (0.5, 10, 0.9, 0.05, 1.5),
    (1.0, 0, 1.0, 0.1, 0.8),
    (2.0, 3, 0.5, 0.2, 1.1),
    (0.9, 50, 0.95, 0.0, 1.0),
]


def _hf_probs(logits, history, t, k, p, m, rep):
    procs = LogitsProcessorList()
    if rep != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(rep))
    if t != 1.0:
        procs.append(TemperatureLogitsWarper(t))
    if k != 0:
        procs.append(TopKLogitsWarper(k))
    if p < 1.0:
        procs.append(TopPLogitsWarper(p))
    procs.append(MinPLogitsWarper(m))
    return procs(history, logits.clone()).softmax(-1)


@pytest.mark.parametrize("seed", range(5))
def test_matches_transformers_processors_row_by_row(seed):
    g = torch.Generator().manual_seed(seed)
    B, V, T = len(ROWS), 64, 12
    logits = torch.randn(B, V, generator=g) * 3
    history = torch.randint(0, V, (B, T), generator=g)
    presence = torch.zeros(B, V, dtype=torch.bool).scatter_(1, history, True)
    cols = list(zip(*ROWS, strict=True))
    params = SamplingParams.make(
        B, temperature=cols[0], top_k=cols[1], top_p=cols[2], min_p=cols[3], repetition_penalty=cols[4]
    )
    ours = process_logits(logits, params, presence)
    assert ours.dtype == torch.float32
    for b, row in enumerate(ROWS):
        ref = _hf_probs(logits[b : b + 1], history[b : b + 1], *row)[0]
        assert torch.equal(ours[b] > 0, ref > 0), f"row {b} {row}: different support"
        torch.testing.assert_close(ours[b], ref, atol=1e-6, rtol=1e-5)


def test_extra_dims_and_fp64_are_kept():
    logits = torch.randn(2, 3, 10, dtype=torch.float64)
    probs = process_logits(logits, SamplingParams.make(2, temperature=[0.5, 1.0], top_k=4))
    assert probs.shape == (2, 3, 10) and probs.dtype == torch.float64
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert ((probs > 0).sum(-1) == 4).all()


def test_greedy_rows_are_one_hot_at_first_argmax_after_penalty():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, -1.0, 0.0], [4.0, 3.0, 0.0, 0.0]])
    presence = torch.tensor([[False] * 4, [False] * 4, [True, False, False, False]])
    params = SamplingParams.make(3, temperature=[0.0, 0.0, 0.0], repetition_penalty=[1.0, 1.0, 2.0])
    probs = process_logits(logits, params, presence)
    assert probs.argmax(-1).tolist() == [1, 0, 1]  # ties -> first index; penalty 4/2 < 3
    assert torch.equal(probs.sum(-1), torch.ones(3)) and torch.equal(probs.max(-1).values, torch.ones(3))


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(2, 20)
    params = SamplingParams.make(2, temperature=[0.0, 0.8])
    probs = process_logits(logits, params)
    assert (probs[0] > 0).sum() == 1 and probs[0].argmax() == logits[0].argmax()
    torch.testing.assert_close(probs[1], (logits[1] / 0.8).softmax(-1))
    assert torch.isfinite(probs).all()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(temperature=-0.1), "temperature=-0.1"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(min_p=1.2), "min_p=1.2"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
        (dict(temperature=[1.0, 1.0, 1.0]), "one value per row"),
    ],
)
def test_bad_parameters_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        SamplingParams.make(2, **kwargs)


def test_batch_mismatch_is_an_error():
    with pytest.raises(ValueError, match="batch 3"):
        process_logits(torch.randn(3, 5), SamplingParams.make(2))


def test_sample_from_probs_never_returns_zero_mass_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(5, 5)
    u = torch.tensor([0.0, 0.25, 0.5, 0.999999, 1 - 2.0**-53], dtype=torch.float64)
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_sample_from_probs_law():
    # chi-square goodness of fit; false-failure probability 1e-6
    p = torch.tensor([0.1, 0.0, 0.4, 0.2, 0.3], dtype=torch.float64)
    n = 200_000
    u = uniform(torch.Generator().manual_seed(0), n, 1, stream=0)[:, 0]
    counts = torch.bincount(sample_from_probs(p.expand(n, 5), u), minlength=5)
    assert counts[1] == 0
    keep = p > 0
    assert stats.chisquare(counts[keep].numpy(), (p[keep] * n).numpy()).pvalue > 1e-6


def test_row_seeds_do_not_depend_on_the_batch():
    a = uniform(RowSeeds(torch.tensor([7, 8, 9]), torch.tensor([3, 3, 5])), 3, 6, stream=1)
    b = uniform(RowSeeds(torch.tensor([9, 7]), torch.tensor([5, 3])), 2, 4, stream=1)
    assert torch.equal(a[2, :4], b[0]) and torch.equal(a[0, :4], b[1])
    assert not torch.equal(a[0], a[1])  # different seeds
    c = uniform(RowSeeds(torch.tensor([7]), torch.tensor([4])), 1, 6, stream=1)
    d = uniform(RowSeeds(torch.tensor([7]), torch.tensor([3])), 1, 6, stream=2)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])  # other step, other stream


def test_row_seeds_are_uniform():
    # Kolmogorov-Smirnov on 200k draws over many seeds and steps; false-failure probability 1e-6
    n = 20_000
    u = uniform(RowSeeds(torch.arange(n) * 7919, torch.arange(n) % 13), n, 10, stream=3)
    assert (u >= 0).all() and (u < 1).all()
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-6
    # consecutive draws of one row are not correlated
    r = torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1].item()
    assert abs(r) < 5 * (1 / math.sqrt(n))
