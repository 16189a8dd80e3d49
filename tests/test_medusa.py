"""Medusa heads: distinct parameters, every checkpoint layout, exact generation with static trees."""

import json

import pytest
import torch
from models import tiny
from safetensors.torch import save_file

import specdec
from specdec import Medusa
from specdec.heads.medusa import MedusaConfig, MedusaHeads, load_medusa
from specdec.proposers.medusa import default_choices

H, V = 64, 96


def _heads(own=True, bias=True, K=3, L=2, seed=0):
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaConfig(K, L, H, V, own_lm_head=own, bias=bias))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)  # trained-looking, not the zero init
    return heads


def test_every_head_and_block_owns_its_parameters():
    heads = MedusaHeads(MedusaConfig(4, 3, H, V))
    ptrs = [p.data_ptr() for p in heads.parameters()]
    assert len(ptrs) == len(set(ptrs)) == 4 * 3 * 2 + 4
    x = torch.randn(2, H)
    assert torch.equal(heads.blocks[0](x), x)  # zero-initialised blocks start as the identity


def _check_same(a: MedusaHeads, b: MedusaHeads, lm_head=None):
    x = torch.randn(3, H)
    torch.testing.assert_close(a(x, lm_head), b(x, lm_head))


def test_round_trip_our_format(tmp_path):
    heads = _heads()
    heads.save_pretrained(tmp_path)
    _check_same(heads, load_medusa(tmp_path, H, V))


@pytest.mark.parametrize("ext", ["safetensors", "pt"])
def test_faster_decoding_v1(tmp_path, ext):
    heads = _heads()
    K, L = 3, 2
    state = {}
    for h in range(K):
        for layer in range(L):
            state[f"{h}.{layer}.linear.weight"] = heads.blocks[h][layer].linear.weight.detach().clone()
            state[f"{h}.{layer}.linear.bias"] = heads.blocks[h][layer].linear.bias.detach().clone()
        state[f"{h}.{L}.weight"] = heads.lm_heads[h].weight.detach().clone()
    if ext == "pt":
        torch.save(state, tmp_path / "medusa_lm_head.pt")
    else:
        save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps({"medusa_num_heads": K, "medusa_num_layers": L, "base_model_name_or_path": "x"})
    )
    _check_same(heads, load_medusa(tmp_path, H, V))


def test_faster_decoding_v2_reuses_the_target_lm_head(tmp_path):
    heads = _heads(own=False)
    state = {
        f"{h}.{layer}.linear.{w}": getattr(heads.blocks[h][layer].linear, w).detach().clone()
        for h in range(3)
        for layer in range(2)
        for w in ("weight", "bias")
    }
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 2, "version": "2"}))
    loaded = load_medusa(tmp_path, H, V)
    assert loaded.lm_heads is None
    _check_same(heads, loaded, torch.nn.Linear(H, V, bias=False))


def test_vllm_layout(tmp_path):
    heads = _heads(bias=False)
    state = {}
    for h in range(3):
        for layer in range(2):
            state[f"medusa_heads.blocks.{h}.layers.{layer}.weight"] = heads.blocks[h][layer].linear.weight.detach()
        state[f"medusa_heads.lm_heads.{h}.weight"] = heads.lm_heads[h].weight.detach()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "medusa",
                "num_heads": 3,
                "num_hidden_layers": 2,
                "hidden_size": H,
                "vocab_size": V,
                "truncated_vocab_size": V,
            }
        )
    )
    _check_same(heads, load_medusa(tmp_path, H, V))


def test_mismatches_are_clear_errors(tmp_path):
    _heads().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"vocab_size={V} but the target has {V + 1}"):
        load_medusa(tmp_path, H, V + 1)
    with pytest.raises(ValueError, match=f"hidden_size={H} but the target has 32"):
        load_medusa(tmp_path, 32, V)
    (tmp_path / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="not a known Medusa config"):
        load_medusa(tmp_path, H, V)
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder, and not a Hugging Face Hub id"):
        Medusa.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Medusa.from_pretrained(tmp_path / "empty")
    fd = tmp_path / "fd"
    fd.mkdir()
    save_file(
        {
            "0.0.linear.weight": torch.zeros(H, H),
            "0.0.linear.bias": torch.zeros(H),
            "0.1.weight": torch.zeros(V + 3, H),
        },
        str(fd / "medusa_lm_head.safetensors"),
    )
    (fd / "config.json").write_text(json.dumps({"medusa_num_heads": 1, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match=r"lm_heads.0.weight.*\(99, 64\).*\(96, 64\)"):
        load_medusa(fd, H, V)


def test_default_trees_are_prefix_closed():
    for n in (1, 8, 32, 64):
        choices = default_choices(n, 4)
        assert len(choices) == n and len(set(choices)) == n
        assert all(c[:-1] in choices or len(c) == 1 for c in choices)
        assert max(len(c) for c in choices) <= 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("B", [1, 4])
def test_greedy_equals_model_generate(arch, own, B, tmp_path):
    model = tiny(arch, vocab=V)
    g = torch.Generator().manual_seed(B)
    lengths = [7, 12, 9, 4][:B]
    T = max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n :], mask[b, T - n :] = torch.randint(3, V, (n,), generator=g), 1
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    _heads(own=own).save_pretrained(tmp_path)
    out = specdec.generate(
        model,
        ids,
        mask,
        proposer=Medusa.from_pretrained(tmp_path, tree=12),
        max_new_tokens=20,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref)
    assert out.stats.proposer == "medusa" and out.stats.drafted > 0


def test_identity_head_on_the_target_lm_head_only_accepts_repeats():
    """A head with no blocks on the target's own lm_head proposes the root token again: it may be
    accepted only where the target repeats a token (a check of the hidden-state plumbing)."""
    model = tiny("llama", vocab=V)
    ids = torch.tensor([[5, 6, 7, 8]])
    heads = MedusaHeads(MedusaConfig(1, 0, H, V, own_lm_head=False))  # head 0 = the target's own lm_head
    out = specdec.generate(
        model,
        ids,
        proposer=Medusa(heads, tree=[(0,)]),
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert torch.equal(
        out.sequences, model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    )
    # head 0 proposes argmax(lm_head(h)) = the root itself: accepted exactly when the target repeats a token
    new = out.sequences[0, 4:].tolist()
    repeats = sum(a == b for a, b in zip(new, new[1:], strict=False))
    assert out.stats.accepted <= repeats + 1


def test_typical_acceptance_is_an_explicit_lossy_option():
    model = tiny("llama", vocab=V)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = specdec.generate(
        model,
        ids,
        proposer=Medusa(_heads(), tree=8),
        max_new_tokens=8,
        do_sample=True,
        seed=0,
        verify_mode="typical",
        typical=specdec.TypicalParams(posterior_threshold=0.09, posterior_alpha=0.3),
        return_dict_in_generate=True,
    )
    assert out.stats.lossy and "LOSSY" in str(out.stats)
    exact = specdec.generate(
        model,
        ids,
        proposer=Medusa(_heads(), tree=8),
        max_new_tokens=8,
        do_sample=True,
        seed=0,
        return_dict_in_generate=True,
    )
    assert not exact.stats.lossy


def test_a_truncated_checkpoint_is_an_error_naming_the_file(tmp_path):
    from specdec.heads.medusa import load_medusa

    _heads().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{weights}: cannot read Medusa weights"):
        load_medusa(tmp_path, H, V)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_medusa(tmp_path, H, V)


@pytest.mark.parametrize("sampled", [False, True], ids=["topk", "sampled"])
def test_the_captured_proposal_drafts_what_the_eager_one_drafts(sampled):
    """The function a CUDA graph captures for Medusa's proposal (heads, top-k, tree, and for the
    sampled rows the draws from each head's q with the rows' parameters and RowSeeds counters as
    graph inputs), run eagerly on padded static buffers (GraphedCalls(capture=False): 3 rows in a
    bucket of 4): the same trees (tokens, parents, laws, q) at every step as the eager proposal,
    already padded to the node bucket; the same outputs and the same per-choice counts. The batch
    mixes a greedy row with two sampled rows of different temperatures and top-p."""
    from specdec.engine import GenerationParams
    from specdec.runtime.graphs import GraphedCalls
    from specdec.sampling import SamplingParams
    from specdec.tree import Law, node_bucket

    model = tiny("llama", vocab=V, eos_token_id=None)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in (7, 12, 5)]
    runs = []
    for graphs in (False, GraphedCalls(capture=False)):
        trees = []

        class Spy(Medusa):
            def propose(self, ctx):
                tree = super().propose(ctx)
                self.trees.append((tree.tokens.tolist(), tree.parents.tolist(), tree.law.tolist(), tree.draft_probs))
                return tree

        proposer = Spy(_heads(), tree=10)
        proposer.trees = trees
        proposer.sampled_trees = sampled
        proposer.graphs = graphs
        gp = GenerationParams(
            max_new_tokens=16,
            sampling=SamplingParams.make(3, temperature=[0.8, 0.0, 1.3], top_p=[1.0, 1.0, 0.9]),
            seeds=torch.tensor([1, 2, 3]),
        )
        out, stats = specdec.Engine(model, proposer).run(prompts, gp)
        runs.append((out, trees, dict(proposer.path_stats)))
        if graphs is not False:
            assert graphs.calls and all(g is None for g, _, _ in graphs.calls.values())
            assert all(len(t[0][0]) == node_bucket(11) for t in trees)  # padded inside the captured call
        if sampled:  # the sampled rows' trees hold WOR nodes, the greedy row's do not
            assert any(Law.WOR in law[0] + law[2] and Law.WOR not in law[1] for _, _, law, _ in trees)
        assert sum(o for o, _ in proposer.path_stats.values()) > 0
    eager, graphed = runs
    assert len(eager[1]) == len(graphed[1]) > 0
    for a, b in zip(eager[1], graphed[1], strict=True):
        n = len(a[0][0])  # the eager tree's width; the captured one is padded further
        assert [r[:n] for r in b[0]] == a[0] and [r[:n] for r in b[1]] == a[1] and [r[:n] for r in b[2]] == a[2]
        assert all(x == -1 for r in b[1] for x in r[n:])
        assert (a[3] is None) == (b[3] is None), (a[3], b[3])
        if a[3] is not None:
            torch.testing.assert_close(b[3][:, :n], a[3], rtol=0, atol=1e-6)
    assert any(t[3] is not None for t in eager[1]) == sampled
    assert eager[0] == graphed[0] and eager[2] == graphed[2]
