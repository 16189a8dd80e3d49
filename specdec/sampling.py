"""The one place where logits become probabilities, and where uniforms come from.

Plain and speculative decoding both call `process_logits`; the verifier's exactness is stated
relative to its output. Dims: B batch, N tree nodes (or any extra dims), V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .devices import to_device

Number = float | int


def _per_row(value, batch_size: int, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    """A scalar, a sequence of length B, or a tensor [B] -> tensor [B]."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(batch_size).clone()
    if t.shape != (batch_size,):
        raise ValueError(
            f"{name} must be a scalar or have one value per row (batch size {batch_size}); got shape {tuple(t.shape)}"
        )
    return t


@dataclass(slots=True)
class SamplingParams:
    """Per-row sampling parameters; every field is a tensor [B].

    temperature        [B] float, 0 means greedy (argmax after the repetition penalty)
    top_k              [B] long, 0 means off
    top_p              [B] float in (0, 1], 1 means off
    min_p              [B] float in [0, 1], 0 means off
    repetition_penalty [B] float > 0, 1 means off
    filters            host-side (top-k, top-p, min-p) flags: False when no row uses that filter, so
                       that its full-vocabulary sort is skipped without a device sync
    warpers            transformers' own warpers applied after min-p to sampled rows, one setting for
                       the whole call (typical_p, epsilon_cutoff, eta_cutoff: their classes, in
                       transformers' order), so the law follows the installed transformers
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    filters: tuple[bool, bool, bool] = (True, True, True)
    warpers: tuple = ()

    _TENSORS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")

    @classmethod
    def make(
        cls,
        batch_size: int,
        *,
        temperature: Number | Sequence[Number] | torch.Tensor = 1.0,
        top_k: int | Sequence[int] | torch.Tensor = 0,
        top_p: Number | Sequence[Number] | torch.Tensor = 1.0,
        min_p: Number | Sequence[Number] | torch.Tensor = 0.0,
        repetition_penalty: Number | Sequence[Number] | torch.Tensor = 1.0,
        device: torch.device | str | None = None,
        warpers: Sequence = (),
    ) -> SamplingParams:
        """Build and validate per-row parameters from scalars or per-row values.

        Examples
        --------
        >>> p = SamplingParams.make(2, temperature=[0.0, 0.7], top_p=0.9)
        >>> p.greedy.tolist()
        [True, False]
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        f32 = torch.float32
        params = cls(
            temperature=_per_row(temperature, batch_size, "temperature", f32, device),
            top_k=_per_row(top_k, batch_size, "top_k", torch.long, device),
            # fp64 so that 1 - top_p rounds like transformers' python-float arithmetic
            top_p=_per_row(top_p, batch_size, "top_p", torch.float64, device),
            min_p=_per_row(min_p, batch_size, "min_p", f32, device),
            repetition_penalty=_per_row(repetition_penalty, batch_size, "repetition_penalty", f32, device),
            warpers=tuple(warpers),
        )
        params.validate()
        params.filters = (
            bool((params.top_k > 0).any()),
            bool((params.top_p < 1).any()),
            bool((params.min_p > 0).any()),
        )
        return params

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range value."""
        checks = [
            ("temperature", self.temperature, ~(self.temperature >= 0), "must be >= 0 (0 means greedy)"),
            ("top_k", self.top_k, self.top_k < 0, "must be >= 0 (0 means off)"),
            ("top_p", self.top_p, ~((self.top_p > 0) & (self.top_p <= 1)), "must be in (0, 1]"),
            ("min_p", self.min_p, ~((self.min_p >= 0) & (self.min_p <= 1)), "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty, ~(self.repetition_penalty > 0), "must be > 0"),
        ]
        for name, values, bad, rule in checks:
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name}={values[row].item()} (row {row}) {rule}")

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @property
    def greedy(self) -> torch.Tensor:
        """[B] bool: rows decoded by argmax."""
        return self.temperature == 0

    def to(self, device: torch.device | str) -> SamplingParams:
        return SamplingParams(
            *(to_device(getattr(self, f), device) for f in self._TENSORS), filters=self.filters, warpers=self.warpers
        )

    def select(self, rows: torch.Tensor | list[int]) -> SamplingParams:
        """The parameters of the given rows, in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.temperature.device)
        return SamplingParams(
            *(getattr(self, f)[idx] for f in self._TENSORS), filters=self.filters, warpers=self.warpers
        )


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def apply_repetition_penalty(logits: torch.Tensor, presence: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' rule on every token present in the history: x < 0 -> x * pen, else x / pen.

    logits   [B, ..., V]
    presence [B, ..., V] bool, True where the token occurs in the row's history
    penalty  [B]
    """
    pen = penalty.to(logits.dtype).view(-1, *([1] * (logits.dim() - 1)))
    penalised = torch.where(logits < 0, logits * pen, logits / pen)
    return torch.where(presence, penalised, logits)


def _view_rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against `like` [B, ..., V]."""
    return x.view(-1, *([1] * (like.dim() - 1)))


def _top_k_filter(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep tokens >= the k-th largest score (ties with it kept, as transformers does)."""
    V = scores.shape[-1]
    k = _view_rows(top_k, scores)
    sorted_desc = scores.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(-1, (k.clamp(1, V) - 1).expand(*scores.shape[:-1], 1))
    remove = (scores < kth) & (k > 0)
    return scores.masked_fill(remove, float("-inf"))


def _top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' nucleus rule: drop the ascending-sorted prefix whose mass is <= 1 - top_p."""
    sorted_asc, order = scores.sort(dim=-1, descending=False)
    cum = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - _view_rows(top_p, scores).to(torch.float64)).to(cum.dtype)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def _min_p_filter(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability."""
    probs = scores.softmax(dim=-1)
    threshold = _view_rows(min_p, scores).to(probs.dtype) * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    # the top token always survives (transformers keeps min_tokens_to_keep=1 by sorted order)
    top = scores.argmax(dim=-1, keepdim=True)
    remove = remove.scatter(-1, top, False)
    return scores.masked_fill(remove, float("-inf"))


def _penalised(logits, params, presence, suppress, processors=None) -> torch.Tensor:
    scores = logits.to(_compute_dtype(logits))
    if suppress is not None:
        scores = scores.masked_fill(suppress, float("-inf"))
    if presence is not None:
        scores = apply_repetition_penalty(scores, presence, params.repetition_penalty)
    if processors is not None:
        scores = processors(scores)
    return scores


def greedy_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    presence: torch.Tensor | None = None,
    suppress: torch.Tensor | None = None,
    processors=None,
) -> torch.Tensor:
    """[B, ...] the argmax (first index on ties) after suppression, the repetition penalty and the
    history processors: what `process_logits` puts its one-hot on for a temperature-0 row, without
    building the one-hot."""
    return _penalised(logits, params, presence, suppress, processors).argmax(dim=-1)


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    presence: torch.Tensor | None = None,
    suppress: torch.Tensor | None = None,
    processors=None,
) -> torch.Tensor:
    """Logits -> the processed sampling distribution, in transformers' processor order.

    Order: repetition penalty, the history processors (no_repeat_ngram_size, bad_words_ids, forced
    BOS / EOS, the length penalty, the user's logits processors), then (sampled rows) temperature,
    top-k, top-p, min-p, the warpers (typical, epsilon, eta), softmax.
    Greedy rows (temperature 0) become a one-hot at the first argmax of the penalised logits.

    Parameters
    ----------
    logits : [B, ..., V] any float dtype; computed in fp32 (fp64 stays fp64).
    params : SamplingParams with B rows.
    presence : [B, ..., V] bool or None; tokens in each row's history, for the repetition penalty.
    suppress : [B, ..., V] bool or None; tokens that may not be produced (EOS before min_new_tokens).
    processors : scores [B, ..., V] -> scores of the same shape, or None: transformers' logits
        processors applied with each row's (each tree node's) own history (Engine builds it).

    Returns
    -------
    probs : [B, ..., V] fp32 (or fp64), rows sum to 1.

    Examples
    --------
    >>> p = process_logits(torch.tensor([[2.0, 1.0, 0.0]]), SamplingParams.make(1, temperature=0))
    >>> p.tolist()
    [[1.0, 0.0, 0.0]]
    """
    if logits.shape[0] != params.batch_size:
        raise ValueError(f"logits have batch {logits.shape[0]} but sampling params have {params.batch_size} rows")
    scores = _penalised(logits, params, presence, suppress, processors)
    greedy = _view_rows(params.greedy, scores)
    one_hot = torch.zeros_like(scores).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, _warped(scores, params).softmax(dim=-1))


def _warped(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Penalised scores -> the sampled rows' scores before the softmax: temperature, top-k, top-p,
    min-p, the warpers (greedy rows are divided by 1 and filtered like the others)."""
    temperature = torch.where(params.greedy, torch.ones_like(params.temperature), params.temperature)
    scores = scores / _view_rows(temperature, scores).to(scores.dtype)
    use_k, use_p, use_min_p = params.filters
    if use_k:
        scores = _top_k_filter(scores, params.top_k)
    if use_p:
        scores = _top_p_filter(scores, params.top_p)
    if use_min_p:
        scores = _min_p_filter(scores, params.min_p)
    for warp in params.warpers:  # transformers' classes on [rows, V] (they read no input_ids)
        scores = warp(None, scores.reshape(-1, scores.shape[-1])).reshape(scores.shape)
    return scores


def processed_scores(
    logits: torch.Tensor,
    params: SamplingParams,
    presence: torch.Tensor | None = None,
    suppress: torch.Tensor | None = None,
    processors=None,
) -> torch.Tensor:
    """[B, ..., V] the scores transformers returns with `output_scores`: sampled rows after every
    processor and warper (softmax of them = `process_logits`), greedy rows after the processors
    (the scores their argmax is taken of). Same arguments as `process_logits`."""
    scores = _penalised(logits, params, presence, suppress, processors)
    return torch.where(_view_rows(params.greedy, scores), scores, _warped(scores, params))


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling with explicit uniforms; never returns a zero-probability token.

    probs [B, ..., V] non-negative (need not be normalised), u [B, ...] in [0, 1) -> ids [B, ...] long.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    target = (u.to(torch.float64) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    # u * total can round up to total; fall back to the last token with positive mass.
    V = probs.shape[-1]
    last_positive = V - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    return torch.minimum(idx, last_positive)


# ---------------------------------------------------------------------------------------------
# Randomness: an explicit torch.Generator, or counter-based per-row seeds.
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without signed 64-bit overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, 'lowbias32' constants) on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@dataclass(slots=True)
class RowSeeds:
    """Counter-based randomness per row: the uniforms of row b depend only on (seed[b], step[b]).

    seeds [B] int64, step [B] int64 (the engine advances it once per decoding step). The same seed
    and step give the same draws whatever else is in the batch.
    """

    seeds: torch.Tensor
    step: torch.Tensor


Rng = torch.Generator | RowSeeds | None


def uniform(rng: Rng, batch_size: int, num: int, stream: int, device=None) -> torch.Tensor:
    """Uniforms in [0, 1), shape [B, num], fp64.

    `stream` separates independent uses within one step (verification coins, draft sampling, ...).
    With a RowSeeds, draws are a pure function of (seed, step, stream, index): 24 random bits
    from three rounds of a 32-bit mixer (resolution 2**-24, exactly representable, always < 1).
    With a torch.Generator or None (torch's global generator), `stream` is ignored.
    """
    if isinstance(rng, RowSeeds):
        seeds, step = rng.seeds.to(torch.long), rng.step.to(torch.long)
        if seeds.shape != (batch_size,) or step.shape != (batch_size,):
            raise ValueError(
                f"RowSeeds needs seeds and step of shape ({batch_size},); "
                f"got {tuple(seeds.shape)} and {tuple(step.shape)}"
            )
        index = torch.arange(num, device=seeds.device, dtype=torch.long)
        h = _hash32(seeds[:, None] ^ _hash32(step[:, None] * 0x9E3779B1 + stream))
        h = _hash32(h ^ (((seeds[:, None] >> 32) & _MASK32) + index * 0x85EBCA77))
        h = _hash32(h + 0x27D4EB2F)
        out = (h >> 8).to(torch.float64) * 2.0**-24
        return to_device(out, device) if device is not None else out
    if rng is not None and not isinstance(rng, torch.Generator):
        raise TypeError(f"rng must be a torch.Generator, a RowSeeds or None, got {type(rng).__name__}")
    gen_device = rng.device if rng is not None else device
    out = torch.rand(batch_size, num, generator=rng, dtype=torch.float64, device=gen_device)
    return out.to(device) if device is not None else out
