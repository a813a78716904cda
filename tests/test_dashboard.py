"""The static dashboard renders in a real browser (headless Chromium, installed by .ci/run)."""

import os
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("torch")

from extract.extractor import ExtractConfig, run_extract  # noqa: E402
from saejax import sae as S  # noqa: E402
from saejax.cli import main  # noqa: E402
from saejax.config import load_config  # noqa: E402
from saejax.saved import save_sae  # noqa: E402
from saejax.store import ActivationStore  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("SAEJAX_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    return path


def browser(*args) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--window-size=1200,900", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def dashboard(trained_gpt2, corpus_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("dash")
    store_path = str(base / "store")
    run_extract(ExtractConfig(out=store_path, model=trained_gpt2, corpus=corpus_file, hooks=[HOOK],
                              tokens=3000, context=32, batch_size=4, dtype="float32"), progress=False)
    store = ActivationStore.open(store_path)
    d = store.d_in
    rng = np.random.default_rng(0)
    W_dec = rng.normal(size=(64, d)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {"W_enc": W_dec.T.copy(), "b_enc": np.full(64, -0.5, np.float32), "W_dec": W_dec,
              "b_dec": np.zeros(d, np.float32)}
    cfg = load_config(None, [f"data.path={store_path}", "sae.architecture=relu", "sae.d_sae=64"],
                      check=False)
    run = base / "run"
    save_sae(str(run / "sae"), params, S.SAESpec("relu", d, 64), 1.0, cfg, store.meta, HOOK)
    return str(run), store_path


def test_dashboard_renders_list_and_latent_pages(dashboard, capsys):
    run, store_path = dashboard
    # an unreachable explanation endpoint: one warning, and the dashboard is still written
    code = main(["dashboard", run, "--store", store_path, "--pages", "8",
                 "--llm-url", "http://127.0.0.1:9/v1"])
    captured = capsys.readouterr()
    assert code == 0 and "endpoint is unreachable" in captured.err
    index = os.path.join(run, "dashboard", "index.html")
    dom = browser("--dump-dom", f"file://{index}").stdout
    assert dom.count('<tr><td data-v="') == 64  # every latent listed
    assert 'id="q"' in dom and "latents/" in dom
    pages = sorted(os.listdir(os.path.join(run, "dashboard", "latents")))
    assert len(pages) == 8
    page = os.path.join(run, "dashboard", "latents", pages[0])
    page_dom = browser("--dump-dom", f"file://{page}").stdout
    assert 'class="tok hit"' in page_dom and "promotes:" in page_dom and "<svg" in page_dom

    shot = os.path.join(os.path.dirname(index), "page.png")
    browser(f"--screenshot={shot}", f"file://{page}")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    orange = (pixels[:, 0] > 200) & (pixels[:, 1] > 100) & (pixels[:, 1] < 200) & (pixels[:, 2] < 120)
    blue = (pixels[:, 2] > 180) & (pixels[:, 0] < 120)  # the histogram bars
    assert orange.sum() > 200, "no highlighted tokens rendered"
    assert blue.sum() > 200, "no histogram rendered"
