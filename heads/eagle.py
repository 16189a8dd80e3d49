"""EAGLE drafters: EAGLE-1/2 (feature extrapolation) and EAGLE-3 (multi-layer fusion, own vocabulary).

Both are one Llama decoder layer that runs on the target's features and token embeddings:

EAGLE-1/2   x = fc(cat(embed(token), feature))        feature: the target's final hidden state [H]
            h = x + attn(x); h = h + mlp(norm(h))     (no input norm)
            logits = target.lm_head(h)                h is also the drafter's predicted feature
EAGLE-3     f = fc(cat(low, mid, high))               target features [3 x H_t] -> [H] (own outputs: as is)
            a = attn(cat(norm_e(embed(token)), norm_h(f)))   attention input is 2H wide
            h = f + a; h = h + mlp(norm(h))
            logits = lm_head(norm(h))                 over a reduced draft vocabulary;
                                                      target id = d + d2t[d], t2d[target id] = in it

Submodule names follow SafeAILab's checkpoints (EAGLE-1/2: `fc`, `layers.0.*`; EAGLE-3: `fc`,
`midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`), so `state_dict()` is their key layout. The token
embedding is the target's (checkpoints may carry a copy: it is used when present).

Dims: B rows, T positions, H drafter hidden, F feature width (H for EAGLE-1, 3 x H_target for
EAGLE-3 target features), V target vocabulary, Vd draft vocabulary.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from ..hub import resolve
from .checkpoint import read_config, read_weights

EAGLE3_ARCH = "LlamaForCausalLMEagle3"

# attend(module, q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]) -> [B, T, Hq, D]
Attend = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention over the call's own positions (training, tests)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=module.scaling)
    return out.transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, config: LlamaConfig, in_features: int):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or H // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.layer_idx = 0  # the drafter's single layer in its paged cache
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = attend(self, q, k, v)  # [B, T, Hq, D]
        return self.o_proj(out.reshape(B, T, -1))


class _MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    # transformers' LlamaMLP.forward, statement for statement: runtime.fusion recognises the formula
    # by its bytecode and runs it as the fused SiLU-mul kernel on the GPU
    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class _Layer(nn.Module):
    """EAGLE-1/2's decoder layer: a Llama layer without the input norm (its input is fc's output)."""

    def __init__(self, config: LlamaConfig, attn_in: int | None = None):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = _Attention(config, attn_in or H)
        self.mlp = _MLP(config)
        self.post_attention_layernorm = LlamaRMSNorm(H, eps=eps)

    def attn_input(self, x: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        return x

    def forward(self, x, cos, sin, attend: Attend, embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.attn_input(x, embeds), cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Eagle3Layer(_Layer):
    """EAGLE-3's decoder layer: attention over [norm(embed), norm(hidden)] (2H wide)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config, attn_in=2 * config.hidden_size)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = LlamaRMSNorm(H, eps=eps)
        self.hidden_norm = LlamaRMSNorm(H, eps=eps)

    def attn_input(self, x: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(x)], -1)


def _default_aux_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's (and vLLM's) default: the inputs of layers 2, L // 2 and L - 3."""
    return (2, num_target_layers // 2, num_target_layers - 3)


class EagleDrafter(nn.Module):
    """An EAGLE drafter: `EagleDrafter(config, version=1)` builds an `Eagle1Drafter` (EAGLE-1/2),
    `version=3` an `Eagle3Drafter`; the proposer, trainer and loaders use only this interface.

    Parameters
    ----------
    config : a LlamaConfig of the drafter (num_hidden_layers = 1). EAGLE-3 also reads
        `draft_vocab_size` (default: vocab_size), `target_hidden_size` (default: hidden_size) and
        `eagle_aux_hidden_state_layer_ids` (default: the inputs of target layers 2, L // 2, L - 3).
    version : 1 (EAGLE-1 and EAGLE-2 share the drafter; EAGLE-2 differs only in its dynamic tree) or 3.

    Examples
    --------
    >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
    ...                   vocab_size=50, num_hidden_layers=1, draft_vocab_size=20)
    >>> d = EagleDrafter(cfg, version=3)
    >>> h = d(torch.randn(1, 4, 32), torch.randn(1, 4, 96), torch.arange(4)[None], from_target=True)
    >>> type(d).__name__, d.logits(h).shape, d.fc.in_features
    ('Eagle3Drafter', torch.Size([1, 4, 20]), 96)
    """

    version: int = 0  # 1 or 3: set by the subclasses

    def __new__(cls, config: LlamaConfig | None = None, version: int | None = None):
        if cls is EagleDrafter:
            if version not in (1, 3):
                raise ValueError(f"version must be 1 (EAGLE-1/2) or 3 (EAGLE-3), got {version!r}")
            cls = Eagle1Drafter if version == 1 else Eagle3Drafter
        return super().__new__(cls)

    def __init__(self, config: LlamaConfig, version: int | None = None):
        super().__init__()
        if version is not None and version != self.version:
            raise ValueError(f"{type(self).__name__} is EAGLE version {self.version}, not {version!r}")
        self.config = config
        self.rotary = LlamaRotaryEmbedding(config)
        self.embed_tokens: nn.Embedding | None = None  # set from a checkpoint that carries one
        # [P, 2 x head_dim]: cos | sin of positions [0, P), made by `use_rope_table` (read-only)
        self.cos_sin: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    # a table of cos / sin: one gather a call instead of the rotary module's ~8 small kernels
    MAX_ROPE_TABLE = 1 << 25  # elements (64 MB in bf16)

    def use_rope_table(self, positions: int | None, dtype: torch.dtype | None = None) -> bool:
        """Take cos / sin of positions [0, positions) from a table made now, in `dtype` on the
        rotary module's device (None: drop the table). The values are the rotary module's own, bit
        for bit: each is one product of a position and a frequency. A table that already covers
        `positions` in that dtype and device is kept (captured graphs read its address). Only
        static RoPE types get one (a dynamic type recomputes its frequencies from the positions),
        and only up to MAX_ROPE_TABLE elements. Returns whether a table is in use; positions
        beyond the table are the caller's error (no check: a captured graph cannot make one)."""
        if positions is None:
            self.cos_sin = None
            return False
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        dev = self.rotary.inv_freq.device
        dtype = dtype or self.rotary.inv_freq.dtype
        t = self.cos_sin
        if t is not None and t.shape[0] >= positions and t.dtype == dtype and t.device == dev:
            return True
        self.cos_sin = None
        if "dynamic" in rope_type or rope_type == "longrope" or 2 * positions * self._head_dim() > self.MAX_ROPE_TABLE:
            return False
        with torch.no_grad():
            cos, sin = self.rotary(torch.empty(0, dtype=dtype, device=dev), torch.arange(positions, device=dev)[None])
        self.cos_sin = torch.cat([cos[0], sin[0]], -1).contiguous()
        return True

    def _head_dim(self) -> int:
        c = self.config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, head_dim] of positions [B, T] in x's dtype: from the table when one
        matches x (`use_rope_table`), else from the rotary module."""
        t = self.cos_sin
        if t is None or t.dtype != x.dtype or t.device != x.device:
            return self.rotary(x, positions)
        cs = t[positions]
        D = t.shape[-1] // 2
        return cs[..., :D], cs[..., D:]

    @property
    def draft_vocab_size(self) -> int:
        raise NotImplementedError

    def feature_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """Which target features the drafter reads (runtime.hf.capture_features indices)."""
        raise NotImplementedError

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> target ids."""
        raise NotImplementedError

    def forward(
        self,
        embeds: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend = causal_attend,
        from_target: bool = True,
    ) -> torch.Tensor:
        """embeds [B, T, H] (the target's token embeddings), features [B, T, F], positions [B, T]
        -> hidden [B, T, H]: the drafter's output, fed back as the next step's feature.

        from_target: the features are the target's (EAGLE-3 fuses them with fc) rather than the
        drafter's own outputs (used as they are). EAGLE-1 treats both alike."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """hidden [..., H] -> logits [..., Vd]; EAGLE-1/2 uses the target's lm_head (pass it)."""
        raise NotImplementedError

    def _saved_config(self, cfg: dict) -> dict:
        """The config.json fields that name this drafter's format."""
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> None:
        """SafeAILab's layout: config.json + model.safetensors (EAGLE-3 with `architectures`
        LlamaForCausalLMEagle3 and `draft_vocab_size`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self._saved_config({**self.config.to_dict(), "num_hidden_layers": 1})
        (path / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("rotary.")}
        save_file(state, str(path / "model.safetensors"))


class Eagle1Drafter(EagleDrafter):
    """EAGLE-1/2: fc over [embed(token), the target's final hidden state], one layer, the target's lm_head."""

    version = 1

    def __init__(self, config: LlamaConfig, version: int | None = None):
        super().__init__(config, version)
        H = config.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=bool(getattr(config, "bias", True)))
        self.layers = nn.ModuleList([_Layer(config)])

    @property
    def draft_vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def feature_layers(self, num_target_layers: int) -> tuple[int, ...]:
        return (num_target_layers,)

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids

    def forward(self, embeds, features, positions, attend: Attend = causal_attend, from_target: bool = True):
        cos, sin = self.rope(embeds, positions)
        return self.layers[0](self.fc(torch.cat([embeds, features], -1)), cos, sin, attend)

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        if lm_head is None:
            raise ValueError("an EAGLE-1/2 drafter uses the target's lm_head: pass lm_head=")
        return lm_head(hidden)

    def _saved_config(self, cfg: dict) -> dict:
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["bias"] = self.fc.bias is not None
        cfg.pop("draft_vocab_size", None)
        return cfg


class Eagle3Drafter(EagleDrafter):
    """EAGLE-3: fc over three target layers' features, one layer attending over [embed, hidden],
    its own lm_head over a draft vocabulary (draft id d is target id d + d2t[d])."""

    version = 3

    def __init__(self, config: LlamaConfig, version: int | None = None):
        super().__init__(config, version)
        H = config.hidden_size
        Ht = int(getattr(config, "target_hidden_size", None) or H)
        V = int(config.vocab_size)
        Vd = int(getattr(config, "draft_vocab_size", None) or V)
        self.fc = nn.Linear(3 * Ht, H, bias=False)
        self.midlayer = _Eagle3Layer(config)
        self.norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(H, Vd, bias=False)
        self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.long))  # identity until set
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[:Vd] = True
        self.register_buffer("t2d", t2d)

    @property
    def draft_vocab_size(self) -> int:
        return self.lm_head.out_features

    def feature_layers(self, num_target_layers: int) -> tuple[int, ...]:
        ids = getattr(self.config, "eagle_aux_hidden_state_layer_ids", None)
        eagle_cfg = getattr(self.config, "eagle_config", None)
        if ids is None and isinstance(eagle_cfg, dict):
            ids = eagle_cfg.get("eagle_aux_hidden_state_layer_ids")
        ids = tuple(int(i) for i in ids) if ids else _default_aux_layers(num_target_layers)
        if len(ids) != 3 or not all(0 <= i < num_target_layers for i in ids):
            raise ValueError(
                f"EAGLE-3 reads 3 target layers in [0, {num_target_layers}); got {list(ids)} "
                "(set eagle_aux_hidden_state_layer_ids in the drafter's config for small targets)"
            )
        return ids

    def set_vocab_map(self, draft_to_target: torch.Tensor) -> None:
        """Draft id d means target id draft_to_target[d] (strictly increasing) -> d2t, t2d."""
        ids = torch.as_tensor(draft_to_target, dtype=torch.long)
        if ids.shape != self.d2t.shape or (ids[1:] <= ids[:-1]).any():
            raise ValueError(f"need {self.d2t.shape[0]} strictly increasing target ids, got shape {tuple(ids.shape)}")
        self.d2t.copy_(ids - torch.arange(len(ids)))
        self.t2d.zero_()
        self.t2d[ids] = True

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def forward(self, embeds, features, positions, attend: Attend = causal_attend, from_target: bool = True):
        cos, sin = self.rope(embeds, positions)
        x = self.fc(features) if from_target else features
        return self.midlayer(x, cos, sin, attend, embeds=embeds)

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def _saved_config(self, cfg: dict) -> dict:
        cfg["architectures"] = [EAGLE3_ARCH]
        cfg["draft_vocab_size"] = self.draft_vocab_size
        return cfg


# ---------------------------------------------------------------------------------------------
# Loading: SafeAILab EAGLE-1/2 and EAGLE-3, with vLLM / SGLang key names
# ---------------------------------------------------------------------------------------------


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_weights(path, ("model.safetensors", "pytorch_model.bin"), "EAGLE")


def is_eagle3(cfg: dict) -> bool:
    archs = [str(a) for a in cfg.get("architectures") or []]
    if archs:
        return any("eagle3" in a.lower() for a in archs)
    return "draft_vocab_size" in cfg


def load_eagle(
    path: str | Path, hidden_size: int | None = None, vocab_size: int | None = None, revision: str | None = None
) -> EagleDrafter:
    """Load an EAGLE drafter folder; EAGLE-1/2 vs EAGLE-3 is read from config.json.

    EAGLE-1/2 (SafeAILab): a Llama config with one layer and optional `"bias"` (the fc's); keys
    `fc.*`, `layers.0.*` and optionally `embed_tokens.weight`. EAGLE-3: `"architectures":
    ["LlamaForCausalLMEagle3"]` or `draft_vocab_size`; keys `fc.weight`, `midlayer.*`, `norm.weight`,
    `lm_head.weight`, `d2t`, `t2d`. vLLM / SGLang names (`model.` prefix, `layers.0.*` for EAGLE-3's
    midlayer) are accepted. Weights: model.safetensors, or pytorch_model.bin read with
    `torch.load(weights_only=True)`. hidden_size / vocab_size, when given, are the target's: a
    mismatch raises ValueError naming both. path may be a Hugging Face Hub id (at `revision`).
    """
    path = resolve(path, revision)  # a folder, or a Hub id through huggingface_hub's cache
    cfg = read_config(path, "an EAGLE")
    version = 3 if is_eagle3(cfg) else 1
    if "hidden_size" not in cfg or "vocab_size" not in cfg:
        raise ValueError(f"{path / 'config.json'} is not an EAGLE (Llama-style) config: keys {sorted(cfg)[:12]}")
    if int(cfg.get("num_hidden_layers", 1)) != 1:
        raise ValueError(f"EAGLE drafters have one layer; {path} has num_hidden_layers={cfg['num_hidden_layers']}")
    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
    config = LlamaConfig(**fields)
    if vocab_size is not None and int(cfg["vocab_size"]) != vocab_size:
        raise ValueError(f"EAGLE drafter has vocab_size={cfg['vocab_size']} but the target has {vocab_size}")
    target_hidden = int(cfg.get("target_hidden_size") or cfg["hidden_size"])
    if hidden_size is not None and target_hidden != hidden_size:
        raise ValueError(f"EAGLE drafter expects target hidden size {target_hidden} but the target has {hidden_size}")
    weights = _read_weights(path)
    state = {}
    for name, tensor in weights.items():
        name = name.removeprefix("model.")
        if version == 3 and name.startswith("layers.0."):
            name = "midlayer." + name.removeprefix("layers.0.")
        state[name] = tensor
    if version == 1:
        state.pop("layers.0.input_layernorm.weight", None)  # EAGLE-1's first layer has no input norm
        state.pop("lm_head.weight", None)  # the target's lm_head is used
    if "fc.bias" not in state and version == 1:
        config.bias = False
    drafter = EagleDrafter(config, version)
    embed = state.pop("embed_tokens.weight", None)
    expected = {k: v for k, v in drafter.state_dict().items() if not k.startswith("rotary.")}
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"unexpected EAGLE-{version} weight {name!r} in {path}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"EAGLE weight {name!r} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if version == 3 and missing in (["d2t", "t2d"], ["t2d"]):
        if "d2t" in state:  # t2d follows from d2t
            ids = torch.arange(len(state["d2t"])) + state["d2t"]
            state["t2d"] = torch.zeros(int(cfg["vocab_size"]), dtype=torch.bool).index_fill_(0, ids, True)
        else:
            warnings.warn(f"{path} has no d2t / t2d: the draft vocabulary is taken as the first ids", stacklevel=2)
            state.update(d2t=expected["d2t"], t2d=expected["t2d"])
        missing = []
    if missing:
        raise ValueError(f"EAGLE-{version} checkpoint {path} lacks {missing[:4]}")
    drafter.load_state_dict(state)
    if embed is not None:
        drafter.embed_tokens = nn.Embedding.from_pretrained(embed.float(), freeze=True)
    return drafter
