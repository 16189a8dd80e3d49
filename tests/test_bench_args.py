"""The benchmarks' argument parsing (the benchmarks themselves run on the GPU, never in CI)."""

import importlib.util
from pathlib import Path

import pytest


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_pairs():
    return _benchmark("bench_pairs")


def test_only_keeps_row_names_with_commas_whole():
    """`--only "plain,Eagle(4, 8, 31)"` selects Eagle(4, 8, 31) alone: it split on every comma, so
    its part "31)" selected Medusa(31) too."""
    parts = _bench_pairs().only_parts("specdec plain, Eagle(4, 8, 31),Ngram(4),Eagle chain")
    assert parts == ["specdec plain", "Eagle(4, 8, 31)", "Ngram(4)", "Eagle chain"]
    assert not any(p in "specdec Medusa(31)" for p in parts)


def test_only_with_an_empty_part_is_an_error():
    with pytest.raises(SystemExit, match="empty part"):
        _bench_pairs().only_parts("plain,,Eagle")


def _count_ops():
    return _benchmark("count_ops")


def test_count_ops_rows_split_outside_parentheses_and_unknown_rows_are_named():
    m = _count_ops()
    assert m.row_names("chain(3), EAGLE-3 (6, 10, 60)") == ["chain(3)", "EAGLE-3 (6, 10, 60)"]
    with pytest.raises(SystemExit, match=r"unknown row\(s\) \['chain\(4\)'\]"):
        m.row_names("chain(4)")


def test_count_ops_counts_a_chain_on_the_demo_pair_and_restores_the_kernels():
    """The CPU op count of one captured EAGLE chain step (the demo pair, fp32): each drafter call's
    Triton kernels counted once, the module's kernels put back after."""
    import specdec.kernels as K

    before = K.paged_tree_attention
    m = _count_ops()
    res = m.main(["--rows", "chain(3)", "--new-tokens", "6"])
    row = res["rows"]["chain(3)"]
    assert K.paged_tree_attention is before
    by_op = dict(row["by_op"])
    assert row["steps"] >= 1 and row["ops"] == sum(by_op.values())
    assert by_op["kernel:silu_mul"] == 3  # the catch-up and two drafts: one MLP each
    assert by_op["linear"] >= 3 * 7  # fc, q / k / v (one or three), o, gate, up, down, lm_head per call
