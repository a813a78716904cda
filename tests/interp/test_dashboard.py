"""The static dashboard renders in a real browser (headless Chromium, installed by .ci/run)."""

import os
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import TRAINED_GPT2_HOOK  # noqa: E402

from saejax.cli import main  # noqa: E402
from saejax.config import load_config  # noqa: E402
from saejax.core import sae as S  # noqa: E402
from saejax.store import ActivationStore  # noqa: E402
from saejax.train.sae_files import save_sae  # noqa: E402

HOOK = TRAINED_GPT2_HOOK


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("SAEJAX_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    return path


def browser(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,900",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def dashboard(trained_gpt2_store, tmp_path_factory):
    base = tmp_path_factory.mktemp("dash")
    store_path = trained_gpt2_store
    store = ActivationStore.open(store_path)
    d = store.d_in
    rng = np.random.default_rng(0)
    W_dec = rng.normal(size=(64, d)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {
        "W_enc": W_dec.T.copy(),
        "b_enc": np.full(64, -0.5, np.float32),
        "W_dec": W_dec,
        "b_dec": np.zeros(d, np.float32),
    }
    cfg = load_config(
        None, [f"data.path={store_path}", "sae.architecture=relu", "sae.d_sae=64"], check=False
    )
    run = base / "run"
    save_sae(str(run / "sae"), params, S.SAESpec("relu", d, 64), 1.0, cfg, store.meta, HOOK)
    return str(run), store_path


def test_dashboard_renders_list_and_latent_pages(dashboard, capsys):
    run, store_path = dashboard
    # an unreachable explanation endpoint: one warning, and the dashboard is still written
    code = main(
        [
            "dashboard",
            run,
            "--store",
            store_path,
            "--pages",
            "8",
            "--llm-url",
            "http://127.0.0.1:9/v1",
        ]
    )
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
    orange = (
        (pixels[:, 0] > 200) & (pixels[:, 1] > 100) & (pixels[:, 1] < 200) & (pixels[:, 2] < 120)
    )
    blue = (pixels[:, 2] > 180) & (pixels[:, 0] < 120)  # the histogram bars
    assert orange.sum() > 200, "no highlighted tokens rendered"
    assert blue.sum() > 200, "no histogram rendered"


def test_llm_explanations_from_an_openai_compatible_endpoint(dashboard, tmp_path):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    prompts = []

    class Fake(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompts.append((self.path, body["messages"][0]["content"]))
            reply = {
                "choices": [{"message": {"content": "Residual test title\nIt fires on tests."}}]
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run, store_path = dashboard
    out = tmp_path / "dash"
    try:
        assert (
            main(
                [
                    "dashboard",
                    run,
                    "--store",
                    store_path,
                    "--pages",
                    "2",
                    "--out",
                    str(out),
                    "--llm-url",
                    f"http://127.0.0.1:{server.server_port}/v1",
                    "--split-with",
                    run,
                ]
            )
            == 0
        )  # against itself: each latent's nearest is itself
    finally:
        server.shutdown()
    assert len(prompts) == 2 and prompts[0][0] == "/v1/chat/completions"
    assert "[[" in prompts[0][1]  # the top examples, with the firing token marked
    page = next((out / "latents").iterdir()).read_text()
    assert "Residual test title" in page and "It fires on tests." in page
    assert "Residual test title" in (out / "index.html").read_text()
    latent_page = next((out / "latents").iterdir())
    own = latent_page.stem
    assert f'id="splits">latent {own} (cos 1.000)' in latent_page.read_text()
    assert (out / "density.png").exists()
