"""A TopK dictionary split over 8 model shards narrower than k and aux_k (d_in 2048, aux_k
1024 and d_sae 16k over 32 shards is the real case) trains, and trains as on one device."""

import os
import textwrap

import numpy as np
from helpers import run_on_fake_devices, superposition_data

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from helpers import small_config
    from saejax.train.run import train

    data, out = sys.argv[1:]
    losses = {{}}
    for name, model in (("one", 1), ("eight", 8)):
        cfg = small_config(
            data, f"{{out}}/{{name}}",
            # 128 latents over 8 shards: 16 per shard, fewer than aux_k (24)
            "sae.architecture=topk", "sae.d_sae=128", "sae.k=4", "sae.aux_k=24",
            "sae.dead_tokens=64", "train.tokens=4096", "train.log_every=4",
            "mesh.data=1", f"mesh.model={{model}}",
        )
        train(cfg)
        with open(f"{{out}}/{{name}}/metrics.jsonl") as f:
            losses[name] = [json.loads(line) for line in f]
    print(json.dumps({{k: [[r["loss"], r["aux_loss"]] for r in v] for k, v in losses.items()}}))
    """
).format(tests=TESTS)


def test_topk_on_shards_narrower_than_k_and_aux_k(tmp_path):
    rows, _ = superposition_data(8192, d=32, m=128, p=0.03)
    np.save(tmp_path / "acts.npy", rows)
    result = run_on_fake_devices(["-c", SCRIPT, str(tmp_path / "acts.npy"), str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    out = json.loads(result.stdout.strip().splitlines()[-1])
    one, eight = np.array(out["one"]), np.array(out["eight"])
    assert one.shape == eight.shape and one.shape[0] >= 2
    assert np.any(one[:, 1] > 0)  # AuxK ran: some latents were dead
    np.testing.assert_allclose(eight, one, rtol=2e-4, atol=1e-6)
