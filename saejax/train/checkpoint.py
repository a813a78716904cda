"""Orbax checkpoints of the whole training state, plus a small JSON sidecar.

A checkpoint holds parameters, optimizer state, step, RNG, dead-latent counters and
metric windows (the TrainState pytree) and, as JSON, the SAE shape it was written
for. The data position is the step itself (batch b is a pure function of the seed
and b), so restoring the state restores the data position. Orbax writes each
checkpoint to a temporary folder and renames it when complete, so a kill -9 in the
middle of a save leaves the previous checkpoint intact.

Saving a step that is already saved is a no-op: a run stopped (or killed) at a checkpoint
step, or one resumed at its final step to finish, saves that step again. The sidecar also
records which data the run trains on (`data_identity`), so a resume on a store that has
changed since is refused unless forced.

A save that fails for want of space (orbax writes in the background, so the error surfaces at
the next save or wait) is one SaejaxError naming the checkpoint kept. The unfinished save is
a temporary folder, never taken for a checkpoint; the next run removes it before it starts
(not at the failure, where orbax's writers may still be at work in it; and not by orbax's own
background cleanup, which races a new save of the same step), and the same resume works once
space is freed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from saejax.errors import SaejaxError, disk_full
from saejax.train.data import split_rows

DATA_KEYS = ("data_rows", "train_rows", "validation_rows")  # absent from older checkpoints


def data_identity(source, data_cfg) -> dict:
    """The rows a run trains and validates on: the store's complete rows (meta n_tokens, or
    the array's length) and the train/validation split."""
    split = split_rows(source.n_rows, data_cfg.validation_tokens, source.store)
    return {
        "data_rows": int(source.n_rows),
        "train_rows": split.train_rows,
        "validation_rows": split.validation_rows,
    }


class _QuietDiskFull(logging.Filter):
    """orbax logs a failed background write, with its traceback, from each thread it passes
    through; the Checkpointer reports it once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (disk_full(error) or disk_full(ValueError(record.getMessage())))


for _logger in ("absl", "asyncio"):  # asyncio: orbax's write tasks whose error went unread
    logging.getLogger(_logger).addFilter(_QuietDiskFull())
# ... and those of its write coroutines that a failed save never started, at exit
warnings.filterwarnings(
    "ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning
)


def _quiet_closed_loop(previous):
    """When a background save fails, TensorStore's callbacks for its other writes reach the
    asyncio loop orbax has already closed, and each prints a RuntimeError('Event loop is
    closed') traceback as an unraisable exception, burying the one line the failure gets.
    Those (and only those) are dropped."""

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    return hook


sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)


class CheckpointDamaged(SaejaxError):
    """A checkpoint that does not read back whole."""


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def remove_unfinished_saves(directory: str) -> None:
    """Delete the temporary folders a killed or failed save left in `directory` (orbax names
    them STEP.orbax-checkpoint-tmp*; a finished save renames its folder to STEP)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if ".orbax-checkpoint-tmp" in name and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, mirror=None):
        self.directory = os.path.abspath(directory)
        self.mirror = mirror  # remote_run.Mirror of a run directory on object storage
        if jax.process_index() == 0:
            remove_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.failed = False  # a save failed for want of space (reported once)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, info: dict) -> None:
        """Save `state` at `step`, unless that step is already saved (it holds the same state:
        batch b is a pure function of the seed and b)."""
        if step in self.manager.all_steps():
            return
        with self._reporting_disk_full():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), info=ocp.args.JsonSave(info)
                ),
                force=True,
            )
        if self.mirror is not None:
            self.mirror.checkpoint_saved(step)

    @contextlib.contextmanager
    def _reporting_disk_full(self):
        """A write that failed for want of space -> one SaejaxError naming what is kept."""
        try:
            yield
        except Exception as e:
            error = disk_full(e)
            if error is None:
                raise
            self.failed = True
            kept = self.manager.latest_step()
            tail = (
                f"the checkpoint at step {kept} is kept: free some space and resume"
                if kept is not None
                else "free some space and run it again"
            )
            raise SaejaxError(
                f"cannot write a checkpoint in {self.directory} ({error.strerror}); {tail}"
            ) from None

    def delete_after(self, step: int) -> int | None:
        """Delete every checkpoint after `step` (states nobody checked); the latest left."""
        self.manager.wait_until_finished()
        for s in self.manager.all_steps():
            if s > step:
                self.manager.delete(s)
        if self.mirror is not None:
            self.mirror.checkpoints_changed()
        return self.manager.latest_step()

    def restore(
        self,
        state_template,
        expected_info: dict,
        step: int | None = None,
        force_data: bool = False,
    ):
        """The state at `step`, or at the newest checkpoint that reads back whole: a damaged
        checkpoint (a crash, a bad disk) is reported in one line and deleted, and the one
        before it is used. The sidecar must agree with `expected_info`; a changed data
        identity is accepted only with `force_data`."""
        if step is not None:
            return self._restore_at(step, state_template, expected_info, force_data)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise SaejaxError(f"no checkpoint in {self.directory} to resume from")
        for i, s in enumerate(steps):
            try:
                return self._restore_at(s, state_template, expected_info, force_data)
            except CheckpointDamaged as e:
                if i + 1 == len(steps):
                    raise SaejaxError(
                        f"every checkpoint in {self.directory} is damaged (the oldest, step {s}: "
                        f"{e}); start the run again in a new run directory"
                    ) from None
                print(
                    f"saejax: warning: the checkpoint at step {s} is damaged ({e}); "
                    f"resuming from step {steps[i + 1]}",
                    file=sys.stderr,
                )
                self.manager.delete(s)
                if self.mirror is not None:
                    self.mirror.checkpoints_changed()

    def _restore_at(self, step: int, state_template, expected_info: dict, force_data: bool):
        try:
            info = self.manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))[
                "info"
            ]
        except Exception as e:  # orbax raises many types for a damaged folder
            raise CheckpointDamaged(_first_line(e)) from None
        if not isinstance(info, dict):
            raise CheckpointDamaged("its info sidecar is not a JSON object")
        data_diffs = [
            f"{k} {info[k]} → {expected_info[k]}"
            for k in DATA_KEYS
            if k in info and k in expected_info and info[k] != expected_info[k]
        ]
        if data_diffs and not force_data:
            raise SaejaxError(
                f"the data has changed since the checkpoint in {self.directory} was written "
                f"({', '.join(data_diffs)}); resume on it anyway with --force"
            )
        diffs = [
            f"{k}: checkpoint {info.get(k)!r}, config {v!r}"
            for k, v in expected_info.items()
            if k not in DATA_KEYS and info.get(k) != v
        ]
        if diffs:
            raise SaejaxError(
                f"the checkpoint in {self.directory} was written for another "
                f"configuration ({'; '.join(diffs)})"
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
        added = self._metrics_added_since(step, abstract)
        if added:
            sums = {k: v for k, v in abstract.metric_sums.items() if k not in added}
            abstract = abstract.replace(metric_sums=sums)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except Exception as e:
            raise CheckpointDamaged(
                f"cannot restore step {step} in {self.directory}: {_first_line(e)}"
            ) from None
        state = restored["state"]
        if added:  # a window sum starts at 0: that metric's first fetch undercounts, once
            zeros = {
                k: jax.device_put(jnp.zeros(v.shape, v.dtype), v.sharding)
                for k, v in state_template.metric_sums.items()
                if k in added
            }
            state = state.replace(metric_sums={**state.metric_sums, **zeros})
        return state, info

    def _metrics_added_since(self, step: int, abstract) -> set:
        """The metric sums the state has and the checkpoint at `step` lacks: it was written by
        an earlier saejax, before that metric was logged (fvu_without_outliers). One that
        holds sums this saejax does not know is refused (not deleted as damaged)."""
        sums = getattr(abstract, "metric_sums", None)
        if not isinstance(sums, dict):
            return set()
        try:
            on_disk = set(self.manager.item_metadata(step)["state"].tree["metric_sums"])
        except Exception:  # unreadable metadata: the restore itself reports it
            return set()
        if on_disk - set(sums):
            raise SaejaxError(
                f"the checkpoint at step {step} in {self.directory} was written by a newer "
                f"saejax (it logs {', '.join(sorted(on_disk - set(sums)))}); resume it with that "
                "version"
            )
        return set(sums) - on_disk

    def wait(self) -> None:
        """Wait for the last save (and, for a run on object storage, its upload)."""
        with self._reporting_disk_full():
            self.manager.wait_until_finished()
        if self.mirror is not None:
            self.mirror.flush()

    def close(self) -> None:
        """Wait for the last save and close; a failure already reported is not raised again."""
        reported = self.failed
        try:
            self.wait()
        except SaejaxError:
            if not reported:
                raise
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self.failed:
                    raise
