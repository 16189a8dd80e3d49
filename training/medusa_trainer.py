"""Medusa-1 training: a frozen target, heads trained on its own continuations.

Head k at position t predicts token t + k + 2 (the target's lm_head predicts t + 1); the loss is
sum_k 0.8^k CE_k, as in the Medusa paper. Runs alone or under torchrun (DDP; gloo on the CPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..heads.medusa import MedusaHeads, load_medusa
from ..validation import require_int
from .data import pad_batch
from .logging import Logger, NullLogger
from .optim import OptimSettings, autocast, check_precision, clip, lr_at, set_lr


@dataclass(slots=True)
class TrainConfig(OptimSettings):
    """Training settings; the schedule / clipping / accumulation / precision ones come from
    `training.optim.OptimSettings`."""

    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    head_decay: float = 0.8  # loss weight of head k: head_decay ** k
    top_k: int = 5  # also report top-k accuracy
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def target_hidden(target: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] the target's final hidden states (after the final norm: what its lm_head sees)."""
    base = getattr(target, target.base_model_prefix)
    with torch.no_grad():
        return base(input_ids=ids, attention_mask=mask).last_hidden_state


def medusa_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, decay: float, top_k: int):
    """logits [B, T, K, V], ids / mask [B, T] -> (loss, metrics). Head k's label at t is ids[t + k + 2]."""
    B, T, K, V = logits.shape
    loss = logits.new_zeros(())
    metrics = {}
    for k in range(K):
        shift = k + 2
        if T <= shift:
            break
        pred = logits[:, : T - shift, k].float()
        label = ids[:, shift:]
        valid = mask[:, shift:].bool() & mask[:, : T - shift].bool()
        ce = F.cross_entropy(pred[valid], label[valid])
        loss = loss + decay**k * ce
        with torch.no_grad():
            top = pred[valid].topk(min(top_k, V), dim=-1).indices
            metrics[f"head{k}/loss"] = ce.item()
            metrics[f"head{k}/top1"] = (top[:, 0] == label[valid]).float().mean().item()
            metrics[f"head{k}/top{top_k}"] = (top == label[valid][:, None]).any(-1).float().mean().item()
    metrics["loss"] = loss.item()
    return loss, metrics


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def train_medusa(
    target: torch.nn.Module,
    heads: MedusaHeads,
    sequences: list[torch.Tensor],
    out: str | Path,
    cfg: TrainConfig,
    logger: Logger | None = None,
) -> MedusaHeads:
    """Train `heads` on `sequences` ([L_i] token ids), checkpointing to out/checkpoint-<step> and
    resuming from the latest one; the result is saved to out/final. Returns the trained heads."""
    out = Path(out)
    logger = logger or NullLogger()
    rank, world = _world()
    device = next(target.parameters()).device
    target.eval().requires_grad_(False)
    lm_head = target.get_output_embeddings()
    heads.to(device=device, dtype=torch.float32).train()
    start = 0
    latest = _latest_checkpoint(out)
    if latest is not None:
        heads.load_state_dict(load_medusa(latest, heads.config.hidden_size, heads.config.vocab_size).state_dict())
        start = json.loads((latest / "trainer_state.json").read_text())["step"]
    model = heads
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(heads)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if latest is not None:
        opt.load_state_dict(torch.load(latest / "optimizer.pt", map_location=device, weights_only=True))
        if rank == 0:
            print(f"resumed from step {start} ({latest})", flush=True)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # each rank its own batches
    mine = sequences[rank::world] or sequences
    bar = tqdm(range(start, cfg.steps), disable=rank != 0, desc="medusa", initial=start, total=cfg.steps)
    require_int("accumulation", cfg.accumulation, 1, "micro-batches per optimiser step")
    check_precision(cfg.precision)
    for step in bar:
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio))
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.accumulation):  # each micro-batch's loss scaled so the step sees their mean
            pick = torch.randint(0, len(mine), (cfg.batch_size,), generator=g).tolist()
            ids, mask = pad_batch([mine[i] for i in pick])
            ids, mask = ids.to(device), mask.to(device)
            hidden = target_hidden(target, ids, mask).float()
            with autocast(device, cfg.precision):
                logits = model(hidden, lambda h: F.linear(h, lm_head.weight.float()))
                loss, metrics = medusa_loss(logits.float(), ids, mask, cfg.head_decay, cfg.top_k)
            (loss / cfg.accumulation).backward()
        norm = clip(heads.parameters(), cfg.grad_clip)
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
                _save(heads, opt, out / f"checkpoint-{done}", done)
    if rank == 0:
        heads.save_pretrained(out / "final")
    if world > 1:
        dist.barrier()
    return heads


def _save(heads: MedusaHeads, opt, path: Path, step: int) -> None:
    heads.save_pretrained(path)
    torch.save(opt.state_dict(), path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))


def init_distributed() -> None:
    """Join the torchrun process group when launched by torchrun (gloo on the CPU, nccl on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
