"""SpecStats: acceptance (tau, acceptance rate, per-depth) and timing (TTFT, TPOT, time split).

Conventions (printed with the numbers): tau = tokens emitted per target forward of a row, bonus
included (EAGLE, Spec-Bench, vLLM: 1 + accepted / steps); acceptance rate = accepted draft tokens /
drafted tokens (vLLM); per-depth acceptance unconditional = accepted at depth d / steps, conditional
= accepted at depth d / accepted at depth d - 1 (EAGLE's n-alpha); TTFT = prompt in -> first token
out; TPOT = (t_last - t_first) / (n - 1); times taken after a device sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


def sync_time(device: torch.device | None = None) -> float:
    """A host clock reading taken after the device finished its queued work."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass(slots=True)
class SpecStats:
    """Counters and timings of one generate() call (or more, merged)."""

    proposer: str = "none"
    lossy: bool = False
    num_sequences: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0  # row-steps: one target forward of one row (prefill excluded)
    emitted: int = 0  # tokens emitted by those steps, bonus / recovered included
    drafted: int = 0
    accepted: int = 0
    drafted_per_depth: list[int] = field(default_factory=list)
    accepted_per_depth: list[int] = field(default_factory=list)
    accepted_lengths: list[int] = field(default_factory=list)  # [n]: row-steps that accepted n drafts
    target_forwards: int = 0  # batched target calls, prefill included
    ttft_s: list[float] = field(default_factory=list)  # per sequence
    tpot_s: list[float] = field(default_factory=list)  # per sequence with >= 2 tokens
    prefill_time_s: float = 0.0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    total_time_s: float = 0.0
    setup_time_s: float = 0.0  # before the first prefill: pools, proposer start, graph buffers
    graph_captures: int = 0  # CUDA graphs captured during the call (target and drafters); 0 in steady state
    per_sequence: list[dict] = field(default_factory=list)  # each row's own tau, acceptance, tokens/s

    def record_step(
        self,
        num_drafts_per_depth: list[int],
        accepted_per_depth: list[int],
        rows: int,
        emitted: int,
        accepted_lengths: list[int] = (),
    ) -> None:
        """Add one batched step: drafted / accepted counts per depth summed over its rows, and each
        row's number of accepted drafts (the accepted-length histogram)."""
        self.steps += rows
        self.emitted += emitted
        for n in accepted_lengths:
            if n >= len(self.accepted_lengths):
                self.accepted_lengths.extend([0] * (n + 1 - len(self.accepted_lengths)))
            self.accepted_lengths[n] += 1
        for name, values in (("drafted_per_depth", num_drafts_per_depth), ("accepted_per_depth", accepted_per_depth)):
            acc = getattr(self, name)
            acc.extend([0] * (len(values) - len(acc)))
            for d, v in enumerate(values):
                acc[d] += int(v)
        self.drafted += int(sum(num_drafts_per_depth))
        self.accepted += int(sum(accepted_per_depth))

    @classmethod
    def merge(cls, parts: list[SpecStats]) -> SpecStats:
        """The stats of several calls as one (counters added, per-sequence timings concatenated)."""
        out = cls(proposer=parts[0].proposer if parts else "none", lossy=any(p.lossy for p in parts))
        for p in parts:
            for name in (
                "num_sequences",
                "prompt_tokens",
                "cached_prompt_tokens",
                "generated_tokens",
                "steps",
                "emitted",
                "target_forwards",
                "prefill_time_s",
                "draft_time_s",
                "verify_time_s",
                "total_time_s",
                "setup_time_s",
                "graph_captures",
            ):
                setattr(out, name, getattr(out, name) + getattr(p, name))
            out.record_step(p.drafted_per_depth, p.accepted_per_depth, 0, 0)
            for n, count in enumerate(p.accepted_lengths):
                out.record_step([], [], 0, 0, [n] * count)
            out.ttft_s += p.ttft_s
            out.tpot_s += p.tpot_s
            out.per_sequence += p.per_sequence
        return out

    # ----------------------------------------------------------------------------- derived

    @property
    def tau(self) -> float:
        """Tokens emitted per target forward of a row, bonus included."""
        return self.emitted / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_depth_unconditional(self) -> list[float]:
        return [a / self.steps if self.steps else 0.0 for a in self.accepted_per_depth]

    @property
    def per_depth_conditional(self) -> list[float]:
        out, prev = [], self.steps
        for a in self.accepted_per_depth:
            out.append(a / prev if prev else 0.0)
            prev = a
        return out

    @property
    def ttft_ms(self) -> float:
        return 1e3 * sum(self.ttft_s) / len(self.ttft_s) if self.ttft_s else 0.0

    @property
    def tpot_ms(self) -> float:
        return 1e3 * sum(self.tpot_s) / len(self.tpot_s) if self.tpot_s else 0.0

    @property
    def other_time_s(self) -> float:
        return max(0.0, self.total_time_s - self.prefill_time_s - self.draft_time_s - self.verify_time_s)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_time_s if self.total_time_s else 0.0

    def as_dict(self) -> dict:
        """Plain numbers under self-explaining names (for JSON reports)."""
        return {
            "proposer": self.proposer,
            "lossy": self.lossy,
            "num_sequences": self.num_sequences,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "steps": self.steps,
            "target_forwards": self.target_forwards,
            "tau": self.tau,
            "acceptance_rate": self.acceptance_rate,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "per_depth": {
                "drafted": list(self.drafted_per_depth),
                "accepted": list(self.accepted_per_depth),
                "unconditional": self.per_depth_unconditional,
                "conditional": self.per_depth_conditional,
            },
            "accepted_length_histogram": list(self.accepted_lengths),
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "tokens_per_s": self.tokens_per_s,
            "time_s": {
                "total": self.total_time_s,
                "prefill": self.prefill_time_s,
                "draft": self.draft_time_s,
                "verify": self.verify_time_s,
                "other": self.other_time_s,
                "setup": self.setup_time_s,
            },
            "graph_captures": self.graph_captures,
            "per_sequence": list(self.per_sequence),
        }

    def __str__(self) -> str:
        depth = " ".join(
            f"d{d + 1}={u:.2f}/{c:.2f}"
            for d, (u, c) in enumerate(zip(self.per_depth_unconditional, self.per_depth_conditional, strict=True))
        )
        lines = [
            f"SpecStats(proposer={self.proposer}{', LOSSY typical acceptance' if self.lossy else ''})",
            f"  sequences {self.num_sequences}, prompt tokens {self.prompt_tokens} "
            f"({self.cached_prompt_tokens} from the prefix cache), generated {self.generated_tokens}",
            f"  tau {self.tau:.2f} tokens/step (bonus included), acceptance {self.acceptance_rate:.2f} "
            f"({self.accepted}/{self.drafted} drafted), {self.steps} row-steps, "
            f"{self.target_forwards} target forwards",
        ]
        if depth:
            lines.append(f"  per-depth acceptance (unconditional/conditional): {depth}")
        lines.append(
            f"  TTFT {self.ttft_ms:.1f} ms, TPOT {self.tpot_ms:.2f} ms, {self.tokens_per_s:.1f} tokens/s; time "
            f"prefill {self.prefill_time_s:.3f}s draft {self.draft_time_s:.3f}s verify {self.verify_time_s:.3f}s "
            f"other {self.other_time_s:.3f}s (setup {self.setup_time_s:.3f}s, {self.graph_captures} graph captures)"
        )
        return "\n".join(lines)
