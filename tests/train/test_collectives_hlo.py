"""The compiled step's collectives on a (4 data, 2 model) mesh of 8 fake CPU devices: every
architecture keeps its latents split (no collective carries a whole weight matrix, a whole
latent vector or a [batch, d_sae] block), and the dry run's bytes sent per device, within and
across hosts, are within 20% of what the compiled step's HLO sends."""

import json
import textwrap

import pytest
from helpers import run_on_fake_devices

from saejax.train.collectives import Collective, inventory, parse_groups, traffic

# d_sae = 96 is no other dimension of the step, so a shape with 96 in it is a whole latent
# axis. At these shapes (a batch large against the dictionary) XLA's partitioner, left to
# itself, gathers W_enc and W_dec onto every device for relu and jumprelu, and BatchTopK's
# AuxK gathers its [512, 96] pre-activations.
D_IN, D_SAE, BATCH = 20, 96, 512
RUNS = {
    "relu": ["sae.architecture=relu"],
    "jumprelu": ["sae.architecture=jumprelu"],
    "topk": ["sae.architecture=topk"],  # the sparse kernels (the default)
    "topk_dense": ["sae.architecture=topk", "sae.topk_kernel=dense"],
    "batchtopk": ["sae.architecture=batchtopk"],
    "gated": ["sae.architecture=gated"],
    "matryoshka": ["sae.architecture=matryoshka_batchtopk", "sae.matryoshka_widths=[8,24]"],
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from saejax.config import load_config
    from saejax.train.collectives import compiled_step_text

    runs = json.loads(sys.argv[1])
    base = ["data.path=x.npy", "sae.d_sae={d_sae}", "sae.k=4", "sae.aux_k=12",
            "train.batch_size={batch}", "mesh.data=4", "mesh.model=2"]
    print(json.dumps({{name: compiled_step_text(load_config(None, base + sets), {d_in})
                      for name, sets in runs.items()}}))
    """
).format(d_in=D_IN, d_sae=D_SAE, batch=BATCH)


@pytest.fixture(scope="module")
def compiled_steps():
    result = run_on_fake_devices(["-c", SCRIPT, json.dumps(RUNS)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: inventory(text, 8) for name, text in json.loads(result.stdout).items()}


def config(sets):
    from saejax.config import load_config

    base = [
        "data.path=x.npy",
        f"sae.d_sae={D_SAE}",
        "sae.k=4",
        "sae.aux_k=12",
        f"train.batch_size={BATCH}",
        "mesh.data=4",
        "mesh.model=2",
    ]
    return load_config(None, base + sets)


@pytest.mark.parametrize("name", list(RUNS))
def test_latents_stay_split_in_the_compiled_step(compiled_steps, name):
    ops = compiled_steps[name]
    assert ops, f"{name}: no collectives on a (4, 2) mesh"
    for c in ops:
        for _, dims in c.shapes:
            assert D_SAE not in dims, f"{name}: {c.describe()} carries a whole latent axis"
        assert c.op != "all-to-all", f"{name}: {c.describe()}"
        assert not c.loop, f"{name}: {c.describe()} runs an unknown number of times"
    if name in ("topk", "topk_dense", "batchtopk", "matryoshka"):  # AuxK compiled in, split too
        assert any(c.conditional for c in ops), name


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("processes", [1, 2, 4])
def test_dry_run_counts_what_the_compiled_step_sends(compiled_steps, name, processes):
    from saejax.train.dryrun import estimate

    sent = estimate(config(RUNS[name]), D_IN, processes=processes)
    sent = sent["bytes_sent_per_device_per_step"]
    hlo = traffic(compiled_steps[name], 8, 8 // processes)
    main = traffic(compiled_steps[name], 8, 8 // processes, conditional=False)
    what = f"{name} on {processes} process(es): dry run {sent}, HLO {hlo}"
    assert sent["total"] == pytest.approx(hlo["total"], rel=0.2), what
    assert sent["total"] - sent["of_which_auxk"] == pytest.approx(main["total"], rel=0.2), what
    for part in ("within_host", "across_host"):
        assert sent[part] == pytest.approx(hlo[part], rel=0.2, abs=64), what
    if processes == 1:
        assert sent["across_host"] == hlo["across_host"] == 0


def test_groups_read_in_every_spelling():
    mesh = "replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, use_global_device_ids=true"
    assert parse_groups(mesh, 8) == ((0, 2, 4, 6), (1, 3, 5, 7))
    iota = "replica_groups=[2,4]<=[4,2]T(1,0), use_global_device_ids=true"
    assert parse_groups(iota, 8) == ((0, 2, 4, 6), (1, 3, 5, 7))
    listed = "replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true"
    assert parse_groups(listed, 8) == ((0, 1), (2, 3), (4, 5), (6, 7))
    moved = "replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}"
    assert parse_groups(moved, 8) == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_traffic_splits_hosts_by_group():
    """An all-reduce of 1 KiB over 4 devices on 2 processes of 2: each device sends
    2·3/4 KiB, one third of it to its own process's other device."""
    hlo = "\n".join(
        [
            "ENTRY %main (p: f32[256]) -> f32[256] {",
            "  %p = f32[256]{0} parameter(0)",
            "  ROOT %all-reduce = f32[256]{0} all-reduce(%p), channel_id=1, "
            + "replica_groups=[1,4]<=[4], use_global_device_ids=true, to_apply=%add",
            "}",
        ]
    )
    (c,) = inventory(hlo, 4)
    assert c == Collective(
        "all-reduce", (("f32", (256,)),), 1024, ((0, 1, 2, 3),), "main", False, False
    )
    assert traffic([c], 4, 2) == {"within_host": 512.0, "across_host": 1024.0, "total": 1536.0}
