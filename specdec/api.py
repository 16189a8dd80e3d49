"""generate(): the drop-in for `model.generate`, with an optional draft proposer.

Defaults come from the model's generation_config exactly as transformers reads them; the result is
the same LongTensor (prompt + new tokens, finished rows padded), or with return_dict_in_generate an
object with `.sequences` and `.stats`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from .engine import Engine, GenerationParams
from .metrics import SpecStats
from .proposers.base import Proposer
from .runtime.hf import check_supported
from .sampling import SamplingParams
from .validation import is_int, require_int
from .verify import TypicalParams, VerifyMode


@dataclass(slots=True)
class GenerateOutput:
    """sequences [B, T + G] long (prompt as given, then new tokens, pad after a row finished); stats."""

    sequences: torch.Tensor
    stats: SpecStats


def _eos_list(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    ids = [eos] if not isinstance(eos, (list, tuple)) else list(eos)
    bad = [e for e in ids if not is_int(e)]
    if bad:
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    return tuple(ids)


def _prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be an integer tensor [B, T]; got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, T]; got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; give at least one token")
    if attention_mask is None:
        return [row.long().cpu() for row in input_ids]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    out = []
    for b, (row, mask) in enumerate(zip(input_ids.cpu(), attention_mask.cpu().bool(), strict=True)):
        if not mask.any():
            raise ValueError(f"empty prompt: row {b} of attention_mask is all zeros")
        out.append(row[mask].long())
    return out


def _seeds(seed: int | Sequence[int] | torch.Tensor | None, batch: int) -> torch.Tensor:
    if seed is None:  # follows torch.manual_seed, like model.generate
        return torch.randint(0, 2**62, (batch,))
    if isinstance(seed, int):
        return seed + torch.arange(batch)  # row b gets seed + b
    seeds = torch.as_tensor(seed, dtype=torch.long).flatten()
    if seeds.shape != (batch,):
        raise ValueError(f"seed must be an int or one value per row ({batch}); got {len(seeds)} values")
    return seeds


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    proposer: Proposer | str | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    streamer=None,
    seed: int | Sequence[int] | torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    return_dict_in_generate: bool | None = None,
    verify_mode: str = "exact",
    typical: TypicalParams | None = None,
    engine: Engine | None = None,
) -> torch.Tensor | GenerateOutput:
    """Generate like `model.generate`, speculatively when a proposer is given; same output law.

    Parameters
    ----------
    model : a transformers causal LM (Llama, Mistral, Qwen2/3, GPT-2, ...).
    input_ids : [B, T] long; rows may be left-padded, with attention_mask [B, T] marking real tokens.
    proposer : None (plain decoding through the same engine: the baseline), a Proposer such as
        `DraftModel(small_model)` or `Ngram()`, or a registered name ("ngram").
    max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, min_p,
    repetition_penalty, eos_token_id, pad_token_id, generation_config : as in transformers; unset
        values come from `generation_config` or `model.generation_config`.
    stop_strings : stop once the output ends with one of them (needs `tokenizer`).
    streamer : a transformers streamer (TextStreamer, TextIteratorStreamer); batch size 1.
    seed : int (row b uses seed + b), one seed per row, or None (drawn from torch's global RNG).
        A row's output depends only on its prompt, its seed and the settings, not on the batch.
    verify_mode : "exact" (default) or "typical" (Medusa's typical acceptance: LOSSY, opt-in).
    engine : reuse an Engine (its KV pool and prefix cache) across calls; it fixes model and proposer.

    Returns
    -------
    LongTensor [B, T + G], or GenerateOutput(sequences, stats) when return_dict_in_generate.

    Examples
    --------
    >>> out = generate(model, ids, proposer=Ngram(num_tokens=4), max_new_tokens=32)  # doctest: +SKIP
    """
    check_supported(model)  # before reading model.generation_config: a plain nn.Module gets the clear error
    gc = copy.deepcopy(generation_config or model.generation_config or GenerationConfig())
    overrides = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        stop_strings=stop_strings,
        return_dict_in_generate=return_dict_in_generate,
    )
    for key, value in overrides.items():
        if value is not None:
            setattr(gc, key, value)
    prompts = _prompts(input_ids, attention_mask)
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - input_ids.shape[1]
    require_int("max_new_tokens", max_new, 1)
    if gc.min_new_tokens is not None:
        require_int("min_new_tokens", gc.min_new_tokens, 0)
    if engine is None:
        engine = Engine(model, proposer)
    elif engine.target.model is not model or (proposer is not None and proposer is not engine.proposer):
        raise ValueError("engine= was built for another model or proposer; pass proposer to the Engine instead")
    limit = engine.target.max_positions
    if limit is not None and longest + max_new > limit:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new} exceeds the model's {limit} positions "
            f"(max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )
    sampled = bool(gc.do_sample)
    temp = gc.temperature if gc.temperature is not None else 1.0
    if not temp >= 0:
        raise ValueError(f"temperature={temp} must be >= 0 (0 means greedy)")
    if gc.top_p is not None and not 0 < gc.top_p <= 1:
        raise ValueError(f"top_p={gc.top_p} must be in (0, 1]")
    sampling = SamplingParams.make(
        B,
        temperature=temp if sampled else 0.0,
        top_k=(gc.top_k or 0) if sampled else 0,
        top_p=(gc.top_p if gc.top_p is not None else 1.0) if sampled else 1.0,
        min_p=(gc.min_p or 0.0) if sampled else 0.0,
        repetition_penalty=gc.repetition_penalty if gc.repetition_penalty is not None else 1.0,
    )
    eos = _eos_list(gc.eos_token_id)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    stop = None
    if gc.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs tokenizer=")
        stop = _stop_checker(tokenizer, gc.stop_strings, prompts)
    gp = GenerationParams(
        max_new_tokens=int(max_new),
        sampling=sampling,
        seeds=_seeds(seed, B),
        min_new_tokens=int(gc.min_new_tokens or 0),
        eos_token_ids=eos,
        mode=VerifyMode.parse(verify_mode),
        typical=typical,
        stop=stop,
    )
    if streamer is not None and B > 1:
        raise ValueError(f"streamers support batch size 1; got {B} rows")
    generated, stats = engine.run(prompts, gp, streamer)
    width = max(len(g) for g in generated)
    new = torch.full((B, width), int(pad), dtype=input_ids.dtype)
    for b, g in enumerate(generated):
        new[b, : len(g)] = torch.tensor(g, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids.cpu(), new], 1).to(input_ids.device)
    if gc.return_dict_in_generate:
        return GenerateOutput(sequences=sequences, stats=stats)
    return sequences


def _stop_checker(tokenizer, stop_strings, prompts):
    from transformers.generation.stopping_criteria import StopStringCriteria

    criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)

    def stop(row: int, generated: list[int]) -> bool:
        ids = torch.cat([prompts[row], torch.tensor(generated, dtype=torch.long)])[None]
        return bool(criteria(ids, None)[0])

    return stop
