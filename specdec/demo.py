"""`make demo`: speculative decoding on tiny random models (until the trained demo models exist).

The target is a tiny random Llama; the draft is the same model with noise on its weights, so it
agrees with the target often but not always. Greedy outputs are checked against `model.generate`.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import DraftModel, Ngram, generate


def tiny_pair(vocab: int = 128, seed: int = 0, noise: float = 0.1) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A tiny random Llama target and a draft that is the target with noise added to its weights."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        eos_token_id=None,
    )
    target = LlamaForCausalLM(cfg).eval()
    draft = LlamaForCausalLM(cfg).eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return target, draft


def main() -> None:
    print("specdec demo -- tiny RANDOM models (the trained demo models are not built yet), CPU")
    target, draft = tiny_pair()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 128, (4, 16), generator=g)
    prompts[:, 8:] = prompts[:, :8]  # a repeated phrase, so that prompt lookup has something to find
    reference = target.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=48, do_sample=False, pad_token_id=0
    )
    print(f"{'proposer':<22} {'mode':<8} {'tau':>5} {'accept':>7} {'tok/s':>7}  same as model.generate")
    for name, make in [
        ("none (plain decoding)", lambda: None),
        ("Ngram(4)", lambda: Ngram(num_tokens=4)),
        ("DraftModel(4)", lambda: DraftModel(draft, num_tokens=4)),
        ("DraftModel('auto')", lambda: DraftModel(draft, num_tokens="auto")),
    ]:
        for sample in (False, True):
            out = generate(
                target,
                prompts,
                proposer=make(),
                max_new_tokens=48,
                do_sample=sample,
                top_k=0,
                seed=0,
                pad_token_id=0,
                return_dict_in_generate=True,
            )
            s = out.stats
            same = str(torch.equal(out.sequences, reference)) if not sample else "(sampled: same law)"
            print(
                f"{name:<22} {'T=1' if sample else 'greedy':<8} {s.tau:5.2f} {s.acceptance_rate:7.2f} "
                f"{s.tokens_per_s:7.0f}  {same}"
            )
            if not sample and not torch.equal(out.sequences, reference):
                raise SystemExit(f"{name}: greedy speculative output differs from model.generate")
    print("tau = tokens per target forward (bonus included); accept = accepted / drafted draft tokens")
    print("\nlast run's stats:\n" + str(s))


if __name__ == "__main__":
    main()
