"""The model interface the engine talks to, and the attention metadata that travels with a call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..cache.paged_kv import PagedKVCache


@dataclass(slots=True)
class AttentionMetadata:
    """Everything one forward needs to read and write the paged cache (B rows, T queries).

    cache        PagedKVCache
    write_slots  [B, T] long  slot each query token's K/V is stored in; -1 = padding, not stored
    q_positions  [B, T] long  position id of each query
    Gathered form (the torch reference attention; S keys):
    kv_slots     [B, S] long  slots of every key a row may attend to (committed prefix + this call); -1 pads
    kv_positions [B, S] long  position id of each key (sliding windows)
    mask         [B, T, S] bool  query t may attend key s
    Paged form (the Triton kernel; None when not built):
    block_tables [B, M] int32  page ids of each row
    prefix_lens  [B] int32     committed keys, visible to every query of the row
    new_slots    [B, T] int32  = write_slots
    new_mask     [B, T, T] bool  query t may attend new token j (tree ancestors / causal)
    max_prefix   int           an upper bound of prefix_lens (no device sync needed)
    """

    cache: PagedKVCache
    write_slots: torch.Tensor
    q_positions: torch.Tensor
    kv_slots: torch.Tensor | None = None
    kv_positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    prefix_lens: torch.Tensor | None = None
    new_slots: torch.Tensor | None = None
    new_mask: torch.Tensor | None = None
    max_prefix: int = 0


@dataclass(slots=True)
class ModelOutput:
    """logits [B, T', V] (T' = the kept positions); hidden_states: per layer [B, T, hidden] or None;
    last_hidden [B, T', hidden]: what the lm_head saw (after the final norm), when asked for;
    features [B, T, F]: the requested layer features at every position, concatenated (see
    runtime.hf.capture_features)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    last_hidden: torch.Tensor | None = None
    features: torch.Tensor | None = None


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
        last_hidden: bool = False,
        features: tuple[int, ...] | None = None,
    ) -> ModelOutput:
        """input_ids, positions [B, T] -> logits [B, T', V]; last_hidden adds the lm_head's input,
        features the given layers' features at every position."""
        ...

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache: ...
