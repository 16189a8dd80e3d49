"""EAGLE training: the draft vocabulary, the training-time test's attention against the proposer's,
and CPU smoke training of both variants through the hydra entry point, loaded back into the proposer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_eagle import make_drafter
from transformers import AutoModelForCausalLM

import specdec
from specdec import Eagle
from specdec.heads.eagle import load_eagle
from specdec.proposers.eagle import _TreeAttend
from specdec.training.data import load_sequences
from specdec.training.eagle_trainer import _TTTAttend, build_draft_vocab


def test_draft_vocab_keeps_the_most_frequent_ids():
    seqs = [torch.tensor([5, 5, 5, 2, 2, 9]), torch.tensor([9, 9, 7])]
    assert build_draft_vocab(seqs, 12, 3).tolist() == [2, 5, 9]
    assert build_draft_vocab(seqs, 12, 5).tolist() == [0, 2, 5, 7, 9]  # unseen ids fill up, lowest first
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_draft_vocab(seqs, 12, 13)


@torch.no_grad()
def test_training_time_test_attends_like_a_drafted_node():
    """Step 1 of the unroll at entry e must equal a depth-1 node drafted after the entries <= e."""
    d = make_drafter(3, seed=4)
    T, e = 7, 4
    emb, feats = torch.randn(1, T, 64), torch.randn(1, T, 192)
    pos = torch.arange(T)[None]
    ttt = _TTTAttend()
    h0 = d(emb, feats, pos, ttt, from_target=True)
    h1 = d(torch.roll(emb, -1, 1), h0, pos + 1, ttt, from_target=False)
    # the proposer's way: entries 0..e in a cache, then one node (token e + 2, parent = entry e)
    cache = _TTTAttend()
    d(emb[:, : e + 1], feats[:, : e + 1], pos[:, : e + 1], cache, from_target=True)
    tree = _TreeAttend(cache.ks[0], cache.vs[0], torch.ones(1, e + 1, dtype=torch.bool))
    attend = tree.step(torch.ones(1, 1, 1, dtype=torch.bool))
    node = d(emb[:, e + 1 : e + 2], h0[:, e : e + 1], pos[:, e : e + 1] + 1, attend, from_target=False)
    assert torch.allclose(node[0, 0], h1[0, e], atol=1e-5)


@torch.no_grad()
def test_eagle3_head_starts_as_the_targets_read_out():
    """With head_from_target, the drafter read out of a hidden state h gives the target's logits of
    the draft vocabulary for the same h (lm_head rows and final norm copied); without, it does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec.training.train import eagle_drafter

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    target = LlamaForCausalLM(cfg).eval()
    target.model.norm.weight.uniform_(0.5, 1.5)  # not the identity, so a missed copy shows
    seqs = [torch.randint(0, 40, (30,)) for _ in range(4)]
    h = torch.randn(3, 32)
    drafter = eagle_drafter(target, 3, seqs, draft_vocab_size=12, aux_layers=[0, 1, 2])
    ids = drafter.target_ids(torch.arange(12))
    want = target.lm_head(target.model.norm(h))[:, ids]
    assert torch.allclose(drafter.logits(h), want, atol=1e-6)
    cold = eagle_drafter(target, 3, seqs, draft_vocab_size=12, aux_layers=[0, 1, 2], head_from_target=False)
    assert not torch.allclose(cold.logits(h), want, atol=1e-2)


def _train(target_dir, out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "specdec.training.train",
        f"target={target_dir / 'target'}",
        f"data={target_dir / 'prompts.txt'}",
        f"out={out}",
        "limit=16",
        "max_new_tokens=24",
        "logger=stdout",
        "head.eval_prompts=2",
        "head.eval_tokens=12",
        *extra,
    ]
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _check_proposer(target_dir, path, version):
    target = AutoModelForCausalLM.from_pretrained(target_dir / "target")
    seqs = load_sequences(path.parent / "distill.safetensors")
    ids = seqs[0][:6][None]
    eagle = Eagle.from_pretrained(path, depth=4, top_k=4, total_tokens=12)
    assert eagle.version == version
    spec = specdec.generate(target, ids, proposer=eagle, max_new_tokens=16, return_dict_in_generate=True)
    plain = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert torch.equal(spec.sequences, plain)
    return spec.stats


def test_eagle1_trains_selects_by_tau_and_loads(target_dir, tmp_path):
    logs = _train(target_dir, tmp_path / "run", "head=eagle", "steps=60", "log_every=10", "checkpoint_every=30")
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) < 0.8 * sum(losses[:2])
    assert {"feature_loss", "ce", "top1"} <= set(logs[0])
    selection = json.loads((tmp_path / "run" / "best" / "selection.json").read_text())
    assert set(selection) == {"checkpoint-30", "checkpoint-60"} and all(t >= 1 for t in selection.values())
    assert [r["eval/tau"] for r in logs if "eval/tau" in r] == pytest.approx(list(selection.values()), rel=1e-5)
    stats = _check_proposer(target_dir, tmp_path / "run" / "best", version=1)
    assert stats.tau > 1.2  # the trained drafter is accepted on the target's own continuations


def test_eagle3_trains_with_the_training_time_test_and_loads(target_dir, tmp_path):
    logs = _train(
        target_dir,
        tmp_path / "run",
        "head=eagle3",
        "head.aux_layers=[0,1,1]",
        "head.draft_vocab_size=48",
        "optim.lr=3e-3",
        "head.feature_cache=" + str(tmp_path / "feats.safetensors"),
        "steps=60",
        "log_every=10",
        "checkpoint_every=60",
    )
    losses = [r["loss"] for r in logs if "loss" in r]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2])
    assert {"step0/ce", "step1/ce", "step2/top1"} <= set(logs[0])
    assert (tmp_path / "feats.safetensors").exists()  # the offline feature cache was written and used
    drafter = load_eagle(tmp_path / "run" / "final")
    assert drafter.version == 3 and drafter.draft_vocab_size == 48
    seqs = load_sequences(tmp_path / "run" / "distill.safetensors")
    counts = torch.bincount(torch.cat(seqs), minlength=drafter.t2d.numel())
    assert counts[drafter.t2d].min() >= counts[~drafter.t2d].max()  # the most frequent tokens
    _check_proposer(target_dir, tmp_path / "run" / "best", version=3)


def test_torchrun_keeps_ranks_identical(target_dir, tmp_path):
    """Two processes, different batches, gradients averaged: both ranks end with the same weights
    (the training-time test runs several drafter forwards per step)."""
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "specdec.training.train",
        "head=eagle3",
        "head.aux_layers=[0,1,1]",
        "head.draft_vocab_size=48",
        "head.eval_prompts=0",
        f"target={target_dir / 'target'}",
        f"data={target_dir / 'prompts.txt'}",
        f"out={tmp_path / 'ddp'}",
        "limit=8",
        "max_new_tokens=12",
        "steps=6",
        "save_rank_weights=true",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ddp" / "final" / "config.json").exists()
