"""Fused kernels for a transformers model's RMSNorm and SiLU-gated MLP, swapped in for specdec's
forwards only.

A module is fused only when its class's `forward` compiles to the same bytecode as transformers'
Llama formula below (Llama, Mistral, Qwen2, Qwen3 and the other "copied from Llama" classes), so
a model whose norm differs (Gemma's 1 + weight, a norm with a bias) keeps its own forward. The
swap is an instance attribute set for one forward under the model's lock and removed after it;
modules whose forward someone else wrapped (accelerate's hooks set the same attribute) are left
alone. Outside specdec's forwards the model is untouched.

Rotary embeddings are a function, not a module: an attention module whose forward calls the
`apply_rotary_pos_emb` of its modeling file, where that function and its `rotate_half` have the
Llama formula, gets the fused `rope` kernel by a swap of that file's global for the duration of
specdec's forwards (counted, under a lock: nested and concurrent forwards share one swap). The
kernel's output is the formula's bit for bit, and tensors it does not take go to the original, so
another thread that calls the same modeling code meanwhile computes what it always does.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import os
import threading
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


def _rotate_half_shape(x):  # transformers' Llama rotate_half
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_pos_emb_shape(q, k, cos, sin, unsqueeze_dim=1):  # transformers' Llama apply_rotary_pos_emb
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)  # noqa: F821 - compared as bytecode, never called
    k_embed = (k * cos) + (rotate_half(k) * sin)  # noqa: F821
    return q_embed, k_embed


def _same_fn(f, ref) -> bool:
    """f's instructions are ref's (their resolved arguments compared, so a docstring, which shifts
    the constants' indices, does not count)."""
    if getattr(f, "__code__", None) is None:
        return False

    def ops(fn):
        return [(i.opname, i.argval) for i in dis.get_instructions(fn) if i.opname not in ("RESUME", "NOP", "CACHE")]

    return ops(f) == ops(ref)


FUSE_ROPE = True  # settable: fusable() then leaves the rotary embeddings alone (to measure what they save)
_ROPE = "apply_rotary_pos_emb"
_rope_lock = threading.Lock()
_rope_swaps: dict[int, list] = {}  # id(namespace) -> [users, the original function]


def _fused_rope(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        from specdec.kernels import rope, rope_fits

        on_device = q.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if not args and not kwargs and on_device and rope_fits(q, k, cos, sin):
            return rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.specdec_original = original
    return apply_rotary_pos_emb


def _plain_function(obj):
    """The Python function behind a modeling file's `apply_rotary_pos_emb`: itself, the one our swap
    replaced, or, where transformers wraps it as a hub-kernel module (`Func`, 5.2x), the function
    its forward closes over (None when there is none)."""
    obj = getattr(obj, "specdec_original", obj)
    if isinstance(obj, nn.Module):
        fwd = getattr(type(obj), "forward", None)
        names = getattr(getattr(fwd, "__code__", None), "co_freevars", ())
        cells = dict(zip(names, getattr(fwd, "__closure__", None) or (), strict=False))
        obj = cells["func"].cell_contents if "func" in cells else None
    return inspect.unwrap(obj) if callable(obj) else None


class RopeSite:
    """A modeling file (its globals) whose `apply_rotary_pos_emb` is the Llama formula: `swap()`
    routes it to the fused kernel while the context is open (see the module's docstring)."""

    def __init__(self, namespace: dict):
        self.namespace = namespace

    @property
    def name(self) -> str:
        return str(self.namespace.get("__name__"))

    @contextlib.contextmanager
    def swap(self):
        ns, key = self.namespace, id(self.namespace)
        with _rope_lock:
            entry = _rope_swaps.get(key)
            if entry is None:
                current = ns[_ROPE]
                original = getattr(current, "specdec_original", current)
                entry = _rope_swaps[key] = [0, original]
                ns[_ROPE] = _fused_rope(original)
            entry[0] += 1
        try:
            yield
        finally:
            with _rope_lock:
                entry[0] -= 1
                if entry[0] == 0:
                    ns[_ROPE] = entry[1]
                    del _rope_swaps[key]


def rope_sites(model: nn.Module) -> list[RopeSite]:
    """The modeling files whose attention forwards (in this model) call a Llama-formula
    `apply_rotary_pos_emb`, one site per file."""
    sites: dict[int, RopeSite] = {}
    for m in model.modules():
        f = getattr(type(m), "forward", None)
        if f is None or "forward" in m.__dict__ or not _plain(m):
            continue
        f = inspect.unwrap(f)
        code, ns = getattr(f, "__code__", None), getattr(f, "__globals__", None)
        if code is None or ns is None or _ROPE not in code.co_names or id(ns) in sites:
            continue
        fn = _plain_function(ns.get(_ROPE))
        helper = getattr(fn, "__globals__", {}).get("rotate_half")
        if _same_fn(fn, _apply_rotary_pos_emb_shape) and _same_fn(helper, _rotate_half_shape):
            sites[id(ns)] = RopeSite(ns)
    return list(sites.values())


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
    """(module, fused forward) for every RMSNorm / SiLU MLP of the model that has the Llama formula,
    then (RopeSite, None) for every modeling file whose rotary embedding has it (`rope_sites`)."""
    from transformers.activations import SiLUActivation

    out = []
    for m in model.modules():
        if "forward" in m.__dict__ or not _plain(m):  # wrapped by someone else, or sharded
            continue
        cls = type(m)
        weight = getattr(m, "weight", None)
        if (
            _same_fn(getattr(cls, "forward", None), _LlamaRMSNormShape.forward)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), float)
        ):
            out.append((m, types.MethodType(_fused_norm, m)))
        elif (
            _same_fn(getattr(cls, "forward", None), _LlamaMLPShape.forward)
            and isinstance(getattr(m, "act_fn", None), (SiLUActivation, nn.SiLU))
            and all(_plain(getattr(m, name)) for name in ("gate_proj", "up_proj"))
        ):
            out.append((m, types.MethodType(_fused_mlp, m)))
    return out + [(site, None) for site in (rope_sites(model) if FUSE_ROPE else [])]


@contextlib.contextmanager
def fused_forwards(modules: list[tuple[nn.Module, types.MethodType]]):
    """Route these modules' calls to their fused forwards, and these files' rotary embeddings to
    the fused kernel, while the context is open."""
    done = []
    with contextlib.ExitStack() as stack:
        try:
            for m, f in modules:
                if isinstance(m, RopeSite):
                    stack.enter_context(m.swap())
                elif "forward" not in m.__dict__:
                    m.forward = f
                    done.append(m)
            yield
        finally:
            for m in done:
                m.__dict__.pop("forward", None)
