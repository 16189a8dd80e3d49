"""The reference-model recipe end to end at its smoke size (CPU, every stage), its resume, and the split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import specdec
from specdec.training.corpus import held_out


def _recipe(out, *extra):
    """The recipe run from another folder than the checkout, with the HumanEval copy installed with
    specdec (a path relative to the working directory once crashed it)."""
    cmd = [sys.executable, "-m", "specdec.training.lm", "size=smoke", f"out={out}", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(out).parent)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "smoke"
    res = _recipe(out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def test_every_stage_produces_loadable_artifacts(smoke):
    out, log = smoke
    for stage in ("collecting the corpus", "training the tokenizer", "training the target", "training the draft",
                  "distilling", "training Medusa", "training the EAGLE drafter", "training the EAGLE-3 drafter",
                  "evaluating"):  # fmt: skip
        assert stage in log, stage
    target = AutoModelForCausalLM.from_pretrained(out / "target").eval()
    tok = AutoTokenizer.from_pretrained(out / "target")
    assert tok.eos_token == "<|endoftext|>" and target.config.eos_token_id == tok.eos_token_id
    record = json.loads((out / "target" / "training.json").read_text())
    assert record["steps"] == 30 and record["tokens_seen"] == 30 * 8 * 64
    assert record["corpus"]["train_files"] > 0 and record["corpus"]["held_out_files"] > 0
    card = (out / "target" / "README.md").read_text()
    assert "held-out loss / perplexity" in card and "size=smoke" in card
    results = json.loads((out / "eval.json").read_text())["results"]
    names = {"draft", "ngram", "medusa", "eagle", "eagle topk", "eagle3", "eagle3 topk"}
    assert {k.split("/")[1] for k in results} == names
    assert "HumanEval/eagle3 topk/T1" in results and "HumanEval/eagle3 topk/T0" not in results
    assert all(r["tau"] >= 1 for r in results.values())
    card = (out / "README.md").read_text()
    assert "| held-out code (3) | eagle |" in card and "| held-out code (3) | eagle3 topk | as above |" in card
    assert "| eagle3/ | an EAGLE-3 drafter (target layers 0, 1, 1 fused" in card
    ids = tok("def f(x):", return_tensors="pt").input_ids
    plain = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12)
    for folder in ("eagle", "eagle3"):
        eagle = specdec.Eagle.from_pretrained(out / folder, depth=3, top_k=4, total_tokens=8)
        assert eagle.version == (3 if folder == "eagle3" else 1)
        assert torch.equal(specdec.generate(target, ids, proposer=eagle, max_new_tokens=12), plain)


def test_a_rerun_resumes_without_retraining(smoke):
    out, _ = smoke
    before = (out / "target" / "model.safetensors").stat().st_mtime_ns
    res = _recipe(out, "stages=[corpus,tokenizer,target,draft,distill,medusa,eagle,eagle3]")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training the target" not in res.stdout and "training the EAGLE" not in res.stdout
    assert (out / "target" / "model.safetensors").stat().st_mtime_ns == before


def test_unknown_stage_is_named(tmp_path):
    res = _recipe(tmp_path / "x", "stages=[corpus,train]")
    assert res.returncode != 0 and "unknown stages ['train']" in res.stderr


def test_the_split_is_a_stable_hash_of_the_path():
    """The same split in every process: Python's salted hash() would differ between interpreters."""
    names = [f"site/pkg/m{i}.py" for i in range(2000)]
    picks = [held_out(n, 0.1) for n in names]
    assert 100 < sum(picks) < 300
    code = (
        "from specdec.training.corpus import held_out\n"
        "print(''.join(str(int(held_out(f'site/pkg/m{i}.py', 0.1))) for i in range(2000)))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True
        )
        assert out.stdout.strip() == "".join(str(int(p)) for p in picks), out.stderr[-500:]


def test_each_stage_runs_on_its_own(tmp_path):
    """stages=[corpus] alone makes the corpus and nothing else (it crashed loading a tokenizer that
    did not exist yet); a stage whose input is missing names the stage that makes it."""
    out = tmp_path / "alone"
    res = _recipe(out, "stages=[corpus]")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "work" / "corpus.json.gz").exists() and not (out / "work" / "tokenizer").exists()
    res = _recipe(out, "stages=[target]")
    assert res.returncode != 0 and "need the output of stage 'tokenizer'" in res.stderr
    res = _recipe(tmp_path / "empty", "stages=[medusa]")
    assert res.returncode != 0 and "need the output of stage 'tokenizer'" in res.stderr
