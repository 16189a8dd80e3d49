"""EAGLE training: a frozen target, a one-layer drafter trained on the target's own continuations.

Alignment (T positions, entry e = 0 .. T-2): the drafter reads token x_{e+1} and the target's
feature f_e, and predicts x_{e+2}, whose law is the target's p_{e+1} = softmax(lm_head(g_{e+1}))
(g: the target's final hidden state).

EAGLE-1/2 (`train_eagle(..., version 1)`): loss = SmoothL1(h_e, g_{e+1}) + 0.1 x CE(p_{e+1},
softmax(lm_head(h_e))), with uniform noise U(-noise, noise) on the input features (EAGLE-1).
EAGLE-3: the training-time test unrolls the drafter `ttt_steps` times on its own outputs: step i
reads x_{e+1+i} and its step-(i-1) hidden at e, attends to the step-0 keys of entries <= e and to
its own keys of steps 1..i at e (what a drafted node of depth i sees), and is scored with soft
cross-entropy against the target's p_{e+1+i} restricted to the draft vocabulary, weight 0.8^i.

Checkpoints are written every `checkpoint_every` steps; when held-out prompts are given, each one
is scored by the tau it reaches in greedy speculative decoding and the best is kept at out/best
(selection by measured tau, not by loss).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..heads.eagle import EagleDrafter, causal_attend, load_eagle
from ..runtime.hf import capture_features, decoder_layers
from ..validation import require_int
from .data import pad_batch
from .logging import Logger, NullLogger
from .medusa_trainer import _latest_checkpoint, _world
from .optim import OptimSettings, autocast, check_precision, clip, lr_at, set_lr


@dataclass(slots=True)
class EagleTrainConfig(OptimSettings):
    """Training settings; the schedule / clipping / accumulation / precision ones come from
    `training.optim.OptimSettings`."""

    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    noise: float = 0.2  # EAGLE-1: half-width of the uniform noise on input features
    feature_weight: float = 1.0  # EAGLE-1: SmoothL1 weight
    ce_weight: float = 0.1  # EAGLE-1: cross-entropy weight
    ttt_steps: int = 3  # EAGLE-3: unrolled steps of the training-time test
    step_decay: float = 0.8  # EAGLE-3: weight of unrolled step i
    checkpoint_every: int = 50
    log_every: int = 10
    eval_tokens: int = 32  # new tokens per held-out prompt when measuring tau
    eval_depth: int = 5
    eval_top_k: int = 8
    eval_total_tokens: int = 32
    seed: int = 0


def build_draft_vocab(sequences: list[torch.Tensor], vocab_size: int, draft_vocab_size: int) -> torch.Tensor:
    """The `draft_vocab_size` most frequent target ids in the training data, ascending [Vd] (ties:
    lower id first; ids never seen fill up the rest). EagleDrafter.set_vocab_map turns it into d2t / t2d."""
    if not 1 <= draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in [1, {vocab_size}], got {draft_vocab_size}")
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in sequences:
        counts += torch.bincount(s.long(), minlength=vocab_size)[:vocab_size].double()
    order = sorted(range(vocab_size), key=lambda t: (-counts[t].item(), t))
    return torch.tensor(sorted(order[:draft_vocab_size]))


@torch.no_grad()
def target_features(
    target: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, layers: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] -> (features [B, T, F] of `layers` (runtime.hf.capture_features), final hidden [B, T, H])."""
    L = len(decoder_layers(target))
    want = tuple(layers) + ((L,) if L not in layers else ())
    with capture_features(target, want) as read:
        target(input_ids=ids, attention_mask=mask)
        allf = read()
    H = allf.shape[-1] // len(want)
    feats = allf[..., : H * len(layers)]
    final = allf[..., H * want.index(L) : H * (want.index(L) + 1)]
    return feats, final


class _TTTAttend:
    """Attention of the training-time test: step-0 keys causally, each later step's key at its own
    position only (a drafted node sees the committed prefix and its ancestors)."""

    def __init__(self):
        self.ks: list[torch.Tensor] = []
        self.vs: list[torch.Tensor] = []

    def __call__(self, module, q, k, v):
        self.ks.append(k)
        self.vs.append(v)
        B, Hq, T, _ = q.shape
        rep = Hq // k.shape[1]
        ks = [x.repeat_interleave(rep, 1) for x in self.ks]
        vs = [x.repeat_interleave(rep, 1) for x in self.vs]
        s0 = (q @ ks[0].transpose(-1, -2)) * module.scaling  # [B, Hq, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        s0 = s0.masked_fill(~causal, float("-inf"))
        diag = [(q * kj).sum(-1, keepdim=True) * module.scaling for kj in ks[1:]]  # [B, Hq, T, 1] each
        attn = torch.softmax(torch.cat([s0, *diag], -1).float(), -1).to(q.dtype)
        out = attn[..., :T] @ vs[0]
        for j, vj in enumerate(vs[1:]):
            out = out + attn[..., T + j : T + j + 1] * vj
        return out.transpose(1, 2)


def _shift(x: torch.Tensor, i: int, fill=0) -> torch.Tensor:
    """x[:, i:] padded back to x's length with `fill` (dim 1)."""
    if i == 0:
        return x
    pad = torch.full_like(x[:, :i], fill)
    return torch.cat([x[:, i:], pad], 1)


def eagle_loss(
    drafter: torch.nn.Module,
    version: int,
    embed: torch.nn.Module,
    lm_head_weight: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    feats: torch.Tensor,
    final: torch.Tensor,
    cfg: EagleTrainConfig,
    draft_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """ids / mask [B, T], feats [B, T, F], final [B, T, H] -> (loss, metrics). See the module doc."""
    B, T = ids.shape
    E = T - 1
    with torch.no_grad():
        emb_all = embed(ids).float()  # [B, T, H]
        logits_t = F.linear(final.float(), lm_head_weight.float())  # [B, T, V]: target logits
    valid = mask[:, 1:].bool()  # entry e has a target p_{e+1}
    positions = torch.arange(E, device=ids.device).expand(B, E)
    metrics = {}
    if version == 1:
        x = feats[:, :E].float()
        if cfg.noise > 0:
            x = x + (torch.rand_like(x) * 2 - 1) * cfg.noise
        h = drafter(emb_all[:, 1:], x, positions, causal_attend)
        goal = final[:, 1:].float()
        fl = F.smooth_l1_loss(h[valid], goal[valid])
        p = torch.softmax(logits_t[:, 1:], -1)[valid]
        logp = torch.log_softmax(F.linear(h, lm_head_weight.float())[valid], -1)
        ce = -(p * logp).sum(-1).mean()
        loss = cfg.feature_weight * fl + cfg.ce_weight * ce
        with torch.no_grad():
            metrics["feature_loss"], metrics["ce"] = fl.item(), ce.item()
            metrics["top1"] = (logp.argmax(-1) == p.argmax(-1)).float().mean().item()
        metrics["loss"] = loss.item()
        return loss, metrics
    attend = _TTTAttend()
    loss = feats.new_zeros((), dtype=torch.float32)
    h = feats[:, :E].float()
    for i in range(cfg.ttt_steps):
        ok = _shift(valid, i, False)  # p_{e+1+i} exists
        if not ok.any():
            break
        tok_emb = _shift(emb_all[:, 1:], i)
        h = drafter(tok_emb, h, positions + i, attend, from_target=(i == 0))
        logp = torch.log_softmax(drafter.logits(h).float(), -1)  # [B, E, Vd]
        p = torch.softmax(_shift(logits_t[:, 1:], i), -1)[..., draft_ids]
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
        ce = -(p[ok] * logp[ok]).sum(-1).mean()
        loss = loss + cfg.step_decay**i * ce
        with torch.no_grad():
            metrics[f"step{i}/ce"] = ce.item()
            metrics[f"step{i}/top1"] = (logp[ok].argmax(-1) == p[ok].argmax(-1)).float().mean().item()
    metrics["loss"] = loss.item()
    return loss, metrics


def _stack_padded(rows: list[torch.Tensor], T: int) -> torch.Tensor:
    """[L_i, F] rows -> [B, T, F], zero-padded at the end."""
    return torch.stack([F.pad(x, (0, 0, 0, T - x.shape[0])) for x in rows])


def cache_features(target, sequences: list[torch.Tensor], layers: tuple[int, ...], path: str | Path) -> None:
    """Offline option: the target's features and final hidden states of every sequence, to safetensors."""
    device = next(target.parameters()).device
    out = {}
    for i, s in enumerate(tqdm(sequences, desc="target features")):
        ids = s[None].to(device)
        f, g = target_features(target, ids, torch.ones_like(ids), layers)
        out[f"f{i}"], out[f"g{i}"] = f[0].cpu().contiguous(), g[0].cpu().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))


@torch.no_grad()
def measure_tau(target, drafter: EagleDrafter, prompts: list[torch.Tensor], cfg: EagleTrainConfig) -> float:
    """Greedy speculative decoding on held-out prompts with an EAGLE-2 tree: tokens per target forward."""
    import specdec

    proposer = specdec.Eagle(
        drafter, depth=cfg.eval_depth, top_k=min(cfg.eval_top_k, drafter.draft_vocab_size),
        total_tokens=cfg.eval_total_tokens,
    )  # fmt: skip
    device = next(target.parameters()).device
    stats = []
    for p in prompts:
        out = specdec.generate(
            target, p[None].to(device), proposer=proposer, max_new_tokens=cfg.eval_tokens, return_dict_in_generate=True
        )
        stats.append(out.stats)
    return specdec.SpecStats.merge(stats).tau


def train_eagle(
    target: torch.nn.Module,
    drafter: EagleDrafter,
    sequences: list[torch.Tensor],
    out: str | Path,
    cfg: EagleTrainConfig,
    logger: Logger | None = None,
    eval_prompts: list[torch.Tensor] | None = None,
    feature_cache: str | Path | None = None,
) -> EagleDrafter:
    """Train `drafter` on `sequences` ([L_i] ids); checkpoints at out/checkpoint-<step> (resumed from
    the latest), the last weights at out/final and, with eval_prompts, the best-tau ones at out/best
    (out/best/selection.json records every checkpoint's tau). feature_cache: a file written by
    `cache_features` (or written now when missing) instead of running the target every step."""
    out = Path(out)
    logger = logger or NullLogger()
    rank, world = _world()
    device = next(target.parameters()).device
    target.eval().requires_grad_(False)
    L = len(decoder_layers(target))
    layers = drafter.feature_layers(L)
    embed, lm_w = target.get_input_embeddings(), target.get_output_embeddings().weight
    drafter.to(device=device, dtype=torch.float32).train()
    draft_ids = drafter.target_ids(torch.arange(drafter.draft_vocab_size, device=device))
    cached = None
    if feature_cache is not None:
        if rank == 0 and not Path(feature_cache).exists():
            cache_features(target, sequences, layers, feature_cache)
        if world > 1:
            dist.barrier()
        cached = load_file(str(feature_cache))
    start = 0
    latest = _latest_checkpoint(out)
    if latest is not None:
        drafter.load_state_dict(load_eagle(latest).to(device).state_dict())
        start = json.loads((latest / "trainer_state.json").read_text())["step"]
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if latest is not None:
        opt.load_state_dict(torch.load(latest / "optimizer.pt", map_location=device, weights_only=True))
        if rank == 0:
            print(f"resumed from step {start} ({latest})", flush=True)
    history = json.loads((out / "best" / "selection.json").read_text()) if (out / "best").exists() else {}
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    index = list(range(rank, len(sequences), world)) or list(range(len(sequences)))
    mine = [sequences[i] for i in index]
    bar = tqdm(
        range(start, cfg.steps), disable=rank != 0, desc=f"eagle{drafter.version}", initial=start, total=cfg.steps
    )  # under torchrun: same initial weights on every rank (same seed), gradients averaged every step
    require_int("accumulation", cfg.accumulation, 1, "micro-batches per optimiser step")
    check_precision(cfg.precision)
    for step in bar:
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio))
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.accumulation):  # each micro-batch's loss scaled so the step sees their mean
            pick = torch.randint(0, len(mine), (cfg.batch_size,), generator=g).tolist()
            ids, mask = pad_batch([mine[i] for i in pick])
            ids, mask = ids.to(device), mask.to(device)
            if cached is None:
                feats, final = target_features(target, ids, mask, layers)
            else:
                feats = _stack_padded([cached[f"f{index[i]}"] for i in pick], ids.shape[1]).to(device)
                final = _stack_padded([cached[f"g{index[i]}"] for i in pick], ids.shape[1]).to(device)
            with autocast(device, cfg.precision):
                loss, metrics = eagle_loss(
                    drafter, drafter.version, embed, lm_w, ids, mask, feats, final, cfg, draft_ids
                )
            (loss / cfg.accumulation).backward()
        if world > 1:  # data parallel by hand: the training-time test runs several forwards per step,
            _average_gradients(drafter, world)  # which DistributedDataParallel's reducer does not allow
        norm = clip(drafter.parameters(), cfg.grad_clip)
        opt.step()
        metrics["lr"] = opt.param_groups[0]["lr"]
        if norm is not None:
            metrics["grad_norm"] = norm
        done = step + 1
        if rank == 0:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                logger.log(metrics, done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                ckpt = out / f"checkpoint-{done}"
                _save(drafter, opt, ckpt, done)
                if eval_prompts:  # a copy: decoding casts the drafter to the target's dtype
                    tau = measure_tau(target, copy.deepcopy(drafter).eval(), eval_prompts, cfg)
                    logger.log({"eval/tau": tau}, done)
                    best = max(history.values(), default=0.0)
                    history[ckpt.name] = tau
                    if tau > best:
                        drafter.save_pretrained(out / "best")
                    (out / "best").mkdir(parents=True, exist_ok=True)
                    (out / "best" / "selection.json").write_text(json.dumps(history, indent=1))
    if rank == 0:
        drafter.save_pretrained(out / "final")
    if world > 1:
        dist.barrier()
    return drafter


def _average_gradients(module: torch.nn.Module, world: int) -> None:
    """All-reduce (mean) every gradient across the process group, in one flat buffer."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def _save(drafter: EagleDrafter, opt, path: Path, step: int) -> None:
    drafter.save_pretrained(path)
    torch.save(opt.state_dict(), path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
