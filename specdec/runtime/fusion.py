"""Fused kernels for a transformers model's RMSNorm and SiLU-gated MLP, swapped in for specdec's
forwards only.

A module is fused only when its class's `forward` compiles to the same bytecode as transformers'
Llama formula below (Llama, Mistral, Qwen2, Qwen3 and the other "copied from Llama" classes), so
a model whose norm differs (Gemma's 1 + weight, a norm with a bias) keeps its own forward. The
swap is an instance attribute set for one forward under the model's lock and removed after it;
modules whose forward someone else wrapped (accelerate's hooks set the same attribute) are left
alone. Outside specdec's forwards the model is untouched.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


class _LlamaRMSNormShape(nn.Module):  # transformers' LlamaRMSNorm.forward: the formula the kernel computes
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _LlamaMLPShape(nn.Module):  # transformers' LlamaMLP.forward
    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


def _same_code(cls: type, shape: type) -> bool:
    f = getattr(cls, "forward", None)
    code, ref = getattr(f, "__code__", None), shape.forward.__code__
    return code is not None and (code.co_code, code.co_names, code.co_consts) == (
        ref.co_code,
        ref.co_names,
        ref.co_consts,
    )


def _fused_norm(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from specdec.kernels import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from specdec.kernels import silu_mul

    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _plain(m: nn.Module) -> bool:
    """No hooks and no distributed tensors: a tensor-parallel plan's hooks and DTensor weights
    decide what a module's inputs and outputs are, and the kernels take plain local tensors."""
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    return all(type(p).__name__ != "DTensor" for p in m.parameters(recurse=False))


def fusable(model: nn.Module) -> list[tuple[nn.Module, types.MethodType]]:
    """(module, fused forward) for every RMSNorm / SiLU MLP of the model that has the Llama formula."""
    from transformers.activations import SiLUActivation

    out = []
    for m in model.modules():
        if "forward" in m.__dict__ or not _plain(m):  # wrapped by someone else, or sharded
            continue
        cls = type(m)
        weight = getattr(m, "weight", None)
        if (
            _same_code(cls, _LlamaRMSNormShape)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), float)
        ):
            out.append((m, types.MethodType(_fused_norm, m)))
        elif (
            _same_code(cls, _LlamaMLPShape)
            and isinstance(getattr(m, "act_fn", None), (SiLUActivation, nn.SiLU))
            and all(_plain(getattr(m, name)) for name in ("gate_proj", "up_proj"))
        ):
            out.append((m, types.MethodType(_fused_mlp, m)))
    return out


@contextlib.contextmanager
def fused_forwards(modules: list[tuple[nn.Module, types.MethodType]]):
    """Route these modules' calls to their fused forwards while the context is open."""
    done = []
    try:
        for m, f in modules:
            if "forward" not in m.__dict__:
                m.forward = f
                done.append(m)
        yield
    finally:
        for m in done:
            m.__dict__.pop("forward", None)
