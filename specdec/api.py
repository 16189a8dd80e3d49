"""generate(): the drop-in for `model.generate`, with an optional draft proposer.

Defaults come from the model's generation_config exactly as transformers reads them; the result is
the same LongTensor (prompt + new tokens, finished rows padded), or with return_dict_in_generate an
object with `.sequences` and `.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from .engine import Engine, GenerationParams
from .metrics import SpecStats
from .proposers.base import Proposer
from .runtime.hf import check_supported
from .sampling import SamplingParams
from .validation import is_int, require_int
from .verify import TypicalParams, VerifyMode


@dataclass
class GenerateOutput(ModelOutput):
    """What `generate` returns with return_dict_in_generate: a transformers ModelOutput (attribute,
    key and index access, `keys()`, `to_tuple()`), as `model.generate`'s output is.

    sequences [B, T + G] long: the prompt as given, then the new tokens, pad after a row finished.
    stats     SpecStats of the call.
    scores    with output_scores: one [B, V] fp32 tensor per generated position, the processed scores
              (before the softmax) each token was drawn from, as transformers returns them.
    logits    with output_logits: one [B, V] fp32 tensor per position, the raw logits.
    logprobs  with output_scores: [B, G] fp32, the log-probability of each emitted token under the
              processed target law it was drawn from (0 for greedy rows: a point mass; use `scores`
              for the model's log-probabilities there). Positions after a row finished hold -inf in
              scores / logits and nan in logprobs.
    """

    sequences: torch.Tensor | None = None
    stats: SpecStats | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    logprobs: torch.Tensor | None = None


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


@torch.no_grad()
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
    stopping_criteria=None,
    logits_processor=None,
    tokenizer=None,
    streamer=None,
    seed: int | Sequence[int] | torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    return_dict_in_generate: bool | None = None,
    verify_mode: str = "exact",
    typical: TypicalParams | None = None,
    engine: Engine | None = None,
    assistant_model: torch.nn.Module | None = None,
    prompt_lookup_num_tokens: int | None = None,
    **kwargs,
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
    stopping_criteria : transformers StoppingCriteria (a StoppingCriteriaList or a list), checked
        after every emitted token on that row's sequence so far ([1, T] ids, scores=None), as
        transformers checks them after every token; a row stops at the first token where one says
        True. Costs one small tensor per token and criterion; criteria that read `scores` are not
        supported (specdec has no per-token scores to give them).
    logits_processor : transformers LogitsProcessors (a LogitsProcessorList or a list), applied as
        transformers applies them (after its own processors, before temperature / top-k / top-p)
        at every tree node with that node's own history (input_ids = the row's tokens, left padding
        included, then the drafted tokens on the path to the node), so the output law is the
        processed target law. Cost: one host read of the tree per step and one call per processor
        for each row and tree depth; steps with processors run eagerly (no step-tail graph).
    streamer : a transformers streamer (TextStreamer, TextIteratorStreamer); batch size 1.
    seed : int (row b uses seed + b), one seed per row, or None (drawn from torch's global RNG).
        A row's output depends only on its prompt, its seed and the settings, not on the batch.
    verify_mode : "exact" (default) or "typical" (Medusa's typical acceptance: LOSSY, opt-in).
    engine : reuse an Engine (its KV pool and prefix cache) across calls; it fixes model and proposer.
    assistant_model, prompt_lookup_num_tokens : transformers' spellings of
        `proposer=DraftModel(assistant_model, num_tokens="auto")` and
        `proposer=Ngram(prompt_lookup_num_tokens, max_ngram=max_matching_ngram_size or 2)`.
    **kwargs : other GenerationConfig fields. The configuration is resolved by the installed
        transformers exactly as `model.generate` resolves it (keywords over `generation_config` over
        `model.generation_config` over transformers' global defaults, e.g. top_k=50 and
        max_length=20); a field specdec does not implement that would change the output (beam
        search, guidance, ...) is a ValueError naming it. no_repeat_ngram_size, bad_words_ids,
        sequence_bias, forced_bos_token_id, forced_eos_token_id and exponential_decay_length_penalty
        are transformers' own processors, applied per tree node as logits_processor is.

    Returns
    -------
    LongTensor [B, T + G], or GenerateOutput(sequences, stats) when return_dict_in_generate.

    Examples
    --------
    >>> out = generate(model, ids, proposer=Ngram(num_tokens=4), max_new_tokens=32)  # doctest: +SKIP
    """
    check_supported(model)  # before reading model.generation_config: a plain nn.Module gets the clear error
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
        prompt_lookup_num_tokens=prompt_lookup_num_tokens,
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    default_length = (  # transformers then generates max_length (20) *new* tokens
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    gc = resolve_generation_config(model, generation_config, **given, **kwargs)
    proposer = _alias_proposer(proposer, assistant_model, gc)
    n = gc.num_return_sequences or 1
    if n > 1:  # as transformers (whose config check refuses it without sampling): rows repeated, own draws
        input_ids = input_ids.repeat_interleave(n, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(n, dim=0)
    prompts = _prompts(input_ids, attention_mask)
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    L = input_ids.shape[1]  # transformers' length rule counts the (padded) prompt
    if gc.max_new_tokens is not None:
        max_new = gc.max_new_tokens
    elif default_length:  # nobody set a length: max_length new tokens, within the model's positions
        limit = getattr(model.config, "max_position_embeddings", None)
        max_new = (min(gc.max_length + L, limit) if limit is not None else gc.max_length + L) - L
    else:
        if L >= gc.max_length:
            raise ValueError(
                f"Input length of input_ids is {L}, but `max_length` is set to {gc.max_length}; increase "
                "max_length or, better, set max_new_tokens"
            )
        max_new = gc.max_length - L
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
        warpers=_warpers(gc, model.device) if sampled else (),
    )
    eos = _eos_list(gc.eos_token_id)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    checks = []
    if gc.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs tokenizer=")
        from transformers.generation.stopping_criteria import StopStringCriteria

        checks.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=gc.stop_strings))
    if stopping_criteria is not None:
        checks += _criteria(stopping_criteria)
    if gc.max_time is not None:  # transformers' criterion, its clock started now, checked per token
        from transformers.generation.stopping_criteria import MaxTimeCriteria

        checks.append(MaxTimeCriteria(max_time=gc.max_time))
    stop = _stop_checker(checks, prompts) if checks else None
    processors = _history_processors(gc, eos, L, max_new, model.device) + _processor_list(logits_processor)
    prefix = None
    if processors and any(len(p) < L for p in prompts):  # transformers' processors see the left padding
        prefix = [row[: L - len(p)].tolist() for row, p in zip(input_ids.cpu(), prompts, strict=True)]
    gp = GenerationParams(
        max_new_tokens=int(max_new),
        sampling=sampling,
        seeds=_seeds(seed, B),
        suppress_tokens=_token_ids("suppress_tokens", gc.suppress_tokens),
        begin_suppress_tokens=_token_ids("begin_suppress_tokens", gc.begin_suppress_tokens),
        # as transformers: after a forced BOS (a 1-token prompt) the ban moves to the second token
        begin_index=2 if L == 1 and gc.forced_bos_token_id is not None else 1,
        processors=tuple(processors),
        history_prefix=prefix,
        outputs={} if gc.return_dict_in_generate and (gc.output_scores or gc.output_logits) else None,
        output_scores=bool(gc.output_scores),
        output_logits=bool(gc.output_logits),
        # min_length counts the (padded) prompt, as transformers' MinLengthLogitsProcessor does
        min_new_tokens=max(int(gc.min_new_tokens or 0), int(gc.min_length or 0) - L),
        eos_token_ids=eos,
        mode=VerifyMode.parse(verify_mode),
        typical=typical,
        stop=stop,
    )
    if streamer is not None and B > 1:
        raise ValueError(f"streamers support batch size 1; got {B} rows")
    with torch.inference_mode():  # the engine's tensors; the output below is an ordinary tensor
        generated, stats = engine.run(prompts, gp, streamer)
    width = max(len(g) for g in generated)
    new = torch.full((B, width), int(pad), dtype=input_ids.dtype)
    for b, g in enumerate(generated):
        new[b, : len(g)] = torch.tensor(g, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids.cpu(), new], 1).to(input_ids.device)
    if gc.return_dict_in_generate:
        out = GenerateOutput(sequences=sequences, stats=stats)
        if gp.outputs is not None:  # in the fields' order (a ModelOutput's keys follow assignment)
            if gc.output_scores:
                out.scores = _per_position(gp.outputs, "scores", B, width, input_ids.device)
            if gc.output_logits:
                out.logits = _per_position(gp.outputs, "logits", B, width, input_ids.device)
            if gc.output_scores:
                out.logprobs = _logprobs(out.scores, new.to(input_ids.device), generated, bool(gc.do_sample))
        return out
    return sequences


def _logprobs(scores: tuple, new: torch.Tensor, generated: list[list[int]], sampled: bool) -> torch.Tensor:
    """[B, G] log p(token) under the law each token was drawn from: log_softmax of its scores when
    sampling, 0 for greedy (a point mass); nan past a row's end. scores: G tensors [B, V]; new [B, G]."""
    B, G = new.shape
    if sampled:
        lp = torch.log_softmax(torch.stack(scores, 1), -1).gather(2, new[:, :, None])[:, :, 0]  # [B, G]
    else:
        lp = torch.zeros(B, G, device=new.device)
    made = torch.tensor([len(g) for g in generated], device=new.device)
    return torch.where(torch.arange(G, device=new.device) < made[:, None], lp, float("nan"))


def _per_position(outputs: dict, name: str, B: int, width: int, device) -> tuple[torch.Tensor, ...]:
    """Per-row lists of [V] tensors -> one [B, V] tensor per generated position (-inf past a row's end)."""
    rows = [outputs.get(b, {}).get(name, []) for b in range(B)]
    V = next(t.shape[-1] for r in rows for t in r)
    full = torch.full((B, width, V), float("-inf"), dtype=torch.float32, device=device)  # [B, G, V]
    for b, r in enumerate(rows):
        if r:
            full[b, : len(r)] = torch.stack(r).to(device)
    return full.unbind(1)


def _token_ids(name: str, ids) -> tuple[int, ...]:
    """Token ids of a ban list; an id >= the vocabulary can never be drawn (harmless), a negative one
    is an error rather than a silent wrap-around."""
    out = tuple(int(t) for t in ids or ())
    bad = [t for t in out if t < 0]
    if bad:
        raise ValueError(f"{name} holds {bad[0]}: token ids must be >= 0")
    return out


def _warpers(gc: GenerationConfig, device) -> tuple:
    """transformers' typical / epsilon / eta warpers for these settings, built as transformers builds
    them for sampling (min_tokens_to_keep 1), in its order."""
    from transformers.generation.logits_process import EpsilonLogitsWarper, EtaLogitsWarper, TypicalLogitsWarper

    out = []
    if gc.typical_p is not None and gc.typical_p < 1.0:
        out.append(TypicalLogitsWarper(mass=gc.typical_p))
    if gc.epsilon_cutoff is not None and 0.0 < gc.epsilon_cutoff < 1.0:
        out.append(EpsilonLogitsWarper(epsilon=gc.epsilon_cutoff))
    if gc.eta_cutoff is not None and 0.0 < gc.eta_cutoff < 1.0:
        out.append(EtaLogitsWarper(epsilon=gc.eta_cutoff, device=device))
    return tuple(out)


def _history_processors(gc: GenerationConfig, eos: list[int], L: int, max_new: int, device) -> list:
    """transformers' own processors for the history-dependent settings, built with the arguments
    `model.generate` gives them (L: the padded prompt length, max_length = L + max_new), in its order."""
    from transformers.generation import logits_process as lp

    rep = gc.repetition_penalty if gc.repetition_penalty is not None else 1.0
    if gc.sequence_bias is not None and rep != 1.0:
        raise ValueError(
            "sequence_bias with repetition_penalty is not supported: transformers biases before the penalty and "
            "specdec applies history processors after it; drop one of them or use model.generate"
        )
    out = []
    if gc.sequence_bias is not None:
        out.append(lp.SequenceBiasLogitsProcessor(sequence_bias=gc.sequence_bias))
    if gc.no_repeat_ngram_size is not None and gc.no_repeat_ngram_size > 0:
        out.append(lp.NoRepeatNGramLogitsProcessor(gc.no_repeat_ngram_size))
    if gc.bad_words_ids is not None:
        out.append(lp.NoBadWordsLogitsProcessor(gc.bad_words_ids, eos or None))
    if gc.forced_bos_token_id is not None:
        out.append(lp.ForcedBOSTokenLogitsProcessor(gc.forced_bos_token_id))
    if gc.forced_eos_token_id is not None:
        out.append(lp.ForcedEOSTokenLogitsProcessor(L + max_new, gc.forced_eos_token_id, device=device))
    if gc.exponential_decay_length_penalty is not None:
        if not eos:
            raise ValueError("exponential_decay_length_penalty needs an eos_token_id")
        out.append(lp.ExponentialDecayLengthPenalty(gc.exponential_decay_length_penalty, eos, L))
    return out


def _callables(name: str, value, expected: str) -> list:
    """A user's transformers LogitsProcessors / StoppingCriteria (a list-like or one) as a list of
    callables; anything else is a ValueError naming it and what was expected."""
    if value is None:
        return []
    items = list(value) if hasattr(value, "__iter__") else [value]
    for item in items:
        if not callable(item):
            raise ValueError(f"{name} holds {type(item).__name__}, which is not callable: give transformers {expected}")
    return items


def _processor_list(logits_processor) -> list:
    """The user's logits processors: (input_ids [n, T], scores [n, V]) -> scores."""
    return _callables("logits_processor", logits_processor, "LogitsProcessors (called with input_ids [n, T] and "
                      "scores [n, V])")  # fmt: skip


def _criteria(stopping_criteria) -> list:
    """The user's stopping criteria: (ids [1, T], scores) -> bool or [1] bool."""
    return _callables("stopping_criteria", stopping_criteria, "StoppingCriteria (called with input_ids [B, T] and "
                      "scores)")  # fmt: skip


def _stop_checker(criteria: list, prompts: list[torch.Tensor]):
    """stop(row, generated ids) -> bool: any criterion true on the row's prompt + generated tokens."""
    hosts = [p.cpu() for p in prompts]

    def stop(row: int, generated: list[int]) -> bool:
        ids = torch.cat([hosts[row], torch.tensor(generated, dtype=torch.long)])[None]
        return any(bool(torch.as_tensor(c(ids, None)).reshape(-1)[0]) for c in criteria)

    return stop


# GenerationConfig fields whose non-default values change the output and that specdec does not
# implement: (is it set?, what to do instead)
_UNSUPPORTED = {
    "top_h": (lambda v: v is not None, "not implemented yet (a newer transformers sampler)"),
    "num_beams": (lambda v: v not in (None, 1), "beam search is not speculative decoding; use model.generate"),
    "num_beam_groups": (lambda v: v not in (None, 1), "use model.generate"),
    "penalty_alpha": (lambda v: v not in (None, 0), "contrastive search: use model.generate"),
    "encoder_no_repeat_ngram_size": (lambda v: v not in (None, 0), "encoder-decoder only"),
    "force_words_ids": (lambda v: v is not None, "constrained beam search: use model.generate"),
    "guidance_scale": (lambda v: v not in (None, 1.0), "classifier-free guidance: use model.generate"),
    "watermarking_config": (lambda v: v is not None, "use model.generate"),
    "dola_layers": (lambda v: v is not None, "DoLa decoding: use model.generate"),
    "output_attentions": (lambda v: bool(v), "attentions are not returned"),
    "output_hidden_states": (lambda v: bool(v), "hidden states are not returned"),
    "assistant_early_exit": (lambda v: v is not None, "use a Proposer"),
}


def resolve_generation_config(
    model: torch.nn.Module, generation_config: GenerationConfig | None = None, **kwargs
) -> GenerationConfig:
    """The GenerationConfig `model.generate` would use: the installed transformers' own merge of
    kwargs over generation_config over model.generation_config over its global defaults.

    Raises ValueError for a keyword that is no GenerationConfig field and for a field specdec does
    not implement (see _UNSUPPORTED), naming it.
    """
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is None:
        raise ValueError(f"{type(model).__name__} has no transformers generation support (_prepare_generation_config)")
    gc, model_kwargs = prepare(generation_config, **kwargs)
    unknown = sorted(k for k in model_kwargs if k not in ("output_attentions", "output_hidden_states"))
    if unknown:
        raise ValueError(
            f"generate() got keyword(s) {', '.join(unknown)} that are neither specdec arguments nor GenerationConfig "
            "fields"
        )
    for field, (is_set, hint) in _UNSUPPORTED.items():
        value = getattr(gc, field, None)
        if is_set(value):
            raise ValueError(
                f"{field}={value!r} (from the keywords, generation_config or model.generation_config) would change "
                f"the output, and specdec does not implement it: {hint}"
            )
    return gc


def _alias_proposer(proposer, assistant_model, gc: GenerationConfig):
    """transformers' assisted-generation spellings as specdec proposers."""
    from .proposers import DraftModel, Ngram

    lookup = getattr(gc, "prompt_lookup_num_tokens", None)
    named = {"proposer": proposer, "assistant_model": assistant_model, "prompt_lookup_num_tokens": lookup}
    given = [name for name, v in named.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of proposer, assistant_model, prompt_lookup_num_tokens; got {', '.join(given)}")
    if assistant_model is not None:
        return DraftModel(assistant_model, num_tokens="auto")
    if lookup is not None:
        return Ngram(num_tokens=lookup, max_ngram=getattr(gc, "max_matching_ngram_size", None) or 2)
    return proposer


# what transformers builds from the settings specdec implements itself; any other processor or
# criterion in a custom_generate call is the user's and is refused rather than ignored
_OWN_PROCESSORS = {
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinPLogitsWarper",
    "RepetitionPenaltyLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "MinLengthLogitsProcessor",
}
# built by transformers from a configuration field (then specdec builds it again from the same
# field); with that field unset, a processor of the type is the user's own
_OWN_IF_SET = {
    "SequenceBiasLogitsProcessor": "sequence_bias",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
}
_FIELD_OFF = {"typical_p": 1.0}  # a field's value at which transformers builds no processor (else None / 0)


def _built_by_transformers(processor, gc: GenerationConfig | None) -> bool:
    name = type(processor).__name__
    if name in _OWN_PROCESSORS:
        return True
    field = _OWN_IF_SET.get(name)
    if field is None or gc is None:
        return False
    value = getattr(gc, field, None)
    return value is not None and value != 0 and value != _FIELD_OFF.get(field)


_OWN_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria", "StopStringCriteria"}


def custom_generate(proposer: Proposer | str | None = None, **options):
    """specdec's decoding loop for transformers' own entry point:
    `model.generate(ids, custom_generate=specdec.custom_generate(Ngram()), max_new_tokens=64)`.

    transformers prepares the inputs and the configuration, then calls this loop; specdec decodes
    with `proposer` and the same output law. options go to `specdec.generate` (seed, engine,
    verify_mode, ...). A user's own stopping criteria are checked per emitted token and a user's
    own logits processors applied at every tree node (see `generate`'s logits_processor).
    """

    def specdec_decode(
        model,
        input_ids: torch.Tensor,
        logits_processor=None,
        stopping_criteria=None,
        generation_config: GenerationConfig | None = None,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ):
        # transformers' own processors are rebuilt from the configuration; the user's are applied per node
        foreign = [p for p in logits_processor or [] if not _built_by_transformers(p, generation_config)]
        # the user's criteria are checked per emitted token; transformers' own ones are the settings
        users = [c for c in stopping_criteria or [] if type(c).__name__ not in _OWN_CRITERIA]
        gc = GenerationConfig.from_dict(generation_config.to_dict()) if generation_config is not None else None
        if gc is not None and gc.max_new_tokens is None:  # transformers has turned the length into max_length
            gc.max_new_tokens = gc.max_length - input_ids.shape[1]
        return generate(
            model,
            input_ids,
            model_kwargs.get("attention_mask"),
            proposer=proposer,
            generation_config=gc,
            streamer=streamer,
            stopping_criteria=users or None,
            logits_processor=foreign or None,
            **options,
        )

    return specdec_decode


def custom_generate_repo() -> str:
    """The folder holding `custom_generate/generate.py` (transformers' custom_generate repository
    layout) inside the installed specdec: pass it as `custom_generate=` with `trust_remote_code=True`."""
    from pathlib import Path

    return str(Path(__file__).parent / "generate_repo")
