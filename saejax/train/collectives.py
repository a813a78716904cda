"""The collectives of a compiled step, read from its HLO text, and the bytes they send.

`inventory(compiled.as_text())` lists every all-gather, all-reduce, reduce-scatter,
all-to-all and collective-permute with its result shapes, its device groups and where it
sits (inside a conditional branch, such as AuxK's, or inside a loop body). `traffic` turns
the list into bytes sent per device per step, split into bytes that stay within a process
(host) and bytes that cross to another, for a layout of devices_per_process devices per
process. The dry run's estimate is checked against these figures (tests/train/
test_collectives_hlo.py), so both use one cost model:

    all-gather      (n−1)/n × the gathered result     all-reduce   2(n−1)/n × the buffer
    reduce-scatter  (n−1)/n × the input (n × result)  all-to-all   (n−1)/n × the buffer
    collective-permute  the buffer, from each device that sends

n is the group size. A device's traffic is spread evenly over the other members of its
group (a direct or ring exchange sends the same total), so the share that crosses hosts
is (members on other processes) / (n − 1). Device ids in the groups are positions in the
mesh's device list, which `sharding.make_mesh` orders process-major.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>"
    + "|".join(OPS)
    + r")(?P<start>-start)?\((?P<rest>.*)$"
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_CALLS = re.compile(
    r"\b(?P<kind>body|condition|branch_computations|true_computation|false_computation|"
    r"calls|to_apply)=(?P<names>\{[^}]*\}|%?[\w.\-]+)"
)


@dataclass(frozen=True)
class Collective:
    op: str
    shapes: tuple  # ((dtype, dims), ...): the result, one entry per buffer of a combined op
    nbytes: int  # bytes of the result (for a reduce-scatter: of its input)
    groups: tuple  # tuples of device ids that exchange together
    computation: str
    conditional: bool  # inside a conditional branch (runs only on some steps)
    loop: bool  # inside a while body (runs once per iteration)

    @property
    def group_size(self) -> int:
        return len(self.groups[0]) if self.groups else 1

    def describe(self) -> str:
        shapes = ", ".join(f"{t}[{','.join(map(str, d))}]" for t, d in self.shapes)
        where = " (conditional)" if self.conditional else ""
        where += " (in a loop)" if self.loop else ""
        return f"{self.op} {shapes} over {self.group_size}: {self.nbytes:,} B{where}"


def _shapes(type_text: str) -> tuple:
    return tuple(
        (m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
        for m in _ARRAY.finditer(type_text)
        if m["dtype"] in ITEMSIZE
    )


def _nbytes(shapes) -> int:
    return sum(ITEMSIZE[t] * int(np.prod(d, dtype=np.int64)) for t, d in shapes)


def _iota(text: str) -> np.ndarray:
    """`[4,2]T(1,0)` or `[8]`: arange over the dims, transposed."""
    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
    if m is None:
        raise ValueError(f"unreadable device list {text!r}")
    dims = [int(d) for d in m[1].split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m[2]:
        ids = ids.transpose([int(p) for p in m[2].split(",")])
    return ids


def parse_groups(attrs: str, n_devices: int) -> tuple:
    """The device groups of a collective's attributes, in any of XLA's three spellings."""
    m = re.search(r"source_target_pairs=\{(.*?)\}\}?", attrs)
    if m:  # collective-permute: pairs, each a group of (source, target)
        return tuple(
            tuple(int(v) for v in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", attrs)
        )
    m = re.search(r"replica_groups=(\{\{.*?\}\}|\{\})", attrs)
    if m:
        groups = tuple(
            tuple(int(v) for v in g.split(",") if v) for g in re.findall(r"\{([\d,]*)\}", m[1])
        )
        return groups or (tuple(range(n_devices)),)
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if m:
        ids = _iota(m[3]).reshape(int(m[1]), int(m[2]))
        return tuple(tuple(int(v) for v in row) for row in ids)
    m = re.search(
        r"replica_groups=mesh\[(?P<axes>[^\]]*)\]"
        r"(?:,\s*device_ids=\((?P<ids>[^)]*\)?)\))?\s*\{(?P<over>[^}]*)\}",
        attrs,
    )
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m["axes"])
        names = [a for a, _ in axes]
        sizes = [int(s) for _, s in axes]
        ids = _iota(m["ids"]) if m["ids"] else np.arange(int(np.prod(sizes)))
        ids = ids.reshape(sizes)
        over = [names.index(a) for a in re.findall(r"'([^']+)'", m["over"])]
        rest = [i for i in range(len(names)) if i not in over]
        width = int(np.prod([sizes[i] for i in over]))
        rows = ids.transpose(rest + over).reshape(-1, width)
        return tuple(tuple(int(v) for v in row) for row in rows)
    raise ValueError(f"no device groups in {attrs[:200]!r}")


def _call_graph(lines) -> tuple[dict, dict]:
    """(collective lines by computation, parents: computation -> [(caller, kind)])."""
    parents: dict = {}
    by_computation: dict = {}
    current = None
    for line in lines:
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("(")[0]:
            current = head["name"]
            continue
        for call in _CALLS.finditer(line):
            for name in re.findall(r"%?([\w.\-]+)", call["names"]):
                parents.setdefault(name, []).append((current, call["kind"]))
        if _INSTRUCTION.match(line):
            by_computation.setdefault(current, []).append(line)
    return by_computation, parents


def _reached_through(name: str, parents: dict, kinds: set, seen=None) -> bool:
    seen = set() if seen is None else seen
    for caller, kind in parents.get(name, ()):
        if kind in kinds:
            return True
        if caller not in seen:
            seen.add(caller)
            if _reached_through(caller, parents, kinds, seen):
                return True
    return False


def inventory(hlo_text: str, n_devices: int) -> list[Collective]:
    """Every collective of a compiled module's text (`jitted.lower(...).compile().as_text()`)."""
    by_computation, parents = _call_graph(hlo_text.splitlines())
    out = []
    for computation, lines in by_computation.items():
        conditional = _reached_through(
            computation, parents, {"branch_computations", "true_computation", "false_computation"}
        )
        loop = _reached_through(computation, parents, {"body", "condition"})
        for line in lines:
            m = _INSTRUCTION.match(line)
            shapes = _shapes(m["type"])
            if m["start"] and m["op"] in ("all-gather", "collective-permute") and len(shapes) > 1:
                shapes = shapes[len(shapes) // 2 :]  # an async start's tuple: (inputs, results)
            groups = parse_groups(m["rest"], n_devices)
            nbytes = _nbytes(shapes)
            if m["op"] == "reduce-scatter":
                nbytes *= len(groups[0])
            out.append(Collective(m["op"], shapes, nbytes, groups, computation, conditional, loop))
    return out


def sent_per_device(c: Collective, devices_per_process: int, n_devices: int) -> tuple:
    """(within-process, across-process) bytes one device sends for `c`, averaged over the
    devices."""
    process = np.arange(n_devices) // max(1, devices_per_process)
    if c.op == "collective-permute":
        pairs = [(s, t) for s, t in c.groups if s != t]
        across = sum(process[s] != process[t] for s, t in pairs)
        return (
            c.nbytes * (len(pairs) - across) / n_devices,
            c.nbytes * across / n_devices,
        )
    n = c.group_size
    if n <= 1:
        return 0.0, 0.0
    total = (2.0 if c.op == "all-reduce" else 1.0) * (n - 1) / n * c.nbytes
    far = np.mean([np.sum(process[list(g)] != process[d]) for g in c.groups for d in g])
    return total * (n - 1 - far) / (n - 1), total * far / (n - 1)


def traffic(
    collectives: list[Collective],
    n_devices: int,
    devices_per_process: int | None = None,
    conditional: bool = True,
) -> dict:
    """Bytes one device sends per step: {"within_host", "across_host", "total"}.
    `conditional=False` leaves out the collectives of conditional branches (AuxK's, which
    runs only while some latent is dead)."""
    per_process = devices_per_process or n_devices
    within = across = 0.0
    for c in collectives:
        if c.conditional and not conditional:
            continue
        w, a = sent_per_device(c, per_process, n_devices)
        within, across = within + w, across + a
    return {"within_host": within, "across_host": across, "total": within + across}


def compiled_step_text(cfg, d_in: int) -> str:
    """The HLO text of the training step compiled for `cfg`'s mesh, as `train` compiles it
    (state placed by `sharding.state_shardings`, batch split over every device, the state
    donated). Needs mesh.data × mesh.model visible devices; touches no data."""
    import jax
    import jax.numpy as jnp

    from saejax.core import sae as S
    from saejax.core import sharding as SH
    from saejax.train import step as T
    from saejax.train.setup import spec_from_config

    spec = spec_from_config(cfg.sae, d_in)
    total_steps = max(1, cfg.train.tokens // cfg.train.batch_size)
    tx = T.make_optimizer(cfg.train, total_steps, cfg.sae)
    params = S.init_params(spec, jax.random.PRNGKey(0), np.zeros(d_in, np.float32))
    state = T.init_state(params, tx, 0, 1.0)
    mesh = SH.make_mesh(cfg.mesh.data, cfg.mesh.model)
    shardings = SH.state_shardings(state, mesh)
    state = jax.tree_util.tree_map(
        lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
        state,
        shardings,
    )
    batch = jax.ShapeDtypeStruct(
        (cfg.train.batch_size, d_in), jnp.float32, sharding=SH.batch_sharding(mesh)
    )
    step = T.make_train_step(spec, cfg.sae, tx, total_steps)
    with jax.set_mesh(mesh):
        jitted = jax.jit(step, donate_argnums=0, out_shardings=(shardings, SH.replicated(mesh)))
        return jitted.lower(state, batch).compile().as_text()
