"""Self-distillation data: the frozen target continues prompts; the ids are cached on disk.

Prompt sources: Spec-Bench question.jsonl (first turn), HumanEval .jsonl / .jsonl.gz (`prompt`), a
text file with one prompt per line, or a folder of source files (each file's head is a prompt).
The cache is a safetensors file: `ids` (all sequences concatenated, int32) and `offsets` (int64).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a jsonl / jsonl.gz (Spec-Bench `turns[0]` or HumanEval `prompt`), a text file
    (one per line) or a folder of code files (the first 1,000 characters of each)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt source {path} does not exist")
    out: list[str] = []
    if path.is_dir():
        for f in sorted(path.rglob("*.py")):
            out.append(f.read_text(errors="ignore")[:1000])
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    out.append(row["turns"][0] if "turns" in row else row["prompt"])
    else:
        out = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    out = [p for p in out if p.strip()]
    if not out:
        raise ValueError(f"no prompts in {path}")
    return out[:limit] if limit else out


@torch.inference_mode()
def distill(
    model,
    tokenizer,
    prompts: list[str],
    max_prompt_tokens: int,
    max_new_tokens: int,
    cache: str | Path,
    do_sample: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Sequences prompt + the target's own continuation (one prompt at a time, plain decoding through
    specdec's engine), as token id tensors [L_i]; cached at `cache` and read back from it next time."""
    cache = Path(cache)
    if cache.exists():
        return load_sequences(cache)
    import specdec

    seqs: list[torch.Tensor] = []
    device = next(model.parameters()).device
    for i, text in enumerate(prompts):
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_prompt_tokens]
        if ids.shape[1] == 0:
            continue
        out = specdec.generate(model, ids.to(device), max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed + i)
        seqs.append(out[0].cpu())
    save_sequences(seqs, cache)
    return seqs


def save_sequences(seqs: list[torch.Tensor], path: str | Path) -> None:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"ids": torch.cat(seqs).to(torch.int32), "offsets": offsets}, str(path))


def load_sequences(path: str | Path) -> list[torch.Tensor]:
    d = load_file(str(path))
    o = d["offsets"].tolist()
    return [d["ids"][a:b].long() for a, b in zip(o[:-1], o[1:], strict=True)]


def pad_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i] token ids -> ids, mask [B, T] (right-padded with 0, mask 1 on real tokens)."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, 1
    return ids, mask
