"""Profiling as a library: speculative vs plain decoding through the same engine on a prompt set, with
acceptance (tau, per-depth), speed, the predicted speedup and the break-even acceptance; the
`specdec profile` command, `tune` and the demo call `profile`.

Conventions: tau = tokens emitted per target forward of a row, bonus included; acceptance rate =
accepted draft tokens / drafted tokens; speedup = tokens/s with speculation / tokens/s of the same
engine without it, same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .api import generate
from .engine import Engine
from .metrics import SpecStats
from .prompts import Prompt, encode
from .proposers.base import Proposer

CONVENTIONS = {
    "tau": "tokens emitted per target forward of a row, bonus included",
    "acceptance_rate": "accepted draft tokens / drafted tokens",
    "per_depth.unconditional": "accepted at depth d / steps",
    "per_depth.conditional": "accepted at depth d / accepted at depth d - 1",
    "speedup": "tokens/s with speculation / tokens/s of the same engine without it",
}


@dataclass(slots=True)
class ProfileSettings:
    """How each prompt is decoded: sampling (temperature 0: greedy; top_k / top_p None: the model's
    generation config and transformers' defaults), new tokens, batch size, prompt truncation."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 1
    max_prompt_tokens: int = 512

    def generate_kwargs(self) -> dict:
        """The `specdec.generate` keywords of these settings."""
        return dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature or None,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            return_dict_in_generate=True,
        )


@dataclass(slots=True)
class ProfileReport:
    """The measured numbers (`as_dict()` is report.json's core; the CLI adds paths and versions)."""

    num_prompts: int
    device: str
    settings: ProfileSettings
    spec: SpecStats
    plain: SpecStats
    rows: list[dict] = field(default_factory=list)  # per prompt: its own tau, acceptance, tokens/s
    per_category: dict = field(default_factory=dict)
    per_choice: dict = field(default_factory=dict)  # Medusa: choice -> offered / accepted
    timestamp: str = ""

    @property
    def speedup(self) -> float:
        return self.spec.tokens_per_s / self.plain.tokens_per_s if self.plain.tokens_per_s else 0.0

    def step_seconds(self) -> tuple[float, float, float]:
        """(plain step, drafting per verify step, verify step) in seconds."""
        t_step = self.plain.total_time_s / max(self.plain.target_forwards, 1)
        calls = max(self.spec.target_forwards - self.spec.num_sequences, 1)  # verify steps, prefills excluded
        return t_step, self.spec.draft_time_s / calls, self.spec.verify_time_s / calls

    def as_dict(self) -> dict:
        s, p = self.spec, self.plain
        t_step, t_draft, t_verify = self.step_seconds()
        drafts_per_step = s.drafted / max(s.steps, 1)
        greedy = self.settings.temperature == 0
        return {
            "proposer": s.proposer,
            "num_prompts": self.num_prompts,
            "device": self.device,
            "timestamp": self.timestamp,
            "temperature": self.settings.temperature,
            "top_p": self.settings.top_p,
            "top_k": self.settings.top_k,
            "settings": {k: getattr(self.settings, k) for k in ProfileSettings.__slots__},
            "conventions": CONVENTIONS,
            "tau": s.tau,
            "acceptance_rate": s.acceptance_rate,
            "per_depth": s.as_dict()["per_depth"],
            "counters": {  # vLLM's names
                "num_drafts": s.steps,
                "num_draft_tokens": s.drafted,
                "num_accepted_tokens": s.accepted,
                "mean_acceptance_length": s.tau,
                # [n] = row-steps that accepted n drafts (sums to num_drafts)
                "accepted_length_histogram": list(s.accepted_lengths),
            },
            "ttft_ms": s.ttft_ms,
            "tpot_ms": s.tpot_ms,
            "plain_tpot_ms": p.tpot_ms,
            "tokens_per_s": s.tokens_per_s,
            "plain_tokens_per_s": p.tokens_per_s,
            "speedup": self.speedup,
            "step_ms": {"plain": 1e3 * t_step, "draft": 1e3 * t_draft, "verify": 1e3 * t_verify},
            "predicted_speedup": s.tau * t_step / (t_draft + t_verify) if t_draft + t_verify else 0.0,
            "break_even_acceptance": break_even_acceptance(drafts_per_step, (t_draft + t_verify) / t_step),
            "greedy_identical": all(r["identical"] for r in self.rows) if greedy else None,
            "divergences": [
                {"prompt": r["prompt"], "position": r["first_divergence"]}
                for r in self.rows
                if greedy and not r["identical"]
            ],
            "per_category": self.per_category,
            "per_choice": self.per_choice,
            "per_prompt": self.rows,
        }


def profile(
    model: torch.nn.Module,
    tokenizer,
    proposer: Proposer,
    prompts: list[Prompt],
    settings: ProfileSettings | None = None,
    progress: bool = False,
) -> ProfileReport:
    """Decode every prompt with and without `proposer` through the same engine, batch by batch.

    Parameters
    ----------
    model : the target (a transformers causal LM), on its device.
    tokenizer : its tokenizer (conversational prompts get its chat template).
    proposer : the speculative side; the plain side is the same engine without one.
    prompts : from `specdec.prompts.load_prompts`.
    settings : ProfileSettings (defaults: greedy, 64 new tokens, batch 1).
    progress : a tqdm bar over the batches.

    Returns
    -------
    ProfileReport; greedy rows also say whether speculation reproduced plain decoding exactly.
    """
    from tqdm import tqdm

    st = settings or ProfileSettings()
    if proposer is None:
        raise ValueError("profile compares speculation with plain decoding: give a proposer")
    if st.batch_size < 1:
        raise ValueError(f"batch_size {st.batch_size} must be >= 1")
    encoded_all = [encode(tokenizer, p, st.max_prompt_tokens)[0] for p in prompts]
    empty = [i for i, e in enumerate(encoded_all) if len(e) == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no tokens")
    plain_engine, spec_engine = Engine(model, None), Engine(model, proposer)
    kw = st.generate_kwargs()
    # pools sized once for the longest prompt: a pool that grows mid-run re-captures the CUDA graphs
    # inside the timed region (seen on the H200 as single prompts at 4 tokens/s)
    longest = max(len(e) for e in encoded_all)
    for engine in (plain_engine, spec_engine):
        engine.fixed_blocks = st.batch_size * engine._row_need(longest, st.max_new_tokens)
    warm = encoded_all[0][None].to(model.device)
    for engine in (plain_engine, spec_engine):  # warm-up: allocation, Triton compilation, graph captures
        generate(model, warm, engine=engine, **kw)
    rows, plain_parts, spec_parts = [], [], []
    by_category: dict[str, list[int]] = {}  # category -> the batches holding its prompts
    B = st.batch_size
    for start in tqdm(range(0, len(prompts), B), desc="profile", disable=not progress):
        group = prompts[start : start + B]
        encoded = encoded_all[start : start + B]
        T = max(len(e) for e in encoded)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, e in enumerate(encoded):  # left padding, as generate() expects
            ids[b, T - len(e) :], mask[b, T - len(e) :] = e, 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        plain = generate(model, ids, mask, engine=plain_engine, **kw)
        spec = generate(model, ids, mask, engine=spec_engine, **kw)
        plain_parts.append(plain.stats)
        spec_parts.append(spec.stats)
        for c in {p.category for p in group}:
            by_category.setdefault(c, []).append(len(spec_parts) - 1)
        for b, p in enumerate(group):
            div = first_divergence(plain.sequences[b, T:], spec.sequences[b, T:])
            mine, base = spec.stats.per_sequence[b], plain.stats.per_sequence[b]  # this row's own numbers
            rows.append(
                {
                    "prompt": start + b,
                    "category": p.category,
                    "prompt_tokens": len(encoded[b]),
                    "tau": mine["tau"],
                    "acceptance_rate": mine["acceptance_rate"],
                    "accepted": mine["accepted"],
                    "drafted": mine["drafted"],
                    "plain_tokens_per_s": base["tokens_per_s"],
                    "tokens_per_s": mine["tokens_per_s"],
                    "identical": div is None,
                    "first_divergence": div,
                }
            )
    per_category = {}
    for c, idx in by_category.items():  # pooled like the overall numbers
        plain_c = SpecStats.merge([plain_parts[i] for i in idx])
        spec_c = SpecStats.merge([spec_parts[i] for i in idx])
        per_category[c] = {
            "prompts": sum(1 for r in rows if r["category"] == c),
            "tau": spec_c.tau,
            "speedup": spec_c.tokens_per_s / plain_c.tokens_per_s if plain_c.tokens_per_s else 0.0,
        }
    return ProfileReport(
        num_prompts=len(prompts),
        device=str(model.device),
        settings=st,
        spec=SpecStats.merge(spec_parts),
        plain=SpecStats.merge(plain_parts),
        rows=rows,
        per_category=per_category,
        per_choice={
            ",".join(map(str, c)): {"offered": o, "accepted": a}
            for c, (o, a) in sorted(getattr(proposer, "path_stats", {}).items())
        },
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def break_even_acceptance(k: float, cost_ratio: float) -> float:
    """The per-token acceptance a at which a chain of k drafts just pays: (1 - a^(k+1)) / (1 - a) equals
    cost_ratio = (T_draft + T_verify) / T_step. 0 when speculation always pays, 1 when it never can."""
    if cost_ratio <= 1:
        return 0.0
    if cost_ratio >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        tau = sum(a**i for i in range(int(round(k)) + 1))
        lo, hi = (a, hi) if tau < cost_ratio else (lo, a)
    return (lo + hi) / 2


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first position where two generated sequences differ (None: identical)."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    if len(diff):
        return int(diff[0, 0])
    return None if len(a) == len(b) else n
