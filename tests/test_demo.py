"""`make demo` runs and checks itself (greedy equality with model.generate)."""

from specdec.demo import main


def test_demo_runs(capsys):
    main()
    out = capsys.readouterr().out
    assert "RANDOM models" in out and "DraftModel" in out and "False" not in out
