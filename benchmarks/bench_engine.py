"""GPU benchmark of the engine against the hardware floor, in one run (< 8 minutes on an H100/H200).

    python benchmarks/bench_engine.py --out results.json          # 8B-shaped Llama, random bf16
    python benchmarks/bench_engine.py --tiny --out /tmp/t.json    # a tiny model, to check the script

Measures, on one card and in one process: copy bandwidth; plain-decode TPOT in specdec (CUDA graphs
and eager) against the floor (weight + KV bytes / measured bandwidth); transformers `generate` TPOT;
the step forward for 8/16/32/64-node trees as a multiple of a 1-token decode step; engine efficiency
(measured speedup / ideal speedup) with a replay proposer at tau = 2, 3, 4, 6; tokens/s at batch
1, 4, 16 with and without speculation. Every section records its error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import specdec
from specdec import Engine
from specdec.proposers.base import ProposeContext, Proposer
from specdec.runtime.graphs import GraphedForward
from specdec.runtime.metadata import prefill_metadata, tree_metadata
from specdec.tree import DraftTree, node_bucket

EIGHT_B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=8192,
)
TINY = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    vocab_size=512,
    max_position_embeddings=8192,
)


class Replay(Proposer):
    """Benchmark-only: drafts the target's own greedy continuation, tau - 1 right tokens then one wrong.

    Every step then accepts exactly tau - 1 drafts, so tau is exact and the draft costs nothing:
    the measured speedup over plain decoding isolates the engine's own efficiency.
    """

    name = "replay"

    def __init__(self, references: dict[tuple[int, ...], list[int]], tau: int, vocab: int):
        self.references, self.tau, self.vocab = references, tau, vocab

    @property
    def max_nodes(self) -> int:
        return self.tau + 1

    def propose(self, ctx: ProposeContext) -> DraftTree:
        rows = []
        for h in ctx.histories:
            h = h.tolist()
            for prompt, ref in self.references.items():
                if tuple(h[: len(prompt)]) == prompt:
                    done = len(h) - len(prompt)
                    right = ref[done : done + self.tau - 1]
                    rows.append(right + [(ref[min(done + self.tau - 1, len(ref) - 1)] + 1) % self.vocab])
                    break
            else:
                raise KeyError("replay proposer: unknown prompt")
        K = self.tau
        drafts = torch.tensor([r + [0] * (K - len(r)) for r in rows])
        num = torch.minimum(torch.tensor([len(r) for r in rows]), ctx.max_drafts)
        return DraftTree.chain(ctx.roots(), drafts, num_drafts=num)


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() (device-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    x = torch.empty(2**30 if DEV.type == "cuda" else 2**26, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), reps=10)
    return 2 * x.numel() / t


def build_model(shape: dict) -> LlamaForCausalLM:
    cfg = LlamaConfig(**shape, eos_token_id=None, bos_token_id=None)
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    with torch.device(DEV):
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    model.eval()
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
    return model


def kv_bytes(cfg, tokens: int) -> int:
    head = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head * tokens * 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--only", help="comma-separated sections to run (default: all)")
    args = ap.parse_args()
    shape = TINY if args.tiny else EIGHT_B
    contexts = [int(c) for c in args.contexts.split(",")]
    res = {
        "card": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": shape,
        "new_tokens": args.new_tokens,
    }
    errors = res.setdefault("errors", {})

    only = set(args.only.split(",")) if args.only else None

    def section(name):
        def wrap(fn):
            if only is not None and name not in only:
                return
            t0 = time.time()
            try:
                fn()
            except Exception:  # record and go on: one device call should bring back every number it can
                errors[name] = traceback.format_exc()[-3000:]
            res.setdefault("section_s", {})[name] = round(time.time() - t0, 1)
            print(f"[{name}] {res['section_s'][name]}s {'ERROR' if name in errors else 'ok'}", flush=True)
            json.dump(res, open(args.out, "w"), indent=1)

        return wrap

    bw = copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw / 1e9
    model = build_model(shape)
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["weight_GB"] = weight_bytes / 1e9
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {c: torch.randint(0, V, (1, c), generator=g) for c in contexts}
    refs: dict[int, torch.Tensor] = {}

    @section("plain_decode")
    def _():
        rows = res["plain_decode"] = []
        for c in contexts:
            ids = prompts[c].to(DEV)
            floor = (weight_bytes + kv_bytes(cfg, c + args.new_tokens // 2)) / bw
            variants = [(True, True, True), (True, False, True), (True, True, False), (True, False, False)]
            for graphs, fuse, pipeline in [*variants, (False, True, True)] if DEV.type == "cuda" else [(False,) * 3]:
                eng = Engine(model, None, cuda_graphs=graphs)
                eng.target.fuse, eng.pipeline = fuse, pipeline
                specdec.generate(model, ids, max_new_tokens=8, engine=eng)  # warm: compile, capture
                out = specdec.generate(
                    model, ids, max_new_tokens=args.new_tokens, engine=eng, return_dict_in_generate=True
                )
                refs.setdefault(c, out.sequences[0, c:].cpu())
                tpot = out.stats.tpot_ms / 1e3
                rows.append(
                    {
                        "context": c,
                        "cuda_graphs": graphs,
                        "fused_norm_mlp": fuse,
                        "pipelined": pipeline,
                        "tpot_ms": tpot * 1e3,
                        "floor_ms": floor * 1e3,
                        "fraction_of_floor": floor / tpot,
                    }
                )

    @section("host_syncs")
    def _():
        # torch's sync debug mode warns at every implicit host-device synchronisation
        if DEV.type != "cuda":
            return
        import warnings

        eng = Engine(model, None)
        ids = prompts[contexts[0]].to(DEV)
        specdec.generate(model, ids, max_new_tokens=8, engine=eng)
        sites = {}
        for n in (8, 40):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    specdec.generate(model, ids, max_new_tokens=n, engine=eng)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            sites[n] = {}
            for w in caught:
                key = f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"
                sites[n][key] = sites[n].get(key, 0) + 1
        per_step = {k: (v - sites[8].get(k, 0)) / 32 for k, v in sites[40].items() if v != sites[8].get(k, 0)}
        res["host_syncs_per_step"] = sum(per_step.values())
        res["host_sync_sites_per_step"] = per_step
        res["host_sync_sites_40_tokens"] = sites[40]

    @section("hf_generate")
    def _():
        rows = res["hf_generate"] = []
        for c in contexts[:1]:
            ids = prompts[c].to(DEV)
            mask = torch.ones_like(ids)
            kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
            model.generate(ids, max_new_tokens=4, **kw)
            sync()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kw)
            sync()
            t1 = time.perf_counter()
            n = 33
            model.generate(ids, max_new_tokens=n, **kw)
            sync()
            t2 = time.perf_counter()
            tpot = ((t2 - t1) - (t1 - t0)) / (n - 1)
            rows.append({"context": c, "tpot_ms": tpot * 1e3})

    @section("hf_generate_static")
    def _():
        # transformers compiles the forward itself with a static cache; per-token times from a streamer
        # (generate syncs at every token to hand it over), after a warm-up call of the same shape
        rows = res["hf_generate_static"] = []
        c = contexts[0]
        ids = prompts[c].to(DEV)
        n = 48

        class Clock:
            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        kw = dict(
            attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, max_new_tokens=n,
            min_new_tokens=n, cache_implementation="static",
        )  # fmt: skip
        t0 = time.perf_counter()
        model.generate(ids, **kw)  # compiles
        compile_s = time.perf_counter() - t0
        tpots = []
        for _ in range(2):
            clock = Clock()
            model.generate(ids, streamer=clock, **kw)
            t = clock.times[1:]  # the first put is the prompt
            tpots.append((t[-1] - t[0]) / (len(t) - 1))
        rows.append({"context": c, "tpot_ms": 1e3 * min(tpots), "first_call_s": compile_s})

    @section("engine_reuse")
    def _():
        # one Engine, 20 prompts of different lengths: no call may pay for a new pool or new graphs
        eng = Engine(model, None)
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(64, 1024, (20,), generator=gen).tolist()
        tpots = []
        for n in lengths:
            ids = torch.randint(0, V, (1, n), generator=gen).to(DEV)
            out = specdec.generate(model, ids, max_new_tokens=32, engine=eng, return_dict_in_generate=True)
            tpots.append(out.stats.tpot_ms)
        steady = sorted(tpots)[len(tpots) // 2]
        res["engine_reuse"] = {
            "lengths": lengths,
            "tpot_ms": tpots,
            "worst_vs_median": max(tpots) / steady,
            "worst_after_first_vs_median": max(tpots[1:]) / steady,  # the first call captures the graphs
        }

    @section("verify_cost")
    def _():
        rows = res["verify_cost"] = []
        for c in contexts:
            eng = Engine(model, None, num_blocks=2 * (c + 128) // 16 + 16)
            specdec.generate(model, prompts[c].to(DEV), max_new_tokens=2, engine=eng)  # allocates the pool
            bm, cache = eng.bm, eng.cache
            sid = 10**6 + c
            cached = bm.allocate(sid, prompts[c][0].tolist())
            ids, pos, meta = prefill_metadata(cache, bm, [sid], [prompts[c][0]], [cached], DEV, eng.kernels)
            eng.target.forward(ids, pos, meta, logits_to_keep=1)
            bm.commit(sid, prompts[c][0, cached:].tolist())
            graphed = GraphedForward(eng.target, cache, (c + 128) // 16 + 1) if eng.cuda_graphs else None

            def fwd(tokens, positions, meta, graphed=graphed, target=eng.target):
                if graphed is not None:
                    return graphed.forward(tokens, positions, meta)
                return target.forward(tokens, positions, meta).logits

            base = None
            for n in (1, 2, 4, 8, 16, 32, 64):
                parents = [[-1] + [max(0, (i - 1) // 2) if n > 8 else i - 1 for i in range(1, n)]]
                tree = DraftTree.from_parents([[1] * n], parents, device=DEV)
                bm.reserve(sid, n)
                positions, meta, _ = tree_metadata(cache, bm, [sid], tree, DEV, eng.kernels, gathered=graphed is None)
                t = timed(lambda tree=tree, positions=positions, meta=meta: fwd(tree.tokens, positions, meta))
                base = base or t
                rows.append({"context": c, "nodes": n, "ms": t * 1e3, "x_decode": t / base})
            bm.free(sid)

    # Replay needs the tree step to pick the same argmax as the 1-token step. In bf16 they round
    # differently (different GEMM shapes) and a random model's top-2 logits are close, so the history
    # soon leaves the recorded continuation. The engine-efficiency sections therefore run in fp32.
    model.float()
    res["replay_dtype"] = "float32"
    refs.clear()

    @section("fp32_reference")
    def _():
        c = contexts[0]
        plain = Engine(model, None)
        specdec.generate(model, prompts[c].to(DEV), max_new_tokens=8, engine=plain)
        out = specdec.generate(model, prompts[c].to(DEV), max_new_tokens=args.new_tokens, engine=plain)
        refs[c] = out[0, c:].cpu()
        verify = res["verify_cost_fp32"] = []
        eng = Engine(model, None, num_blocks=2 * (c + 128) // 16 + 16)
        specdec.generate(model, prompts[c].to(DEV), max_new_tokens=2, engine=eng)
        bm, cache = eng.bm, eng.cache
        cached = bm.allocate(-1, prompts[c][0].tolist())
        ids, pos, meta = prefill_metadata(cache, bm, [-1], [prompts[c][0]], [cached], DEV, eng.kernels)
        eng.target.forward(ids, pos, meta, logits_to_keep=1)
        bm.commit(-1, prompts[c][0, cached:].tolist())
        graphed = GraphedForward(eng.target, cache, (c + 128) // 16 + 1) if eng.cuda_graphs else None
        for n in (1, 2, 4, 8):
            tree = DraftTree.from_parents([[1] * n], [[-1] + list(range(n - 1))], device=DEV)
            bm.reserve(-1, n)
            positions, meta, _ = tree_metadata(cache, bm, [-1], tree, DEV, eng.kernels, gathered=graphed is None)
            if graphed is not None:
                t = timed(
                    lambda tree=tree, positions=positions, meta=meta: graphed.forward(tree.tokens, positions, meta)
                )
            else:
                t = timed(
                    lambda tree=tree, positions=positions, meta=meta: eng.target.forward(tree.tokens, positions, meta)
                )
            verify.append({"context": c, "nodes": n, "ms": t * 1e3})
        bm.free(-1)

    @section("replay_efficiency")
    def _():
        rows = res["replay_efficiency"] = []
        c = contexts[0]
        ids = prompts[c].to(DEV)
        references = {tuple(prompts[c][0].tolist()): refs[c].tolist()}
        plain = Engine(model, None)
        specdec.generate(model, ids, max_new_tokens=8, engine=plain)
        p = specdec.generate(model, ids, max_new_tokens=args.new_tokens, engine=plain, return_dict_in_generate=True)
        base_tps = p.stats.generated_tokens / p.stats.total_time_s
        verify = {r["nodes"]: r["ms"] for r in res.get("verify_cost_fp32", [])}
        for tau in (2, 3, 4, 6):
            eng = Engine(model, Replay(references, tau, V))
            specdec.generate(model, ids, max_new_tokens=16, engine=eng)
            out = specdec.generate(model, ids, max_new_tokens=args.new_tokens, engine=eng, return_dict_in_generate=True)
            same = out.sequences[0, c:].cpu() == refs[c]  # bf16: tree and 1-token steps round differently
            tps = out.stats.generated_tokens / out.stats.total_time_s
            step_ratio = verify[node_bucket(tau + 1)] / verify[1]  # verify step / decode step
            ideal = out.stats.tau / step_ratio
            rows.append(
                {
                    "context": c,
                    "tau_target": tau,
                    "tau": out.stats.tau,
                    "tokens_per_s": tps,
                    "plain_tokens_per_s": base_tps,
                    "speedup": tps / base_tps,
                    "ideal_speedup": ideal,
                    "efficiency": (tps / base_tps) / ideal,
                    "identical_to_plain": bool(same.all()),
                }
            )

    @section("batch")
    def _():
        rows = res["batch"] = []
        c = 512
        for B in (1, 4, 16):
            ids = torch.randint(0, V, (B, c), generator=g)
            plain = Engine(model, None)
            specdec.generate(model, ids.to(DEV), max_new_tokens=8, engine=plain)
            p = specdec.generate(model, ids.to(DEV), max_new_tokens=64, engine=plain, return_dict_in_generate=True)
            references = {tuple(ids[b].tolist()): p.sequences[b, c:].tolist() for b in range(B)}
            eng = Engine(model, Replay(references, 4, V))
            specdec.generate(model, ids.to(DEV), max_new_tokens=8, engine=eng)
            s = specdec.generate(model, ids.to(DEV), max_new_tokens=64, engine=eng, return_dict_in_generate=True)
            rows.append(
                {
                    "batch": B,
                    "context": c,
                    "plain_tokens_per_s": p.stats.tokens_per_s,
                    "spec_tokens_per_s": s.stats.tokens_per_s,
                    "tau": s.stats.tau,
                    "speedup": s.stats.tokens_per_s / p.stats.tokens_per_s,
                    "identical_to_plain": bool(torch.equal(s.sequences, p.sequences)),
                }
            )

    for name, err in errors.items():
        print(f"--- {name} failed:\n{err}")
    print(summary(res))


def summary(res: dict) -> str:
    """The table printed last (and written to docs/benchmarks.md by hand)."""
    out = [
        f"card {res['card']} | torch {res['torch']} | triton {res['triton']} | transformers "
        f"{res['transformers']} | copy bandwidth {res.get('copy_bandwidth_GBps', 0):.0f} GB/s | "
        f"weights {res.get('weight_GB', 0):.2f} GB"
    ]
    for r in res.get("plain_decode", []):
        out.append(
            f"plain decode ctx {r['context']:>5} graphs={r['cuda_graphs']!s:<5} fused={r.get('fused_norm_mlp')!s:<5} "
            f"pipelined={r.get('pipelined')!s:<5} TPOT {r['tpot_ms']:7.2f} ms"
            f" | floor {r['floor_ms']:6.2f} ms | {100 * r['fraction_of_floor']:5.1f}% of floor"
        )
    if "host_syncs_per_step" in res:
        out.append(
            f"implicit host syncs per plain-decode step: {res['host_syncs_per_step']:.2f} "
            f"(per-step sites: {res.get('host_sync_sites_per_step')})"
        )
    for r in res.get("hf_generate", []):
        out.append(f"transformers generate ctx {r['context']:>5} TPOT {r['tpot_ms']:7.2f} ms")
    for r in res.get("hf_generate_static", []):
        out.append(
            f"transformers generate static cache (compiled) ctx {r['context']:>5} TPOT {r['tpot_ms']:7.2f} ms "
            f"(first call {r['first_call_s']:.0f} s)"
        )
    if "engine_reuse" in res:
        r = res["engine_reuse"]
        out.append(
            f"one Engine over 20 prompt lengths: worst call TPOT / median = {r['worst_vs_median']:.2f} "
            f"(after the first, capturing call: {r.get('worst_after_first_vs_median', 0):.2f})"
        )
    replay = {r["context"]: r["ms"] for r in res.get("verify_cost", []) if r["nodes"] == 1}
    for r in res.get("plain_decode", []):
        # what the host adds to the replayed (fused) forward
        if r["cuda_graphs"] and r.get("fused_norm_mlp", True) and r["context"] in replay:
            out.append(
                f"host time per plain-decode step ctx {r['context']:>5} pipelined={r.get('pipelined')}: "
                f"TPOT {r['tpot_ms']:.2f} - graph replay "
                f"{replay[r['context']]:.2f} = {r['tpot_ms'] - replay[r['context']]:.2f} ms"
            )
    for r in res.get("verify_cost", []):
        out.append(
            f"step forward ctx {r['context']:>5} nodes {r['nodes']:>3}: {r['ms']:7.2f} ms = "
            f"{r['x_decode']:.2f} x decode"
        )
    for r in res.get("replay_efficiency", []):
        out.append(
            f"replay tau {r['tau']:.2f}: speedup {r['speedup']:.2f} / ideal {r['ideal_speedup']:.2f} = "
            f"efficiency {r['efficiency']:.2f} (identical to plain: {r.get('identical_to_plain')})"
        )
    for r in res.get("batch", []):
        out.append(
            f"batch {r['batch']:>2}: plain {r['plain_tokens_per_s']:8.1f} tok/s | spec (tau {r['tau']:.2f}) "
            f"{r['spec_tokens_per_s']:8.1f} tok/s | x{r['speedup']:.2f} (identical: {r.get('identical_to_plain')})"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
