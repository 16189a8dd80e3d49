"""Medusa heads: K extra heads on the target's last hidden state, head k guessing the token k + 2 ahead.

Head k = n residual blocks x + SiLU(Linear(x)) (the linear zero-initialised, so an untrained head
starts as the identity), then its own vocabulary projection, or the target's lm_head (v2 style).
Checkpoints: FasterDecoding v1 / v2, vLLM's layout and our own (safetensors + config.json) load
through one call, `load_medusa`. Dims: B batch, T tokens, H hidden, K heads, V vocab.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..hub import resolve
from .checkpoint import read_config, read_weights

FORMAT = "specdec-medusa"


@dataclass(slots=True)
class MedusaConfig:
    """num_heads K, num_layers (residual blocks per head), hidden_size H, vocab_size V;
    own_lm_head False = reuse the target's lm_head (v2 style); bias of the block linears."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    own_lm_head: bool = True
    bias: bool = True


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W zero-initialised."""

    def __init__(self, hidden: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=bias)
        nn.init.zeros_(self.linear.weight)
        if bias:
            nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads; every head and block owns its parameters (no `[Block()] * n` sharing).

    forward(hidden [..., H], lm_head=None) -> logits [..., K, V]; `lm_head` is the target's
    output projection, needed when config.own_lm_head is False.
    """

    def __init__(self, config: MedusaConfig):
        super().__init__()
        if config.num_heads < 1 or config.num_layers < 0:
            raise ValueError(f"need num_heads >= 1 and num_layers >= 0; got {config}")
        self.config = config
        H, V = config.hidden_size, config.vocab_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(H, config.bias) for _ in range(config.num_layers)])
            for _ in range(config.num_heads)
        )
        self.lm_heads = (
            nn.ModuleList(nn.Linear(H, V, bias=False) for _ in range(config.num_heads)) if config.own_lm_head else None
        )

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        if self.lm_heads is None and lm_head is None:
            raise ValueError("these Medusa heads reuse the target's lm_head: pass lm_head=")
        outs = []
        for k, block in enumerate(self.blocks):
            h = block(hidden)
            outs.append(self.lm_heads[k](h) if self.lm_heads is not None else lm_head(h))
        return torch.stack(outs, dim=-2)

    def save_pretrained(self, path: str | Path) -> None:
        """Our format: config.json (with "format": "specdec-medusa") + model.safetensors."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"format": FORMAT, **asdict(self.config)}, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Loading: one entry point for every layout
# ---------------------------------------------------------------------------------------------


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    names = ("model.safetensors", "medusa_lm_head.safetensors", "medusa_lm_head.pt", "pytorch_model.bin")
    return read_weights(path, names, "Medusa")


def _from_faster_decoding(cfg: dict, weights: dict, hidden: int, vocab: int) -> tuple[MedusaConfig, dict]:
    K, L = int(cfg["medusa_num_heads"]), int(cfg["medusa_num_layers"])
    v2 = str(cfg.get("version", "1")) == "2"
    bias = "0.0.linear.bias" in weights if L else True
    mc = MedusaConfig(K, L, hidden, vocab, own_lm_head=not v2, bias=bias)
    state = {}
    for h in range(K):
        for layer in range(L):
            state[f"blocks.{h}.{layer}.linear.weight"] = weights[f"{h}.{layer}.linear.weight"]
            if bias:
                state[f"blocks.{h}.{layer}.linear.bias"] = weights[f"{h}.{layer}.linear.bias"]
        if not v2:
            state[f"lm_heads.{h}.weight"] = weights[f"{h}.{L}.weight"]
    return mc, state


def _from_vllm(cfg: dict, weights: dict, hidden: int, vocab: int) -> tuple[MedusaConfig, dict]:
    weights = {k.removeprefix("medusa_heads."): v for k, v in weights.items()}
    K, L = int(cfg["num_heads"]), int(cfg["num_hidden_layers"])
    bias = bool(cfg.get("medusa_fc_bias", False))
    shared = bool(cfg.get("original_lm_head", False))
    mc = MedusaConfig(K, L, hidden, vocab, own_lm_head=True, bias=bias)
    state = {}
    for h in range(K):
        for layer in range(L):
            state[f"blocks.{h}.{layer}.linear.weight"] = weights[f"blocks.{h}.layers.{layer}.weight"]
            if bias:
                state[f"blocks.{h}.{layer}.linear.bias"] = weights[f"blocks.{h}.layers.{layer}.bias"]
        state[f"lm_heads.{h}.weight"] = weights["lm_heads.0.weight" if shared else f"lm_heads.{h}.weight"]
    return mc, state


def load_medusa(path: str | Path, hidden_size: int, vocab_size: int, revision: str | None = None) -> MedusaHeads:
    """Load Medusa heads for a target with this hidden size and vocabulary, from any known layout.

    Layouts: ours ("format": "specdec-medusa"); FasterDecoding v1 (`medusa_num_heads`,
    `medusa_num_layers`; keys `{h}.{l}.linear.weight|bias`, `{h}.{L}.weight`); FasterDecoding v2
    (`"version": "2"`: no per-head projection, the target's lm_head is reused); vLLM
    (`num_heads`, `num_hidden_layers`; keys `blocks.{h}.layers.{l}.weight`, `lm_heads.{h}.weight`).
    A shape or vocabulary mismatch with the target raises ValueError naming both. path may be a
    Hugging Face Hub id (at `revision`), resolved through huggingface_hub's cache.
    """
    path = resolve(path, revision)  # a folder, or a Hub id through huggingface_hub's cache
    cfg = read_config(path, "a Medusa")
    weights = _read_weights(path)
    if cfg.get("format") == FORMAT:
        fields = {k: cfg[k] for k in MedusaConfig.__dataclass_fields__}
        mc, state = MedusaConfig(**fields), weights
    elif "medusa_num_heads" in cfg:
        mc, state = _from_faster_decoding(cfg, weights, hidden_size, vocab_size)
    elif "num_heads" in cfg and "num_hidden_layers" in cfg:
        mc, state = _from_vllm(cfg, weights, hidden_size, vocab_size)
    else:
        raise ValueError(f"{path / 'config.json'} is not a known Medusa config (keys: {sorted(cfg)})")
    for key in ("hidden_size", "vocab_size"):
        want = hidden_size if key == "hidden_size" else vocab_size
        got = cfg.get(key, getattr(mc, key))
        if got != want:
            raise ValueError(f"Medusa heads have {key}={got} but the target has {want}")
    heads = MedusaHeads(mc)
    expected = heads.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"unexpected Medusa weight {name!r} in {path}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"Medusa weight {name!r} has shape {tuple(tensor.shape)}, "
                f"the target needs {tuple(expected[name].shape)}"
            )
    missing = set(expected) - set(state)
    if missing:
        raise ValueError(f"Medusa checkpoint {path} lacks {sorted(missing)[:4]}")
    heads.load_state_dict(state)
    return heads
