"""One process of a multi-process run on the CPU (launched by test_multiprocess.py).

usage: python multiprocess_run.py DATA.npy RUN_DIR READ_LOG PROCESS_ID NUM_PROCESSES PORT [DIE]
Trains with mesh.data = NUM_PROCESSES (one CPU device per process) and records every row
range this process reads from the data (test instrumentation, patched in here only).
DIE (a step): process 1 kills itself (SIGKILL) as it starts that step's checkpoint, so its
peers are inside that checkpoint's save when it dies. DIE "raise:P:STEP": process P raises a
RuntimeError (a plain bug) once STEP has been dispatched, before that step's metrics fetch,
and writes the time.time() of the raise to READ_LOG + ".raised".
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import small_config  # noqa: E402

import saejax.train.data as D  # noqa: E402
from saejax.train.launch import resolve_launch  # noqa: E402
from saejax.train.run import train  # noqa: E402


def die_at_save(step: int) -> None:
    import saejax.train.checkpoint as C

    original = C.Checkpointer.save

    def save(self, at, state, info):
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, at, state, info)

    C.Checkpointer.save = save


def raise_at(step: int, marker: str) -> None:
    import time

    import saejax.train.loop as L

    original = L._member_cadence

    def cadence(m, at, end_step, pool):
        if at == step:
            with open(marker, "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError(f"a plain bug at step {at}")
        return original(m, at, end_step, pool)

    L._member_cadence = cadence


def main():
    data, run_dir, read_log, pid, nproc, port, *die = sys.argv[1:]
    if die and die[0].startswith("raise:"):
        _, who, step = die[0].split(":")
        if pid == who:
            raise_at(int(step), read_log + ".raised")
    elif die and pid == "1":
        die_at_save(int(die[0]))
    reads = []
    original = D.ArraySource.read_async

    def logged_read(self, start, stop):
        reads.append([int(start), int(stop)])
        return original(self, start, stop)

    D.ArraySource.read_async = logged_read
    original_into = D.ArraySource.read_into

    def logged_read_into(self, start, stop, out):
        reads.append([int(start), int(stop)])
        return original_into(self, start, stop, out)

    D.ArraySource.read_into = logged_read_into
    sets = [
        "train.tokens=8192",
        "train.batch_size=256",
        "sae.d_sae=64",
        "train.lr=1e-2",
        "train.lr_warmup_steps=0",
        "data.slices=2",
        "data.block_rows=256",
        "data.shuffle_blocks=2",
        f"mesh.data={nproc}",
    ]
    launch = resolve_launch(f"localhost:{port}", int(nproc), int(pid), 120)
    train(small_config(data, run_dir, *sets), launch=launch)
    with open(read_log, "w") as f:
        json.dump(reads, f)


if __name__ == "__main__":
    main()
