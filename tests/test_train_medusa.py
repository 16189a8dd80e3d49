"""Medusa training end to end: the hydra entry point, loss falls, checkpoints resume, wandb offline,
torchrun DDP keeps both ranks identical, and the trained heads load into the proposer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import specdec
from specdec import Medusa
from specdec.training.data import load_sequences, read_prompts


def _train(target_dir, out, *extra, torchrun=False):
    args = [
        f"target={target_dir / 'target'}",
        f"data={target_dir / 'prompts.txt'}",
        f"out={out}",
        "limit=16",
        "max_new_tokens=24",
        *extra,
    ]
    if torchrun:
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "specdec.training.train",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "specdec.training.train", *args]
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_loss_falls_and_the_heads_load_into_the_proposer(target_dir, tmp_path):
    out = _train(target_dir, tmp_path / "run", "steps=80", "log_every=10", "checkpoint_every=40", "logger=stdout")
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["step"] for r in logs] == list(range(10, 81, 10))
    assert sum(r["loss"] for r in logs[-2:]) < 0.85 * sum(r["loss"] for r in logs[:2])
    assert {"head0/top1", "head0/top5", "head2/loss"} <= set(logs[0])
    seqs = load_sequences(tmp_path / "run" / "distill.safetensors")
    assert len(seqs) == 16 and all(len(s) > 24 for s in seqs)  # prompt + 24 distilled tokens
    # the trained checkpoint drives exact generation
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(target_dir / "target")
    ids = seqs[0][:6][None]
    spec = specdec.generate(
        target,
        ids,
        proposer=Medusa.from_pretrained(tmp_path / "run" / "final", tree=8),
        max_new_tokens=16,
        return_dict_in_generate=True,
    )
    plain = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert torch.equal(spec.sequences, plain)
    assert spec.stats.accepted > 0  # heads trained on the target's own continuations are accepted


def test_resume_from_the_latest_checkpoint(target_dir, tmp_path):
    _train(target_dir, tmp_path / "run", "steps=20", "checkpoint_every=10")
    out = _train(target_dir, tmp_path / "run", "steps=30", "checkpoint_every=10")
    assert "resumed from step 20" in out
    assert json.loads((tmp_path / "run" / "checkpoint-30" / "trainer_state.json").read_text())["step"] == 30


def test_wandb_offline_run(target_dir, tmp_path):
    _train(target_dir, tmp_path / "run", "steps=10", "log_every=5", "logger=wandb")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_torchrun_ddp_keeps_ranks_identical(target_dir, tmp_path):
    _train(target_dir, tmp_path / "ddp", "steps=12", "save_rank_weights=true", torchrun=True)
    a = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "blocks" in k)  # the zero-initialised blocks moved


def test_prompt_sources(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"turns": ["hello", "again"]}) + "\n")
    (tmp_path / "h.jsonl").write_text(json.dumps({"prompt": "def f():"}) + "\n")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("x = 1\n")
    assert read_prompts(tmp_path / "q.jsonl") == ["hello"]
    assert read_prompts(tmp_path / "h.jsonl") == ["def f():"]
    assert read_prompts(tmp_path / "code") == ["x = 1\n"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
