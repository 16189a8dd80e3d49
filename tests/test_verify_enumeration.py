"""The verifier's output law equals the target law exactly (float64 enumeration, TV < 1e-12).

Every draft draw is enumerated and the uniform coins are integrated analytically (tests/enumeration.py).
Negative controls show that the same measurement catches the classic mistakes.
"""

import numpy as np
import pytest

from enumeration import SCHEMES, Spec, World, correct_law, random_spec, target_law, tv, verified_law
from specdec.tree import Law

FAMILIES = ("random", "sparse", "near_one_hot", "q_equals_p")
TOL = 1e-12


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_law_is_exact_on_random_trees(family, scheme):
    rng = np.random.default_rng(SCHEMES.index(scheme) * 17 + FAMILIES.index(family))
    for case in range(3):
        V = int(rng.integers(4, 7))
        spec = random_spec(
            rng, depth=int(rng.integers(1, 4)), max_children=3 if scheme != "iid_sorted" else 2, scheme=scheme
        )
        world = World(V=V, family=family, seed=case)
        L = spec.depth() + 1
        got = verified_law(world, spec, L)
        want = target_law(world, (), L)
        assert abs(want.sum() - 1) < 1e-12
        assert tv(got, want) < TOL, (family, scheme, case, V, spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_laws_in_one_tree_are_exact(family):
    rng = np.random.default_rng(7 + FAMILIES.index(family))
    for case in range(4):
        spec = random_spec(rng, depth=3, max_children=2)
        world = World(V=int(rng.integers(4, 6)), family=family, seed=100 + case)
        L = spec.depth() + 1
        assert tv(verified_law(world, spec, L), target_law(world, (), L)) < TOL, spec


def test_full_three_by_three_tree_is_exact():
    leaf = Spec("iid", Law.IID, (None, None, None))
    mid = Spec("wor", Law.WOR, (leaf, None, leaf))
    spec = Spec("topk", Law.POINT, (mid, mid, None))
    world = World(V=5, family="random", seed=3)
    assert tv(verified_law(world, spec, 4), target_law(world, (), 4)) < TOL


def test_first_token_marginal_is_the_target():
    world = World(V=6, family="random", seed=11)
    spec = Spec("iid", Law.IID, (Spec("topk", Law.POINT, (None, None)), None, None))
    law = verified_law(world, spec, 3)
    assert np.abs(law.sum(axis=(1, 2)) - world.p(())).max() < TOL


# --- negative controls: each mistake must move the law far beyond the tolerance -----------------


def _worst_tv(spec: Spec, families=("random",), seeds=range(4), V=5, bug=None) -> float:
    worst = 0.0
    for family in families:
        for seed in seeds:
            world = World(V=V, family=family, seed=seed)
            L = spec.depth() + 1
            worst = max(worst, tv(verified_law(world, spec, L, bug=bug), target_law(world, (), L)))
    return worst


def test_control_topk_children_verified_with_q_is_detected():
    wrong = Spec("topk", Law.IID, (None, None, None))
    right = Spec("topk", Law.POINT, (None, None, None))
    assert _worst_tv(right) < TOL
    assert _worst_tv(wrong) > 0.05


def test_control_skipped_residual_update_for_duplicate_iid_sibling_is_detected():
    spec = Spec("iid", Law.IID, (None, None, None))
    assert _worst_tv(spec) < TOL
    assert _worst_tv(spec, bug="skip_duplicate_residual") > 1e-3


def test_control_sorted_samples_verified_as_iid_is_detected():
    wrong = Spec("iid_sorted", Law.IID, (None, None))
    right = Spec("iid_sorted", correct_law("iid_sorted"), (None, None))
    assert _worst_tv(right) < TOL
    assert _worst_tv(wrong) > 1e-3


# --- EAGLE's sampled trees: which node expands depends on the drawn values ------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_expanding_the_best_drawn_child_is_exact(family):
    """Three children drawn without replacement; the one with the highest q then draws two of its
    own (the shape `DraftTree.from_sampled_expansion` builds): exact, because a node's number of
    children never depends on those children's own values."""
    inner = Spec("wor", Law.WOR, (None, None))
    spec = Spec("wor", Law.WOR, (None, None, None), expand_best=inner)
    for seed in range(3):
        world = World(V=5, family=family, seed=seed)
        assert tv(verified_law(world, spec, 3), target_law(world, (), 3)) < TOL, (family, seed)


def test_control_keeping_only_the_best_draws_is_detected():
    """Pruning drawn children by their own values (keep the 2 most likely of 3 draws) is not exact."""
    spec = Spec("wor", Law.WOR, (None, None, None), keep_best=2)
    world = World(V=5, family="random", seed=1)
    assert tv(verified_law(world, spec, 2), target_law(world, (), 2)) > 1e-3
