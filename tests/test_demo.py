"""The committed demo models (assets/demo) and `make demo`: they load with the Auto classes, stay
within the size limits, carry their model card, drive every proposer exactly, and the demo runs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specdec
from specdec.cli import main as cli_main
from specdec.demo import demo_dir, main

MiB = 1 << 20


@pytest.fixture(scope="module")
def demo():
    root = demo_dir()
    target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=torch.float32).eval()
    return root, target, AutoTokenizer.from_pretrained(root / "target")


def test_sizes_are_within_the_limits():
    files = [p for p in demo_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40e6
    assert max(p.stat().st_size for p in files) <= 15 * MiB


def test_models_load_with_the_auto_classes(demo):
    root, target, tok = demo
    n = sum(p.numel() for p in target.parameters())
    assert 8e6 <= n <= 15e6
    draft = AutoModelForCausalLM.from_pretrained(root / "draft")
    assert 1e6 <= sum(p.numel() for p in draft.parameters()) <= 3e6
    assert AutoTokenizer.from_pretrained(root / "draft").get_vocab() == tok.get_vocab()
    assert (
        8000 <= len(tok) <= 16384 and tok.decode(tok("def f(x):\n    return x").input_ids) == "def f(x):\n    return x"
    )


def test_model_card_reports_tau_per_proposer():
    root = demo_dir()
    card = (root / "README.md").read_text()
    for name in ("draft", "ngram", "medusa", "eagle"):
        assert f"| HumanEval (40) | {name} |" in card and f"| held-out code (40) | {name} |" in card
    assert "H200" in card
    results = json.loads((root / "eval.json").read_text())["results"]
    assert results["HumanEval/eagle/T0"]["tau"] >= 2.5  # the bar for the demo EAGLE head
    for sub in ("target", "draft"):
        record = json.loads((root / sub / "training.json").read_text())
        assert record["held_out_perplexity"] > 1 and "command" in record and "card" in record


@pytest.mark.parametrize("name", ["draft", "medusa", "eagle"])
def test_demo_heads_are_exact_and_accepted(demo, name):
    root, target, tok = demo
    proposer = {
        "draft": lambda: specdec.DraftModel(AutoModelForCausalLM.from_pretrained(root / "draft").eval(), 4),
        "medusa": lambda: specdec.Medusa.from_pretrained(root / "medusa", tree=8),
        "eagle": lambda: specdec.Eagle.from_pretrained(root / "eagle", depth=5, top_k=4, total_tokens=12),
    }[name]()
    ids = tok("def fibonacci(n):\n", return_tensors="pt").input_ids
    out = specdec.generate(target, ids, proposer=proposer, max_new_tokens=24, return_dict_in_generate=True)
    plain = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, plain)
    assert out.stats.tau > 1.2


def test_generate_without_target_uses_the_demo_models(capsys):
    assert cli_main(["generate", "--prompt", "import os\n", "--proposer", "eagle", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("import os") and "[eagle] 8 tokens" in captured.err


def test_make_demo_prints_one_table(capsys):
    main(["--prompts", "1", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    for label in ("DraftModel(4)", "Ngram(4)", "Medusa(tree=8)", "EAGLE-1/2 (depth=5", "EAGLE-3 (depth=5"):
        assert label in out
    assert "tok/s" in out and "False" not in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eagle_is_exact_on_the_gpu(demo):
    """CUDA graphs capture the feature hooks, the drafter's catch-up uses the Triton kernels: greedy
    outputs must still equal plain decoding (fp32), for EAGLE-2 trees, chains and an EAGLE-3 drafter."""
    from transformers import LlamaConfig

    from specdec.heads.eagle import EagleDrafter

    root, _, tok = demo
    target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=torch.float32).cuda().eval()
    texts = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n", "x = ["]
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt").to("cuda")
    kw = dict(max_new_tokens=48, eos_token_id=None, return_dict_in_generate=True)
    plain = specdec.generate(target, enc.input_ids, enc.attention_mask, **kw).sequences
    cfg = LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": 1, "draft_vocab_size": 2048})
    torch.manual_seed(0)
    eagle3 = EagleDrafter(cfg, version=3)
    eagle3.set_vocab_map(torch.arange(2048) * 4)
    for proposer in (
        specdec.Eagle.from_pretrained(root / "eagle"),
        specdec.Eagle.from_pretrained(root / "eagle", depth=5, chain=True),
        specdec.Eagle(eagle3, depth=3, top_k=4, total_tokens=12),
    ):
        out = specdec.generate(target, enc.input_ids, enc.attention_mask, proposer=proposer, **kw)
        assert torch.equal(out.sequences, plain)
        if proposer.version == 1:  # the trained drafter is accepted (the random EAGLE-3 one need not be)
            assert out.stats.tau > 2.0
