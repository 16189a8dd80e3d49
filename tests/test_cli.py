"""The `specdec` command end to end on tiny random pairs saved to disk, with a small trained tokenizer."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from models import noisy_copy, tiny
from test_generate_greedy import byte_bpe_tokenizer

from specdec.cli import main
from specdec.profile import break_even_acceptance


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = byte_bpe_tokenizer()
    target = tiny("llama", vocab=len(tok), eos_token_id=None, init=0.3)
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    noisy_copy(target, 0.05).save_pretrained(root / "draft")
    tiny("llama", vocab=len(tok) + 8).save_pretrained(root / "other")
    with open(root / "sb.jsonl", "w") as f:
        for i, c in enumerate(["coding", "math", "coding"]):
            f.write(json.dumps({"question_id": i, "category": c, "turns": [f"def f{i}(x):", "next"]}) + "\n")
    with gzip.open(root / "he.jsonl.gz", "wt") as f:
        f.write(json.dumps({"task_id": "t/0", "prompt": "def add(a, b):\n"}) + "\n")
    (root / "lines.txt").write_text("for i in range(3):\nprint(i)\n")
    (root / "empty.txt").write_text("\n\n")
    return root


def test_kv_size_arithmetic(capsys):
    assert main(["kv-size", "--layers", "32", "--kv-heads", "32", "--head-dim", "128", "--seq-len", "4096"]) == 0
    assert "2,147,483,648 bytes per sequence" in capsys.readouterr().out
    assert main(["kv-size", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "536,870,912 bytes per sequence" in out and "8-bit KV cache: 268,435,456" in out


def test_kv_size_from_a_config_with_weights_and_batch(zoo, capsys):
    assert (
        main(
            [
                "kv-size",
                "--config",
                str(zoo / "target"),
                "--seq-len",
                "1024",
                "--memory-gib",
                "1",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "without GQA (4 KV heads)" in out and "weights:" in out and "largest batch in 1.0 GiB" in out


@pytest.mark.parametrize(
    "fmt, extra",
    [("sb.jsonl", ["--category", "coding", "--batch-size", "2"]), ("he.jsonl.gz", []), ("lines.txt", ["--limit", "1"])],
)
def test_profile_each_prompt_format(zoo, tmp_path, fmt, extra):
    out = tmp_path / "prof"
    rc = main(
        [
            "profile",
            "--target",
            str(zoo / "target"),
            "--proposer",
            "draft",
            "--draft",
            str(zoo / "draft"),
            "--prompts",
            str(zoo / fmt),
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    for key in (
        "tau",
        "acceptance_rate",
        "speedup",
        "predicted_speedup",
        "tpot_ms",
        "ttft_ms",
        "per_depth",
        "break_even_acceptance",
        "per_category",
        "step_ms",
        "conventions",
    ):
        assert key in r, key
    assert r["greedy_identical"] is True and r["divergences"] == []
    assert 1 <= r["tau"] <= 5 and 0 <= r["break_even_acceptance"] <= 1
    assert r["num_prompts"] == {"sb.jsonl": 2, "he.jsonl.gz": 1, "lines.txt": 1}[fmt]
    if fmt == "sb.jsonl":
        assert set(r["per_category"]) == {"coding"}
    pngs = ("acceptance_by_depth.png", "tau_per_prompt.png", "tokens_per_s_per_prompt.png", "speedup_vs_acceptance.png",
            "accepted_length_histogram.png")
    for png in pngs:
        assert (out / png).stat().st_size > 1000
    assert (out / "speedup_per_category.png").exists() == (len(r["per_category"]) > 1)  # no one-bar chart


def test_generate_streams_then_prints_stats(zoo):
    cmd = [
        str(Path(sys.executable).parent / "specdec"),
        "generate",
        "--target",
        str(zoo / "target"),
        "--proposer",
        "ngram",
        "--prompt",
        "def f(x):",
        "--max-new-tokens",
        "8",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def f(x):")
    assert "[ngram] 8 tokens, tau" in res.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["generate", "--target", "/nowhere", "--prompt", "x"], "no such folder"),
        (
            ["profile", "--target", "{t}", "--proposer", "medusa2", "--prompts", "{z}/lines.txt", "--out", "{o}"],
            "unknown proposer 'medusa2'",
        ),
        (
            [
                "profile",
                "--target",
                "{t}",
                "--proposer",
                "draft",
                "--draft",
                "{z}/other",
                "--prompts",
                "{z}/lines.txt",
                "--out",
                "{o}",
            ],
            "draft vocabulary",
        ),
        (
            ["profile", "--target", "{t}", "--proposer", "ngram", "--prompts", "{z}/empty.txt", "--out", "{o}"],
            "no prompts in",
        ),
        (
            ["profile", "--target", "{t}", "--proposer", "ngram", "--prompts", "{z}/missing.jsonl", "--out", "{o}"],
            "does not exist",
        ),
        (
            [
                "profile",
                "--target",
                "{t}",
                "--proposer",
                "ngram",
                "--prompts",
                "{z}/lines.txt",
                "--out",
                "{o}",
                "--batch-size",
                "0",
            ],
            "--batch-size 0 must be >= 1",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(zoo, tmp_path, capsys, argv, fragment):
    argv = [a.format(t=zoo / "target", z=zoo, o=tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0]


def test_break_even_acceptance():
    assert break_even_acceptance(4, 0.9) == 0.0  # cheaper than a plain step: always pays
    assert break_even_acceptance(4, 6.0) == 1.0  # can never pay
    a = break_even_acceptance(4, 2.0)
    assert abs(sum(a**i for i in range(5)) - 2.0) < 1e-9


def test_tune_builds_a_tree_from_a_medusa_profile_and_remeasures(zoo, tmp_path):
    from specdec.heads.medusa import MedusaConfig, MedusaHeads

    heads = MedusaHeads(MedusaConfig(3, 1, 64, len(byte_bpe_tokenizer()), own_lm_head=False))
    heads.save_pretrained(tmp_path / "heads")
    common = ["--target", str(zoo / "target"), "--heads", str(tmp_path / "heads")]
    assert (
        main(
            [
                "profile",
                *common,
                "--proposer",
                "medusa",
                "--tree",
                "16",
                "--prompts",
                str(zoo / "sb.jsonl"),
                "--max-new-tokens",
                "16",
                "--out",
                str(tmp_path / "prof"),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "prof" / "report.json").read_text())
    per = report["per_choice"]
    depth1 = [v["offered"] for k, v in per.items() if "," not in k]
    assert len(per) == 16 and len(set(depth1)) == 1 and depth1[0] > 0  # every step offers each depth-1 choice
    assert all(v["accepted"] <= v["offered"] for v in per.values())
    assert (
        main(
            [
                "tune",
                "--report",
                str(tmp_path / "prof" / "report.json"),
                *common,
                "--out",
                str(tmp_path / "tree.json"),
                "--max-nodes",
                "16",
                "--prompts",
                str(zoo / "sb.jsonl"),
                "--max-new-tokens",
                "16",
            ]
        )
        == 0
    )
    tree = json.loads((tmp_path / "tree.json").read_text())
    choices = [tuple(c) for c in tree["choices"]]
    assert len(choices) == tree["nodes"] - 1 and tree["nodes"] in (2, 4, 8, 16)
    assert all(len(c) == 1 or c[:-1] in choices for c in choices)
    assert set(tree["verify_cost_ms"]) == {"1", "2", "4", "8", "16"}
    assert Path(tree["remeasured"]["report"]).is_file() and tree["remeasured"]["tau"] >= 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tau": 1.0}))
    assert main(["tune", "--report", str(bad), *common, "--out", str(tmp_path / "t2.json")]) == 2


def test_profile_eagle_tree_and_chain(zoo, tmp_path):
    from transformers import LlamaConfig

    from specdec.heads.eagle import EagleDrafter

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=json.loads((zoo / "target" / "config.json").read_text())["vocab_size"],
        num_hidden_layers=1,
    )
    EagleDrafter(cfg, version=1).save_pretrained(tmp_path / "eagle")
    for extra in (["--depth", "3", "--tree-top-k", "4", "--total-tokens", "10"], ["--chain", "--depth", "3"]):
        out = tmp_path / ("prof" + str(len(extra)))
        argv = ["profile", "--target", str(zoo / "target"), "--proposer", "eagle", "--heads", str(tmp_path / "eagle")]
        argv += ["--prompts", str(zoo / "lines.txt"), "--max-new-tokens", "10", "--out", str(out), "--quiet", *extra]
        assert main(argv) == 0
        r = json.loads((out / "report.json").read_text())
        assert r["greedy_identical"] is True and r["proposer"] == "eagle"
    argv = ["profile", "--target", str(zoo / "target"), "--proposer", "eagle", "--heads", str(zoo / "target")]
    assert main([*argv, "--prompts", str(zoo / "lines.txt"), "--out", str(tmp_path / "x")]) == 2


def test_tune_eagle_measures_each_setting(zoo, tmp_path):
    from transformers import LlamaConfig

    from specdec.heads.eagle import EagleDrafter

    vocab = json.loads((zoo / "target" / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, num_hidden_layers=1)  # fmt: skip
    EagleDrafter(cfg, version=1).save_pretrained(tmp_path / "eagle")
    argv = ["tune", "--proposer", "eagle", "--target", str(zoo / "target"), "--heads", str(tmp_path / "eagle")]
    argv += ["--prompts", str(zoo / "lines.txt"), "--max-new-tokens", "8", "--out", str(tmp_path / "tune.json")]
    assert main([*argv, "--grid", "2:2:3,3:4:8"]) == 0
    r = json.loads((tmp_path / "tune.json").read_text())
    assert [(c["depth"], c["top_k"], c["total_tokens"]) for c in r["candidates"]] == [(2, 2, 3), (3, 4, 8)]
    best = max(r["candidates"], key=lambda c: c["speedup"])
    assert r["flags"] == f"--depth {best['depth']} --tree-top-k {best['top_k']} --total-tokens {best['total_tokens']}"
    assert main([*argv, "--grid", "2:2:99"]) == 2
    assert main([*argv, "--grid", "2:2"]) == 2
    no_report = ["tune", "--target", str(zoo / "target"), "--heads", str(tmp_path / "eagle"), "--out", "x.json"]
    assert main(no_report) == 2  # Medusa's tuner needs a profile report


def _broken(zoo, tmp_path):
    """Files for the bad-input cases: a truncated checkpoint, a tree without choices, a report without
    step_ms, a Spec-Bench row without turns, a .jsonl.gz that is not gzip, a config without heads."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(zoo / "target", bad / "truncated")
    weights = bad / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.copytree(zoo / "target", bad / "noweights")
    (bad / "noweights" / "model.safetensors").unlink()
    (bad / "tree.json").write_text(json.dumps({"nodes": [[0]]}))
    (bad / "report.json").write_text(json.dumps({"per_choice": {"0": {"offered": 1, "accepted": 1}}}))
    (bad / "noturns.jsonl").write_text(json.dumps({"turns": []}) + "\n")
    (bad / "plain.jsonl.gz").write_text(json.dumps({"prompt": "x"}) + "\n")
    (bad / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64}))
    (bad / "notjson.json").write_text("{oops")
    (bad / "readonly").mkdir()
    (bad / "readonly" / "out").write_text("a file where --out wants a folder")
    return bad


PROFILE = ["profile", "--target", "{t}", "--proposer", "ngram", "--prompts", "{z}/lines.txt", "--out", "{o}"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (PROFILE[:-1] + ["{b}/readonly/out/sub"], "cannot write there"),
        (["generate", "--target", "{b}/truncated", "--prompt", "x"], "cannot load the model"),
        (["generate", "--target", "{b}/noweights", "--prompt", "x"], "cannot load the model"),
        (["generate", "--target", "{t}", "--prompt", "x", "--proposer", "medusa", "--heads", "{t}", "--tree",
          "{b}/tree.json"], "expected a list of choices"),  # fmt: skip
        (PROFILE[:6] + ["{b}/noturns.jsonl", "--out", "{o}"], "'turns' must be a non-empty list"),
        (PROFILE[:6] + ["{b}/plain.jsonl.gz", "--out", "{o}"], "cannot read prompts"),
        (["tune", "--target", "{t}", "--heads", "{t}", "--report", "{b}/report.json", "--out", "{o}/t.json"],
         "has no step_ms.draft"),  # fmt: skip
        (["generate", "--target", "{t}", "--prompt", "x", "--device", "cuda:7"], "--device cuda:7"),
        (["generate", "--target", "{t}", "--prompt", "x", "--device", "tpu"], "not a device name"),
        (["kv-size", "--config", "{b}/config.json", "--seq-len", "8"], "lacks num_attention_heads"),
        (["kv-size", "--config", "{b}/notjson.json", "--seq-len", "8"], "notjson.json is not valid JSON"),
        (["kv-size", "--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--seq-len", "-5"], "--seq-len -5 must be"),
        (PROFILE + ["--limit", "-1"], "--limit -1 must be >= 1"),
        (PROFILE + ["--max-prompt-tokens", "0"], "--max-prompt-tokens 0 must be >= 1"),
        (PROFILE + ["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
        (PROFILE + ["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
        (PROFILE + ["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    ],
)
def test_more_bad_input_is_one_line_and_exit_2_before_any_work(zoo, tmp_path, capsys, argv, fragment):
    bad = _broken(zoo, tmp_path)
    argv = [a.format(t=zoo / "target", z=zoo, o=tmp_path / "o", b=bad) for a in argv]
    if "cuda:7" in argv and __import__("torch").cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "o" / "report.json").exists()


def test_version_json_and_help_with_defaults(zoo, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("specdec ")
    base = ["--target", str(zoo / "target"), "--max-new-tokens", "6", "--device", "cpu", "--json"]
    assert main(["generate", *base, "--prompt", "def f(x):", "--proposer", "ngram", "--top-k", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "tau", "tokens_per_s"} <= set(out)
    argv = ["profile", *base, "--proposer", "ngram", "--prompts", str(zoo / "lines.txt"), "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # nothing but the summary on stdout
    assert report["proposer_options"] == {"name": "ngram", "num_tokens": 4}
    assert report["versions"]["specdec"] and report["counters"]["num_draft_tokens"] >= 0
    hist = report["counters"]["accepted_length_histogram"]
    assert sum(hist) == report["counters"]["num_drafts"] > 0
    assert sum(n * c for n, c in enumerate(hist)) == report["counters"]["num_accepted_tokens"]
    assert report["dtype"] == "float32" and report["target"] == str(zoo / "target")  # --dtype auto: as saved
    assert main(["kv-size", "--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--seq-len", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_bytes_per_sequence"] == 2 * 2 * 2 * 8 * 4 * 2
    from specdec.cli import parser

    help_text = parser()._subparsers._group_actions[0].choices["profile"].format_help()
    assert "(default: 64)" in help_text and "--tree-top-k" in help_text and "sampling top-k" in help_text
