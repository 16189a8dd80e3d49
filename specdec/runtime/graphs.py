"""CUDA graphs of the step forward (decode / tree verify), one per (batch bucket, token bucket).

The captured forward reads only the paged form of the metadata (block tables, prefix lengths, new
slots, new mask) from static buffers, so a replay costs one launch instead of the model's hundreds.
Rows beyond the real batch are padding: no slot is written for them and their logits are unused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..cache.paged_kv import PagedKVCache
from .base import AttentionMetadata, ModelOutput
from .hf import HFModel

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [Bb, T]
    positions: torch.Tensor  # [Bb, T]
    meta: AttentionMetadata  # static paged buffers
    logits: torch.Tensor  # [Bb, T, V]
    hidden: torch.Tensor | None = None  # [Bb, T, H] the lm_head's input, when captured
    features: torch.Tensor | None = None  # [Bb, T, F] layer features, when captured


def batch_bucket(batch: int) -> int:
    for b in BATCH_BUCKETS:
        if b >= batch:
            return b
    raise ValueError(f"batch {batch} exceeds the largest graph bucket {BATCH_BUCKETS[-1]}")


class GraphedForward:
    """`forward(input_ids, positions, meta)` through captured CUDA graphs (paged metadata only).

    Parameters
    ----------
    runtime : the HFModel to capture.
    cache : its PagedKVCache (allocated by an eager call before the first capture).
    max_blocks : block-table width of the static buffers; keys beyond max_blocks * page never exist.
    """

    captures = 0  # graphs captured in this process, by every GraphedForward (SpecStats.graph_captures)

    def __init__(
        self,
        runtime: HFModel,
        cache: PagedKVCache,
        max_blocks: int,
        last_hidden: bool = False,
        features: tuple[int, ...] | None = None,
    ):
        self.runtime, self.cache, self.max_blocks = runtime, cache, max_blocks
        self.last_hidden = last_hidden  # also capture the lm_head's input (proposers that need it)
        self.feature_layers = features  # also capture these layer features (EAGLE)
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = None
        self.uncapturable: str | None = None  # why capture failed: every step then runs eagerly

    def _eager(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> ModelOutput:
        """The same forward without a graph, on the paged metadata (batches beyond the largest bucket,
        models that cannot be captured)."""
        return self.runtime.forward(
            input_ids, positions, meta, last_hidden=self.last_hidden, features=self.feature_layers
        )

    def _static(self, B: int, T: int) -> _Captured:
        dev = self.runtime.device
        positions = torch.zeros(B, T, dtype=torch.long, device=dev)  # also the kernel's q_positions (windows)
        meta = AttentionMetadata(
            cache=self.cache,
            write_slots=torch.full((B, T), -1, dtype=torch.long, device=dev),
            q_positions=positions,
            block_tables=torch.zeros(B, self.max_blocks, dtype=torch.int32, device=dev),
            prefix_lens=torch.zeros(B, dtype=torch.int32, device=dev),
            new_slots=torch.full((B, T), -1, dtype=torch.int32, device=dev),
            new_mask=torch.zeros(B, T, T, dtype=torch.bool, device=dev),
            max_prefix=self.max_blocks * self.cache.block_size,
        )
        ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        return _Captured(None, ids, positions, meta, None)

    def _capture(self, B: int, T: int) -> _Captured:
        c = self._static(B, T)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels
                self.runtime.forward(
                    c.input_ids, c.positions, c.meta, last_hidden=self.last_hidden, features=self.feature_layers
                )
        torch.cuda.current_stream().wait_stream(stream)
        c.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(c.graph, pool=self.pool):
            out = self.runtime.forward(
                c.input_ids, c.positions, c.meta, last_hidden=self.last_hidden, features=self.feature_layers
            )
        c.logits, c.hidden, c.features = out.logits, out.last_hidden, out.features
        self.pool = c.graph.pool()
        GraphedForward.captures += 1
        return c

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> ModelOutput:
        """input_ids, positions [B, T] -> ModelOutput: logits [B, T, V], and last_hidden [B, T, E] /
        features [B, T, F] when captured (views of static buffers: use them before the next call)."""
        B, T = input_ids.shape
        if B > BATCH_BUCKETS[-1] or self.uncapturable:
            return self._eager(input_ids, positions, meta)
        Bb = batch_bucket(B)
        if meta.block_tables.shape[1] > self.max_blocks:
            raise ValueError(f"block table width {meta.block_tables.shape[1]} exceeds the graphs' {self.max_blocks}")
        key = (Bb, T)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(Bb, T)
            except RuntimeError as e:  # e.g. MoE experts that copy routing offsets from the host
                if "captur" not in str(e).lower():
                    raise
                self.uncapturable = str(e).strip().splitlines()[0]
                warnings.warn(
                    f"{type(self.runtime.model).__name__} cannot be captured in a CUDA graph "
                    f"({self.uncapturable}); its steps run eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self._eager(input_ids, positions, meta)
        c = self.graphs[key]
        c.input_ids[:B].copy_(input_ids)
        c.positions[:B].copy_(positions)
        s = c.meta
        s.block_tables.zero_()
        s.block_tables[:B, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        s.prefix_lens.zero_()
        s.prefix_lens[:B].copy_(meta.prefix_lens)
        s.new_slots.fill_(-1)
        s.new_slots[:B].copy_(meta.new_slots)
        s.new_mask.zero_()
        s.new_mask[:B].copy_(meta.new_mask)
        c.graph.replay()
        return ModelOutput(
            logits=c.logits[:B],
            last_hidden=c.hidden[:B] if c.hidden is not None else None,
            features=c.features[:B] if c.features is not None else None,
        )
