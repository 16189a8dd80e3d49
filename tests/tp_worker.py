"""Run under `torchrun --nproc_per_node N`: a tiny Llama sharded by transformers' tensor-parallel
plan decodes through specdec exactly as the single-process model does (tests/test_tensor_parallel.py).

    torchrun --nproc_per_node 2 tests/tp_worker.py OUT_DIR [--backend gloo|nccl]
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))


PROPOSERS = ("none", "ngram", "draft", "medusa", "eagle")


def _medusa_heads(device):
    """Random Medusa heads, the same on every rank and in the single-process run (seeded)."""
    from specdec.heads.medusa import MedusaConfig, MedusaHeads

    torch.manual_seed(11)
    heads = MedusaHeads(MedusaConfig(2, 1, 64, 96, own_lm_head=False))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    return heads.to(device) if device is not None else heads


def _eagle_drafter(device):
    from transformers import LlamaConfig

    from specdec.heads.eagle import EagleDrafter

    torch.manual_seed(12)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=96, num_hidden_layers=1)  # fmt: skip
    drafter = EagleDrafter(cfg, version=1).eval()
    return drafter.to(device) if device is not None else drafter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--backend", default="gloo")
    args = ap.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)
    from models import noisy_copy, tiny
    from transformers import AutoModelForCausalLM

    import specdec
    from specdec.runtime.fusion import fusable

    path = os.path.join(args.out, "model")
    reference = tiny("llama", vocab=96, num_key_value_heads=2, num_attention_heads=4)
    if rank == 0:
        reference.save_pretrained(path)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()
    draft = noisy_copy(reference, 0.05)
    if device is not None:
        reference, draft = reference.to(device), draft.to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 9), generator=g)
    ids[:, 4:8] = ids[:, :4]  # a repeat for the n-gram proposer
    if device is not None:
        ids = ids.to(device)
    mask = torch.ones_like(ids)
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    attn = model.model.layers[0].self_attn
    w = attn.q_proj.weight
    local = w.to_local() if hasattr(w, "to_local") else w
    results = {
        "q_rows_local": int(local.shape[0]),
        "q_rows_full": int(reference.model.layers[0].self_attn.q_proj.weight.shape[0]),
        "norm_weight_type": type(model.model.norm.weight).__name__,
        "fused_modules": len(fusable(model)),  # the kernels' path (GPU): norms / MLPs that run fused
        "device": str(model.device),
    }
    for name, make in {
        "none": lambda: None,
        "ngram": lambda: specdec.Ngram(num_tokens=3),
        "draft": lambda: specdec.DraftModel(draft, num_tokens=3),
        "medusa": lambda: specdec.Medusa(_medusa_heads(device), tree=6),
        "eagle": lambda: specdec.Eagle(_eagle_drafter(device), depth=2, top_k=2, total_tokens=4),
    }.items():
        engine = specdec.Engine(model, make())
        out = specdec.generate(
            model, ids, mask, engine=engine, max_new_tokens=16, do_sample=False, return_dict_in_generate=True
        )
        sampled = specdec.generate(model, ids, mask, engine=engine, max_new_tokens=16, do_sample=True, seed=5)
        # the same proposer on the unsharded model, same seeds: the same draws (the law, draw for draw)
        single = specdec.generate(reference, ids, mask, proposer=make(), max_new_tokens=16, do_sample=True, seed=5)
        results[name] = {
            "greedy_equal": bool(torch.equal(out.sequences, want)),
            "sampled": sampled.tolist(),
            "sampled_equal_single_process": sampled.tolist() == single.tolist(),
            "free_blocks": engine.bm.num_free_blocks == engine.bm.num_blocks,
            "kv_heads_local": int(engine.cache.k.shape[2]),
            "tau": out.stats.tau,
        }
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        same = all(g[n]["sampled"] == gathered[0][n]["sampled"] for g in gathered for n in PROPOSERS)
        report = {"world": world, "ranks": gathered, "sampled_same_on_every_rank": same}
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
