"""The benchmarks' argument parsing (the benchmarks themselves run on the GPU, never in CI)."""

import importlib.util
from pathlib import Path

import pytest


def _bench_pairs():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pairs.py"
    spec = importlib.util.spec_from_file_location("bench_pairs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_keeps_row_names_with_commas_whole():
    """`--only "plain,Eagle(4, 8, 31)"` selects Eagle(4, 8, 31) alone: it split on every comma, so
    its part "31)" selected Medusa(31) too."""
    parts = _bench_pairs().only_parts("specdec plain, Eagle(4, 8, 31),Ngram(4),Eagle chain")
    assert parts == ["specdec plain", "Eagle(4, 8, 31)", "Ngram(4)", "Eagle chain"]
    assert not any(p in "specdec Medusa(31)" for p in parts)


def test_only_with_an_empty_part_is_an_error():
    with pytest.raises(SystemExit, match="empty part"):
        _bench_pairs().only_parts("plain,,Eagle")
