"""Orbax checkpoints of the whole training state, plus a small JSON sidecar.

A checkpoint holds parameters, optimizer state, step, RNG, dead-latent counters and
metric windows (the TrainState pytree) and, as JSON, the SAE shape it was written
for. The data position is the step itself (batch b is a pure function of the seed
and b), so restoring the state restores the data position. Orbax writes each
checkpoint to a temporary folder and renames it when complete, so a kill -9 in the
middle of a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from saejax.errors import SaejaxError


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, info: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), info=ocp.args.JsonSave(info)
            ),
            force=True,
        )

    def restore(self, state_template, expected_info: dict, step: int | None = None):
        step = self.latest_step() if step is None else step
        if step is None:
            raise SaejaxError(f"no checkpoint in {self.directory} to resume from")
        info = self.manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))[
            "info"
        ]
        diffs = [
            f"{k}: checkpoint {info.get(k)!r}, config {v!r}"
            for k, v in expected_info.items()
            if info.get(k) != v
        ]
        if diffs:
            raise SaejaxError(
                f"the checkpoint in {self.directory} was written for another "
                f"configuration ({'; '.join(diffs)})"
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except (ValueError, KeyError, TypeError) as e:
            raise SaejaxError(
                f"cannot restore the checkpoint at step {step} in {self.directory}: "
                f"{str(e).splitlines()[0]}"
            ) from None
        return restored["state"], info

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
