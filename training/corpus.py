"""The reference models' data: Python sources of the running interpreter, a byte-level BPE tokenizer.

A file goes to the held-out set by a stable hash of its path relative to its root (`stdlib/...` or
`site/...`), so the split does not depend on the machine's folder layout.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

import numpy as np
from tqdm import tqdm

EOS = "<|endoftext|>"


def source_roots() -> list[tuple[str, Path]]:
    """(name, folder) of the interpreter's standard library and package folders."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and all(p != r for _, r in roots):
            roots.append(("site", p))
    return roots


def held_out(relpath: str, fraction: float) -> bool:
    """A stable split: the first 8 bytes of sha256(relative path), as a fraction of 2**64 (another
    hash than the reading order's sha1, so that the held-out files are spread over it)."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def collect_corpus(max_bytes: int, max_file_bytes: int, held_out_fraction: float) -> dict:
    """Deduplicated .py sources -> {"train": [(relpath, text)], "held_out": [...], "stats": {...}}.

    Files are read in the order of sha1(relative path) (fixed, independent of the machine's folder
    layout) until max_bytes; a file whose content was seen already is skipped, as are files larger
    than max_file_bytes (generated tables) and non-UTF-8 files."""
    candidates = []
    for name, root in source_roots():
        for path in root.rglob("*.py"):
            rel = f"{name}/{path.relative_to(root).as_posix()}"
            candidates.append((hashlib.sha1(rel.encode()).hexdigest(), rel, path))
    candidates.sort()
    seen: set[str] = set()
    files, total, skipped, duplicates = [], 0, 0, 0
    for _, rel, path in candidates:
        if total >= max_bytes:
            break
        try:
            if not path.is_file() or path.stat().st_size > max_file_bytes:
                skipped += 1
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if not text.strip() or digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        files.append((rel, text))
        total += len(text)
    train = [f for f in files if not held_out(f[0], held_out_fraction)]
    held = [f for f in files if held_out(f[0], held_out_fraction)]
    if not train or not held:
        raise ValueError(
            f"corpus split {len(train)} train / {len(held)} held-out files: raise corpus.max_bytes ({max_bytes}) "
            f"or adjust corpus.held_out ({held_out_fraction})"
        )
    stats = dict(
        candidate_files=len(candidates),
        used_files=len(files),
        used_bytes=total,
        train_files=len(train),
        held_out_files=len(held),
        skipped_files=skipped,
        duplicate_or_empty_files=duplicates,
        roots=[f"{n}: {r}" for n, r in source_roots()],
        python=sys.version.split()[0],
    )
    return {"train": train, "held_out": held, "stats": stats}


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Byte-level BPE (tokenizers) -> a transformers PreTrainedTokenizerFast saved at out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.model_max_length = 4096
    fast.save_pretrained(out)
    return fast


def encode(tokenizer, texts: list[str], batch: int = 256) -> np.ndarray:
    """Every text's ids followed by EOS, concatenated -> uint16 (vocab < 65536)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    parts = []
    for i in tqdm(range(0, len(texts), batch), desc="tokenize", mininterval=10):
        for ids in tokenizer(texts[i : i + batch], add_special_tokens=False).input_ids:
            parts.append(np.asarray(ids + [eos], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
