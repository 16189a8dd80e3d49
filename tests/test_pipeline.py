"""Plain decoding launches step k + 1 before reading step k back (Engine._plain_run): the same
tokens and the same coins as one step at a time, rows that finish mid-flight, waiting rows, and no
block left behind."""

import pytest
import torch
from models import tiny

import specdec
from specdec.cache import BlockManager

# CI: eager on the CPU, with the kernels' torch references (conftest.reference_kernels); `make test-gpu`:
# CUDA graphs on the real kernels, pinned copies and events
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("reference_kernels")]


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


# ----------------------------------------------------------------------------- speculative steps
# On a CUDA device (`make test-gpu`) the target and the proposers' steps run as captured graphs; on
# the CPU the proposers' captured functions run eagerly on their static buffers.

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _graphs():
    from specdec.runtime.graphs import GraphedCalls

    return True if DEV == "cuda" else GraphedCalls(capture=False)


def _spec_run(model, proposer, prompts, gp, pipeline):
    """Engine.run with the pipeline on or off; counts the proposals drafted from a step in flight."""
    from specdec.engine import Engine

    engine = Engine(model, proposer)
    engine.pipeline = pipeline
    seen = {"ahead": 0, "proposals": 0, "spec_run": 0, "after_finish": 0}
    propose, spec_run, land = proposer.propose, engine._spec_run, engine._land

    def land_spy(rows, *a, **k):
        seen["after_finish"] += any(r.done for r in rows)  # a step in flight lands after a row finished
        return land(rows, *a, **k)

    engine._land = land_spy

    def spy(ctx):
        seen["proposals"] += 1
        seen["ahead"] += ctx.ahead is not None
        return propose(ctx)

    proposer.propose = spy
    engine._spec_run = lambda *a: (seen.__setitem__("spec_run", seen["spec_run"] + 1), spec_run(*a))[1]
    out, stats = engine.run(prompts, gp)
    assert engine.bm.num_free_blocks == engine.bm.num_blocks  # nothing stays allocated in the target's pool
    drafter_bm = getattr(proposer, "bm", None)
    if drafter_bm is not None:  # nor in EAGLE's drafter pool
        assert drafter_bm.num_free_blocks == drafter_bm.num_blocks
    return out, stats, seen


def _eagle(mode):
    from test_eagle import make_drafter

    from specdec import Eagle

    shape = dict(chain=True) if mode == "chain" else dict(top_k=2, total_tokens=6)
    proposer = Eagle(make_drafter(1), depth=3, **shape)
    proposer.sampled_trees = mode == "sampled"
    proposer.graphs = _graphs()
    return proposer


def _medusa(mode):
    from test_medusa import _heads

    from specdec import Medusa

    proposer = Medusa(_heads(), tree=10)
    proposer.sampled_trees = mode == "sampled"
    proposer.graphs = _graphs()
    return proposer


def _ngram(mode):
    from specdec import Ngram

    proposer = Ngram(num_tokens=3)
    proposer.graphs = _graphs()
    return proposer


def _draft(mode, model):
    from models import noisy_copy

    from specdec import DraftModel

    proposer = DraftModel(noisy_copy(model.cpu(), 0.05).to(DEV), num_tokens=3)
    model.to(DEV)
    proposer.graphs = _graphs()
    return proposer


@pytest.mark.parametrize("temps", [[0.0, 0.0, 0.0], [0.8, 0.0, 1.3]], ids=["greedy", "mixed"])
@pytest.mark.parametrize(
    "name,mode",
    [
        ("eagle", "topk"),
        ("eagle", "sampled"),
        ("eagle", "chain"),
        ("medusa", "topk"),
        ("medusa", "sampled"),
        ("draft", "chain"),
        ("ngram", "lookup"),
    ],
)
def test_pipelined_speculative_steps_equal_one_step_at_a_time(name, mode, temps):
    """Engine._spec_run drafts step n + 1 from step n's device outputs (`Ahead`) and scores it after
    the tokens step n will commit (a device-side advance): the same tokens, the same accepted
    counts and the same number of target forwards as one step at a time, for greedy and sampled
    rows in one batch, rows of three lengths; greedy batches equal model.generate."""
    from test_eagle import V as EAGLE_V

    from specdec.engine import GenerationParams
    from specdec.sampling import SamplingParams

    if name == "eagle":  # test_eagle's target
        model = tiny("llama", vocab=EAGLE_V, init=0.5, seed=2, num_hidden_layers=4, eos_token_id=None).to(DEV)
        make, V = _eagle, EAGLE_V
    elif name == "draft":
        model, V = tiny("llama", vocab=96, eos_token_id=None).to(DEV), 96

        def make(mode):
            return _draft(mode, model)
    elif name == "ngram":
        model, make, V = tiny("llama", vocab=96, eos_token_id=None).to(DEV), _ngram, 96
    else:
        model, make, V = tiny("llama", vocab=96, eos_token_id=None).to(DEV), _medusa, 96
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in (7, 12, 5)]
    gp = GenerationParams(
        max_new_tokens=24,
        sampling=SamplingParams.make(3, temperature=temps, top_p=[1.0, 1.0, 0.9]),
        seeds=torch.tensor([1, 2, 3]),
    )
    one, s1, seen1 = _spec_run(model, make(mode), prompts, gp, pipeline=False)
    two, s2, seen2 = _spec_run(model, make(mode), prompts, gp, pipeline=True)
    assert seen1["ahead"] == seen1["spec_run"] == 0
    # most steps ran ahead (the draft's chains accept less of a sampled row: more steps near the end,
    # where no row has room for two steps' tokens and each step is launched alone)
    assert seen2["spec_run"] > 0 and seen2["ahead"] >= seen2["proposals"] // (3 if name == "draft" else 2), seen2
    assert one == two
    assert s1.target_forwards == s2.target_forwards
    assert s1.accepted_per_depth == s2.accepted_per_depth and s2.tau > 1.0  # drafts were accepted: advance > 1
    if max(temps) == 0:
        for p, o in zip(prompts, two, strict=True):
            ref = model.generate(p[None].to(DEV), attention_mask=torch.ones(1, len(p), dtype=torch.long, device=DEV),
                                 max_new_tokens=24, do_sample=False).cpu()  # fmt: skip
            assert o == ref[0, len(p) :].tolist()


@pytest.mark.parametrize("name", ["medusa", "eagle"])
def test_more_rows_than_the_largest_graph_bucket_draft_eagerly(name):
    """Captured proposals take at most BATCH_BUCKETS[-1] rows: a larger batch runs the same steps
    eagerly, one step at a time, and greedy rows equal model.generate (it raised before)."""
    from test_eagle import V as EAGLE_V

    from specdec.engine import GenerationParams
    from specdec.runtime.graphs import BATCH_BUCKETS
    from specdec.sampling import SamplingParams

    V = EAGLE_V if name == "eagle" else 96
    model = tiny("llama", vocab=V, init=0.5, seed=2, num_hidden_layers=4, eos_token_id=None).to(DEV)
    B = BATCH_BUCKETS[-1] + 2
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, V, (5,), generator=g) for _ in range(B)]
    gp = GenerationParams(max_new_tokens=12, sampling=SamplingParams.make(B, temperature=0.0), seeds=torch.arange(B))
    make = _eagle if name == "eagle" else _medusa
    two, _, seen = _spec_run(model, make("topk"), prompts, gp, pipeline=True)
    assert seen["ahead"] == 0 and seen["proposals"] > 0
    ids = torch.stack(prompts).to(DEV)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False).cpu()
    assert two == ref[:, 5:].tolist()


def test_ngram_above_the_largest_graph_bucket_equals_one_step_at_a_time():
    """More rows than a graph takes (BATCH_BUCKETS[-1]): the steps are not pipelined (the engine
    keeps them for batches its captured proposals take), the lookup runs on the host, and the
    tokens equal one step at a time."""
    from specdec.engine import GenerationParams
    from specdec.runtime.graphs import BATCH_BUCKETS
    from specdec.sampling import SamplingParams

    model = tiny("llama", vocab=96, eos_token_id=None).to(DEV)
    B = BATCH_BUCKETS[-1] + 2
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 12, (3,), generator=g).repeat(3) for _ in range(B)]  # recurring n-grams
    gp = GenerationParams(max_new_tokens=20, sampling=SamplingParams.make(B, temperature=0.0), seeds=torch.arange(B))
    one, _, _ = _spec_run(model, _ngram(""), prompts, gp, pipeline=False)
    two, s2, seen = _spec_run(model, _ngram(""), prompts, gp, pipeline=True)
    assert seen["ahead"] == 0 and s2.tau > 1.0 and one == two


@pytest.mark.parametrize("name", ["eagle", "draft", "ngram"])
def test_a_row_that_finishes_while_a_speculative_step_is_in_flight(name):
    """EOS ids end rows at different steps: the step in flight still lands for the other rows, the
    finished row keeps nothing from it, and every row equals one step at a time (and model.generate)."""
    from test_eagle import V

    from specdec.engine import GenerationParams
    from specdec.sampling import SamplingParams

    model = tiny("llama", vocab=V, init=0.5, seed=2, num_hidden_layers=4, eos_token_id=None).to(DEV)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in (6, 9, 4, 11)]
    gp = GenerationParams(
        max_new_tokens=30, sampling=SamplingParams.make(4, temperature=0.0), seeds=torch.arange(4), eos_token_ids=(4, 7)
    )

    def make():
        makers = {"eagle": lambda: _eagle("topk"), "draft": lambda: _draft("chain", model), "ngram": lambda: _ngram("")}
        return makers[name]()

    one, _, _ = _spec_run(model, make(), prompts, gp, pipeline=False)
    two, _, seen = _spec_run(model, make(), prompts, gp, pipeline=True)
    assert one == two and seen["ahead"] > 0
    assert seen["after_finish"] > 0, "no step was in flight when a row finished: the test is vacuous"
    lengths = sorted(len(o) for o in two)
    assert lengths[0] < lengths[-1] and lengths[0] < 30, "no row met an EOS early: the test is vacuous"
    for p, o in zip(prompts, two, strict=True):
        ref = model.generate(p[None].to(DEV), attention_mask=torch.ones(1, len(p), dtype=torch.long, device=DEV),
                             max_new_tokens=30, do_sample=False, eos_token_id=[4, 7], pad_token_id=0)  # fmt: skip
        ref = ref[0, len(p) :].tolist()
        assert o == ref[: len(o)] and (len(o) == 30 or o[-1] in (4, 7))


@pytest.mark.parametrize("name,mode", [("eagle", "sampled"), ("medusa", "topk"), ("draft", "chain")])
def test_pipelined_steps_ban_eos_before_min_new_tokens(name, mode):
    """min_new_tokens counts the tokens a row has made, which a step launched ahead knows only on
    the device (the count of the step in flight): EOS never comes before min_new_tokens, and the
    tokens equal one step at a time."""
    from test_eagle import V as EAGLE_V

    from specdec.engine import GenerationParams
    from specdec.sampling import SamplingParams

    V = EAGLE_V if name == "eagle" else 96
    model = tiny("llama", vocab=V, init=0.5, seed=2, num_hidden_layers=4, eos_token_id=None).to(DEV)
    make = {"eagle": _eagle, "medusa": _medusa, "draft": lambda mode: _draft(mode, model)}[name]
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in (7, 12, 5)]
    eos = tuple(range(3, 3 + V // 4))  # a quarter of the vocabulary: without the ban rows would stop early
    gp = GenerationParams(
        max_new_tokens=30,
        min_new_tokens=16,
        eos_token_ids=eos,
        sampling=SamplingParams.make(3, temperature=[0.9, 0.0, 1.2]),
        seeds=torch.tensor([4, 5, 6]),
    )
    one, _, _ = _spec_run(model, make(mode), prompts, gp, pipeline=False)
    two, _, seen = _spec_run(model, make(mode), prompts, gp, pipeline=True)
    assert seen["ahead"] > 0 and one == two
    assert all(len(o) >= 16 and not set(o[:15]) & set(eos) for o in two)
    assert any(len(o) < 30 for o in two), "no row stopped at an EOS after min_new_tokens: the test is vacuous"


def test_a_draft_step_in_flight_that_cannot_be_captured_reads_its_tokens():
    """When the captured step cannot take a proposal drafted ahead (here: forced), the draft model
    reads the step in flight's tokens back (one sync) and drafts eagerly: the same tokens as one
    step at a time, and the catch-up is committed once (nothing stays allocated)."""
    from specdec.engine import GenerationParams
    from specdec.sampling import SamplingParams

    model = tiny("llama", vocab=96, eos_token_id=None).to(DEV)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (6, 10)]
    gp = GenerationParams(max_new_tokens=20, sampling=SamplingParams.make(2, temperature=0.0), seeds=torch.arange(2))
    one, _, _ = _spec_run(model, _draft("chain", model), prompts, gp, pipeline=False)
    proposer = _draft("chain", model)
    capturable = proposer._capturable
    proposer._capturable = lambda ctx: ctx.ahead is None and capturable(ctx)
    two, _, seen = _spec_run(model, proposer, prompts, gp, pipeline=True)
    assert seen["ahead"] > 0 and one == two
    assert not proposer._inflight
