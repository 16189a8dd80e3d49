"""Evaluate the reference models: tau per proposer at temperature 0 and 1 on prompt sets, and the card.

Every proposer is built on the checkpoints of one recipe folder (target/, draft/, medusa/, eagle/);
all prompts of a set run as one ragged batch with one seed per row.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .logging import stage


@dataclass(slots=True)
class EvalSpec:
    """conf/size/*.yaml: eval."""

    prompts: int
    prompt_tokens: int
    new_tokens: int
    draft_tokens: int
    ngram_tokens: int
    medusa_nodes: int
    eagle_depth: int
    eagle_top_k: int
    eagle_total_tokens: int


def humaneval_prompts(path: Path, limit: int) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:limit]


def held_out_prompts(files: list[str], tokenizer, n: int, length: int) -> list[str]:
    """The first `length` tokens of the first n held-out files long enough (decoded back to text)."""
    out = []
    for text in files:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > length:
            out.append(tokenizer.decode(ids[:length]))
        if len(out) == n:
            break
    return out


def make_proposers(root: Path, target, spec: EvalSpec) -> dict:
    """name -> a function building the proposer on the demo folder's checkpoints."""
    from transformers import AutoModelForCausalLM

    import specdec

    def draft():
        d = AutoModelForCausalLM.from_pretrained(root / "draft", dtype=torch.float32).to(target.device).eval()
        return specdec.DraftModel(d, num_tokens=spec.draft_tokens)

    return {
        "draft": draft,
        "ngram": lambda: specdec.Ngram(num_tokens=spec.ngram_tokens),
        "medusa": lambda: specdec.Medusa.from_pretrained(root / "medusa", tree=spec.medusa_nodes),
        "eagle": lambda: specdec.Eagle.from_pretrained(
            root / "eagle", depth=spec.eagle_depth, top_k=spec.eagle_top_k, total_tokens=spec.eagle_total_tokens
        ),
    }


@torch.no_grad()
def evaluate(root: Path, tokenizer, prompt_sets: dict[str, list[str]], spec: EvalSpec, device) -> dict:
    """tau and acceptance per proposer, temperature 0 and 1, on each prompt set (fp32)."""
    from transformers import AutoModelForCausalLM

    import specdec

    target = AutoModelForCausalLM.from_pretrained(root / "target", dtype=torch.float32).to(device).eval()
    results = {}
    for set_name, texts in prompt_sets.items():
        enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        for name, make in make_proposers(root, target, spec).items():
            proposer = make()
            for temp in (0.0, 1.0):
                out = specdec.generate(  # one ragged batch; every row its own seed
                    target,
                    ids,
                    mask,
                    proposer=proposer,
                    max_new_tokens=spec.new_tokens,
                    do_sample=temp > 0,
                    temperature=temp if temp > 0 else None,
                    top_k=0,
                    seed=list(range(len(texts))),
                    eos_token_id=None,
                    return_dict_in_generate=True,
                )
                s = out.stats
                results[f"{set_name}/{name}/T{temp:g}"] = dict(
                    tau=round(s.tau, 3), acceptance_rate=round(s.acceptance_rate, 3), prompts=len(texts)
                )
                stage(f"eval {set_name} {name} T={temp:g}: tau {s.tau:.2f}, acceptance {s.acceptance_rate:.2f}")
    return results


def eval_card(results: dict, spec: EvalSpec, meta: dict) -> str:
    sets = sorted({k.split("/")[0] for k in results})
    lines = [
        "## Speculative decoding with these models",
        "",
        f"Measured on {meta['card']}, {meta['date']}, fp32, all prompts in one ragged batch, "
        f"{spec.new_tokens} new tokens per prompt "
        "(EOS ignored), seeds 0..n-1. tau = tokens per target forward, bonus included; acceptance = "
        "accepted / drafted tokens.",
        f"Proposers: draft = DraftModel({spec.draft_tokens}), ngram = Ngram({spec.ngram_tokens}), "
        f"medusa = Medusa(tree={spec.medusa_nodes}), eagle = Eagle(depth={spec.eagle_depth}, "
        f"top_k={spec.eagle_top_k}, total_tokens={spec.eagle_total_tokens}).",
        "",
        "| prompts | proposer | tau T=0 | acceptance T=0 | tau T=1 | acceptance T=1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in sets:
        for name in ("draft", "ngram", "medusa", "eagle"):
            a, b = results.get(f"{s}/{name}/T0"), results.get(f"{s}/{name}/T1")
            if a and b:
                n = a["prompts"]
                lines.append(
                    f"| {s} ({n}) | {name} | {a['tau']:.2f} | {a['acceptance_rate']:.2f} | "
                    f"{b['tau']:.2f} | {b['acceptance_rate']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def write_card(out: Path, name: str, results: dict, ev: EvalSpec, meta: dict, size: dict) -> None:
    """out/README.md: what each folder is, how it was trained, and the evaluation table. size: the
    size config as a plain dict (its distill, medusa and eagle sections are quoted)."""
    rec = {m: json.loads((out / m / "training.json").read_text()) for m in ("target", "draft")}
    sel = out / "eagle" / "selection.json"
    selection = json.loads(sel.read_text()) if sel.exists() else {}
    best = max(selection, key=selection.get) if selection else "?"
    d, h, e = size["distill"], size["medusa"], size["eagle"]
    lines = [
        f"# specdec {name} models",
        "",
        "Trained from scratch by specdec's own recipe, `python -m specdec.training.lm size="
        f"{name}` (training records: each folder's README.md and training.json; the command that made them: "
        f"`{rec['target']['command']}`).",
        "",
        "| folder | what | training |",
        "| --- | --- | --- |",
        f"| target/ | Llama, {rec['target']['parameters'] / 1e6:.2f} M parameters, with the tokenizer (byte-level "
        f"BPE, {meta['vocab_size']} tokens) | {rec['target']['tokens_seen'] / 1e6:.0f} M tokens of Python source, "
        f"held-out perplexity {rec['target']['held_out_perplexity']} |",
        f"| draft/ | Llama, {rec['draft']['parameters'] / 1e6:.2f} M parameters, same tokenizer | "
        f"{rec['draft']['tokens_seen'] / 1e6:.0f} M tokens, "
        f"held-out perplexity {rec['draft']['held_out_perplexity']} |",
        f"| medusa/ | {h['num_heads']} Medusa-1 heads ({h['num_layers']} residual block each) sharing the "
        "target's lm_head | "
        f"{h['steps']} steps x {h['batch_size']} sequences of the target's greedy continuations "
        f"({d['num_sequences']} snippets: {d['prompt_tokens']} prompt + {d['new_tokens']} generated tokens) |",
        f"| eagle/ | an EAGLE-1/2 drafter (one decoder layer, the target's lm_head) | {e['steps']} steps x "
        f"{e['batch_size']} of the same continuations; kept: {best} by held-out greedy tau (selection.json) |",
        "",
        f"Data: {meta['corpus']['train_files']} train / {meta['corpus']['held_out_files']} held-out .py files of "
        f"Python {meta['corpus']['python']}'s standard library and installed packages (split by a hash of the path).",
        "",
        eval_card(results, ev, meta),
    ]
    (out / "README.md").write_text("\n".join(lines))
