"""Tiny random transformers models for the tests (no hub access: built from configs)."""

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny(arch: str = "llama", vocab: int = 96, seed: int = 0, init: float = 0.1, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=init, **over
        )
        cls = GPT2LMHeadModel
    else:
        cfg_cls, cls = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM),
            "gemma2": (Gemma2Config, Gemma2ForCausalLM),
            "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
            "gpt_oss": (GptOssConfig, GptOssForCausalLM),
        }[arch]
        extra = dict(head_dim=16) if arch in ("qwen3", "gemma2", "gemma3", "gpt_oss") else {}
        if arch == "gemma2":  # a soft cap that bites and a window shorter than the prompts
            extra.update(attn_logit_softcapping=1.0, sliding_window=4, final_logit_softcapping=None)
        if arch == "gemma3":
            extra.update(sliding_window=4)
        if arch == "gpt_oss":
            extra.update(sliding_window=4, num_local_experts=4, num_experts_per_tok=2)
        cfg = cfg_cls(vocab_size=vocab, initializer_range=init, **{**COMMON, **extra, **over})
    model = cls(cfg).eval()
    if arch == "gpt_oss":  # sinks large enough to change the attention (their init is tiny)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(seed))
    return model


def noisy_copy(model: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """A draft model: the target with Gaussian noise on every weight (high but imperfect acceptance)."""
    draft = type(model)(model.config).eval()
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return draft
