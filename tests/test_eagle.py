"""EAGLE: drafter modules, checkpoint layouts, feature hooks, and greedy equality with plain decoding."""

import copy
import json

import pytest
import torch
from models import tiny
from safetensors.torch import save_file
from transformers import LlamaConfig

import specdec
from specdec import Eagle
from specdec.engine import GenerationParams
from specdec.heads.eagle import EagleDrafter, load_eagle
from specdec.runtime.hf import capture_features, decoder_layers
from specdec.sampling import SamplingParams
from specdec.tree import Law, node_bucket

V = 16


def drafter_config(**over) -> LlamaConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        num_hidden_layers=1,
        draft_vocab_size=10,
        eagle_aux_hidden_state_layer_ids=[0, 2, 3],
    )
    return LlamaConfig(**{**base, **over})


def make_drafter(version: int, seed: int = 0, **over) -> EagleDrafter:
    torch.manual_seed(seed)
    d = EagleDrafter(drafter_config(**over), version=version)
    if version == 3:
        d.set_vocab_map(torch.tensor([0, 1, 2, 3, 5, 8, 9, 11, 12, 15]))
    return d.eval()


@pytest.fixture(scope="module")
def target():
    return tiny("llama", vocab=V, init=0.5, seed=2, num_hidden_layers=4, eos_token_id=None)


def _hooks(model) -> int:
    mods = [model, *decoder_layers(model), model.model, model.get_output_embeddings()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


# ------------------------------------------------------------------------------- the drafter


def test_eagle3_vocab_map_round_trips():
    d = make_drafter(3)
    ids = torch.tensor([0, 1, 2, 3, 5, 8, 9, 11, 12, 15])
    assert d.target_ids(torch.arange(10)).tolist() == ids.tolist()
    assert d.t2d.nonzero().flatten().tolist() == ids.tolist()
    with pytest.raises(ValueError, match="strictly increasing"):
        d.set_vocab_map(torch.tensor([3, 1, 2, 4, 5, 6, 7, 8, 9, 10]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("version", [1, 3])
def test_thecos_sin_gives_the_rotary_modules_values_bit_for_bit(version, dtype):
    d = make_drafter(version).to(dtype)
    g = torch.Generator().manual_seed(4)
    pos = torch.randint(0, 200, (2, 7), generator=g)
    x = torch.randn(2, 7, 64, generator=g).to(dtype)
    feats = torch.randn(2, 7, d.fc.in_features - (64 if version == 1 else 0), generator=g).to(dtype)
    want_cs, want_h = d.rotary(x, pos), d(x, feats, pos)
    assert d.use_rope_table(200, dtype)
    table = d.cos_sin
    got = d.rope(x, pos)
    assert all(torch.equal(a, b) for a, b in zip(got, want_cs, strict=True))
    assert torch.equal(d(x, feats, pos), want_h)
    assert not torch.equal(d.rope(x, pos + 1)[0], want_cs[0])  # the table is indexed, not constant
    assert d.use_rope_table(150, dtype) and d.cos_sin is table  # covered: kept (graphs read it)
    other = torch.float64
    assert all(torch.equal(a, b) for a, b in zip(d.rope(x.to(other), pos), d.rotary(x.to(other), pos), strict=True))
    assert not d.use_rope_table(None) and d.cos_sin is None


def test_nocos_sin_for_a_dynamic_rope_or_past_the_size_limit(monkeypatch):
    d = make_drafter(1, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert not d.use_rope_table(64) and d.cos_sin is None  # its frequencies depend on the positions
    d = make_drafter(1)
    monkeypatch.setattr(EagleDrafter, "MAX_ROPE_TABLE", 2 * 16 * 63)  # head_dim 16: 63 positions
    assert d.use_rope_table(63) and not d.use_rope_table(64) and d.cos_sin is None


@pytest.mark.parametrize(
    "version, names",
    [
        (1, {"layers.0.post_attention_layernorm", "layers.0.mlp"}),
        (
            3,
            {
                "norm",
                "midlayer.mlp",
                *(f"midlayer.{n}" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")),
            },
        ),
    ],
)
def test_the_drafters_norms_and_mlp_are_fusable(version, names):
    from specdec.runtime.fusion import fusable

    d = make_drafter(version)
    found = {n for n, m in d.named_modules() if any(m is f for f, _ in fusable(d))}
    assert found == names
    # and its attention's RoPE: the file heads/eagle.py calls transformers' Llama formula
    assert [m.name for m, f in fusable(d) if f is None] == ["specdec.heads.eagle"]


def test_eagle1_predicts_with_the_targets_lm_head(target):
    d = make_drafter(1)
    h = d(torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.arange(3).expand(2, 3))
    assert d.logits(h, target.lm_head).shape == (2, 3, V)
    with pytest.raises(ValueError, match="lm_head"):
        d.logits(h)
    with pytest.raises(ValueError, match="version"):
        EagleDrafter(drafter_config(), version=2)


def test_features_are_layer_inputs_and_the_final_hidden(target):
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        ref = target(ids, output_hidden_states=True)  # transformers may keep hooks of its own
        base = target.model(ids).last_hidden_state
        before = _hooks(target)
        with capture_features(target, (0, 2, 4)) as read:
            target(ids)
            feats = read()
    assert torch.equal(feats[..., :64], ref.hidden_states[0])  # layer 0's input: the embeddings
    assert torch.equal(feats[..., 64:128], ref.hidden_states[2])
    assert torch.allclose(feats[..., 128:], base)  # index L: after the final norm (the lm_head's input)
    assert _hooks(target) == before
    with pytest.raises(ValueError, match=r"in \[0, 4\]"):
        with capture_features(target, (0, 5)):
            pass


# ------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("version", [1, 3])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_checkpoint_round_trip(tmp_path, version, fmt):
    d = make_drafter(version)
    d.save_pretrained(tmp_path)
    if fmt == "bin":
        state = {k: v for k, v in d.state_dict().items()}
        torch.save(state, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    back = load_eagle(tmp_path, hidden_size=64, vocab_size=V)
    assert back.version == version
    for k, v in d.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["architectures"] == ["LlamaForCausalLMEagle3"]) == (version == 3)


def test_safeailab_eagle1_layout_with_embedding_and_no_bias(tmp_path):
    d = make_drafter(1, bias=False)
    state = {k: v for k, v in d.state_dict().items()}
    assert "fc.bias" not in state
    state["embed_tokens.weight"] = torch.randn(V, 64)
    cfg = drafter_config().to_dict()
    cfg.pop("draft_vocab_size")
    cfg.update(architectures=["LlamaForCausalLM"], bias=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(state, tmp_path / "pytorch_model.bin")
    back = load_eagle(tmp_path)
    assert back.version == 1 and back.fc.bias is None
    assert torch.equal(back.embed_tokens.weight, state["embed_tokens.weight"])


def test_vllm_and_sglang_key_names(tmp_path):
    d = make_drafter(3)
    renamed = {"model." + k.replace("midlayer.", "layers.0."): v for k, v in d.state_dict().items()}
    d.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp_path / "model.safetensors"))
    back = load_eagle(tmp_path)
    for k, v in d.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_t2d_is_rebuilt_from_d2t(tmp_path):
    d = make_drafter(3)
    d.save_pretrained(tmp_path)
    state = {k: v for k, v in d.state_dict().items() if k != "t2d"}
    save_file(state, str(tmp_path / "model.safetensors"))
    assert torch.equal(load_eagle(tmp_path).t2d, d.t2d)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_eagle(tmp_path)
    d = make_drafter(3)
    d.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="target has 32"):
        load_eagle(tmp_path, hidden_size=32)
    with pytest.raises(ValueError, match="vocab_size=16 but the target has 50"):
        load_eagle(tmp_path, vocab_size=50)
    state = {k: v for k, v in d.state_dict().items() if k != "norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        load_eagle(tmp_path)
    state["norm.weight"] = torch.ones(32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        load_eagle(tmp_path)
    state["norm.weight"] = torch.ones(64)
    state["extra.weight"] = torch.ones(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):
        load_eagle(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="one layer"):
        load_eagle(tmp_path)


# ------------------------------------------------------------------------------- the proposer


def test_bad_arguments_are_named():
    d = make_drafter(1)
    with pytest.raises(ValueError, match="depth"):
        Eagle(d, depth=0)
    with pytest.raises(ValueError, match="total_tokens=99"):
        Eagle(d, depth=2, top_k=3, total_tokens=99)
    with pytest.raises(ValueError, match="top_k=20 exceeds"):
        Eagle(make_drafter(3), depth=2, top_k=20, total_tokens=20)
    with pytest.raises(TypeError, match="EagleDrafter"):
        Eagle("path")


def test_a_drafter_for_another_target_is_refused(target):
    before = _hooks(target)
    ids = torch.randint(0, V, (1, 5))
    small = make_drafter(1, hidden_size=32, intermediate_size=32)
    with pytest.raises(ValueError, match="hidden size 32 != target hidden size 64"):
        specdec.generate(target, ids, proposer=Eagle(small, depth=2, top_k=2, total_tokens=3), max_new_tokens=4)
    deep = make_drafter(3, eagle_aux_hidden_state_layer_ids=[0, 2, 9])
    with pytest.raises(ValueError, match="3 target layers"):
        specdec.generate(target, ids, proposer=Eagle(deep, depth=2, top_k=2, total_tokens=3), max_new_tokens=4)
    assert _hooks(target) == before


CONFIGS = {
    "eagle2-tree": dict(version=1, depth=3, top_k=4, total_tokens=12, chain=False),
    "eagle2-chain": dict(version=1, depth=4, chain=True),
    "eagle3-tree": dict(version=3, depth=4, top_k=3, total_tokens=15, chain=False),
    "eagle3-chain": dict(version=3, depth=3, chain=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equality_ragged_batch(target, name):
    cfg = dict(CONFIGS[name])
    before = _hooks(target)
    drafter = make_drafter(cfg.pop("version"))
    torch.manual_seed(3)
    ids = torch.randint(0, V, (4, 11))
    mask = torch.ones_like(ids)
    mask[0, :6], mask[2, :9] = 0, 0
    plain = specdec.generate(target, ids, mask, max_new_tokens=24)
    out = specdec.generate(
        target, ids, mask, proposer=Eagle(drafter, **cfg), max_new_tokens=24, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, plain)
    assert out.stats.accepted > 0  # accepted paths were compacted, and the drafter caught up after them
    assert _hooks(target) == before


def test_eagle3_drafts_only_its_vocabulary(target):
    drafter = make_drafter(3)
    seen = []

    class Spy(Eagle):
        def propose(self, ctx):
            tree = super().propose(ctx)
            seen.append(tree.tokens[:, 1:][tree.valid()[:, 1:]])
            return tree

    specdec.generate(target, torch.randint(0, V, (2, 6)), proposer=Spy(drafter, depth=2, top_k=3, total_tokens=6))
    drafted = torch.cat(seen)
    assert drafted.numel() > 0 and drafter.t2d[drafted].all()


def test_hooks_are_removed_after_an_error(target):
    drafter = make_drafter(1)
    before = _hooks(target)

    class Boom(Eagle):
        calls = 0

        def update(self, ctx, tree, result, features=None):
            assert _hooks(target) == before  # features come from hooks that live for one forward only
            Boom.calls += 1
            if Boom.calls == 2:
                raise RuntimeError("boom")
            super().update(ctx, tree, result, features)

    with pytest.raises(RuntimeError, match="boom"):
        specdec.generate(target, torch.randint(0, V, (1, 6)), proposer=Boom(drafter, depth=2, top_k=2, total_tokens=3))
    assert _hooks(target) == before


def test_from_pretrained_detects_the_version(tmp_path, target):
    make_drafter(3).save_pretrained(tmp_path / "e3")
    make_drafter(1).save_pretrained(tmp_path / "e1")
    assert Eagle.from_pretrained(tmp_path / "e3", depth=2, top_k=2, total_tokens=4).version == 3
    e1 = Eagle.from_pretrained(tmp_path / "e1", depth=2, top_k=2, total_tokens=4)
    assert e1.version == 1 and e1.max_nodes == 5
    ids = torch.randint(0, V, (1, 5))
    assert torch.equal(
        specdec.generate(target, ids, proposer=e1, max_new_tokens=8), specdec.generate(target, ids, max_new_tokens=8)
    )


@pytest.mark.parametrize("mode", ["topk", "sampled", "chain"])
@pytest.mark.parametrize("version", [1, 3])
def test_the_captured_drafting_step_drafts_what_the_eager_one_drafts(target, version, mode, request):
    """The function a CUDA graph captures for a drafting step (catch-up over the new entries,
    written into the drafter's pages through the Triton kernels, then the tree expansion: top-k,
    or children drawn from q with the rows' parameters and RowSeeds counters as graph inputs, or a
    chain: argmax for the greedy row, draws from q for the sampled rows), run eagerly on padded
    static buffers (GraphedCalls(capture=False): 3 rows in a bucket of 4, the padding row
    live=False): the same trees (tokens, parents, laws, q) at every step as the eager path, after
    the first catch-up (a prompt: eager in both). The batch mixes a greedy row with two sampled
    rows of different temperatures and top-p."""
    sampled, chain = mode == "sampled", mode == "chain"
    from specdec.runtime.graphs import GraphedCalls

    if (version, mode) != (1, "topk"):  # one case runs the interpreted kernels on the CPU; the rest their references
        request.getfixturevalue("reference_kernels")

    torch.manual_seed(3)
    ids = torch.randint(0, V, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :6], mask[2, :9] = 0, 0
    runs = []
    for graphs in (False, GraphedCalls(capture=False)):
        trees, graphed = [], []

        class Spy(Eagle):
            def propose(self, ctx):
                tree = super().propose(ctx)
                t = tree.pad_to(node_bucket(tree.width))  # captured steps pad inside: compare padded
                self.trees.append((t.tokens.tolist(), t.parents.tolist(), t.law.tolist(), t.draft_probs))
                return tree

            def _propose_graphed(self, ctx, roots, sampled=False):
                self.graphed.append((sampled, not bool(ctx.params.greedy.all())))
                return super()._propose_graphed(ctx, roots, sampled)

        shape = dict(chain=True) if chain else dict(top_k=2, total_tokens=5)
        proposer = Spy(make_drafter(version), depth=3, **shape)
        proposer.sampled_trees = sampled
        proposer.trees, proposer.graphed = trees, graphed
        proposer.graphs = graphs
        engine = specdec.Engine(target, proposer)
        gp = GenerationParams(
            max_new_tokens=20,
            sampling=SamplingParams.make(3, temperature=[0.8, 0.0, 1.3], top_p=[1.0, 1.0, 0.9]),
            seeds=torch.tensor([1, 2, 3]),
        )
        out, _ = engine.run([ids[b][mask[b].bool()] for b in range(3)], gp)
        runs.append((out, trees))
        # a sampled tree whenever a sampled row is in the batch (the greedy row may finish last)
        assert all(g == (sampled and some) for g, some in graphed)
        assert graphs is False or any(g for g, _ in graphed) == sampled
        if sampled:  # the sampled rows' trees hold WOR nodes, the greedy row's do not
            assert any(Law.WOR in law[0] + law[2] and Law.WOR not in law[1] for _, _, law, _ in trees)
        if chain:  # the sampled rows' chains are drawn from q (IID), the greedy row's are argmax
            assert any(Law.IID in law[0] + law[2] and Law.IID not in law[1] for _, _, law, _ in trees)
        # graphed: every step but the first (a prompt's catch-up) and a last one with nothing to draft
        assert len(graphed) == 0 if graphs is False else len(graphed) >= len(trees) - 2 > 0
        if graphs is not False:
            assert graphs.calls and all(g is None for g, _, _ in graphs.calls.values())
    assert [t[:3] for t in runs[0][1]] == [t[:3] for t in runs[1][1]]
    for (*_, q_eager), (*_, q_graphed) in zip(runs[0][1], runs[1][1], strict=True):
        # q agrees to rounding (CPU matmuls are not bitwise reproducible across buffers)
        assert (q_eager is None) == (q_graphed is None)
        if q_eager is not None:
            torch.testing.assert_close(q_graphed, q_eager, rtol=0, atol=1e-5)
    assert any(t[3] is not None for t in runs[0][1]) == (sampled or chain)
    assert runs[0][0] == runs[1][0]


def test_a_mixed_batch_draws_sampled_trees_and_keeps_the_greedy_row_exact(target):
    """A greedy row beside sampled rows: the sampled rows' trees are drawn from q (WOR nodes in the
    tree), the greedy row's are top-k (POINT) and its output is plain greedy decoding's."""
    from specdec.engine import GenerationParams
    from specdec.sampling import SamplingParams
    from specdec.tree import Law

    laws = []

    class Spy(Eagle):
        def propose(self, ctx):
            tree = super().propose(ctx)
            laws.append(tree.law.clone())
            return tree

    torch.manual_seed(3)
    prompt = torch.randint(0, V, (9,))
    proposer = Spy(make_drafter(1), depth=3, top_k=3, total_tokens=7)
    engine = specdec.Engine(target, proposer)
    gp = GenerationParams(
        max_new_tokens=16, sampling=SamplingParams.make(3, temperature=[0.0, 1.0, 0.7]), seeds=torch.tensor([1, 2, 3])
    )
    out, _ = engine.run([prompt, prompt, prompt], gp)
    plain = specdec.generate(target, prompt[None], max_new_tokens=16)
    assert out[0] == plain[0, 9:].tolist()
    wor = [(law == int(Law.WOR)).any(1) for law in laws if law.shape[0] == 3]
    assert wor and all(not w[0] and w[1:].any() for w in wor)


def test_a_reused_eagle3_proposer_keeps_the_draft_vocabulary_map_its_graphs_read(target):
    """A captured drafting step reads the draft -> target id map by address: a second call must
    not make a new one (it did: the graphs of a reused proposer then indexed freed memory and hit
    out-of-bounds asserts at T > 0 on the GPU)."""
    proposer = Eagle(make_drafter(3), depth=2, top_k=2, total_tokens=4)
    ids = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(4))
    engine = specdec.Engine(target, proposer)
    first = None
    for _ in range(2):
        specdec.generate(target, ids, engine=engine, max_new_tokens=6, do_sample=True, seed=1)
        first = first if first is not None else proposer._draft_ids
        assert proposer._draft_ids is first
    assert first.tolist() == [0, 1, 2, 3, 5, 8, 9, 11, 12, 15]


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1, 3])
def test_fused_drafting_drafts_the_same_trees_and_stays_greedy_identical(target, version, monkeypatch):
    """The drafter's norms, MLP and RoPE as the fused kernels (counted; on the CPU under Triton's
    interpreter, where the proposer is told to fuse): the same trees as the unfused drafter, and
    plain decoding's output. fuse=False runs none of them."""
    import specdec.heads.eagle as he
    import specdec.kernels as K
    from specdec.runtime.fusion import fusable

    calls = {"norm": 0, "mlp": 0, "rope": 0}
    norm, mlp, rope = K.rms_norm, K.silu_mul, K.rope
    monkeypatch.setattr(K, "rms_norm", lambda *a: (calls.__setitem__("norm", calls["norm"] + 1), norm(*a))[1])
    monkeypatch.setattr(K, "silu_mul", lambda *a: (calls.__setitem__("mlp", calls["mlp"] + 1), mlp(*a))[1])
    monkeypatch.setattr(K, "rope", lambda *a: (calls.__setitem__("rope", calls["rope"] + 1), rope(*a))[1])
    original_rope = he.apply_rotary_pos_emb
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = copy.deepcopy(target).to(dev)  # the module's target stays on the CPU
    torch.manual_seed(5)
    ids = torch.randint(0, V, (2, 9), device=dev)
    plain = specdec.generate(model, ids, max_new_tokens=12)
    runs = []
    for fuse in (True, False):
        trees = []

        class Spy(Eagle):
            seen = trees

            def start(self, *a, **k):
                super().start(*a, **k)
                if self.fuse and not self._fused:  # the CPU: fuse under the interpreter
                    self._fused = fusable(self.drafter)

            def propose(self, ctx):
                tree = super().propose(ctx)
                self.seen.append((tree.tokens.tolist(), tree.parents.tolist()))
                return tree

        proposer = Spy(make_drafter(version), depth=3, top_k=2, total_tokens=5)
        proposer.fuse = fuse
        calls.update(norm=0, mlp=0, rope=0)
        out = specdec.generate(model, ids, proposer=proposer, max_new_tokens=12)
        assert torch.equal(out, plain)
        assert not any("forward" in m.__dict__ for m in proposer.drafter.modules())  # swapped for the call only
        assert he.apply_rotary_pos_emb is original_rope
        if fuse:  # the layer's norms (EAGLE-3: three) with each MLP call, several calls a step; the final
            # norm runs only where logits are read, and graph replays call no Python (on the GPU);
            # one RoPE with each MLP (a RoPE the kernel did not take would break the equality)
            assert calls["mlp"] >= len(trees) and calls["norm"] >= calls["mlp"] * (1 if version == 1 else 3), calls
            assert calls["rope"] == calls["mlp"], calls
        elif not torch.cuda.is_available():
            assert calls == {"norm": 0, "mlp": 0, "rope": 0}, calls  # (on a GPU the target's forwards fuse too)
        runs.append(trees)
    assert runs[0] == runs[1]
