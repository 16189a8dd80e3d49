"""Greedy speculative generation equals model.generate token for token (fp32), for every proposer."""

import pytest
import torch
from models import noisy_copy, tiny

import specdec
from specdec import DraftModel, Ngram

V = 96


def _proposers(model):
    return {
        "none": lambda: None,
        "ngram": lambda: Ngram(num_tokens=4, max_ngram=3),
        "draft": lambda: DraftModel(noisy_copy(model, 0.1), num_tokens=4),
        "draft-auto": lambda: DraftModel(noisy_copy(model, 0.05), num_tokens="auto"),
        "draft-exact": lambda: DraftModel(noisy_copy(model, 0.0), num_tokens=3),
    }


def _batch(B, seed, repetitive=False):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 11, 8, 14][:B] if B > 1 else [10]
    T = max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(3, V, (n,), generator=g)
        if repetitive:  # recurring n-grams for the lookup proposer
            row = torch.randint(3, 12, (4,), generator=g).repeat(n // 4 + 1)[:n]
        ids[b, T - n :] = row
        mask[b, T - n :] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("proposer", ["none", "ngram", "draft", "draft-auto", "draft-exact"])
@pytest.mark.parametrize("B", [1, 4])
def test_greedy_equals_model_generate(arch, proposer, B):
    model = tiny(arch, vocab=V)
    for repetitive in (False, True):
        ids, mask = _batch(B, seed=B + 10 * repetitive, repetitive=repetitive)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        out = specdec.generate(
            model,
            ids,
            mask,
            proposer=_proposers(model)[proposer](),
            max_new_tokens=24,
            do_sample=False,
            return_dict_in_generate=True,
        )
        assert torch.equal(out.sequences, ref), (arch, proposer, B, repetitive)
        if proposer == "draft-exact":
            assert out.stats.acceptance_rate == 1.0


@pytest.mark.parametrize("proposer", ["ngram", "draft-exact"])
def test_eos_inside_an_accepted_run(proposer):
    model = tiny("llama", vocab=V)
    ids, mask = _batch(4, seed=3, repetitive=proposer == "ngram")
    free = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    eos = int(free[0, ids.shape[1] + 6])  # a token row 0 produces mid-way
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=1)
    out = specdec.generate(
        model,
        ids,
        mask,
        proposer=_proposers(model)[proposer](),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=1,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    row0 = out.sequences[0, ids.shape[1] :].tolist()
    assert eos in row0 and row0[row0.index(eos) + 1 :] == [1] * (len(row0) - row0.index(eos) - 1)
    if proposer == "draft-exact":
        assert out.stats.tau > 2  # EOS arrived inside a run of accepted drafts


def test_min_new_tokens_and_repetition_penalty_match_transformers():
    model = tiny("llama", vocab=V)
    ids, mask = _batch(2, seed=5)
    free = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    eos = int(free[0, ids.shape[1] + 1])
    kw = dict(
        max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0, min_new_tokens=5, repetition_penalty=1.3
    )
    ref = model.generate(ids, attention_mask=mask, **kw)
    for proposer in ("none", "draft"):
        out = specdec.generate(model, ids, mask, proposer=_proposers(model)[proposer](), **kw)
        assert torch.equal(out, ref), proposer


def test_streamer_receives_the_prompt_then_every_token():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    model = tiny("llama", vocab=V)
    ids, _ = _batch(1, seed=6)
    s = Collect()
    out = specdec.generate(
        model, ids, proposer=DraftModel(noisy_copy(model, 0.05)), max_new_tokens=15, do_sample=False, streamer=s
    )
    assert s.ended and s.chunks[0] == ids[0].tolist()
    assert sum(s.chunks[1:], []) == out[0, ids.shape[1] :].tolist()
    assert any(len(c) > 1 for c in s.chunks[1:])  # several tokens per step


def test_text_streamer_with_a_real_tokenizer(capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TextStreamer

    vocab = {f"w{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    model = tiny("llama", vocab=V)
    ids, _ = _batch(1, seed=7)
    out = specdec.generate(
        model,
        ids,
        proposer=Ngram(),
        max_new_tokens=8,
        do_sample=False,
        streamer=TextStreamer(tokenizer, skip_prompt=True),
    )
    printed = capsys.readouterr().out.split()
    assert printed == [f"w{t}" for t in out[0, ids.shape[1] :].tolist()]


def byte_bpe_tokenizer(vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained here (no hub): like GPT-2's, on a few lines of code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "for i in range(10): print(i)"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_stop_strings_match_transformers():
    tokenizer = byte_bpe_tokenizer()
    vocab = len(tokenizer)
    # with an EOS id transformers pads rows that stopped early (without one it lets them run on)
    model = tiny("llama", vocab=vocab, eos_token_id=tokenizer.eos_token_id)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
    texts = [tokenizer.decode(free[0, 9 + i : 10 + i]) for i in range(16)]
    at = next(i for i, t in enumerate(texts) if i > 0 and t.isascii() and t.strip())
    stop = texts[at]  # a printable token that row 0 produces mid-way
    kw = dict(max_new_tokens=16, do_sample=False, stop_strings=[stop], tokenizer=tokenizer, pad_token_id=1)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    out = specdec.generate(model, ids, proposer=DraftModel(noisy_copy(model, 0.0)), **kw)
    assert torch.equal(out, ref)
    assert (out[0, 9 + at + 1 :] == 1).all()  # row 0 stopped at the stop string


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.usefixtures("reference_kernels")  # on the CPU: the kernels' references (test_eagle interprets one)
def test_the_captured_draft_chain_drafts_what_the_eager_chain_drafts(arch):
    """DraftModel's captured step (catch-up + K drafts with the metadata derived on the device),
    run eagerly on padded static buffers (GraphedCalls(capture=False): 3 rows in a bucket of 4,
    the padding row not live): the same chains at every step as the eager path, for a greedy row
    beside sampled ones and for an all-greedy batch, and the same outputs."""
    from specdec.engine import GenerationParams
    from specdec.runtime.graphs import GraphedCalls
    from specdec.sampling import SamplingParams
    from specdec.tree import node_bucket

    over = dict(sliding_window=6) if arch == "mistral" else {}
    model = tiny(arch, eos_token_id=None, **over)
    draft = noisy_copy(model, 0.05)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 12, (4,), generator=g).repeat(n)[: 3 * n] for n in (7, 3, 5)]
    for temps in ([0.0, 0.0, 0.0], [0.0, 0.8, 1.2]):
        gp = GenerationParams(
            max_new_tokens=18, sampling=SamplingParams.make(3, temperature=temps, top_p=0.9),
            seeds=torch.tensor([1, 2, 3]),
        )  # fmt: skip
        runs = []
        for graphs in (False, GraphedCalls(capture=False)):

            class Spy(DraftModel):
                def propose(self, ctx):
                    tree = super().propose(ctx)
                    t = tree.pad_to(node_bucket(tree.width))  # the captured step pads inside: compare padded
                    self.trees.append((t.tokens.tolist(), t.num_nodes.tolist()))
                    return tree

                def _propose_graphed(self, ctx, roots, K):
                    self.graphed += 1
                    return super()._propose_graphed(ctx, roots, K)

            proposer = Spy(draft, num_tokens=3)
            proposer.trees, proposer.graphed, proposer.graphs = [], 0, graphs
            out, stats = specdec.Engine(model, proposer).run(prompts, gp)
            runs.append((out, proposer.trees))
            if graphs is False:
                assert proposer.graphed == 0
            else:  # every step (a catch-up is the accepted drafts + the root: <= 4) but a last one
                assert len(proposer.trees) - 1 <= proposer.graphed <= len(proposer.trees)  # with nothing to draft
                assert proposer.graphed > 3
                assert graphs.calls and all(c is None for c, _, _ in graphs.calls.values())
        assert runs[0][1] == runs[1][1], temps
        assert runs[0][0] == runs[1][0]
        if max(temps) == 0:
            for p, o in zip(prompts, runs[1][0], strict=True):
                ref = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=18, do_sample=False)  # fmt: skip
                assert ref[0, len(p) :].tolist() == list(o), (p, o)
