"""Entry point: `python -m specdec.training.train head=medusa|eagle|eagle3 target=PATH data=PATH out=DIR`.

Hydra composes conf/ (groups head, optim, logger); everything below the entry point takes typed
arguments. Under `torchrun --nproc_per_node N` the heads train with DDP.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from ..heads.eagle import EagleDrafter
from ..heads.medusa import MedusaConfig, MedusaHeads
from ..hub import resolve
from ..prompts import encode
from ..validation import require_int
from .data import distill, load_sequences, read_prompts
from .eagle_trainer import EagleTrainConfig, build_draft_vocab, train_eagle
from .logging import make_logger
from .medusa_trainer import TrainConfig, _world, init_distributed, train_medusa
from .optim import check_precision, lr_at

HEADS = ("medusa", "eagle", "eagle3")


def eagle_drafter(
    target: torch.nn.Module,
    version: int,
    sequences,
    draft_vocab_size: int = 2048,
    aux_layers=None,
    head_from_target: bool = True,
) -> EagleDrafter:
    """A fresh drafter shaped like one layer of the target (EAGLE-3: with the data's draft vocabulary;
    with `head_from_target`, its lm_head starts as the target's rows of that vocabulary and its final
    norm as the target's, rather than at random)."""
    tc = target.config
    V = target.get_output_embeddings().weight.shape[0]
    fields = dict(
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        hidden_act=getattr(tc, "hidden_act", "silu"),
        rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
        max_position_embeddings=getattr(tc, "max_position_embeddings", 4096),
        vocab_size=V,
        num_hidden_layers=1,
    )
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None)
    if isinstance(rope, dict):
        fields["rope_parameters"] = dict(rope)
    if version == 3:
        fields["draft_vocab_size"] = min(int(draft_vocab_size), V)
        fields["target_hidden_size"] = tc.hidden_size
        if aux_layers is not None:
            fields["eagle_aux_hidden_state_layer_ids"] = [int(i) for i in aux_layers]
    drafter = EagleDrafter(LlamaConfig(**fields), version=version)
    if version == 3:
        drafter.set_vocab_map(build_draft_vocab(sequences, V, fields["draft_vocab_size"]))
        if head_from_target:
            warm_start_eagle3_head(drafter, target)
    return drafter


@torch.no_grad()
def warm_start_eagle3_head(drafter: EagleDrafter, target: torch.nn.Module) -> None:
    """Copy the target's lm_head rows of the drafter's draft vocabulary ([Vd, H] of [V, H]) into the
    drafter's lm_head, and the target's final RMSNorm weight into the drafter's norm (when the target
    has one of the drafter's width). The drafter's last hidden state is trained to play the part of the
    target's, so the target's read-out is a start that already ranks tokens the way the target does."""
    weight = target.get_output_embeddings().weight
    head = drafter.lm_head.weight
    if weight.shape[1] != head.shape[1]:
        raise ValueError(
            f"the target's lm_head has width {weight.shape[1]}, the drafter's {head.shape[1]}: "
            "set head_from_target=false for a drafter narrower than its target"
        )
    ids = drafter.target_ids(torch.arange(drafter.draft_vocab_size, device=drafter.d2t.device))
    head.copy_(weight[ids.to(weight.device)].to(device=head.device, dtype=head.dtype))
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else None
    norm_weight = getattr(getattr(decoder, "norm", None), "weight", None)
    if norm_weight is not None and norm_weight.shape == drafter.norm.weight.shape:
        drafter.norm.weight.copy_(norm_weight.to(drafter.norm.weight))


def _optim_fields(cfg: DictConfig) -> dict:
    """The schedule / clipping / accumulation settings of the optim group and the precision (older
    configs: defaults)."""
    o = cfg.optim
    fields = dict(
        warmup_steps=int(o.get("warmup_steps", 0)),
        schedule=str(o.get("schedule", "constant")),
        min_lr_ratio=float(o.get("min_lr_ratio", 0.0)),
        grad_clip=float(o.get("grad_clip", 0.0)),
        accumulation=int(o.get("accumulation", 1)),
    )
    # checked before the (long) distillation, not at the first training step
    lr_at(0, 1, 1.0, fields["warmup_steps"], fields["schedule"], fields["min_lr_ratio"])
    fields["precision"] = check_precision(str(cfg.get("precision", "fp32")))
    require_int("optim.accumulation", fields["accumulation"], 1, "micro-batches per optimiser step")
    if fields["grad_clip"] < 0:
        raise ValueError(f"optim.grad_clip={fields['grad_clip']} must be >= 0 (0: no clipping)")
    return fields


def save_run_config(cfg: DictConfig, out: Path) -> None:
    """The resolved configuration (config.yaml) and the command-line overrides (overrides.yaml, when
    run through hydra) in the run folder: what made this run, next to what it made."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # called as a function, not through hydra's entry point
        return
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))


def record_base_model(folder: Path, target: str, revision: str | None, resolved: Path) -> None:
    """Name the target the heads were trained for in their config.json (`base_model`: the path or
    Hub id as given, its revision, and the folder it resolved to)."""
    path = folder / "config.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    data["base_model"] = {"name_or_path": str(target), "revision": revision, "resolved": str(resolved)}
    path.write_text(json.dumps(data, indent=1))


def run(cfg: DictConfig) -> Path:
    if cfg.head.name not in HEADS:
        raise ValueError(f"head={cfg.head.name!r} is not a known head; choose one of {', '.join(HEADS)}")
    _optim_fields(cfg)  # bad optimiser settings fail now, before the distillation
    init_distributed()
    rank, world = _world()
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    revision = cfg.get("target_revision")
    target_path = resolve(cfg.target, revision)  # a folder, or a Hub id through huggingface_hub's cache
    if not (target_path / "config.json").exists():
        raise FileNotFoundError(f"target={target_path} is not a model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path).to(device).eval()
    out = Path(cfg.out)
    if rank == 0:
        save_run_config(cfg, out)
    cache = Path(cfg.cache) if cfg.cache else out / "distill.safetensors"
    eval_n = int(cfg.head.get("eval_prompts", 0) or 0)
    all_prompts = read_prompts(cfg.data, cfg.limit + eval_n if cfg.limit else None)
    if eval_n and len(all_prompts) <= eval_n:
        raise ValueError(f"{cfg.data} has {len(all_prompts)} prompts; need more than head.eval_prompts={eval_n}")
    prompts, held_out = (all_prompts[:-eval_n], all_prompts[-eval_n:]) if eval_n else (all_prompts, [])
    if rank == 0:
        distill(
            target,
            tokenizer,
            prompts,
            cfg.max_prompt_tokens,
            cfg.max_new_tokens,
            cache,
            do_sample=cfg.sample,
            seed=cfg.seed,
            batch_size=int(cfg.get("distill_batch_size", 8)),
        )
    if world > 1:
        torch.distributed.barrier()
    sequences = load_sequences(cache)
    torch.manual_seed(cfg.seed)
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    kind = logger_cfg.pop("kind")
    if kind == "wandb":
        logger_cfg["config"] = OmegaConf.to_container(cfg, resolve=True)
    logger = make_logger(kind if rank == 0 else "none", **(logger_cfg if rank == 0 else {}))
    if cfg.head.name in ("eagle", "eagle3"):
        drafter = eagle_drafter(
            target,
            int(cfg.head.version),
            sequences,
            cfg.head.get("draft_vocab_size", 2048),
            cfg.head.get("aux_layers"),
            bool(cfg.head.get("head_from_target", True)),
        )
        h = cfg.head
        train_cfg = EagleTrainConfig(
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            noise=h.get("noise", 0.2),
            feature_weight=h.get("feature_weight", 1.0),
            ce_weight=h.get("ce_weight", 0.1),
            ttt_steps=h.get("ttt_steps", 3),
            step_decay=h.get("step_decay", 0.8),
            checkpoint_every=cfg.checkpoint_every,
            log_every=cfg.log_every,
            eval_tokens=h.eval_tokens,
            eval_depth=h.eval_depth,
            eval_top_k=h.eval_top_k,
            eval_total_tokens=h.eval_total_tokens,
            seed=cfg.seed,
            **_optim_fields(cfg),
        )
        eval_ids = [encode(tokenizer, p, cfg.max_prompt_tokens)[0] for p in held_out]
        try:
            drafter = train_eagle(
                target, drafter, sequences, out, train_cfg, logger, [e for e in eval_ids if len(e)], h.feature_cache
            )
        finally:
            logger.close()
        if cfg.save_rank_weights:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in drafter.state_dict().items()},
                str(out / f"rank{rank}.safetensors"),
            )
        if rank == 0:
            for folder in (out / "final", out / "best"):
                record_base_model(folder, cfg.target, revision, target_path)
        if world > 1:
            torch.distributed.destroy_process_group()
        return out / ("best" if eval_n else "final")
    heads = MedusaHeads(
        MedusaConfig(
            num_heads=cfg.head.num_heads,
            num_layers=cfg.head.num_layers,
            hidden_size=target.config.hidden_size,
            vocab_size=target.get_output_embeddings().weight.shape[0],
            own_lm_head=cfg.head.own_lm_head,
        )
    )
    train_cfg = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        head_decay=cfg.head.head_decay,
        top_k=cfg.head.top_k,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        seed=cfg.seed,
        **_optim_fields(cfg),
    )
    try:
        heads = train_medusa(target, heads, sequences, out, train_cfg, logger)
    finally:
        logger.close()
    if cfg.save_rank_weights:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
            str(out / f"rank{rank}.safetensors"),
        )
    if rank == 0:
        record_base_model(out / "final", cfg.target, revision, target_path)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out / "final"


@hydra.main(version_base=None, config_path="pkg://specdec.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
