"""Entry point: `python -m specdec.training.train head=medusa target=PATH data=PATH out=DIR`.

Hydra composes conf/ (groups head, optim, logger); everything below the entry point takes typed
arguments. Under `torchrun --nproc_per_node N` the heads train with DDP.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..heads.medusa import MedusaConfig, MedusaHeads
from .data import distill, load_sequences, read_prompts
from .logging import make_logger
from .medusa_trainer import TrainConfig, _world, init_distributed, train_medusa


def run(cfg: DictConfig) -> Path:
    if cfg.head.name != "medusa":
        raise ValueError(f"head={cfg.head.name!r} is not available yet; choose head=medusa")
    init_distributed()
    rank, world = _world()
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    target_path = Path(cfg.target)
    if not (target_path / "config.json").exists():
        raise FileNotFoundError(f"target={target_path} is not a model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path).to(device).eval()
    out = Path(cfg.out)
    cache = Path(cfg.cache) if cfg.cache else out / "distill.safetensors"
    if rank == 0:
        prompts = read_prompts(cfg.data, cfg.limit)
        distill(
            target,
            tokenizer,
            prompts,
            cfg.max_prompt_tokens,
            cfg.max_new_tokens,
            cache,
            do_sample=cfg.sample,
            seed=cfg.seed,
        )
    if world > 1:
        torch.distributed.barrier()
    sequences = load_sequences(cache)
    torch.manual_seed(cfg.seed)
    heads = MedusaHeads(
        MedusaConfig(
            num_heads=cfg.head.num_heads,
            num_layers=cfg.head.num_layers,
            hidden_size=target.config.hidden_size,
            vocab_size=target.get_output_embeddings().weight.shape[0],
            own_lm_head=cfg.head.own_lm_head,
        )
    )
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    kind = logger_cfg.pop("kind")
    if kind == "wandb":
        logger_cfg["config"] = OmegaConf.to_container(cfg, resolve=True)
    logger = make_logger(kind if rank == 0 else "none", **(logger_cfg if rank == 0 else {}))
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
    if world > 1:
        torch.distributed.destroy_process_group()
    return out / "final"


@hydra.main(version_base=None, config_path="pkg://specdec.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
