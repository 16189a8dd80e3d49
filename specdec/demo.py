"""`make demo`: speculative decoding on tiny random models (until the trained demo models exist).

A draft model that is a noisy copy of the target drafts chains; the target scores each chain in one
forward pass and `verify` accepts the longest prefix its own sampler allows. Greedy output is
checked against `model.generate`; the sampled run reports tau and the acceptance rate.
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .sampling import RowSeeds, SamplingParams, process_logits
from .tree import DraftTree, Law
from .verify import verify


def tiny_pair(vocab: int = 128, seed: int = 0) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A tiny random Llama target and a draft that is the target with noise added to its weights."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,  # peaky logits, so acceptance is not trivially ~1
    )
    target = LlamaForCausalLM(cfg).eval()
    draft = LlamaForCausalLM(cfg).eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    return target, draft


@torch.no_grad()
def speculate(
    target,
    draft,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    k: int = 4,
    seed: int = 0,
    eos_token_id: int = 2,
):
    """Chain speculation without a KV cache (every forward recomputes the prefix): [1, T] -> ids, tau."""
    params = SamplingParams.make(1, temperature=temperature)
    ids = prompt.clone()
    forwards, drafted, accepted, step = 0, 0, 0, 0
    gen = torch.Generator().manual_seed(seed)
    while ids.shape[1] - prompt.shape[1] < max_new_tokens:
        chain, qs = ids, []
        for _ in range(k):  # draft k tokens: argmax when greedy, sampled from q otherwise
            probs = process_logits(draft(chain).logits[:, -1], params)
            tok = probs.argmax(-1) if temperature == 0 else torch.multinomial(probs, 1, generator=gen)[:, 0]
            qs.append(probs)
            chain = torch.cat([chain, tok[:, None]], 1)
        drafts = chain[:, ids.shape[1] :]
        law = Law.POINT if temperature == 0 else Law.IID
        tree = DraftTree.chain(ids[:, -1], drafts, law, torch.stack(qs, 1) if law == Law.IID else None)
        logits = target(chain).logits[:, ids.shape[1] - 1 :]  # [1, k + 1, V]: root + drafts
        res = verify(tree, logits, params, rng=RowSeeds(torch.tensor([seed]), torch.tensor([step])))
        n = int(res.num_accepted)
        ids = torch.cat([ids, drafts[:, :n], res.next_tokens[:, None]], 1)
        forwards, drafted, accepted, step = forwards + 1, drafted + k, accepted + n, step + 1
        eos = (ids[0, prompt.shape[1] :] == eos_token_id).nonzero()
        if len(eos):  # stop at the first end-of-sequence token, as model.generate does
            ids = ids[:, : prompt.shape[1] + int(eos[0, 0]) + 1]
            break
    new = ids[:, prompt.shape[1] :][:, :max_new_tokens]
    return torch.cat([prompt, new], 1), new.shape[1] / forwards, accepted / drafted


def main() -> None:
    print("specdec demo -- tiny RANDOM models (the trained demo models are not built yet)")
    target, draft = tiny_pair()
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    ids, tau, alpha = speculate(target, draft, prompt, max_new_tokens=48, temperature=0.0)
    plain = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48, do_sample=False)
    same = torch.equal(ids, plain)
    print(f"greedy : tau={tau:.2f} tokens/forward, acceptance={alpha:.2f}, identical to model.generate: {same}")
    ids, tau, alpha = speculate(target, draft, prompt, max_new_tokens=48, temperature=1.0)
    print(f"T=1.0  : tau={tau:.2f} tokens/forward, acceptance={alpha:.2f} (exact rejection sampling)")
    print(f"({time.perf_counter() - t0:.1f}s on the CPU; tau counts the bonus token, acceptance = accepted/drafted)")
    if not same:
        raise SystemExit("greedy speculative output differs from model.generate")


if __name__ == "__main__":
    main()
