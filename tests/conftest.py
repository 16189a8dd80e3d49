"""Test-wide setup: Triton kernels run in Triton's interpreter on machines without a GPU; the trainers'
tests share one saved tiny target with a tokenizer and a prompt file (`target_dir`)."""

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
