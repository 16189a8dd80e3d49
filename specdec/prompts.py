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
    try:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt") as fh:
                out = [p for n, line in enumerate(fh, 1) if line.strip() for p in [_jsonl_prompt(path, n, line)]]
        else:
            out = [Prompt(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as e:  # e.g. a .gz that is not gzip, a binary file
        raise ValueError(f"{path}: cannot read prompts ({type(e).__name__}: {e})") from None
    if category is not None:
        out = [p for p in out if p.category == category]
    if limit is not None:
        out = out[:limit]
    if not out:
        raise ValueError(f"no prompts in {path}" + (f" with category {category!r}" if category else ""))
    return out


def _jsonl_prompt(path: Path, n: int, line: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{n} is not a JSON object")
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise ValueError(f"{path}:{n}: 'turns' must be a non-empty list of strings (Spec-Bench)")
        return Prompt(turns[0], str(row.get("category", "all")), chat=True)
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError(f"{path}:{n}: 'prompt' must be a string (HumanEval)")
        return Prompt(row["prompt"], str(row.get("category", "all")))
    raise ValueError(f"{path}:{n} has neither 'turns' (Spec-Bench) nor 'prompt' (HumanEval)")


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
