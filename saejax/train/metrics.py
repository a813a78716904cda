"""The metrics log of a run: metrics.jsonl, the progress bar, optional wandb/TensorBoard.

metrics.jsonl keeps every fetched value under its plain name. The loggers people already use
get the same numbers under namespaced tags, with the step as the x-axis: `train/<metric>`
(loss, fvu, l0, dead_fraction, ...), `perf/tokens_per_s`, the feature-density histogram as
a histogram (`train/feature_density`), and after the run `val/<metric>` for the held-out
evaluation (`log_final`). Both also get the resolved config.

A resumed run holds each step once in metrics.jsonl: a run killed after its last checkpoint
had already logged steps it will train (and log) again, so on resume the lines after the
restored step, and a line torn by the kill, are dropped first (`drop_records_after`, one
atomic rewrite). Readers can take the file as it is.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import sys
import time
from urllib.parse import urlparse

import numpy as np
import yaml

from saejax import io
from saejax.config import to_dict
from saejax.errors import SaejaxError
from saejax.train.step import DENSITY_EDGES

WANDB_ID_FILE = "wandb_id"  # RUN/wandb_id: a resumed run continues the same wandb run
NOT_METRICS = ("step", "tokens", "steps", "density_edges")  # axes and labels, not curves
HISTOGRAMS = {"density_hist": "feature_density"}  # log10 firing frequency of each latent


def _plain(value):
    value = np.asarray(value)
    return value.tolist() if value.ndim else value.item()


def tags(record: dict, prefix: str) -> dict:
    """Numeric values of `record` under namespaced tags: `tokens_per_s` -> `perf/...`, the
    rest -> `{prefix}/...`; axes (step, tokens) and histograms left out."""
    out = {}
    for key, value in record.items():
        if key in NOT_METRICS or key in HISTOGRAMS:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"perf/{key}" if key.endswith("tokens_per_s") else f"{prefix}/{key}"] = value
    return out


def resolved_config(cfg, d_in: int | None = None) -> dict:
    """The config as a dict, with `sae.d_in` filled in from the data when it was left 0."""
    values = to_dict(cfg)
    if d_in and not values["sae"]["d_in"]:
        values["sae"]["d_in"] = int(d_in)
    return values


def has_wandb_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _import_wandb():
    """wandb, checked to be usable before anything of the run is written."""
    try:
        import wandb
    except ImportError:
        raise SaejaxError(
            "log.wandb is on but wandb is not installed: pip install 'saejax[wandb]'"
        ) from None
    mode = os.environ.get("WANDB_MODE", "")
    if mode not in ("offline", "disabled", "dryrun") and not has_wandb_credentials():
        raise SaejaxError(
            "log.wandb is on but wandb has no credentials: run `wandb login`, or set "
            "WANDB_MODE=offline to log locally and `wandb sync` later"
        )
    return wandb


def _import_summary_writer():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise SaejaxError(
            "log.tensorboard is on but tensorboardX is not installed: "
            "pip install 'saejax[tensorboard]'"
        ) from None
    return SummaryWriter


def _histogram(counts) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(counts, np.float64), np.asarray(DENSITY_EDGES, np.float64)


def _kept(line: str, step: int) -> bool:
    """A whole JSON line of a step up to `step` (lines without a step are kept)."""
    try:
        record = json.loads(line)
    except ValueError:  # torn by a kill in the middle of a write
        return False
    return not (isinstance(record, dict) and (record.get("step") or 0) > step)


def drop_records_after(path: str, step: int) -> int:
    """Drop the lines of metrics.jsonl logged after `step` (the checkpoint a run resumes
    from) and any torn line; the file is rewritten atomically, and only when something goes.
    Returns the number of lines dropped."""
    try:
        with open(path) as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    kept = [line for line in lines if line.endswith("\n") and _kept(line, step)]
    if len(kept) < len(lines):
        io.write_text(path, "".join(kept))
    return len(lines) - len(kept)


class MetricsLogger:
    """Writes one JSON line per fetch to run_dir/metrics.jsonl, updates the progress bar and
    mirrors the numbers to wandb/TensorBoard when `cfg.log` asks for them.

    Construct it before writing anything into the run directory: it raises a one-line
    SaejaxError when a requested logger cannot work (not installed, no wandb credentials).
    `d_in` fills in `sae.d_in` in the logged config when the config left it to the data.
    """

    def __init__(self, cfg, total_steps: int, start_step: int, d_in: int | None = None):
        wandb = _import_wandb() if cfg.log.wandb else None
        summary_writer = _import_summary_writer() if cfg.log.tensorboard else None
        self.cfg, self.total_steps = cfg, total_steps
        self.path = os.path.join(cfg.run_dir, "metrics.jsonl")
        drop_records_after(self.path, start_step)  # what a killed run logged past its checkpoint
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
        config = resolved_config(cfg, d_in)
        self.wandb = self.tensorboard = None
        if summary_writer is not None:
            # a resumed run drops what an earlier process logged after its last checkpoint
            self.tensorboard = summary_writer(
                os.path.join(cfg.run_dir, "tensorboard"),
                purge_step=start_step + 1 if start_step else None,
                # a new file per session, in order, even when two start in the same second
                filename_suffix=f".from_step_{start_step:012d}",
            )
            text = yaml.safe_dump(config, sort_keys=False)
            self.tensorboard.add_text(
                "config", "".join(f"    {line}\n" for line in text.splitlines()), start_step
            )
        if wandb is not None:
            id_path = os.path.join(cfg.run_dir, WANDB_ID_FILE)
            run_id = None
            if os.path.exists(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip()
            self.wandb = wandb.init(
                project=cfg.log.wandb_project,
                id=run_id or secrets.token_hex(6),
                resume="allow",
                config=config,
                dir=cfg.run_dir,
            )
            if not run_id:
                io.write_text(id_path, self.wandb.id + "\n")
            self._wandb_histogram = wandb.Histogram

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
        if self.bar is not None:
            self.bar.update(steps_done)
            self.bar.set_postfix(
                fvu=f"{record['fvu']:.3f}",
                l0=f"{record['l0']:.1f}",
                dead=f"{record['dead_fraction']:.1%}",
                refresh=False,
            )
        self._send(step, record, "train")
        return record

    def log_final(self, metrics: dict, step: int | None = None) -> None:
        """The held-out evaluation (eval.json's values) as `val/<metric>` at the last step."""
        step = self.last_step if step is None else step
        # throughput over the whole run: perf/run_tokens_per_s, beside the per-fetch figure
        record = {f"run_{k}" if k == "tokens_per_s" else k: _plain(v) for k, v in metrics.items()}
        self._send(step, record, "val")
        if self.wandb is not None:
            self.wandb.summary.update(tags(record, "val"))

    def _send(self, step: int, record: dict, prefix: str) -> None:
        scalars = tags(record, prefix)
        hists = {
            f"{prefix}/{name}": _histogram(record[key])
            for key, name in HISTOGRAMS.items()
            if key in record
        }
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
            for tag, (counts, edges) in hists.items():
                self._tensorboard_histogram(tag, counts, edges, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            values = dict(scalars)
            for tag, (counts, edges) in hists.items():
                values[tag] = self._wandb_histogram(np_histogram=(counts, edges))
            self.wandb.log(values, step=step)

    def _tensorboard_histogram(self, tag, counts, edges, step) -> None:
        if counts.sum() == 0:
            return  # every latent below the lowest bin (never fired in the window)
        centers = (edges[:-1] + edges[1:]) / 2
        self.tensorboard.add_histogram_raw(
            tag,
            min=float(edges[0]),
            max=float(edges[-1]),
            num=int(counts.sum()),
            sum=float(np.sum(centers * counts)),
            sum_squares=float(np.sum(centers**2 * counts)),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
