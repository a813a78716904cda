"""The metrics log of a run: metrics.jsonl, the progress bar, optional wandb/TensorBoard."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from saejax.train.step import DENSITY_EDGES


def _plain(value):
    value = np.asarray(value)
    return value.tolist() if value.ndim else value.item()


class MetricsLogger:
    """Writes one JSON line per fetch to run_dir/metrics.jsonl and updates the progress bar."""

    def __init__(self, cfg, total_steps: int, start_step: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.path = os.path.join(cfg.run_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.batch_size = cfg.train.batch_size
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.bar = None
        if cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                desc="train",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 15,
            )
        self.wandb = self.tensorboard = None
        if cfg.log.wandb:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=cfg.log.wandb_project,
                    config=_config_dict(cfg),
                    dir=cfg.run_dir,
                    resume="allow",
                )
            except ImportError:
                print(
                    "saejax: log.wandb is on but wandb is not installed; skipping it",
                    file=sys.stderr,
                )
        if cfg.log.tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))
            except ImportError:
                print("saejax: log.tensorboard needs tensorboardX; skipping it", file=sys.stderr)

    def log(self, step: int, metrics: dict) -> dict:
        now = time.perf_counter()
        record = {k: _plain(v) for k, v in metrics.items()}
        record["step"] = step
        record["tokens"] = step * self.batch_size
        steps_done = step - self.last_step
        record["tokens_per_s"] = steps_done * self.batch_size / max(now - self.last_time, 1e-9)
        record["density_edges"] = list(DENSITY_EDGES)
        self.last_time, self.last_step = now, step
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        if self.bar is not None:
            self.bar.update(steps_done)
            self.bar.set_postfix(
                fvu=f"{record['fvu']:.3f}",
                l0=f"{record['l0']:.1f}",
                dead=f"{record['dead_fraction']:.1%}",
                refresh=False,
            )
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
        return record

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _config_dict(cfg):
    from saejax.config import to_dict

    return to_dict(cfg)
