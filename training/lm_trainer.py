"""Train one Llama-architecture causal LM from scratch on a token array, and save it with its card.

Random windows of `seq_len + 1` tokens, AdamW, warm-up then cosine to 10 %, bf16 autocast on a GPU
(fp32 on the CPU); training stops at `steps` or `max_minutes`, whichever the schedule reaches first.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(slots=True)
class LMSpec:
    """Shape and schedule of one model (conf/size/*.yaml: target, draft)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    seq_len: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    steps: int
    max_minutes: float
    eval_batches: int
    log_every: int


def llama_config(spec: LMSpec, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rms_norm_eps=1e-5,
    )


def _windows(tokens: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=g)
    idx = starts[:, None] + torch.arange(length + 1)
    return tokens[idx.to(tokens.device)].long()


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, batch: int, length: int, batches: int, device) -> float:
    """Mean next-token cross-entropy (nats) over `batches` fixed random windows of the held-out tokens."""
    g = torch.Generator().manual_seed(1234)
    model.eval()
    total = 0.0
    for _ in range(batches):
        w = _windows(tokens, batch, length, g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=w[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten()).item()
    model.train()
    return total / batches


def train_lm(spec: LMSpec, config, train_tokens: torch.Tensor, held_tokens: torch.Tensor, device, seed: int):
    """Train one LlamaForCausalLM on random windows; stops at spec.steps or spec.max_minutes (the
    cosine schedule follows whichever is further along). Returns (model, record)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    g = torch.Generator().manual_seed(seed)
    tokens = train_tokens.to(device)
    budget = spec.max_minutes * 60
    t0 = time.perf_counter()
    step, losses = 0, []
    bar = tqdm(total=spec.steps, desc=f"lm {n_params / 1e6:.1f}M", mininterval=10)
    while True:
        progress = max(step / spec.steps, (time.perf_counter() - t0) / budget)
        if progress >= 1.0:
            break
        warm = min(1.0, (step + 1) / spec.warmup_steps)
        lr = spec.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        w = _windows(tokens, spec.batch_size, spec.seq_len, g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % spec.log_every == 0:
            losses.append((step, loss.item()))
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
            print(json.dumps({"step": step, "loss": round(losses[-1][1], 4), "lr": lr}), flush=True)
    bar.close()
    seconds = time.perf_counter() - t0
    held = held_out_loss(model, held_tokens, min(spec.batch_size, 16), spec.seq_len, spec.eval_batches, device)
    record = dict(
        parameters=n_params,
        steps=step,
        tokens_seen=step * spec.batch_size * spec.seq_len,
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        final_train_loss=round(float(np.mean([v for _, v in losses[-5:]])) if losses else loss.item(), 4),
        held_out_loss=round(held, 4),
        held_out_perplexity=round(math.exp(held), 3),
        train_seconds=round(seconds, 1),
        loss_curve=losses,
    )
    return model.eval(), record


def save_lm(model, tokenizer, out: Path, record: dict, meta: dict, name: str) -> None:
    """safetensors (bf16, sharded below the asset size limit) + tokenizer + model card + record."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if meta["save_dtype"] == "bfloat16" else torch.float32
    model.to(dtype).save_pretrained(out, max_shard_size=meta["max_shard_size"])
    model.float()
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({**record, **meta}, indent=1))
    (out / "README.md").write_text(lm_card(name, record, meta))


def _data_line(meta: dict) -> str:
    c = meta["corpus"]
    return (
        f"{c['train_files']} train / {c['held_out_files']} held-out .py files of Python {c['python']}'s standard "
        f"library and installed packages ({c['used_bytes'] / 1e6:.0f} MB), "
        f"{meta['train_tokens'] / 1e6:.1f} M train tokens"
    )


def lm_card(name: str, r: dict, meta: dict) -> str:
    return f"""# specdec reference model: {name}

A Llama-architecture causal LM trained from scratch by specdec's recipe (`specdec.training.lm`) on
Python source code. It exists so that speculative decoding can be measured offline; it is not a
useful code model.

| | |
| --- | --- |
| parameters | {r["parameters"] / 1e6:.2f} M |
| data | {_data_line(meta)} |
| tokenizer | byte-level BPE, vocabulary {meta["vocab_size"]} (`tokenizers`) |
| steps | {r["steps"]} x {r["batch_size"]} x {r["seq_len"]} tokens = {r["tokens_seen"] / 1e6:.0f} M tokens seen |
| final train loss | {r["final_train_loss"]} nats/token |
| held-out loss / perplexity | {r["held_out_loss"]} / {r["held_out_perplexity"]} |
| trained on | {meta["card"]}, {r["train_seconds"]:.0f} s, {meta["date"]} |
| saved as | {meta["save_dtype"]} safetensors |
| command | `{meta["command"]}` |

Load with `AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)` and
`AutoTokenizer.from_pretrained(path)`. License of the training data: the Python Software Foundation
License (standard library) and the licenses of the installed packages.
"""
