"""The demo's speculative loop reproduces model.generate under greedy decoding."""

import torch

from specdec.demo import speculate, tiny_pair


def test_demo_greedy_equals_generate():
    target, draft = tiny_pair(seed=3)
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    ids, tau, _ = speculate(target, draft, prompt, max_new_tokens=20, temperature=0.0)
    plain = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(ids, plain)
    assert tau > 1.0
