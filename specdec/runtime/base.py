"""The model interface the engine talks to, and the attention metadata that travels with a call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..cache.paged_kv import PagedKVCache


@dataclass(slots=True)
class AttentionMetadata:
    """Everything one forward needs to read and write the paged cache (B rows, T queries, S keys).

    cache        PagedKVCache
    write_slots  [B, T] long  slot each query token's K/V is stored in; -1 = padding, not stored
    kv_slots     [B, S] long  slots of every key a row may attend to (committed prefix + this call); -1 pads
    kv_positions [B, S] long  position id of each key (sliding windows)
    q_positions  [B, T] long  position id of each query
    mask         [B, T, S] bool  query t may attend key s (causal prefix, tree ancestors)
    """

    cache: PagedKVCache
    write_slots: torch.Tensor
    kv_slots: torch.Tensor
    kv_positions: torch.Tensor
    q_positions: torch.Tensor
    mask: torch.Tensor


@dataclass(slots=True)
class ModelOutput:
    """logits [B, T', V] (T' = the kept positions); hidden_states: per layer [B, T, hidden] or None."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class TargetModel(Protocol):
    """A causal LM running on the paged cache with explicit positions and tree masks."""

    num_layers: int
    vocab_size: int
    max_positions: int | None
    device: torch.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
    ) -> ModelOutput: ...

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache: ...
