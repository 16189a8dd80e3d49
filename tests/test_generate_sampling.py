"""End-to-end sampling exactness: speculative output has the target's own law (vocab 8, fp32).

Token 1 comes from the prefill; tokens 2 and 3 come from speculative steps. The joint laws of
(token 1, token 2) and (token 2, token 3) over many seeded rows of one batch are compared with the
exact autoregressive law by enumeration. Each comparison fails falsely with probability <= 1e-6
(TV bound sqrt((K ln 2 + ln(1/delta)) / 2n), K = 64 categories, n rows).
"""

import math

import pytest
import torch
from models import noisy_copy, tiny
from replay import ReplayTree

import specdec
from specdec import DraftModel, Eagle, Medusa, Ngram, SamplingParams, process_logits
from specdec.heads.eagle import EagleDrafter
from specdec.heads.medusa import MedusaConfig, MedusaHeads
from specdec.tree import Law

V, N_RUNS, DELTA = 8, 30_000, 1e-6
SETTINGS = {"t1": dict(temperature=1.0, top_p=1.0), "t07_p08": dict(temperature=0.7, top_p=0.8)}


def tv_bound(k: int, n: int) -> float:
    return math.sqrt((k * math.log(2) + math.log(1 / DELTA)) / (2 * n))


def exact_law(model, prompt: torch.Tensor, params: SamplingParams, processors=None) -> torch.Tensor:
    """[V, V, V] law of the first three generated tokens, by enumeration; processors: a transformers
    LogitsProcessor applied with each prefix as its input_ids."""

    def p(seq):
        proc = None if processors is None else (lambda s: processors(seq, s))
        with torch.no_grad():
            return process_logits(model(seq).logits[:, -1].double(), params, processors=proc)[0]

    law = torch.zeros(V, V, V, dtype=torch.float64)
    p1 = p(prompt)
    for a in range(V):
        s1 = torch.cat([prompt, torch.tensor([[a]])], 1)
        p2 = p(s1)
        for b in range(V):
            law[a, b] = p1[a] * p2[b] * p(torch.cat([s1, torch.tensor([[b]])], 1))
    return law


def tvs(seqs: torch.Tensor, prompt: torch.Tensor, law: torch.Tensor) -> tuple[float, float]:
    new = seqs[:, prompt.shape[1] :]

    def emp(i, j):
        return torch.bincount(new[:, i] * V + new[:, j], minlength=V * V).double().view(V, V) / len(new)

    return (0.5 * (emp(0, 1) - law.sum(2)).abs().sum().item(), 0.5 * (emp(1, 2) - law.sum(0)).abs().sum().item())


# A peaky target that continues a run of 7s (so that lookups get accepted), and a spread-out one.
WORLDS = {
    "peaky": dict(init=0.6, prompt=[[1, 2, 7, 7, 7, 7, 7, 7]]),
    "spread": dict(init=0.2, prompt=[[4, 6, 4, 5, 7, 2, 7, 5]]),
}


@pytest.fixture(scope="module")
def worlds():
    out = {}
    for name, w in WORLDS.items():
        target = tiny("llama", vocab=V, init=w["init"], seed=3, eos_token_id=None)
        out[name] = (target, noisy_copy(target, 0.3, seed=4), torch.tensor(w["prompt"]))
    return out


class RandomTree(ReplayTree):
    """POINT trees of random tokens, two children per node, depth 2: exercises siblings and compaction."""

    def __init__(self):
        super().__init__({}, depth=2, vocab=V)

    def propose(self, ctx):
        g = torch.Generator().manual_seed(int(ctx.rng.step[0]) + 7)
        B = ctx.batch_size
        tokens = torch.randint(0, V, (B, 7), generator=g)
        tokens[:, 0] = ctx.roots()
        tree = specdec.DraftTree.from_parents(tokens.tolist(), [[-1, 0, 0, 1, 1, 2, 2]] * B)
        keep = ctx.max_drafts.clamp(max=2)
        tree.num_nodes = torch.where(keep >= 2, 7, torch.where(keep == 1, 3, 1))
        return tree


class ArgmaxLabelledIID(DraftModel):
    """A deliberately wrong proposer: drafts the argmax of q but claims it sampled from q (IID)."""

    def propose(self, ctx):
        tree = super().propose(ctx)
        if tree.draft_probs is not None:
            tree.tokens = torch.where(tree.law == int(Law.IID), tree.draft_probs.argmax(-1), tree.tokens)
        return tree


def _run(model, prompt, proposer, setting, n=N_RUNS):
    return specdec.generate(
        model,
        prompt.expand(n, -1),
        proposer=proposer,
        max_new_tokens=3,
        do_sample=True,
        top_k=0,
        seed=12345,
        return_dict_in_generate=True,
        **SETTINGS[setting],
    )


CASES = [
    ("ngram", "peaky"),
    ("draft", "peaky"),
    ("draft", "spread"),
    ("tree", "spread"),
    ("medusa", "spread"),  # sampled rows: each node's children drawn without replacement from q
    ("medusa_topk", "spread"),
    ("eagle2", "spread"),  # sampled rows: children drawn without replacement from q (WOR)
    ("eagle2_topk", "spread"),  # EAGLE-2's top-k trees (POINT) at every temperature
    ("eagle3_tree", "spread"),
    ("eagle3_chain", "spread"),
]


def _eagle(version: int, chain: bool, sampled_trees: bool | None = None):
    """A random EAGLE drafter: EAGLE-2 trees (POINT) or an EAGLE-3 chain over a 6-token draft
    vocabulary (sampled rows draw from its q: IID)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        num_hidden_layers=1,
        draft_vocab_size=6,
        eagle_aux_hidden_state_layer_ids=[0, 1, 1],
    )
    torch.manual_seed(6)
    drafter = EagleDrafter(cfg, version=version)
    if version == 3:
        drafter.set_vocab_map(torch.tensor([0, 1, 2, 4, 5, 7]))
    eagle = Eagle(drafter, depth=2, top_k=3, total_tokens=6, chain=chain)
    eagle.sampled_trees = sampled_trees
    return eagle


def _medusa(sampled_trees: bool | None = None):
    torch.manual_seed(5)
    heads = MedusaHeads(MedusaConfig(num_heads=2, num_layers=1, hidden_size=64, vocab_size=V))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    medusa = Medusa(heads, tree=6)
    medusa.sampled_trees = sampled_trees
    return medusa


def law_proposer(kind: str, draft):
    """The proposer of a CASES kind (draft: the world's draft model)."""
    return {
        "draft": lambda: DraftModel(draft, num_tokens=3),
        "ngram": lambda: Ngram(num_tokens=3),
        "tree": RandomTree,
        "medusa": _medusa,
        "eagle2": lambda: _eagle(1, chain=False),
        "eagle2_topk": lambda: _eagle(1, chain=False, sampled_trees=False),
        "medusa_topk": lambda: _medusa(sampled_trees=False),
        "eagle3_tree": lambda: _eagle(3, chain=False),
        "eagle3_chain": lambda: _eagle(3, chain=True),
    }[kind]()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind, world", CASES)
def test_first_tokens_follow_the_target_law(worlds, kind, world, setting):
    target, draft, prompt = worlds[world]
    law = exact_law(target, prompt, SamplingParams.make(1, top_k=0, **SETTINGS[setting]))
    proposer = law_proposer(kind, draft)
    out = _run(target, prompt, proposer, setting)
    bound = tv_bound(V * V, N_RUNS)
    tv12, tv23 = tvs(out.sequences, prompt, law)
    assert tv12 < bound and tv23 < bound, (tv12, tv23, bound)
    assert out.stats.accepted > 0.05 * N_RUNS  # speculation really happened


class RankedLabelledWOR(Eagle):
    """A deliberately wrong proposer: each WOR child is replaced by q's next most likely token (the
    k-th child by the k-th largest q), still claimed drawn without replacement from q."""

    def propose(self, ctx):
        tree = super().propose(ctx)
        if tree.draft_probs is None:
            return tree
        N = tree.width
        same = tree.parents[:, :, None] == tree.parents[:, None, :]
        rank = (same & (torch.arange(N)[None, :] < torch.arange(N)[:, None])).sum(-1)  # earlier siblings
        ranked = tree.draft_probs.argsort(-1, descending=True).gather(2, rank[:, :, None])[:, :, 0]
        tree.tokens = torch.where(tree.law == int(Law.WOR), ranked, tree.tokens)
        return tree


def test_the_sampling_test_catches_ranked_children_verified_as_wor(worlds):
    """The negative control of sampled trees: the same shapes with top-ranked children labelled WOR
    fail the law test. (Verifying truly sampled children as POINT would not fail: a POINT test is
    exact for any child chosen independently of the target, only less likely to accept.)"""
    target, _, prompt = worlds["spread"]
    wrong = _eagle(1, chain=False)
    wrong.__class__ = RankedLabelledWOR
    law = exact_law(target, prompt, SamplingParams.make(1, top_k=0, temperature=1.0))
    out = _run(target, prompt, wrong, "t1")
    assert max(tvs(out.sequences, prompt, law)) > 3 * tv_bound(V * V, N_RUNS)


def test_the_sampling_test_catches_argmax_drafts_verified_as_iid(worlds):
    target, _, prompt = worlds["spread"]
    sharp = noisy_copy(target, 0.0)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(2.0)  # q is sharper than p: the argmax has q(x) > p(x)
    law = exact_law(target, prompt, SamplingParams.make(1, top_k=0, temperature=1.0))
    out = _run(target, prompt, ArgmaxLabelledIID(sharp, num_tokens=3), "t1")
    assert tvs(out.sequences, prompt, law)[1] > 3 * tv_bound(V * V, N_RUNS)


@pytest.mark.parametrize("kind", ["draft", "tree"])
def test_typical_epsilon_eta_follow_transformers_warpers(worlds, kind):
    """typical_p, epsilon_cutoff and eta_cutoff are transformers' own warpers applied to the target law
    at every node: the first tokens follow the law they define (and that law differs from the
    unfiltered one by more than the test's bound, so the test can fail)."""
    from transformers import GenerationConfig

    from specdec.api import _warpers

    target, draft, prompt = worlds["spread"]
    settings = dict(temperature=0.9, typical_p=0.9, epsilon_cutoff=0.03, eta_cutoff=0.05)
    gc = GenerationConfig(do_sample=True, **settings)
    law = exact_law(target, prompt, SamplingParams.make(1, temperature=0.9, warpers=_warpers(gc, "cpu")))
    plain_law = exact_law(target, prompt, SamplingParams.make(1, temperature=0.9))
    bound = tv_bound(V * V, N_RUNS)
    assert 0.5 * (law.sum(2) - plain_law.sum(2)).abs().sum().item() > 3 * bound
    out = specdec.generate(target, prompt.expand(N_RUNS, -1), proposer=law_proposer(kind, draft), max_new_tokens=3,
                           do_sample=True, top_k=0, seed=777, return_dict_in_generate=True, **settings)  # fmt: skip
    tv12, tv23 = tvs(out.sequences, prompt, law)
    assert tv12 < bound and tv23 < bound, (tv12, tv23, bound)
    assert out.stats.accepted > 0.05 * N_RUNS


@pytest.mark.parametrize("extra", [1, -1])
def test_a_draft_padded_to_another_vocabulary_keeps_the_target_law(worlds, monkeypatch, extra):
    """A draft with one embedding row more (its logits cut to the target's width) or fewer (padded
    with -inf; the target's last id fed to it as 0): the first tokens follow the target's law."""
    import specdec.proposers.draft_model as dm

    monkeypatch.setattr(dm, "VOCAB_PADDING", 0.2)  # V = 8: one row is 12 %
    target, draft, prompt = worlds["spread"]
    import copy

    padded = copy.deepcopy(draft)  # resizing updates the config in place: not the fixture's
    padded.resize_token_embeddings(V + extra)
    law = exact_law(target, prompt, SamplingParams.make(1, top_k=0, temperature=1.0))
    out = _run(target, prompt, DraftModel(padded, num_tokens=3), "t1")
    bound = tv_bound(V * V, N_RUNS)
    tv12, tv23 = tvs(out.sequences, prompt, law)
    assert tv12 < bound and tv23 < bound, (tv12, tv23, bound)
    assert out.stats.accepted > 0.05 * N_RUNS
