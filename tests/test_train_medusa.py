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
    assert [(p.text, p.chat) for p in read_prompts(tmp_path / "q.jsonl")] == [("hello", True)]  # a chat turn
    assert [(p.text, p.chat) for p in read_prompts(tmp_path / "h.jsonl")] == [("def f():", False)]
    assert [p.text for p in read_prompts(tmp_path / "code")] == ["x = 1\n"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_a_run_explains_itself_and_recomputes_a_stale_cache(target_dir, tmp_path):
    """The run folder holds the resolved config and the overrides; the heads name their base model;
    the learning rate follows warm-up + cosine, with clipping and accumulation; a cache made from
    other inputs is recomputed, with a message."""
    import yaml

    from specdec.training.optim import lr_at

    out = tmp_path / "run"
    extra = ["steps=6", "log_every=1", "logger=stdout", "optim.warmup_steps=2", "optim.schedule=cosine",
             "optim.grad_clip=0.5", "optim.accumulation=2"]  # fmt: skip
    stdout = _train(target_dir, out, *extra)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["schedule"] == "cosine" and cfg["out"] == str(out) and cfg["head"]["name"] == "medusa"
    assert "optim.accumulation=2" in (out / "overrides.yaml").read_text()
    base = json.loads((out / "final" / "config.json").read_text())["base_model"]
    assert base["name_or_path"] == str(target_dir / "target")
    logs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    want = [lr_at(s, 6, 1e-3, 2, "cosine") for s in range(6)]
    assert [round(r["lr"], 8) for r in logs] == [round(w, 8) for w in want]
    assert all(r["grad_norm"] > 0 for r in logs)
    assert "recomputing" not in stdout
    again = _train(target_dir, out, "sample=true", *extra)  # other distillation inputs: a new cache
    assert "was made from other inputs" in again and "recomputing" in again


def test_learning_rate_schedules():
    from specdec.training.optim import lr_at

    assert [lr_at(s, 5, 2.0) for s in range(5)] == [2.0] * 5
    assert [round(lr_at(s, 5, 1.0, 1, "linear", 0.1), 3) for s in range(5)] == [1.0, 1.0, 0.7, 0.4, 0.1]
    cos = [lr_at(s, 6, 1.0, 0, "cosine") for s in range(6)]
    assert cos[0] == 1.0 and abs(cos[-1]) < 1e-12 and all(a >= b for a, b in zip(cos, cos[1:], strict=False))
    with pytest.raises(ValueError, match="schedule='step' is not one of constant, linear, cosine"):
        lr_at(0, 5, 1.0, schedule="step")


def test_default_out_is_per_head():
    from hydra import compose, initialize_config_module

    with initialize_config_module("specdec.conf", version_base=None):
        for head in ("medusa", "eagle", "eagle3"):
            cfg = compose("train", overrides=[f"head={head}", "target=t", "data=d"])
            assert cfg.out == f"outputs/{head}"


def test_batched_distillation_is_the_one_prompt_at_a_time_distillation(target_dir, tmp_path):
    """Prompt i draws with seed + i: batches of 3 give the sequences of one prompt at a time,
    greedy and sampled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.training.data import distill

    tok = AutoTokenizer.from_pretrained(target_dir / "target")
    model = AutoModelForCausalLM.from_pretrained(target_dir / "target").eval()
    prompts = read_prompts(target_dir / "prompts.txt")[:5]
    for sample in (False, True):
        one = distill(model, tok, prompts, 16, 10, tmp_path / f"a{sample}.safetensors", sample, 3, batch_size=1)
        three = distill(model, tok, prompts, 16, 10, tmp_path / f"b{sample}.safetensors", sample, 3, batch_size=3)
        assert len(one) == 5 and all(torch.equal(a, b) for a, b in zip(one, three, strict=True))


def test_distillation_encodes_prompts_as_profile_does(target_dir, tmp_path):
    """One prompt reader and one encoder for training and profiling: a Spec-Bench turn goes through
    the tokenizer's chat template in both, a HumanEval prompt as plain text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.prompts import encode
    from specdec.training.data import distill

    tok = AutoTokenizer.from_pretrained(target_dir / "target")
    tok.chat_template = "{% for m in messages %}[user] {{ m['content'] }}{% endfor %}[bot]"
    model = AutoModelForCausalLM.from_pretrained(target_dir / "target").eval()
    (tmp_path / "q.jsonl").write_text(json.dumps({"turns": ["def f(x):"]}) + "\n" + json.dumps({"prompt": "x = 1"}))
    prompts = read_prompts(tmp_path / "q.jsonl")
    seqs = distill(model, tok, prompts, 64, 4, tmp_path / "d.safetensors")
    for p, seq in zip(prompts, seqs, strict=True):
        ids = encode(tok, p, 64)[0]
        assert torch.equal(seq[: len(ids)], ids) and len(seq) == len(ids) + 4
    assert len(encode(tok, prompts[0])[0]) > len(tok("def f(x):").input_ids)  # the template was applied


def test_bad_optimiser_settings_fail_before_distillation(target_dir, tmp_path):
    from hydra import compose, initialize_config_module

    from specdec.training.train import run

    with initialize_config_module("specdec.conf", version_base=None):
        for bad, match in [("optim.schedule=step", "schedule='step'"), ("optim.accumulation=0", "accumulation"),
                           ("optim.grad_clip=-1", "grad_clip=-1.0")]:  # fmt: skip
            cfg = compose("train", overrides=[f"target={target_dir / 'target'}", f"data={target_dir / 'prompts.txt'}",
                                              f"out={tmp_path / 'run'}", bad])  # fmt: skip
            with pytest.raises(ValueError, match=match):
                run(cfg)
            assert not (tmp_path / "run" / "distill.safetensors").exists()


@pytest.mark.parametrize("head", ["medusa", "eagle"])
def test_bf16_autocast_trains_the_heads_in_fp32_weights(target_dir, tmp_path, head):
    """precision=bf16 runs the heads' forward and loss under bf16 autocast: the losses differ from
    the fp32 run's with the same seed (so autocast is on) but stay close, fall, and the saved weights
    are fp32; an unknown precision is an error that names it, before any work."""
    logs = {}
    extra = ["steps=30", "log_every=5", "checkpoint_every=30", "logger=stdout", f"head={head}"]
    if head == "eagle":
        extra.append("head.eval_prompts=0")
    for precision in ("fp32", "bf16"):
        out = _train(target_dir, tmp_path / precision, *extra, f"precision={precision}")
        logs[precision] = [json.loads(line)["loss"] for line in out.splitlines() if line.startswith("{")]
    a, b = logs["fp32"], logs["bf16"]
    assert len(a) == len(b) == 6 and a != b
    assert all(abs(x - y) < 0.1 * abs(x) + 1e-3 for x, y in zip(a, b, strict=True)), (a, b)
    assert sum(b[-2:]) < sum(b[:2])
    weights = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}

    from hydra import compose, initialize_config_module

    from specdec.training.train import run

    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("train", overrides=[f"target={target_dir / 'target'}", f"data={target_dir / 'prompts.txt'}",
                                          f"out={tmp_path / 'bad'}", "precision=fp16"])  # fmt: skip
        with pytest.raises(ValueError, match="precision='fp16' is not one of fp32, bf16"):
            run(cfg)
    assert not (tmp_path / "bad" / "distill.safetensors").exists()
