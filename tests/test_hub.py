"""Hub ids for targets, drafts and heads resolve through huggingface_hub's cache (offline here: the test
builds the cache folder the way huggingface_hub lays it out), with the revision respected."""

import pytest
import torch
from models import tiny
from test_generate_greedy import byte_bpe_tokenizer

from specdec.cli import main
from specdec.heads.medusa import MedusaConfig, MedusaHeads, load_medusa
from specdec.hub import resolve


def _publish(cache, repo_id: str, save, revision: str = "main", commit: str = "a" * 40):
    """Lay out repo_id at `revision` as huggingface_hub's cache does: refs/<rev> -> snapshots/<commit>."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    save(snap)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_ids_resolve_to_their_cached_snapshot_at_a_revision(hub):
    main_snap = _publish(hub, "org/heads", lambda d: (d / "config.json").write_text("{}"))
    v2 = _publish(hub, "org/heads", lambda d: (d / "config.json").write_text("{}"), "v2", "b" * 40)
    assert resolve("org/heads") == main_snap
    assert resolve("org/heads", revision="v2") == v2
    with pytest.raises(FileNotFoundError, match="org/missing: not a local folder, and the local Hub cache"):
        resolve("org/missing")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub id"):
        resolve("/no/such/folder")


def test_heads_and_the_cli_take_hub_ids(hub, capsys):
    tok = byte_bpe_tokenizer()
    target = tiny("llama", vocab=len(tok), eos_token_id=None, init=0.3)
    _publish(hub, "org/tiny-target", lambda d: (target.save_pretrained(d), tok.save_pretrained(d)))
    heads = MedusaHeads(MedusaConfig(2, 1, 64, len(tok), own_lm_head=False))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    _publish(hub, "org/tiny-medusa", heads.save_pretrained)
    loaded = load_medusa("org/tiny-medusa", 64, len(tok))
    pairs = zip(loaded.state_dict().values(), heads.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    argv = ["generate", "--target", "org/tiny-target", "--proposer", "medusa", "--heads", "org/tiny-medusa"]
    assert main([*argv, "--prompt", "def f(x):", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert "[medusa]" in capsys.readouterr().err


def test_proposers_from_pretrained_take_hub_ids(hub):
    """Medusa.from_pretrained and Eagle.from_pretrained resolve Hub ids (and a revision) as the
    loaders do; the proposers then decode greedy-equal to the target."""
    from transformers import LlamaConfig

    import specdec
    from specdec.heads.eagle import EagleDrafter

    target = tiny("llama", vocab=96, eos_token_id=None)
    heads = MedusaHeads(MedusaConfig(2, 1, 64, 96, own_lm_head=False))
    _publish(hub, "org/medusa", heads.save_pretrained, "v1", "c" * 40)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=96, num_hidden_layers=1)  # fmt: skip
    _publish(hub, "org/eagle", EagleDrafter(cfg, version=1).save_pretrained)
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    ref = specdec.generate(target, ids, max_new_tokens=8)
    medusa = specdec.Medusa.from_pretrained("org/medusa", tree=4, revision="v1")
    eagle = specdec.Eagle.from_pretrained("org/eagle", depth=2, top_k=2, total_tokens=3)
    for proposer in (medusa, eagle):
        assert torch.equal(specdec.generate(target, ids, proposer=proposer, max_new_tokens=8), ref)
    with pytest.raises(FileNotFoundError, match="org/medusa"):
        specdec.Medusa.from_pretrained("org/medusa")  # no "main" revision in the cache
