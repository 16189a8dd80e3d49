"""Test-wide setup: Triton kernels run in Triton's interpreter on machines without a GPU; the trainers'
tests share one saved tiny target with a tokenizer and a prompt file (`target_dir`); `reference_kernels`
swaps the interpreted kernels for their torch references where a test checks the engine, not a kernel."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the Hub: Hub ids resolve from a test-built cache

from models import tiny  # noqa: E402
from test_generate_greedy import byte_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    tok = byte_bpe_tokenizer()
    model = tiny("llama", vocab=len(tok), eos_token_id=None, init=0.3)
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    # 16 training prompts (limit=16), then 2 more that the EAGLE tests hold out for measuring tau
    lines = ["def f(x):", "for i in range(10):", "return x + 1", "print(i)"] * 4 + ["x = 1", "while x:"]
    (root / "prompts.txt").write_text("\n".join(lines))
    return root


@pytest.fixture
def reference_kernels(monkeypatch):
    """On a machine without a GPU: the paged-attention, K/V-store, RoPE, RMSNorm and SiLU-mul
    kernels become their plain-torch references for this test. The steps that are CUDA graphs on
    a GPU run eagerly on the CPU through the kernels' paged metadata, and interpreted (~0.1 s a
    call) they made test_pipeline alone take ~1100 s of CI. What these tests check (padding, `live`, the pipeline's
    bookkeeping, captured == eager) does not depend on which implementation does the arithmetic;
    tests/test_kernels.py checks each interpreted kernel against its reference, and `make test-gpu`
    runs these same tests on the real kernels under CUDA graphs. A no-op on a CUDA machine."""
    if torch.cuda.is_available():
        return
    import specdec.kernels as k

    def attention(q, k_cache, v_cache, tables, prefix_lens, new_slots, mask, scale, page_size, max_prefix, **kw):
        """`paged_tree_attention`'s signature; max_prefix, num_splits and tiles only shape the launch."""
        kw = {n: kw[n] for n in ("q_positions", "sliding_window", "softcap", "sinks") if n in kw}
        return k.paged_tree_attention_reference(
            q, k_cache, v_cache, tables, prefix_lens, new_slots, mask, scale, page_size, **kw
        )

    monkeypatch.setattr(k, "paged_tree_attention", attention)
    monkeypatch.setattr(k, "store_kv", k.store_kv_reference)
    monkeypatch.setattr(k, "rope", k.rope_reference)
    monkeypatch.setattr(k, "rms_norm", k.rms_norm_reference)
    monkeypatch.setattr(k, "silu_mul", k.silu_mul_reference)
