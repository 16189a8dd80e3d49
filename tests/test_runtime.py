"""The transformers adapter on the paged cache gives the unmodified model's logits (fp32, atol 1e-5), through
the gathered torch attention and through the paged Triton kernel (interpreted on the CPU), including the
features some layers ask for: sliding windows (Mistral, Gemma2/3, GPT-OSS), softcapping (Gemma2), sinks
(GPT-OSS)."""

import pytest
import torch
from models import tiny
from transformers import T5Config, T5ForConditionalGeneration

from specdec.cache import BlockManager
from specdec.runtime import HFModel
from specdec.runtime.metadata import prefill_metadata, tree_metadata
from specdec.tree import DraftTree

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3", "gpt_oss"]
ATOL = 1e-5


def _plain_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
def test_prefill_decode_and_tree_match_the_unmodified_model(arch, block_size, kernels):
    if kernels and block_size == 4:
        pytest.skip("the kernel runs interpreted: two page sizes suffice")
    model = tiny(arch, sliding_window=4) if arch == "mistral" else tiny(arch)
    paged = dict(kernels=kernels, gathered=not kernels)  # gathered=False: only the kernel can attend
    rt = HFModel(model)
    bm = BlockManager(num_blocks=200, block_size=block_size)
    cache = rt.new_cache(200, block_size)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g) for n in (7, 12)]
    ids = [0, 1]
    cached = [bm.allocate(s, p.tolist()) for s, p in zip(ids, prompts, strict=True)]
    input_ids, pos, meta = prefill_metadata(cache, bm, ids, prompts, cached, torch.device("cpu"), **paged)
    out = rt.forward(input_ids, pos, meta).logits
    for b, p in enumerate(prompts):
        n = len(p)
        torch.testing.assert_close(out[b, -n:], _plain_logits(model, p), atol=ATOL, rtol=0)
        bm.commit(ids[b], p.tolist())
    # a tree step: root (the next token) + a small tree, different per row
    tree = DraftTree.from_parents([[5, 6, 7, 8, 9], [1, 2, 3, 4, 4]], [[-1, 0, 0, 1, 3], [-1, 0, 1, 0, 3]])
    for s in ids:
        bm.reserve(s, tree.width)
    positions, meta, _ = tree_metadata(cache, bm, ids, tree, torch.device("cpu"), **paged)
    logits = rt.forward(tree.tokens, positions, meta).logits
    anc = tree.ancestor_mask()
    for b, p in enumerate(prompts):
        for i in range(tree.width):
            path = tree.tokens[b][anc[b, i]]
            want = _plain_logits(model, torch.cat([p, path]))[-1]
            torch.testing.assert_close(logits[b, i], want, atol=ATOL, rtol=0)
    # decode: commit root + node 1 (a chain), then one token
    for b, s in enumerate(ids):
        bm.commit(s, [int(tree.tokens[b, 0]), int(tree.tokens[b, 1])])
    step = DraftTree.chain(torch.tensor([11, 12]), torch.zeros(2, 0, dtype=torch.long))
    for s in ids:
        bm.reserve(s, 1)
    positions, meta, _ = tree_metadata(cache, bm, ids, step, torch.device("cpu"), **paged)
    logits = rt.forward(step.tokens, positions, meta).logits
    for b, p in enumerate(prompts):
        seq = torch.cat([p, tree.tokens[b, :2], step.tokens[b]])
        torch.testing.assert_close(logits[b, 0], _plain_logits(model, seq)[-1], atol=ATOL, rtol=0)


def test_shared_prefix_blocks_are_read_in_the_same_prefill():
    model = tiny("llama")
    rt = HFModel(model)
    bm = BlockManager(num_blocks=50, block_size=4)
    cache = rt.new_cache(50, 4)
    system = torch.arange(10)
    prompts = [torch.cat([system, torch.tensor([20, 21])]), torch.cat([system, torch.tensor([30])])]
    cached = [bm.allocate(s, p.tolist()) for s, p in enumerate(prompts)]
    assert cached == [0, 8] and bm.block_table(0)[:2] == bm.block_table(1)[:2]
    input_ids, pos, meta = prefill_metadata(cache, bm, [0, 1], prompts, cached, torch.device("cpu"))
    out = rt.forward(input_ids, pos, meta, logits_to_keep=1).logits
    for b, p in enumerate(prompts):
        torch.testing.assert_close(out[b, -1], _plain_logits(model, p)[-1], atol=ATOL, rtol=0)


def test_unsupported_architectures_are_named():
    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        HFModel(t5)
    with pytest.raises(ValueError, match="Linear is not a transformers PreTrainedModel"):
        HFModel(torch.nn.Linear(2, 2))


def test_the_model_is_left_as_it_was():
    model = tiny("llama")
    before = model.config._attn_implementation
    rt = HFModel(model)
    bm = BlockManager(10, 16)
    bm.allocate(0, [1, 2, 3])
    cache = rt.new_cache(10, 16)
    rt.forward(*prefill_metadata(cache, bm, [0], [torch.tensor([1, 2, 3])], [0], torch.device("cpu")))
    assert model.config._attn_implementation == before
