"""Transformers adapter: any HF causal LM on the paged cache, through the attention-function seam.

The model's own attention modules project, rotate and normalise as usual; the registered function
`specdec` stores their K/V in the paged cache and attends over the slots named by the metadata.
No modeling file is copied or changed; the model's attention setting is swapped only for the call.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from ..cache.paged_kv import PagedKVCache
from .base import AttentionMetadata, ModelOutput
from .fusion import fusable, fused_forwards

ATTENTION_NAME = "specdec"


# keywords transformers' attention layers pass that do not change the attention's result
_NEUTRAL_KWARGS = frozenset(
    {"position_ids", "output_hidden_states", "use_cache", "output_router_logits", "cache_position", "is_causal"}
)


def _check_kwargs(module: torch.nn.Module, dropout: float, kwargs: dict) -> None:
    """An attention keyword specdec does not implement would change the output silently: refuse it."""
    if dropout:
        raise ValueError(
            f"{type(module).__name__} asks for attention dropout {dropout} (the model is in training mode): "
            "call model.eval() before generating"
        )
    if kwargs.get("is_causal") is False:
        raise ValueError(f"{type(module).__name__} runs bidirectional attention (is_causal=False); specdec is causal")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _NEUTRAL_KWARGS)
    if unknown:
        raise ValueError(
            f"{type(module).__name__} passes attention keyword(s) {', '.join(unknown)} that specdec's paged "
            "attention does not implement, so its output would differ from the model's own; implemented: the "
            "mask, scaling, sliding_window, softcap (Gemma2), s_aux sinks (GPT-OSS)"
        )


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    specdec_meta: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Paged attention: query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D].

    Stores the new K/V at the metadata's slots, then attends over each row's committed prefix and
    the new tokens (tree / causal mask), with the layer's sliding window, logit softcapping (Gemma2)
    and sinks (GPT-OSS, `s_aux` [H]). On the GPU the Triton kernel does it (always under CUDA
    graphs, whose metadata has only the paged form); otherwise a gathered torch reference.
    """
    meta = specdec_meta
    if meta is None:
        raise RuntimeError(
            f"{type(module).__name__}: specdec's paged attention was called without specdec metadata: the model "
            "was called directly (e.g. model(...) or model.generate from another thread) while specdec ran a "
            "forward of it; use one model from one thread at a time, or wait for specdec to finish"
        )
    _check_kwargs(module, dropout, kwargs)
    layer = module.layer_idx
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    scale = scaling if scaling is not None else D**-0.5
    if meta.block_tables is not None and (meta.kv_slots is None or T * H // Hkv <= 256):
        from specdec.kernels import paged_tree_attention, store_kv

        k_pool, v_pool = meta.cache.layer(layer, key)
        store_kv(key.transpose(1, 2), value.transpose(1, 2), k_pool, v_pool, meta.new_slots)
        out = paged_tree_attention(
            query.transpose(1, 2),
            k_pool,
            v_pool,
            meta.block_tables,
            meta.prefix_lens,
            meta.new_slots,
            meta.new_mask,
            scale,
            meta.cache.block_size,
            meta.max_prefix,
            q_positions=meta.q_positions,
            sliding_window=sliding_window,
            softcap=softcap,
            sinks=s_aux,
        )
        return out, None
    if meta.kv_slots is None:
        raise RuntimeError("the metadata has neither a paged nor a gathered form")
    if key.is_cuda and meta.new_slots is not None:  # the store kernel: no boolean indexing, no sync
        from specdec.kernels import store_kv

        k_pool, v_pool = meta.cache.layer(layer, key)
        store_kv(key.transpose(1, 2), value.transpose(1, 2), k_pool, v_pool, meta.new_slots)
    else:
        meta.cache.write(layer, meta.write_slots, key, value)
    k, v = meta.cache.gather(layer, meta.kv_slots)  # [B, Hkv, S, D]
    mask = meta.mask
    if sliding_window is not None:
        mask = mask & ((meta.q_positions[:, :, None] - meta.kv_positions[:, None, :]) < sliding_window)
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    if softcap is None and s_aux is None:
        # a padding query that sees nothing looks at key 0, so that it stays finite (its output is unused)
        first = torch.zeros_like(mask)
        first[..., 0] = True
        mask = torch.where(mask.any(-1, keepdim=True), mask, first)
        out = F.scaled_dot_product_attention(
            query, k.to(query.dtype), v.to(query.dtype), attn_mask=mask[:, None], scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None
    s = torch.matmul(query.float(), k.float().transpose(2, 3)) * scale  # [B, H, T, S]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    if s_aux is not None:  # one more logit per head in the denominator, with no value
        s = torch.cat([s, s_aux.float()[None, :, None, None].expand(B, H, T, 1)], -1)
    w = torch.nan_to_num(s.softmax(-1), nan=0.0)[..., : k.shape[2]]
    out = torch.matmul(w, v.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)


def check_supported(model: torch.nn.Module) -> None:
    """Raise ValueError for models this adapter cannot run."""
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"{name} is not a transformers PreTrainedModel; specdec runs Hugging Face causal LMs")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; specdec runs decoder-only causal LMs")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{name} does not route attention through transformers' AttentionInterface, so specdec cannot run "
            "it on its paged cache (supported: Llama, Mistral, Qwen2, Qwen3, GPT-2 and other models whose "
            "class sets _supports_attention_backend)"
        )
    if model.get_output_embeddings() is None:
        raise ValueError(f"{name} has no language-model head; pass a *ForCausalLM model")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (Llama-style `layers`, GPT-2-style `h`)."""
    base = getattr(model, model.base_model_prefix, model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for layers, h, blocks)")


@contextlib.contextmanager
def capture_features(model: torch.nn.Module, layers: tuple[int, ...]):
    """Record features of `model` while the context is open; yields a function that returns the
    features of the latest forward, [B, T, F] (F = len(layers) x hidden), concatenated in order.

    Layer index i < L is the input of decoder layer i (0: the embeddings; EAGLE-3 and vLLM's
    `eagle_aux_hidden_state_layer_ids` count the same way); i == L is the final hidden state after
    the final norm (what the lm_head sees: EAGLE-1's feature). The hooks are removed on exit, also
    after an error.
    """
    blocks = decoder_layers(model)
    L = len(blocks)
    bad = [i for i in layers if not 0 <= int(i) <= L]
    if bad or not layers:
        raise ValueError(f"feature layers {list(layers)} must be non-empty and in [0, {L}] for a {L}-layer model")
    seen: dict[int, torch.Tensor] = {}
    hooks = []

    def pre(i):
        def hook(module, args, kwargs):
            seen[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post(module, args, kwargs, output):
        seen[L] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    try:
        for i in sorted(set(layers)):
            if i < L:
                hooks.append(blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True))
        if L in layers:
            base = getattr(model, model.base_model_prefix, model)
            hooks.append(base.register_forward_hook(post, with_kwargs=True))

        def read() -> torch.Tensor:
            return torch.cat([seen[i] for i in layers], -1)

        yield read
    finally:
        for h in hooks:
            h.remove()


_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The one lock of a model that serialises specdec forwards on it (re-entrant within a thread)."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class HFModel:
    """A transformers causal LM behind the TargetModel interface.

    Examples
    --------
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = HFModel(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=50)))
    >>> m.num_layers, m.vocab_size
    (1, 50)
    """

    def __init__(self, model: torch.nn.Module):
        check_supported(model)
        self.model = model
        cfg = model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])  # logits width
        self.input_vocab_size = int(model.get_input_embeddings().weight.shape[0])  # valid input ids
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.max_positions = int(max_pos) if max_pos else None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # fused RMSNorm / SiLU-MLP / rotary kernels in forwards on the paged kernels (runtime.fusion);
        # settable, e.g. to measure what they save
        self.fuse = True
        self._fusable = None

    def kv_bytes_per_token(self) -> int | None:
        """K and V bytes one token takes over all layers, from the config (None when it cannot tell)."""
        cfg = self.model.config
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
        if not kv_heads or not head_dim:
            return None
        return 2 * self.num_layers * int(kv_heads) * int(head_dim) * self.dtype.itemsize

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.num_layers, num_blocks, block_size)

    @contextlib.contextmanager
    def _paged_attention(self):
        """Route the model's attention to specdec for one forward. The switch lives on the model's
        config, which every user of the model shares: specdec forwards of one model take turns
        (a lock per model, held for the whole forward), so threads that each run an Engine on
        one model get their own outputs; a plain `model(...)` that runs into a specdec forward
        from another thread raises (see `paged_attention`) instead of computing garbage."""
        with model_lock(self.model):
            cfg = self.model.config
            previous = cfg._attn_implementation
            cfg._attn_implementation = ATTENTION_NAME
            try:
                yield
            finally:
                cfg._attn_implementation = previous

    @torch.inference_mode()
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
        """input_ids, positions [B, T] -> logits [B, T', V] (T' = logits_to_keep or T).

        last_hidden=True also returns the lm_head's input [B, T', hidden] (a forward pre-hook on
        the output embedding, registered for this call only). features=(i, ...) also returns those
        layers' features at every position [B, T, F] (`capture_features`, hooks for this call only).
        """
        seen: list[torch.Tensor] = []
        hook = None
        if last_hidden:
            hook = self.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        capture = capture_features(self.model, features) if features else contextlib.nullcontext()
        fused = contextlib.nullcontext()
        if self.fuse and meta.block_tables is not None:  # the Triton path: fuse the norms, MLPs and RoPE too
            if self._fusable is None:
                self._fusable = fusable(self.model)
            fused = fused_forwards(self._fusable)
        try:
            with self._paged_attention(), capture as read, fused:
                out = self.model(
                    input_ids=input_ids,
                    position_ids=positions,
                    use_cache=False,
                    logits_to_keep=logits_to_keep,
                    output_hidden_states=output_hidden_states,
                    specdec_meta=meta,
                )
                feats = read() if features else None
        finally:
            if hook is not None:
                hook.remove()
        hidden = tuple(out.hidden_states) if output_hidden_states else None
        return ModelOutput(
            logits=out.logits, hidden_states=hidden, last_hidden=seen[-1] if seen else None, features=feats
        )
