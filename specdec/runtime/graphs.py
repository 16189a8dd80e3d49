"""CUDA graphs of the step forward (decode / tree verify), one per (batch bucket, token bucket).

The captured forward reads only the paged form of the metadata (block tables, prefix lengths, new
slots, new mask) from static buffers, so a replay costs one launch instead of the model's hundreds.
Rows beyond the real batch are padding: no slot is written for them and their logits are unused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
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
    # tree graphs (GraphedForward.forward_tree) derive the metadata inside the graph from these:
    depth: torch.Tensor | None = None  # [Bb, T] long
    parents: torch.Tensor | None = None  # [Bb, T] long (-1: the root; padding rows: 0)
    num_nodes: torch.Tensor | None = None  # [Bb] long (padding rows: 0, no valid node)
    host: torch.Tensor | None = None  # [Bb, 1 + max_blocks] int32: committed length (-1: padding row), table
    advance: torch.Tensor | None = None  # [Bb] int32: positions a step in flight commits first (device-known)
    advanced: bool = False  # advance holds nonzero values (a later call without one zeroes it)
    node_slots: torch.Tensor | None = None  # [Bb, T] long, an output
    columns: torch.Tensor | None = None  # [T] arange: read by the graph, so owned here (a freed one is reused)


def ancestor_closure(parents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: node i sees node j when j is i or an ancestor of i and j is valid; from
    parents [B, T] (-1 for the root) and valid [B, T], in ceil(log2 T) boolean matrix squarings
    (a fixed number of launches for any depth, so it can live inside a graph)."""
    T = parents.shape[1]
    col = torch.arange(T, device=parents.device)
    reach = ((parents[:, :, None] == col) | (col[:, None] == col)).float()  # itself and its parent
    for _ in range(max(T - 1, 0).bit_length()):  # covers distances up to 2**k >= T - 1
        reach = (torch.bmm(reach, reach) > 0).float()
    return (reach > 0) & valid[:, None, :]


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
        self.tree_graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = None
        self.uncapturable: str | None = None  # why capture failed: every step then runs eagerly
        self.last: _Captured | None = None  # the tree graph of the latest forward_tree replay

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
        return self._record(c, lambda: self.runtime.forward(
            c.input_ids, c.positions, c.meta, last_hidden=self.last_hidden, features=self.feature_layers
        ))  # fmt: skip

    def _record(self, c: _Captured, run) -> _Captured:
        """Warm run() up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        c.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(c.graph, pool=self.pool):
            out = run()
        c.logits, c.hidden, c.features = out.logits, out.last_hidden, out.features
        self.pool = c.graph.pool()
        GraphedForward.captures += 1
        return c

    def _capture_tree(self, B: int, T: int) -> _Captured:
        c = self._static_tree(B, T)
        return self._record(c, self._tree_step(c))

    def _static_tree(self, B: int, T: int) -> _Captured:
        dev = self.runtime.device
        c = self._static(B, T)
        c.depth = torch.zeros(B, T, dtype=torch.long, device=dev)
        c.parents = torch.zeros(B, T, dtype=torch.long, device=dev)
        c.num_nodes = torch.zeros(B, dtype=torch.long, device=dev)
        c.host = torch.zeros(B, 1 + self.max_blocks, dtype=torch.int32, device=dev)
        c.host[:, 0] = -1  # the warm-up and capture runs are all padding: they write no slot
        c.advance = torch.zeros(B, dtype=torch.int32, device=dev)
        return c

    def _tree_step(self, c: _Captured):
        """The captured function of a tree graph: the metadata is derived inside it. Node i of row b
        is stored at logical position committed[b] + i, has position id committed[b] + depth[b, i]
        and sees the committed prefix, itself and its valid ancestors (`ancestor_closure`)."""
        bs = self.cache.block_size
        # every tensor the graph reads must outlive the capture: a temporary made here and freed
        # after it would be handed to another tensor, and replays would read that one's contents
        c.columns = col = torch.arange(c.input_ids.shape[1], device=c.input_ids.device)

        def run() -> ModelOutput:
            committed = c.host[:, 0].long()
            committed = torch.where(committed >= 0, committed + c.advance.long(), committed)
            prefix = committed.clamp(min=0)
            tables = c.host[:, 1:]
            pos = prefix[:, None] + col
            slots = tables.gather(1, pos // bs).long() * bs + pos % bs
            slots = torch.where(committed[:, None] >= 0, slots, -1)
            positions = prefix[:, None] + c.depth
            meta = AttentionMetadata(
                cache=self.cache,
                write_slots=slots,
                q_positions=positions,
                block_tables=tables,
                prefix_lens=prefix.int(),
                new_slots=slots.int(),
                new_mask=ancestor_closure(c.parents, col < c.num_nodes[:, None]),
                max_prefix=self.max_blocks * bs,
            )
            out = self.runtime.forward(
                c.input_ids, positions, meta, last_hidden=self.last_hidden, features=self.feature_layers
            )
            c.node_slots = slots
            return out

        return run

    def _load_tree(
        self,
        c: _Captured,
        tokens,
        depth,
        parents,
        num_nodes,
        committed: list[int],
        tables: list[list[int]],
        advance: torch.Tensor | None = None,
    ) -> None:
        """Fill a tree graph's inputs: rows beyond the batch are padding (committed -1)."""
        B = tokens.shape[0]
        if advance is not None:
            c.advance[:B].copy_(advance, non_blocking=True)
            c.advanced = True
        elif c.advanced:
            c.advance.zero_()
            c.advanced = False
        host = np.zeros(tuple(c.host.shape), dtype=np.int32)
        host[:, 0] = -1  # padding rows: no slot written, no prefix read
        for b, (n, table) in enumerate(zip(committed, tables, strict=True)):
            if len(table) > self.max_blocks:
                raise ValueError(f"block table width {len(table)} exceeds the graphs' {self.max_blocks}")
            host[b, 0] = n
            host[b, 1 : 1 + len(table)] = table
        staged = torch.from_numpy(host)
        if c.host.is_cuda:
            staged = staged.pin_memory()
        c.host.copy_(staged, non_blocking=True)
        # one multi-tensor copy (the tree's fields are all long) instead of four
        dst, src = [c.input_ids[:B], c.depth[:B], c.parents[:B], c.num_nodes[:B]], [tokens, depth, parents, num_nodes]
        if all(x.dtype == torch.long and x.device == c.depth.device for x in src):
            torch._foreach_copy_(dst, src, non_blocking=True)
        else:
            for d, x in zip(dst, src, strict=True):
                d.copy_(x)

    def capturable(self, batch: int) -> bool:
        return batch <= BATCH_BUCKETS[-1] and not self.uncapturable

    def _get(self, graphs: dict, capture, B: int, T: int) -> _Captured | None:
        """The graph of (B's bucket, T), captured on first use; None when the model cannot be captured."""
        key = (batch_bucket(B), T)
        if key not in graphs:
            try:
                graphs[key] = capture(*key)
            except RuntimeError as e:  # e.g. MoE experts that copy routing offsets from the host
                if "captur" not in str(e).lower():
                    raise
                self.uncapturable = str(e).strip().splitlines()[0]
                warnings.warn(
                    f"{type(self.runtime.model).__name__} cannot be captured in a CUDA graph "
                    f"({self.uncapturable}); its steps run eagerly",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
        return graphs[key]

    def forward_tree(
        self,
        tokens: torch.Tensor,
        depth: torch.Tensor,
        parents: torch.Tensor,
        num_nodes: torch.Tensor,
        committed: list[int],
        tables: list[list[int]],
        advance: torch.Tensor | None = None,
    ) -> tuple[ModelOutput, torch.Tensor] | None:
        """One tree step with its metadata built inside the graph (a few copies and one host ->
        device transfer before the replay): tokens, depth, parents [B, T], num_nodes [B] (the
        ancestor mask is derived in the graph), committed [B] lengths and block tables [B][<= max_blocks] on the
        host; advance [B] on the device is added to committed inside the graph (a step in flight
        commits that many first). Returns (output, node_slots [B, T]) as static views, or None when
        the model cannot be captured (the caller runs it eagerly)."""
        B, T = tokens.shape
        if not self.capturable(B):
            return None
        c = self._get(self.tree_graphs, self._capture_tree, B, T)
        if c is None:
            return None
        self._load_tree(c, tokens, depth, parents, num_nodes, committed, tables, advance)
        c.graph.replay()
        self.last = c
        out = ModelOutput(
            logits=c.logits[:B],
            last_hidden=c.hidden[:B] if c.hidden is not None else None,
            features=c.features[:B] if c.features is not None else None,
        )
        return out, c.node_slots[:B]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> ModelOutput:
        """input_ids, positions [B, T] -> ModelOutput: logits [B, T, V], and last_hidden [B, T, E] /
        features [B, T, F] when captured (views of static buffers: use them before the next call)."""
        B, T = input_ids.shape
        if not self.capturable(B):
            return self._eager(input_ids, positions, meta)
        if meta.block_tables.shape[1] > self.max_blocks:
            raise ValueError(f"block table width {meta.block_tables.shape[1]} exceeds the graphs' {self.max_blocks}")
        c = self._get(self.graphs, self._capture, B, T)
        if c is None:
            return self._eager(input_ids, positions, meta)
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


class GraphedCalls:
    """A function of per-row tensors captured as one CUDA graph per key, for the work around a
    graphed forward: the engine's step tail (verification, K/V compaction, the read-back pack)
    replays as one launch instead of a few hundred.

    `fn(inputs) -> dict[str, Tensor]` must be a pure function of `inputs` (a dict of tensors)
    whose control flow is fixed by the key, and every output must have the batch bucket as its
    first dimension. Inputs come in three kinds:

    rows   : [B, ...] tensors, copied into static buffers of the bucket Bb >= B before each replay;
             rows B.. keep row 0's values from the capture (a valid input whose results are unused).
             Rows on the host (CPU tensors) are packed per dtype into one pinned buffer and reach
             the device in one transfer (rows B.. then take row 0's values of this call); rows
             already on the device are copied with one multi-tensor copy per dtype.
    fixed  : tensors that are already static with Bb rows (another graph's outputs); their
             addresses are part of the key, so a re-captured forward gets new calls.
    shared : tensors without a batch dimension (copied whole).

    `inputs["live"]` ([Bb] bool) is False for padding rows and during the warm-up runs, which
    execute for real: `fn` must make its side effects (K/V moves) conditional on it.

    capture=False runs `fn` eagerly on the same padded static buffers at every call (no CUDA
    needed): the CPU tests check the padding and `live` rules of a captured function with it.
    """

    def __init__(self, capture: bool = True) -> None:
        self.capture = capture
        self.calls: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}
        self.pool = None
        self.owner = None  # the GraphedForward whose outputs are `fixed`: a new one drops every call

    def __call__(
        self,
        key: tuple,
        fn,
        B: int,
        rows: dict[str, torch.Tensor],
        fixed: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor] | None = None,
        owner=None,
        device: torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        """Replay (capture on first use) the call of `key` for B rows; device: where the static
        buffers live (default: the first input not on the host)."""
        shared = shared or {}
        if owner is not self.owner:
            self.calls.clear()
            self.owner = owner
        Bb = batch_bucket(B)
        full = (
            key,
            Bb,
            tuple((n, t.data_ptr(), tuple(t.shape), t.dtype) for n, t in sorted(fixed.items())),
            tuple((n, tuple(t.shape[1:]), t.dtype, t.device.type) for n, t in sorted(rows.items())),
            tuple((n, tuple(t.shape), t.dtype) for n, t in sorted(shared.items())),
        )
        entry = self.calls.get(full)
        if entry is None:
            entry = self._capture(fn, B, Bb, rows, fixed, shared, device)
            self.calls[full] = entry
        else:
            self._load(entry[1], B, rows, shared)
        graph, static, outputs = entry
        if static["_live_rows"] != B:  # the rows' mask, set only when the batch changes
            live = static["live"]
            live[:B] = True
            live[B:] = False
            static["_live_rows"] = B
        if graph is None:  # capture=False
            outputs = fn({**{n: t for n, t in static.items() if not n.startswith("_")}, **fixed})
        else:
            graph.replay()
        return {n: t[:B] for n, t in outputs.items()}

    @staticmethod
    def _load(static: dict, B: int, rows: dict, shared: dict) -> None:
        """Copy this call's inputs into the static buffers: host rows packed per dtype into one
        (pinned) staging buffer and one transfer, device rows by one multi-tensor copy per dtype."""
        for flat, layout in static["_packed"]:
            stage = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=flat.is_cuda)
            Bb, off = static["live"].shape[0], 0
            for n, k in layout:
                src = rows[n].reshape(B, k)
                dst = stage[off : off + Bb * k].view(Bb, k)
                dst[:B].copy_(src)
                if Bb > B:  # padding rows: row 0's values (a valid input whose results are unused)
                    dst[B:].copy_(src[:1].expand(Bb - B, k))
                off += Bb * k
            flat.copy_(stage, non_blocking=True)
        groups: dict[torch.dtype, tuple[list, list]] = {}
        for n, t in rows.items():
            if t.device.type != "cpu":
                dst, src = groups.setdefault(t.dtype, ([], []))
                dst.append(static[n][:B])
                src.append(t)
        for dst, src in groups.values():
            torch._foreach_copy_(dst, src, non_blocking=True)
        for n, t in shared.items():
            static[n].copy_(t, non_blocking=True)

    def _capture(self, fn, B: int, Bb: int, rows: dict, fixed: dict, shared: dict, device=None):
        if device is None:
            on = [t.device for t in (*fixed.values(), *rows.values(), *shared.values()) if t.device.type != "cpu"]
            device = on[0] if on else torch.device("cpu")
        static: dict = {}
        packed = []
        by_dtype: dict[torch.dtype, list[str]] = {}
        for n, t in rows.items():
            if t.device.type == "cpu":  # packed: one flat device buffer per dtype, the inputs views of it
                by_dtype.setdefault(t.dtype, []).append(n)
            else:
                buf = t[:1].expand(Bb, *t.shape[1:]).clone()  # padding rows: row 0's (valid) values
                buf[:B].copy_(t)
                static[n] = buf
        for dtype, names in by_dtype.items():
            sizes = [rows[n][0].numel() for n in names]
            flat = torch.empty(Bb * sum(sizes), dtype=dtype, device=device)
            off = 0
            for n, k in zip(names, sizes, strict=True):
                static[n] = flat[off : off + Bb * k].view(Bb, *rows[n].shape[1:])
                off += Bb * k
            packed.append((flat, list(zip(names, sizes, strict=True))))
        for n, t in shared.items():
            static[n] = t.clone()
        static["live"] = torch.zeros(Bb, dtype=torch.bool, device=device)  # the warm-up runs move nothing
        static["_packed"] = packed
        static["_live_rows"] = 0
        self._load(static, B, {n: t for n, t in rows.items() if t.device.type == "cpu"}, {})
        inputs = {**{n: t for n, t in static.items() if not n.startswith("_")}, **fixed}
        if not self.capture:
            fn(inputs)  # a warm-up run as the captured path has one: it must write nothing
            return None, {**static, "_fixed": tuple(fixed.values())}, {}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # Triton compiles, cuBLAS picks its kernels
                fn(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(inputs)
        self.pool = graph.pool()
        GraphedForward.captures += 1
        bad = [n for n, t in outputs.items() if t.shape[:1] != (Bb,)]
        if bad:
            raise ValueError(f"GraphedCalls outputs {bad} do not have the batch bucket {Bb} as their first dim")
        # `fixed` tensors are owned by their graph; keep them alive with this call all the same
        return graph, {**static, "_fixed": tuple(fixed.values())}, outputs
