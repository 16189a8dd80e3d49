"""Exact-enumeration oracle for tree verification, in float64.

A `World` gives the (processed) target law p(.|path) and the drafter's q(.|path) for every path.
A `Spec` describes how a node's children are drafted (top-k ranks, i.i.d. draws, draws without
replacement, i.i.d. draws sorted afterwards) and by which law they are verified. `verified_law`
enumerates every draft draw, integrates the verifier's uniform coins analytically and returns the
law of the next L tokens (emitted tokens, then the target's own continuation). It uses the
library's one-step rules (`acceptance_probability`, `residual_after_rejection`, `without_tokens`),
so a wrong rule there is caught here; the batched walk is tested statistically elsewhere.
`bug` switches on known-wrong variants for the negative controls.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch

from specdec.tree import Law
from specdec.verify import acceptance_probability, residual_after_rejection, without_tokens

SCHEMES = ("topk", "iid", "wor", "iid_sorted")


@dataclass(frozen=True)
class Spec:
    """Children of one node: `k` children drawn by `scheme`, verified with `law`, in order.

    children[j] is the Spec of child j's own children (None: a leaf).
    """

    scheme: str = "topk"
    law: Law = Law.POINT
    children: tuple[Spec | None, ...] = ()
    # EAGLE's sampled trees: after the draws, the child with the highest q (first among equals) gets
    # this subtree and the others none: which node expands depends on the drawn values
    expand_best: Spec | None = None
    # a mistake for the negative control: only the keep_best highest-q draws are verified (in draw order)
    keep_best: int | None = None

    @property
    def k(self) -> int:
        return len(self.children)

    def depth(self) -> int:
        below = [c.depth() if c is not None else 0 for c in self.children]
        if self.expand_best is not None:
            below.append(self.expand_best.depth())
        return 1 + max(below)


def correct_law(scheme: str) -> Law:
    return {"topk": Law.POINT, "iid": Law.IID, "wor": Law.WOR, "iid_sorted": Law.POINT}[scheme]


@dataclass
class World:
    """Target and draft laws as functions of the path (a tuple of tokens after the root)."""

    V: int
    family: str
    seed: int
    _cache: dict = field(default_factory=dict)

    def _draw(self, path: tuple[int, ...], which: str) -> np.ndarray:
        key = (path, which)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, 0 if which == "p" else 1, len(path), *path])
            self._cache[key] = _family(self.family, which, self.V, rng)
        return self._cache[key]

    def p(self, path: tuple[int, ...]) -> np.ndarray:
        return self._draw(path, "p")

    def q(self, path: tuple[int, ...]) -> np.ndarray:
        return self.p(path) if self.family == "q_equals_p" else self._draw(path, "q")


def _family(family: str, which: str, V: int, rng: np.random.Generator) -> np.ndarray:
    if family in ("random", "q_equals_p"):
        x = rng.dirichlet(np.ones(V))
    elif family == "sparse":  # top-p truncation of a random law: some tokens have p = 0
        x = rng.dirichlet(np.full(V, 0.5))
        order = np.argsort(-x)
        keep = np.cumsum(x[order]) - x[order] < 0.7
        mask = np.zeros(V, dtype=bool)
        mask[order[keep]] = True
        x = np.where(mask, x, 0.0)
    elif family == "near_one_hot":
        x = rng.dirichlet(np.ones(V)) * 1e-3
        x[rng.integers(V)] += 1.0
    else:
        raise ValueError(family)
    return x / x.sum()


def target_law(world: World, path: tuple[int, ...], length: int) -> np.ndarray:
    """[V] * length: the product of target conditionals for the next `length` tokens."""
    if length == 0:
        return np.ones(())
    p = world.p(path)
    out = np.zeros((world.V,) * length)
    for x in range(world.V):
        if p[x] > 0:
            out[x] = p[x] * target_law(world, path + (x,), length - 1)
    return out


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _joint_draws(spec: Spec, world: World, path: tuple[int, ...]):
    """Yield (tokens of the k children, probability, q used to verify each child)."""
    q = world.q(path)
    k, V = spec.k, world.V
    if spec.scheme == "topk":
        order = np.argsort(-q, kind="stable")
        yield tuple(int(t) for t in order[:k]), 1.0, [q] * k
    elif spec.scheme in ("iid", "iid_sorted"):
        for xs in itertools.product(range(V), repeat=k):
            w = float(np.prod([q[x] for x in xs]))
            if w == 0:
                continue
            if spec.scheme == "iid_sorted":
                xs = tuple(sorted(xs, key=lambda x: -q[x]))
            yield xs, w, [q] * k
    elif spec.scheme == "wor":
        # a drafter cannot draw more distinct tokens than q supports: it drafts fewer children
        for xs in itertools.permutations(range(V), min(k, int((q > 0).sum()))):
            qs, w, removed = [], 1.0, torch.zeros(V, dtype=torch.bool)
            for x in xs:
                qj = without_tokens(_t(q), removed).numpy()
                qs.append(qj)
                w *= qj[x]
                removed[x] = True
            if w > 0:
                yield xs, w, qs
    else:
        raise ValueError(spec.scheme)


def verified_law(world: World, spec: Spec | None, length: int, bug: str | None = None) -> np.ndarray:
    """[V] * length: the law of the next `length` tokens when the tree `spec` is verified at the root."""

    @cache
    def law_at(node_spec: Spec | None, path: tuple[int, ...], rem: int) -> np.ndarray:
        if rem == 0:
            return np.ones(())
        V = world.V
        p = world.p(path)
        out = np.zeros((V,) * rem)
        if node_spec is None or node_spec.k == 0:
            for y in range(V):  # bonus token from p, then the target continues
                if p[y] > 0:
                    out[y] = p[y] * target_law(world, path + (y,), rem - 1)
            return out
        for xs, w, qs in _joint_draws(node_spec, world, path):
            if node_spec.keep_best is not None:  # value-dependent pruning (wrong): keep the top draws
                q0 = world.q(path)
                top = sorted(range(len(xs)), key=lambda j: (-q0[xs[j]], j))[: node_spec.keep_best]
                xs, qs = tuple(xs[j] for j in sorted(top)), [qs[j] for j in sorted(top)]
            out += w * _siblings(node_spec, path, rem, xs, qs, _t(p), 0, ())
        return out

    def _siblings(node_spec, path, rem, xs, qs, r, j, seen) -> np.ndarray:
        V = world.V
        out = np.zeros((V,) * rem)
        if j == len(xs):  # every child rejected: recovered token from the residual
            rn = r.numpy()
            for y in range(V):
                if rn[y] > 0:
                    out[y] = rn[y] * target_law(world, path + (y,), rem - 1)
            return out
        x, q = xs[j], _t(qs[j])
        law = node_spec.law
        if bug == "skip_duplicate_residual" and law == Law.IID and x in seen:
            return _siblings(node_spec, path, rem, xs, qs, r, j + 1, seen)
        lw = torch.tensor(int(law))
        a = float(acceptance_probability(r[x], q[x], lw))
        child = node_spec.children[j] if j < node_spec.k else None
        if node_spec.expand_best is not None:
            q0 = world.q(path)
            best = min(range(len(xs)), key=lambda i: (-q0[xs[i]], i))
            child = node_spec.expand_best if j == best else None
        if a > 0:
            out[x] += a * law_at(child, path + (x,), rem - 1)
        if a < 1:
            r_next = residual_after_rejection(r, torch.tensor(x), q, lw)
            out += (1 - a) * _siblings(node_spec, path, rem, xs, qs, r_next, j + 1, seen + (x,))
        return out

    return law_at(spec, (), length)


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def random_spec(
    rng: np.random.Generator, depth: int, max_children: int, scheme: str | None = None, law: Law | None = None
) -> Spec | None:
    """A random tree shape of at most `depth` levels; each node picks a scheme and its correct law."""
    if depth == 0:
        return None
    k = int(rng.integers(1, max_children + 1))
    s = scheme or SCHEMES[int(rng.integers(len(SCHEMES)))]
    children = tuple(
        random_spec(rng, depth - 1, max_children, scheme, law) if rng.random() < 0.7 else None for _ in range(k)
    )
    return Spec(scheme=s, law=law if law is not None else correct_law(s), children=children)
