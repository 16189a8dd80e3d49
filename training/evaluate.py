"""Evaluate the reference models: tau per proposer at temperature 0 and 1 on prompt sets, and the card.

Every proposer is built on the checkpoints of one recipe folder (target/, draft/, medusa/, eagle/,
eagle3/ when trained); all prompts of a set run as one ragged batch with one seed per row. At T = 1
the EAGLE drafters run twice: with sampled trees (children drawn without replacement from the
drafter's q, the default) and with EAGLE-2's top-k trees ("eagle topk").
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
    """name -> (a function building the proposer on the recipe folder's checkpoints, temperatures)."""
    from transformers import AutoModelForCausalLM

    import specdec

    def draft():
        d = AutoModelForCausalLM.from_pretrained(root / "draft", dtype=torch.float32).to(target.device).eval()
        return specdec.DraftModel(d, num_tokens=spec.draft_tokens)

    def eagle(folder: str, sampled: bool):
        def make():
            p = specdec.Eagle.from_pretrained(
                root / folder, depth=spec.eagle_depth, top_k=spec.eagle_top_k, total_tokens=spec.eagle_total_tokens
            )
            p.sampled_trees = sampled
            return p

        return make

    both, sampled_only = (0.0, 1.0), (1.0,)  # a top-k tree at T = 0 is the same run as the default
    out = {
        "draft": (draft, both),
        "ngram": (lambda: specdec.Ngram(num_tokens=spec.ngram_tokens), both),
    }
    if (root / "medusa" / "config.json").exists():  # heads the recipe trained (stages may skip them)
        out["medusa"] = (lambda: specdec.Medusa.from_pretrained(root / "medusa", tree=spec.medusa_nodes), both)
    for folder in ("eagle", "eagle3"):
        if (root / folder / "config.json").exists():
            out[folder] = (eagle(folder, True), both)
            out[f"{folder} topk"] = (eagle(folder, False), sampled_only)
    return out


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
        for name, (make, temps) in make_proposers(root, target, spec).items():
            proposer = make()
            for temp in temps:
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
        f"top_k={spec.eagle_top_k}, total_tokens={spec.eagle_total_tokens}) on the eagle/ (EAGLE-1/2) and "
        "eagle3/ (EAGLE-3) drafters; at T=1 their trees are sampled without replacement from the drafter's q "
        "(the default), and the `topk` rows are EAGLE-2's top-k trees at the same T=1 (the same run as the "
        "default at T=0).",
        "",
        "| prompts | proposer | tau T=0 | acceptance T=0 | tau T=1 | acceptance T=1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = ("draft", "ngram", "medusa", "eagle", "eagle topk", "eagle3", "eagle3 topk")
    for s in sets:
        for name in names:
            a, b = results.get(f"{s}/{name}/T0"), results.get(f"{s}/{name}/T1")
            if b:
                t0 = f"{a['tau']:.2f} | {a['acceptance_rate']:.2f}" if a else "as above | as above"
                lines.append(f"| {s} ({b['prompts']}) | {name} | {t0} | {b['tau']:.2f} | {b['acceptance_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def _aux_layers(out: Path) -> list[int]:
    """The target layers an EAGLE-3 drafter folder fuses (its config, or EAGLE-3's default 2, L // 2, L - 3)."""
    cfg = json.loads((out / "eagle3" / "config.json").read_text())
    ids = cfg.get("eagle_aux_hidden_state_layer_ids") or (cfg.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids"
    )
    if ids:
        return [int(i) for i in ids]
    from ..heads.eagle import _default_aux_layers

    return list(_default_aux_layers(json.loads((out / "target" / "config.json").read_text())["num_hidden_layers"]))


def _draft_vocab(out: Path) -> int:
    return int(json.loads((out / "eagle3" / "config.json").read_text())["draft_vocab_size"])


def write_card(out: Path, name: str, results: dict, ev: EvalSpec, meta: dict, size: dict) -> None:
    """out/README.md: what each folder is, how it was trained, and the evaluation table. size: the
    size config as a plain dict (its distill, medusa and eagle sections are quoted)."""
    rec = {m: json.loads((out / m / "training.json").read_text()) for m in ("target", "draft")}

    def best(folder: str) -> str:
        sel = out / folder / "selection.json"
        selection = json.loads(sel.read_text()) if sel.exists() else {}
        return max(selection, key=selection.get) if selection else "?"

    d, h, e = size["distill"], size["medusa"], size["eagle"]
    e3 = size.get("eagle3")
    eagle3 = (
        [
            f"| eagle3/ | an EAGLE-3 drafter (target layers {', '.join(map(str, _aux_layers(out)))} fused, one decoder "
            f"layer, its own lm_head over a {_draft_vocab(out)}-token draft vocabulary) | {e3['steps']} steps x "
            f"{e3['batch_size']} of the same continuations, training-time test over {e3['ttt_steps']} steps; "
            f"kept: {best('eagle3')} by held-out greedy tau |"
        ]
        if e3 and (out / "eagle3" / "config.json").exists()
        else []
    )
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
        f"{e['batch_size']} of the same continuations; kept: {best('eagle')} by held-out greedy tau (selection.json) |",
        *eagle3,
        "",
        f"Data: {meta['corpus']['train_files']} train / {meta['corpus']['held_out_files']} held-out .py files of "
        f"Python {meta['corpus']['python']}'s standard library and installed packages (split by a hash of the path).",
        "",
        eval_card(results, ev, meta),
    ]
    (out / "README.md").write_text("\n".join(lines))
