"""Faults at every stage of a call (target prefill, draft prefill, propose, target forward, verify,
streamer) for every proposer: afterwards every KV pool (target, draft model, EAGLE) is empty, and the
same Engine, given prompts that share the faulted prompt's prefix, still equals `model.generate` token
for token with the acceptance of a fresh Engine (a poisoned draft cache keeps greedy output but
lowers it). Runs on the CPU in CI and under CUDA graphs + Triton kernels on a GPU (`make test-gpu`)."""

import pytest
import torch
from models import noisy_copy, tiny
from transformers import LlamaConfig

import specdec
import specdec.engine
from specdec import DraftModel, Eagle, Engine, Medusa, Ngram
from specdec.heads.eagle import EagleDrafter
from specdec.heads.medusa import MedusaConfig, MedusaHeads

V = 96
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu  # CI runs it on the CPU; `make test-gpu` under CUDA graphs
STAGES = ["target-prefill", "draft-prefill", "propose", "target-forward", "verify", "streamer"]
PROPOSERS = ["none", "ngram", "draft", "medusa", "eagle"]


class Boom(RuntimeError):
    """The injected fault."""


def _proposer(name: str, model):
    torch.manual_seed(0)
    if name == "none":
        return None
    if name == "ngram":
        return Ngram(num_tokens=3)
    if name == "draft":
        return DraftModel(noisy_copy(model, 0.05).to(DEV), num_tokens=3)
    if name == "medusa":
        heads = MedusaHeads(MedusaConfig(2, 1, 64, V, own_lm_head=False))
        with torch.no_grad():
            for p in heads.parameters():
                p.normal_(0, 0.05)
        return Medusa(heads, tree=6)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
        num_hidden_layers=1,
    )  # fmt: skip
    if name == "eagle3":  # a draft vocabulary of half the target's, fusing layers 0 / 1 / 1
        cfg.update(dict(draft_vocab_size=V // 2, eagle_aux_hidden_state_layer_ids=[0, 1, 1]))
        drafter = EagleDrafter(cfg, version=3).eval()
        drafter.set_vocab_map(torch.arange(0, V, 2))
        return Eagle(drafter, depth=2, top_k=2, total_tokens=4)
    if name == "eagle-chain":
        return Eagle(EagleDrafter(cfg, version=1).eval(), depth=3, chain=True)
    return Eagle(EagleDrafter(cfg, version=1).eval(), depth=2, top_k=2, total_tokens=4)


def _batch():
    """Two left-padded rows that share a 32-token prefix (two full blocks of 16)."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, V, (32,), generator=g)
    rows = [torch.cat([shared, torch.randint(3, V, (8,), generator=g)]), torch.cat([shared, torch.tensor([5, 6])])]
    T = max(len(r) for r in rows)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, 1
    return ids.to(DEV), mask.to(DEV)


def _fail_on(obj, attr: str, call: int, exc: BaseException, monkeypatch, after: bool = False):
    """Make obj.attr raise exc on its call-th call (after running it when `after`: state already changed)."""
    original = getattr(obj, attr)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == call and not after:
            raise exc
        out = original(*args, **kwargs)
        if count[0] == call:
            raise exc
        return out

    monkeypatch.setattr(obj, attr, wrapper)


class _RaisingStreamer:
    def __init__(self):
        self.puts, self.ended = 0, False

    def put(self, value):
        self.puts += 1
        if self.puts == 3:
            raise Boom("streamer")

    def end(self):
        self.ended = True


def _inject(stage: str, engine: Engine, proposer, monkeypatch):
    """Arm the fault of `stage`; returns the streamer to pass (or None), or None when the stage does
    not exist for this proposer."""
    if stage == "target-prefill":
        _fail_on(engine.target, "forward", 1, Boom(stage), monkeypatch)
    elif stage == "draft-prefill":
        if proposer is None:
            return False
        if isinstance(proposer, DraftModel):  # inside DraftModel.prefill, after its blocks were allocated
            _fail_on(proposer.runtime, "forward", 1, KeyboardInterrupt(), monkeypatch)
        else:
            _fail_on(proposer, "prefill", 1, KeyboardInterrupt(), monkeypatch, after=True)
    elif stage == "propose":
        if proposer is None:
            return False
        _fail_on(proposer, "propose", 2, Boom(stage), monkeypatch, after=True)
    elif stage == "target-forward":
        if engine.cuda_graphs:
            _fail_on(engine.runner.graphs, "forward_tree", 2, Boom(stage), monkeypatch)
        else:
            _fail_on(engine.target, "forward", 3, Boom(stage), monkeypatch)  # 1: prefill, 2: first step
    elif stage == "verify":
        _fail_on(specdec.engine, "verify", 3, Boom(stage), monkeypatch)  # 1: the prefill's first token
    return True


def _pools_empty(engine: Engine, proposer) -> None:
    assert engine.bm.num_free_blocks == engine.bm.num_blocks, "target blocks left allocated"
    assert not engine._proposer_rows
    bm = getattr(proposer, "bm", None)
    if bm is not None:
        assert bm.num_free_blocks == bm.num_blocks, f"{type(proposer).__name__} blocks left allocated"
    if isinstance(proposer, Eagle):
        assert not proposer.pending


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", PROPOSERS)
def test_a_fault_leaves_empty_pools_and_an_exact_engine(name, stage, monkeypatch):
    model = tiny("llama", vocab=V, eos_token_id=None).to(DEV)
    ids, mask = _batch()
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    fresh = specdec.generate(model, ids, mask, proposer=_proposer(name, model), **kw)
    assert torch.equal(fresh.sequences, ref)

    proposer = _proposer(name, model)
    engine = Engine(model, proposer, num_blocks=64)
    warm = torch.tensor([[1, 2, 3, 4, 5]], device=DEV)  # sets up the pools and graphs; shares nothing
    specdec.generate(model, warm, engine=engine, max_new_tokens=4, do_sample=False)
    with monkeypatch.context() as mp:
        if not _inject(stage, engine, proposer, mp):
            pytest.skip(f"no {stage} stage without a proposer")
        streamer = _RaisingStreamer() if stage == "streamer" else None
        faulted = (ids[:1], mask[:1]) if streamer is not None else (ids, mask)  # streamers take one row
        with pytest.raises((Boom, KeyboardInterrupt)):
            specdec.generate(model, *faulted, engine=engine, streamer=streamer, **kw)
        if streamer is not None:
            assert streamer.ended, "a consumer waiting on the stream would hang"
    _pools_empty(engine, proposer)
    out = specdec.generate(model, ids, mask, engine=engine, **kw)
    assert torch.equal(out.sequences, ref), f"{name} after a fault in {stage}"
    assert out.stats.accepted == fresh.stats.accepted, "the drafter's state was damaged by the fault"
    _pools_empty(engine, proposer)
