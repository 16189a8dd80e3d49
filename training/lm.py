"""The reference-model recipe: `python -m specdec.training.lm size=demo out=assets/demo`.

No model hub is reachable here, so specdec trains its own target / draft pair on Python source code
and the Medusa and EAGLE heads on the target's own continuations, with the project's own trainers.
Stages (each is skipped when its output exists, so a rerun resumes):

corpus     the .py files of the running interpreter's standard library and installed packages,
           deduplicated by content, split train / held-out by a stable hash of the path relative to
           its root (`stdlib/...` or `site/...`)
tokenizer  byte-level BPE trained with `tokenizers`, saved as a transformers tokenizer
target     LlamaForCausalLM, trained with bf16 autocast on a GPU (fp32 on the CPU), saved with
draft      `save_pretrained` (safetensors) and a model card
distill    the target's greedy continuations of code snippets from the training files
medusa     Medusa-1 heads sharing the target's lm_head (v2 style: small)
eagle      an EAGLE-1/2 drafter, the checkpoint with the best held-out tau
eagle3     an EAGLE-3 drafter (three target layers fused, training-time test, a draft vocabulary of
           the distilled data's most frequent tokens), chosen the same way; only when the size
           config has an eagle3 section
eval       tau per proposer at temperature 0 and 1 on HumanEval prompts and held-out code files
           (at T = 1 the EAGLE drafters twice: sampled trees, the default, and top-k trees)
           -> the model card (out/README.md) and out/eval.json
"""

from __future__ import annotations

import gzip
import json
import shlex
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..resources import humaneval_path
from .corpus import EOS, collect_corpus, encode, train_tokenizer
from .evaluate import EvalSpec, evaluate, held_out_prompts, humaneval_prompts, write_card
from .lm_trainer import LMSpec, llama_config, save_lm, train_lm
from .logging import stage

STAGES = ("corpus", "tokenizer", "target", "draft", "distill", "medusa", "eagle", "eagle3", "eval")


@dataclass(slots=True)
class DistillSpec:
    """conf/size/*.yaml: distill."""

    num_sequences: int
    prompt_tokens: int
    new_tokens: int
    batch_size: int


@dataclass(slots=True)
class MedusaSpec:
    num_heads: int
    num_layers: int
    steps: int
    batch_size: int
    lr: float


@dataclass(slots=True)
class EagleSpec:
    steps: int
    batch_size: int
    lr: float
    checkpoint_every: int
    eval_prompts: int
    eval_tokens: int
    eval_depth: int
    eval_top_k: int
    eval_total_tokens: int
    # EAGLE-3 only (the eagle3 section)
    draft_vocab_size: int = 2048
    ttt_steps: int = 3
    step_decay: float = 0.8
    aux_layers: list | None = None  # target layers fused (null: 2, L // 2, L - 3)
    head_from_target: bool = True  # lm_head / norm start as the target's (draft-vocabulary rows)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


@torch.no_grad()
def distill_snippets(target, files: list[str], tokenizer, spec: DistillSpec, device, seed: int) -> list[torch.Tensor]:
    """Prompts: `prompt_tokens` ids from a random place in random training files; continuations:
    the target's greedy output through specdec (batched). Returns prompt + continuation [L_i]."""
    import specdec

    g = np.random.default_rng(seed)
    prompts = []
    for i in g.permutation(len(files)):
        ids = tokenizer(files[i], add_special_tokens=False).input_ids
        if len(ids) <= spec.prompt_tokens:
            continue
        start = int(g.integers(0, len(ids) - spec.prompt_tokens))
        prompts.append(torch.tensor(ids[start : start + spec.prompt_tokens]))
        if len(prompts) == spec.num_sequences:
            break
    seqs = []
    for i in tqdm(range(0, len(prompts), spec.batch_size), desc="distill", mininterval=10):
        batch = torch.stack(prompts[i : i + spec.batch_size]).to(device)
        out = specdec.generate(target, batch, max_new_tokens=spec.new_tokens, eos_token_id=None)
        seqs += [s.cpu() for s in out]
    return seqs


def _need(path: Path, maker: str, stages: list[str]) -> None:
    """A stage's input must exist: else a clear error naming the stage that makes it."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: stages {stages} need the output of stage {maker!r}; run it first "
            f"(stages=[{maker}]) or together with them, with the same out= / work="
        )


def run(cfg: DictConfig) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..heads.medusa import MedusaConfig, MedusaHeads
    from .data import load_sequences, save_sequences
    from .eagle_trainer import EagleTrainConfig, train_eagle
    from .medusa_trainer import TrainConfig, train_medusa
    from .train import eagle_drafter

    stages = list(cfg.stages) if cfg.stages else list(STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    out = Path(cfg.out)
    work = Path(cfg.work) if cfg.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))  # fmt: skip
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    size = OmegaConf.to_container(cfg.size, resolve=True)
    command = "python -m specdec.training.lm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = dict(card=device_name(device), date=date.today().isoformat(), command=command,
                save_dtype=size["save_dtype"], max_shard_size=size["max_shard_size"])  # fmt: skip

    corpus_file = work / "corpus.json.gz"
    if "corpus" in stages and not corpus_file.exists():
        stage("collecting the corpus")
        c = size["corpus"]
        corpus = collect_corpus(int(c["max_bytes"]), int(c["max_file_bytes"]), float(c["held_out"]))
        with gzip.open(corpus_file, "wt") as f:
            json.dump(corpus, f)
        stage(f"corpus: {corpus['stats']}")
    # each later stage reads what an earlier one left in `work` / `out`: missing, it says which stage makes it
    tok_dir = work / "tokenizer"
    if (out / "target" / "tokenizer.json").exists():  # a finished target fixes the tokenizer
        tok_dir = out / "target"
    texts_needed = [s for s in stages if s in ("tokenizer", "target", "draft", "distill", "eagle", "eagle3", "eval")]
    if texts_needed:
        _need(corpus_file, "corpus", texts_needed)
        with gzip.open(corpus_file, "rt") as f:
            corpus = json.load(f)
        meta["corpus"] = corpus["stats"]
        train_texts = [t for _, t in corpus["train"]]
        held_texts = [t for _, t in corpus["held_out"]]
    if stages == ["corpus"]:
        return out
    if "tokenizer" in stages and not (tok_dir / "tokenizer.json").exists():
        stage("training the tokenizer")
        sample, n = [], 0
        for t in train_texts:
            if n > size["tokenizer"]["sample_bytes"]:
                break
            sample.append(t)
            n += len(t)
        train_tokenizer(sample, size["tokenizer"]["vocab_size"], tok_dir)
    _need(tok_dir / "tokenizer.json", "tokenizer", stages)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    vocab = len(tokenizer)
    meta["vocab_size"] = vocab

    tokens_file = work / "tokens.npz"
    todo = [n for n in ("target", "draft") if n in stages and not (out / n / "config.json").exists()]
    if todo:
        if not tokens_file.exists():
            stage("tokenizing")
            np.savez(tokens_file, train=encode(tokenizer, train_texts), held_out=encode(tokenizer, held_texts))
        arrays = np.load(tokens_file)
        train_tokens = torch.from_numpy(arrays["train"].astype(np.int32))
        held_tokens = torch.from_numpy(arrays["held_out"].astype(np.int32))
        meta["train_tokens"], meta["held_out_tokens"] = len(train_tokens), len(held_tokens)
        stage(f"{len(train_tokens)} train / {len(held_tokens)} held-out tokens, vocabulary {vocab}")

    for name in todo:
        folder = out / name
        stage(f"training the {name}")
        spec = LMSpec(**size[name])
        model, record = train_lm(spec, llama_config(spec, vocab, eos_id), train_tokens, held_tokens, device, cfg.seed)
        save_lm(model, tokenizer, folder, record, meta, f"{size['name']}-{name}")
        stage(f"{name}: {record['parameters'] / 1e6:.2f}M parameters, held-out ppl {record['held_out_perplexity']}")
        del model

    need_target = any(s in stages for s in ("distill", "medusa", "eagle", "eagle3"))
    target = None
    if need_target:
        _need(out / "target" / "config.json", "target", stages)
        target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).to(device).eval()
    seq_file = work / "distill.safetensors"
    if "distill" in stages and not seq_file.exists():
        stage("distilling the target's continuations")
        seqs = distill_snippets(target, train_texts, tokenizer, DistillSpec(**size["distill"]), device, cfg.seed)
        save_sequences(seqs, seq_file)
    if "medusa" in stages and not (out / "medusa" / "config.json").exists():
        stage("training Medusa heads")
        _need(seq_file, "distill", stages)
        seqs = load_sequences(seq_file)
        h = MedusaSpec(**size["medusa"])
        torch.manual_seed(cfg.seed)
        heads = MedusaHeads(
            MedusaConfig(h.num_heads, h.num_layers, target.config.hidden_size, vocab, own_lm_head=False)
        )
        tc = TrainConfig(steps=h.steps, batch_size=h.batch_size, lr=h.lr, checkpoint_every=h.steps, log_every=50)
        train_medusa(target, heads, seqs, work / "medusa_run", tc)
        heads.save_pretrained(out / "medusa")
    for name, version in (("eagle", 1), ("eagle3", 3)):
        if name not in stages or (out / name / "config.json").exists():
            continue
        if name not in size:
            raise ValueError(f"stage {name!r} needs an {name} section in conf/size/{size['name']}.yaml")
        stage(f"training the EAGLE{'-3' if version == 3 else ''} drafter")
        _need(seq_file, "distill", stages)
        seqs = load_sequences(seq_file)
        e = EagleSpec(**size[name])
        torch.manual_seed(cfg.seed)
        drafter = eagle_drafter(target, version, seqs, e.draft_vocab_size, e.aux_layers, e.head_from_target)
        texts = held_out_prompts(held_texts, tokenizer, e.eval_prompts, 64)
        evals = [tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]
        ec = EagleTrainConfig(
            steps=e.steps, batch_size=e.batch_size, lr=e.lr, checkpoint_every=e.checkpoint_every, log_every=50,
            eval_tokens=e.eval_tokens, eval_depth=e.eval_depth, eval_top_k=e.eval_top_k,
            eval_total_tokens=e.eval_total_tokens, ttt_steps=e.ttt_steps, step_decay=e.step_decay, seed=cfg.seed,
        )  # fmt: skip
        train_eagle(target, drafter, seqs, work / f"{name}_run", ec, eval_prompts=evals)
        best = work / f"{name}_run" / "best"
        from ..heads.eagle import load_eagle

        load_eagle(best).save_pretrained(out / name)
        (out / name / "selection.json").write_text((best / "selection.json").read_text())
    if "eval" in stages:
        stage("evaluating")
        ev = EvalSpec(**size["eval"])
        sets = {
            "HumanEval": humaneval_prompts(Path(cfg.humaneval) if cfg.humaneval else humaneval_path(), ev.prompts),
            "held-out code": held_out_prompts(held_texts, tokenizer, ev.prompts, ev.prompt_tokens),
        }
        results = evaluate(out, tokenizer, sets, ev, device)
        (out / "eval.json").write_text(json.dumps({"results": results, **meta}, indent=1))
        write_card(out, size["name"], results, ev, meta, size)
    return out


@hydra.main(version_base=None, config_path="pkg://specdec.conf", config_name="lm")
def main(cfg: DictConfig) -> None:
    stage(OmegaConf.to_yaml(cfg).replace("\n", " | "))
    run(cfg)


if __name__ == "__main__":
    main()
