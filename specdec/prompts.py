"""Prompt sets for profiling: Spec-Bench question.jsonl (first turn, with categories), HumanEval
.jsonl / .jsonl.gz (the `prompt` field), or plain text with one prompt per line."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class Prompt:
    text: str
    category: str = "all"
    chat: bool = False  # conversational: apply the tokenizer's chat template when it has one


def load_prompts(path: str | Path, category: str | None = None, limit: int | None = None) -> list[Prompt]:
    """Read a prompt file; raises FileNotFoundError / ValueError with the path on bad input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    out: list[Prompt] = []
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not JSON ({e.msg})") from None
                if "turns" in row:
                    out.append(Prompt(row["turns"][0], row.get("category", "all"), chat=True))
                elif "prompt" in row:
                    out.append(Prompt(row["prompt"], row.get("category", "all")))
                else:
                    raise ValueError(f"{path}:{n} has neither 'turns' (Spec-Bench) nor 'prompt' (HumanEval)")
    else:
        out = [Prompt(line) for line in path.read_text().splitlines() if line.strip()]
    if category is not None:
        out = [p for p in out if p.category == category]
    if limit is not None:
        out = out[:limit]
    if not out:
        raise ValueError(f"no prompts in {path}" + (f" with category {category!r}" if category else ""))
    return out


def encode(tokenizer, prompt: Prompt, max_tokens: int | None = None):
    """Token ids [1, T] of a prompt, through the chat template for conversational prompts."""
    if prompt.chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    return ids[:, -max_tokens:] if max_tokens else ids
