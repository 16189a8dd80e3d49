"""Self-distillation data: the frozen target continues prompts; the ids are cached on disk.

Prompt sources: Spec-Bench question.jsonl (first turn), HumanEval .jsonl / .jsonl.gz (`prompt`), a
text file with one prompt per line, or a folder of source files (each file's head is a prompt).
The cache is a safetensors file: `ids` (all sequences concatenated, int32) and `offsets` (int64).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..prompts import Prompt, encode, load_prompts


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Prompts from a jsonl / jsonl.gz (Spec-Bench `turns[0]`, conversational; HumanEval `prompt`)
    or a text file (one per line), read by the same reader as `specdec profile`
    (`specdec.prompts.load_prompts`), or a folder of code files (the first 1,000 characters of each)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt source {path} does not exist")
    if path.is_dir():
        out = [Prompt(f.read_text(errors="ignore")[:1000]) for f in sorted(path.rglob("*.py"))]
        out = [p for p in out if p.text.strip()]
        if not out:
            raise ValueError(f"no prompts in {path}")
        return out[:limit] if limit else out
    return [p for p in load_prompts(path, limit=None) if p.text.strip()][:limit]


def cache_key(model, prompts: list[Prompt], **settings) -> str:
    """What a distillation cache was made from: the prompts, the settings and the target (its name,
    parameter count and a checksum of a few weights), hashed."""
    import hashlib

    params = list(model.parameters())
    probe = [float(p.detach().float().flatten()[:64].sum()) for p in params[:: max(1, len(params) // 8)]]
    ident = {
        "target": str(getattr(model.config, "_name_or_path", "")),
        "params": sum(p.numel() for p in params),
        "probe": [round(x, 6) for x in probe],
        "settings": settings,
        "prompts": hashlib.sha256("\x00".join(f"{int(p.chat)}{p.text}" for p in prompts).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@torch.inference_mode()
def distill(
    model,
    tokenizer,
    prompts: list[Prompt | str],
    max_prompt_tokens: int,
    max_new_tokens: int,
    cache: str | Path,
    do_sample: bool = False,
    seed: int = 0,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Sequences prompt + the target's own continuation (plain decoding through specdec's engine,
    prompts encoded as `specdec profile` encodes them: the chat template for conversational ones,
    the last max_prompt_tokens tokens;
    `batch_size` prompts at a time; prompt i draws with seed + i, so batching changes nothing), as
    token id tensors [L_i]. Cached at `cache` with a key of its inputs (`cache_key`): a cache made
    from other prompts, settings or another target is recomputed, with a message saying so."""
    cache = Path(cache)
    prompts = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    settings = dict(
        max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, do_sample=bool(do_sample), seed=seed
    )
    key = cache_key(model, prompts, **settings)
    if cache.exists():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            found = (f.metadata() or {}).get("key")
        if found == key:
            return load_sequences(cache)
        print(f"distillation cache {cache} was made from other inputs (key {found} != {key}): recomputing", flush=True)
    import specdec

    encoded = [(i, encode(tokenizer, p, max_prompt_tokens)[0]) for i, p in enumerate(prompts)]
    encoded = [(i, ids) for i, ids in encoded if len(ids)]
    device = next(model.parameters()).device
    seqs: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        T = max(len(ids) for _, ids in chunk)
        batch = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for b, (_, ids) in enumerate(chunk):
            batch[b, T - len(ids) :], mask[b, T - len(ids) :] = ids, 1
        out = specdec.generate(
            model, batch.to(device), mask.to(device), max_new_tokens=max_new_tokens, do_sample=do_sample,
            seed=torch.tensor([seed + i for i, _ in chunk]), return_dict_in_generate=True,
        )  # fmt: skip
        for b, (_, ids) in enumerate(chunk):
            n = out.stats.per_sequence[b]["generated_tokens"]
            seqs.append(torch.cat([ids, out.sequences[b, T : T + n].cpu()]))
    save_sequences(seqs, cache, key=key)
    return seqs


def save_sequences(seqs: list[torch.Tensor], path: str | Path, key: str | None = None) -> None:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": key} if key else None
    save_file({"ids": torch.cat(seqs).to(torch.int32), "offsets": offsets}, str(path), metadata=meta)


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
