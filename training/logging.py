"""Training loggers behind one small protocol: null (default), stdout, wandb (offline unless configured)."""

from __future__ import annotations

import json
import sys
from typing import Protocol


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class StdoutLogger:
    """One JSON line per call, written through tqdm so that it lands above a running progress bar
    (the bar is on stderr) instead of breaking it."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def log(self, metrics: dict[str, float], step: int) -> None:
        from tqdm import tqdm

        line = json.dumps({"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}})
        tqdm.write(line, file=self.stream)

    def close(self) -> None:
        self.stream.flush()


class WandbLogger:
    """A real wandb run; mode "offline" (the default) writes under `dir` and needs no account."""

    def __init__(
        self,
        project: str = "specdec",
        name: str | None = None,
        mode: str = "offline",
        dir: str | None = None,
        config: dict | None = None,
    ):
        import wandb

        self.run = wandb.init(project=project, name=name, mode=mode, dir=dir, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(kind: str, **kwargs) -> Logger:
    if kind in ("null", "none", None):
        return NullLogger()
    if kind == "stdout":
        return StdoutLogger()
    if kind == "wandb":
        return WandbLogger(**kwargs)
    raise ValueError(f"unknown logger {kind!r}; choose null, stdout or wandb")


def stage(msg: str) -> None:
    """One timestamped progress line of a long recipe (stdout, flushed)."""
    import time

    print(f"[lm {time.strftime('%H:%M:%S')}] {msg}", flush=True)
