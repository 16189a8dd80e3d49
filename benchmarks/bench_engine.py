"""GPU benchmark of the engine against the hardware floor, in one run (< 8 minutes on an H100/H200).

    python benchmarks/bench_engine.py --out results.json          # 8B-shaped Llama, random bf16
    python benchmarks/bench_engine.py --tiny --out /tmp/t.json    # a tiny model, to check the script

Measures, on one card and in one process: copy bandwidth; plain-decode TPOT in specdec (CUDA graphs
and eager) against the floor (weight + KV bytes / measured bandwidth); transformers `generate` TPOT;
the step forward for 8/16/32/64-node trees as a multiple of a 1-token decode step; engine efficiency
(measured speedup / ideal speedup) with a replay proposer at tau = 2, 3, 4, 6; tokens/s at batch
1, 4, 16 with and without speculation; the cost of one speculative step of every proposer at this
shape (random drafters: the cost does not depend on the weights) and the speedup it predicts at the
tau measured on the trained demo pair. Every section records its error instead of stopping the run.
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
from specdec.devices import to_device
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
# the draft model of the drafting-cost section: Llama-3.2-1B's shape (the usual partner of an 8B)
ONE_B = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=128256,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
TINY_DRAFT = dict(
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=128,
    vocab_size=512,
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

    pipelined: draft from the step in flight on the device (`Proposer.pipelines`: the next tree is
    gathered from each row's reference at the position the step in flight ends at, its token count
    read on the device), as EAGLE, Medusa and the draft model do under graphs, so the engine
    launches step n + 1 before it reads step n back. Off: the host reads each step's tokens first.
    """

    name = "replay"

    def __init__(self, references: dict[tuple[int, ...], list[int]], tau: int, vocab: int, pipelined: bool = False):
        self.references, self.tau, self.vocab, self.pipelined = references, tau, vocab, pipelined
        self._rows: dict[int, tuple[int, torch.Tensor]] = {}  # seq id -> (prompt length, reference [G] on the device)

    @property
    def max_nodes(self) -> int:
        return self.tau + 1

    @property
    def pipelines(self) -> bool:
        return self.pipelined

    def _reference(self, h: list[int]) -> tuple[int, list[int]]:
        for prompt, ref in self.references.items():
            if tuple(h[: len(prompt)]) == prompt:
                return len(prompt), ref
        raise KeyError("replay proposer: unknown prompt")

    def prefill(self, seq_ids, prompts, features=None) -> None:
        for s, p in zip(seq_ids, prompts, strict=True):
            n, ref = self._reference(p.tolist())
            self._rows[s] = (n, torch.tensor(ref, device=DEV))

    def release(self, seq_ids) -> None:
        for s in seq_ids:
            self._rows.pop(s, None)

    def propose(self, ctx: ProposeContext) -> DraftTree:
        K = self.tau
        if ctx.ahead is not None:  # device only: the step in flight emits ahead.count tokens first
            refs = [self._rows[s][1] for s in ctx.seq_ids]
            L = min(len(r) for r in refs)
            table = torch.stack([r[:L] for r in refs])  # [B, L]
            base = torch.tensor([len(h) - self._rows[s][0] for s, h in zip(ctx.seq_ids, ctx.histories, strict=True)])
            # pinned, non-blocking copies (to_device): a pageable .to() would make the host wait for
            # the step in flight, and the next step would not be launched ahead of it
            done = to_device(base, DEV) + ctx.ahead.count  # [B] generated tokens once the step in flight lands
            idx = (done[:, None] + torch.arange(K, device=DEV)).clamp(max=L - 1)
            drafts = table.gather(1, idx)
            drafts[:, -1] = (drafts[:, -1] + 1) % self.vocab  # the last draft is wrong
            num = to_device(ctx.max_drafts.clamp(max=K), DEV)
            return DraftTree.chain(ctx.roots(), drafts, num_drafts=num)
        rows = []
        for h in ctx.histories:
            h = h.tolist()
            n, ref = self._reference(h)
            done = len(h) - n
            right = ref[done : done + self.tau - 1]
            rows.append(right + [(ref[min(done + self.tau - 1, len(ref) - 1)] + 1) % self.vocab])
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


def random_init(module: torch.nn.Module) -> None:
    """N(0, 0.02) matrices (a random model's activations stay finite through the drafters)."""
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)


def trained_taus() -> dict[str, float]:
    """tau at T = 0 on HumanEval of the trained demo pair (assets/demo/eval.json), per proposer."""
    from specdec.resources import demo_dir

    try:
        results = json.loads((demo_dir() / "eval.json").read_text())["results"]
    except FileNotFoundError:
        return {}
    return {k.split("/")[1]: v["tau"] for k, v in results.items() if k.startswith("HumanEval/") and k.endswith("/T0")}


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

    def plain_decode():
        rows = res["plain_decode"] = []
        for c in contexts:
            ids = prompts[c].to(DEV)
            floor = (weight_bytes + kv_bytes(cfg, c + args.new_tokens // 2)) / bw
            # (graphs, fused norm / MLP, pipelined, fused RoPE: read where the norm / MLP are fused)
            variants = [
                (True, True, True, True),
                (True, True, True, False),
                (True, False, True, False),
                (True, True, False, True),
                (True, False, False, False),
                (False, True, True, True),
            ]
            for graphs, fuse, pipeline, rope in variants if DEV.type == "cuda" else [(False,) * 4]:
                specdec.runtime.fusion.FUSE_ROPE = rope  # read when the engine's target first fuses
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
                        "fused_rope": fuse and rope,
                        "pipelined": pipeline,
                        "tpot_ms": tpot * 1e3,
                        "floor_ms": floor * 1e3,
                        "fraction_of_floor": floor / tpot,
                    }
                )

    @section("plain_decode")
    def _():
        try:
            plain_decode()
        finally:
            specdec.runtime.fusion.FUSE_ROPE = True  # the library's default for the sections after this one

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
        # one Engine, warmed up (Engine.warmup), then 20 prompts of different lengths: no call may pay
        # for a new pool or new graphs
        eng = Engine(model, None)
        t0 = time.perf_counter()
        warm_captures = eng.warmup(1024, 32)
        warm_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(64, 1024, (20,), generator=gen).tolist()
        tpots, captures = [], []
        for n in lengths:
            ids = torch.randint(0, V, (1, n), generator=gen).to(DEV)
            out = specdec.generate(model, ids, max_new_tokens=32, engine=eng, return_dict_in_generate=True)
            tpots.append(out.stats.tpot_ms)
            captures.append(out.stats.graph_captures)
        steady = sorted(tpots)[len(tpots) // 2]
        res["engine_reuse"] = {
            "warmup_s": warm_s,
            "warmup_captures": warm_captures,
            "captures_per_call": captures,
            "lengths": lengths,
            "tpot_ms": tpots,
            "worst_vs_median": max(tpots) / steady,
            "worst_after_first_vs_median": max(tpots[1:]) / steady,
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

    @section("drafting_cost")
    def _():
        # One speculative step of each proposer at this shape, batch 1, bf16, greedy: step time =
        # TPOT x tau (tokens per step), measured over a whole call after a warm-up call. The drafters
        # are random, so tau here is ~1 and says nothing; the step's cost barely depends on the
        # weights (EAGLE's catch-up covers the accepted path: <= 8 entries, one graph per bucket).
        # The speedup a trained drafter would give is tau_trained x plain step / this step.
        from specdec.heads.eagle import EagleDrafter
        from specdec.heads.medusa import MedusaConfig, MedusaHeads

        rows = res["drafting_cost"] = []
        c = contexts[0]
        taus = trained_taus()
        res["drafting_cost_trained_tau_source"] = "assets/demo/eval.json, HumanEval, T=0"
        draft_shape = TINY_DRAFT if args.tiny else ONE_B
        gen = torch.Generator().manual_seed(2)
        block = torch.randint(0, V, (64,), generator=gen)
        repeated = block.repeat(c // 64 + 1)[:c][None]  # n-gram lookup finds its matches in the prompt
        drafter_fields = dict(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
            vocab_size=V, num_hidden_layers=1, rms_norm_eps=cfg.rms_norm_eps,
        )  # fmt: skip
        dtype = next(model.parameters()).dtype

        def eagle(version: int, **kw):
            fields = dict(drafter_fields)
            if version == 3:
                fields.update(draft_vocab_size=min(32000, V), target_hidden_size=cfg.hidden_size)
                if args.tiny:  # EAGLE-3's default layers (2, L // 2, L - 3) need L >= 6
                    L = cfg.num_hidden_layers
                    fields["eagle_aux_hidden_state_layer_ids"] = [0, L // 2, L - 1]
            d = EagleDrafter(LlamaConfig(**fields), version=version).to(DEV, dtype)
            random_init(d)
            return specdec.Eagle(d, **kw)

        def draft_model(k: int):
            d = build_model(draft_shape)
            return specdec.DraftModel(d, num_tokens=k)

        def medusa(nodes: int):
            heads = MedusaHeads(MedusaConfig(3, 1, cfg.hidden_size, V, own_lm_head=False)).to(DEV, dtype)
            random_init(heads)
            return specdec.Medusa(heads, tree=nodes)

        cases = [
            ("none", "plain", lambda: None, prompts[c]),
            ("ngram", "Ngram(4)", lambda: specdec.Ngram(num_tokens=4), repeated),
            ("draft", f"DraftModel(4), {'tiny' if args.tiny else '1B'}-shaped draft", lambda: draft_model(4),
             prompts[c]),
            ("medusa", "Medusa(32), 3 heads", lambda: medusa(32), prompts[c]),
            ("eagle", "Eagle(6, 10, 60), EAGLE-1/2 drafter", lambda: eagle(1, depth=6, top_k=10, total_tokens=60),
             prompts[c]),
            ("eagle3", "Eagle(6, 10, 60), EAGLE-3 drafter (32k draft vocabulary)",
             lambda: eagle(3, depth=6, top_k=10, total_tokens=60), prompts[c]),
            ("eagle chain", "Eagle chain(5)", lambda: eagle(1, depth=5, chain=True), prompts[c]),
        ]  # fmt: skip
        plain_step = None
        for key, label, make, ids in cases:
            try:
                proposer = make()
                eng = Engine(model, proposer)
                specdec.generate(model, ids.to(DEV), max_new_tokens=24, engine=eng)  # capture
                out = specdec.generate(
                    model, ids.to(DEV), max_new_tokens=args.new_tokens, engine=eng, return_dict_in_generate=True
                )
            except Exception:
                errors[f"drafting_cost/{key}"] = traceback.format_exc()[-2000:]
                continue
            st = out.stats
            step = st.tpot_ms * st.tau
            plain_step = plain_step or step
            tau = taus.get(key)  # eval.json's proposer names (no chain row there)
            row = {
                "proposer": key,
                "label": label,
                "context": c,
                "step_ms": step,
                "x_plain_step": step / plain_step,
                "draft_ms_per_step": 1e3 * st.draft_time_s / max(st.steps, 1),
                "drafted_per_step": st.drafted / max(st.steps, 1),
                "tau_random": st.tau,
                "graph_captures_timed_call": st.graph_captures,
                "break_even_tau": step / plain_step,
            }
            if key != "none" and tau:
                row["tau_trained"] = tau
                row["predicted_speedup"] = tau * plain_step / step
            rows.append(row)
            del eng, proposer
            if DEV.type == "cuda":
                torch.cuda.empty_cache()

    def anchored(eng: Engine, ids: torch.Tensor, n: int, max_rounds: int = 30) -> tuple[torch.Tensor, int, bool]:
        """Re-anchor a Replay proposer on the target's own output: decode with the references, take
        what the target emitted as the new references, repeat until nothing changes (bf16 tree steps
        and 1-token steps round differently, so the plain output is not what a tree step confirms).
        At the fixed point every step accepts exactly tau - 1 drafts. -> (output, rounds, converged)."""
        c = ids.shape[1]
        for rounds in range(1, max_rounds + 1):
            out = specdec.generate(model, ids.to(DEV), max_new_tokens=n, engine=eng)
            new = {tuple(ids[b].tolist()): out[b, c:].tolist() for b in range(ids.shape[0])}
            if new == eng.proposer.references:
                return out, rounds, True
            eng.proposer.references = new
        return out, max_rounds, False

    @section("replay_bf16")
    def _():
        # engine efficiency and batching in bf16, with the replay proposer re-anchored (see anchored)
        rows = res["replay_bf16"] = []
        c = contexts[0]
        ids = prompts[c]
        plain = Engine(model, None)
        specdec.generate(model, ids.to(DEV), max_new_tokens=8, engine=plain)
        p = specdec.generate(
            model, ids.to(DEV), max_new_tokens=args.new_tokens, engine=plain, return_dict_in_generate=True
        )
        base_tps = p.stats.generated_tokens / p.stats.total_time_s
        first = {tuple(ids[0].tolist()): p.sequences[0, c:].tolist()}
        verify = {r["nodes"]: r["ms"] for r in res.get("verify_cost", []) if r["context"] == c}
        # efficiency: tokens/s (prefill included) over the ideal; decode_efficiency: TPOT (after the
        # first token) over the ideal, which counts decode steps only. pipelined: the replay drafts
        # from the step in flight on the device, as the library's captured proposers do
        for pipelined in (False, True):
            for tau in (2, 3, 4, 6):
                eng = Engine(model, Replay(dict(first), tau, V, pipelined=pipelined))
                _, rounds, converged = anchored(eng, ids, args.new_tokens)
                out = specdec.generate(
                    model, ids.to(DEV), max_new_tokens=args.new_tokens, engine=eng, return_dict_in_generate=True
                )
                tps = out.stats.generated_tokens / out.stats.total_time_s
                ratio = verify[node_bucket(tau + 1)] / verify[1] if verify else float("nan")
                ideal = out.stats.tau / ratio
                # an engine with no overhead still prefills as plain decoding does: the ideal call
                # time is plain's TTFT, then its decode steps at the tree step's cost, tau tokens each
                ideal_ms = p.stats.ttft_ms + (out.stats.generated_tokens - 1) * p.stats.tpot_ms * ratio / out.stats.tau
                rows.append(
                    {
                        "context": c, "tau_target": tau, "pipelined": pipelined, "tau": out.stats.tau,
                        "tokens_per_s": tps, "plain_tokens_per_s": base_tps, "speedup": tps / base_tps,
                        "ideal_speedup": ideal, "efficiency": (tps / base_tps) / ideal,
                        "tpot_ms": out.stats.tpot_ms, "plain_tpot_ms": p.stats.tpot_ms,
                        "decode_efficiency": (p.stats.tpot_ms / out.stats.tpot_ms) / ideal,
                        "prefill_ideal_efficiency": ideal_ms / (1e3 * out.stats.total_time_s),
                        "anchor_rounds": rounds, "converged": converged,
                    }
                )  # fmt: skip
        batch = res["batch_bf16"] = []
        for B in (1, 4, 16):
            ids = torch.randint(0, V, (B, 512), generator=torch.Generator().manual_seed(3))
            plain = Engine(model, None)
            specdec.generate(model, ids.to(DEV), max_new_tokens=8, engine=plain)
            p = specdec.generate(model, ids.to(DEV), max_new_tokens=64, engine=plain, return_dict_in_generate=True)
            refs = {tuple(ids[b].tolist()): p.sequences[b, 512:].tolist() for b in range(B)}
            eng = Engine(model, Replay(refs, 4, V, pipelined=True))
            _, rounds, converged = anchored(eng, ids, 64)
            s = specdec.generate(model, ids.to(DEV), max_new_tokens=64, engine=eng, return_dict_in_generate=True)
            batch.append(
                {
                    "batch": B, "context": 512, "pipelined": True, "plain_tokens_per_s": p.stats.tokens_per_s,
                    "spec_tokens_per_s": s.stats.tokens_per_s, "tau": s.stats.tau,
                    "speedup": s.stats.tokens_per_s / p.stats.tokens_per_s, "anchor_rounds": rounds,
                    "converged": converged,
                }
            )  # fmt: skip

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
            f"rope={r.get('fused_rope')!s:<5} pipelined={r.get('pipelined')!s:<5} TPOT {r['tpot_ms']:7.2f} ms"
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
            f"one Engine over 20 prompt lengths after Engine.warmup ({r.get('warmup_s', 0):.1f} s, "
            f"{r.get('warmup_captures', 0)} graphs): worst call TPOT / median = {r['worst_vs_median']:.2f}, "
            f"graphs captured in the calls {sum(r.get('captures_per_call', []))}"
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
    for r in res.get("drafting_cost", []):
        pred = (
            f" | trained tau {r['tau_trained']:.2f} -> predicted {r['predicted_speedup']:.2f}x plain"
            if "predicted_speedup" in r
            else ""
        )
        out.append(
            f"step of {r['label']:<55} {r['step_ms']:7.2f} ms = {r['x_plain_step']:.2f} x plain step "
            f"(drafted {r['drafted_per_step']:.1f}/step, break-even tau {r['break_even_tau']:.2f}){pred}"
        )
    for r in res.get("replay_efficiency", []):
        out.append(
            f"replay tau {r['tau']:.2f}: speedup {r['speedup']:.2f} / ideal {r['ideal_speedup']:.2f} = "
            f"efficiency {r['efficiency']:.2f} (identical to plain: {r.get('identical_to_plain')})"
        )
    for r in res.get("replay_bf16", []):
        out.append(
            f"replay bf16 pipelined={r.get('pipelined', False)!s:<5} (re-anchored in {r['anchor_rounds']} rounds, "
            f"converged {r['converged']}) tau {r['tau']:.2f}: speedup {r['speedup']:.2f} / ideal "
            f"{r['ideal_speedup']:.2f} = efficiency {r['efficiency']:.2f} (decode only, TPOT: "
            f"{r.get('decode_efficiency', float('nan')):.2f}; plain's prefill in the ideal: "
            f"{r.get('prefill_ideal_efficiency', float('nan')):.2f})"
        )
    for r in res.get("batch_bf16", []):
        out.append(
            f"batch {r['batch']:>2} bf16: plain {r['plain_tokens_per_s']:8.1f} tok/s | replay (tau {r['tau']:.2f}, "
            f"{r['anchor_rounds']} anchor rounds) {r['spec_tokens_per_s']:8.1f} tok/s | x{r['speedup']:.2f}"
        )
    for r in res.get("batch", []):
        out.append(
            f"batch {r['batch']:>2}: plain {r['plain_tokens_per_s']:8.1f} tok/s | spec (tau {r['tau']:.2f}) "
            f"{r['spec_tokens_per_s']:8.1f} tok/s | x{r['speedup']:.2f} (identical: {r.get('identical_to_plain')})"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
