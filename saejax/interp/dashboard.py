"""`saejax dashboard RUN`: a static HTML dashboard of an SAE (no server; open index.html).

index.html lists every latent (density, mean activation, explanation), sortable by any
column, with a search box. latents/<i>.html shows a latent's activation histogram (from its
random activating samples), its top examples with every context token shaded by the
latent's activation on it, its examples at activation quantiles, the output tokens its
decoder direction promotes and suppresses through the unembedding, and its explanation.

Explanations: a built-in summary (the tokens it fires on most among its examples, and the
tokens over-represented there against the store's token frequencies); with an
OpenAI-compatible endpoint (--llm-url, --llm-model, key in $OPENAI_API_KEY) also a short
LLM-written title and explanation from the top examples. An unreachable endpoint is
reported once and the rest of the dashboard is still written.
"""

from __future__ import annotations

import html
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from saejax import io
from saejax.errors import SaejaxError
from saejax.interp.contexts import marked_context

CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4


def _token_strings(tok, ids) -> list[str]:
    return [tok.decode([int(i)]) for i in ids]


def builtin_explanation(
    tokens_at_top: list[str], sample_tokens: list[int], token_freq: dict, tok
) -> str:
    """Dominant tokens among the examples, and tokens over-represented against the corpus."""
    parts = []
    if tokens_at_top:
        values, counts = np.unique(tokens_at_top, return_counts=True)
        order = np.argsort(-counts)[:3]
        parts.append(
            "fires on "
            + ", ".join(f"{str(values[i])!r} ({counts[i]}/{len(tokens_at_top)})" for i in order)
        )
    if sample_tokens:
        ids, counts = np.unique(sample_tokens, return_counts=True)
        total = sum(token_freq.values())
        lift = [
            (c / len(sample_tokens)) / max(token_freq.get(int(t), 0.5) / total, 1e-9)
            for t, c in zip(ids, counts)
        ]
        picks = [i for i in np.argsort(lift)[::-1] if counts[i] >= 2 and lift[i] > 2][:3]
        if picks:
            parts.append(
                "over-represented: "
                + ", ".join(f"{tok.decode([int(ids[i])])!r} ×{lift[i]:.0f}" for i in picks)
            )
    return "; ".join(parts) or "no activations seen"


def reply_text(reply) -> str:
    """The text of a chat-completions reply; ValueError for anything else (an endpoint may
    answer with null content, a string for `choices`, an error object, ...)."""
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"malformed reply ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):
        raise ValueError(f"malformed reply (content is {type(text).__name__}, not text)")
    return text.strip()


class LLMExplainer:
    """OpenAI-compatible chat completions; after the first failure it stops asking."""

    def __init__(self, url: str, model: str, timeout: float = 20.0):
        self.url = url.rstrip("/") + (
            "" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions"
        )
        self.model, self.timeout, self.failed = model, timeout, None

    def explain(self, examples: list[str]) -> tuple[str, str] | None:
        if self.failed:
            return None
        prompt = (
            "Here are text snippets where one feature of a language model is most active; "
            "the token where it fires is marked [[like this]].\n\n"
            + "\n".join(examples[:12])
            + "\n\nAnswer in two lines: a title of at most six words, then one sentence "
            "explaining what the feature detects."
        )
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        try:
            req = urllib.request.Request(self.url, data=body, headers=headers)
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = reply_text(json.load(resp))
        except (urllib.error.URLError, OSError, ValueError) as e:
            self.failed = f"{self.url}: {getattr(e, 'reason', e)}"
            what = "gave an unusable reply" if isinstance(e, ValueError) else "is unreachable"
            print(
                f"saejax: warning: the explanation endpoint {what} ({self.failed}); "
                "writing the dashboard with built-in summaries only",
                file=sys.stderr,
            )
            return None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return (lines[0][:80], " ".join(lines[1:])[:400]) if lines else None


def unembedding_effects(loaded, sae, n: int = 8) -> tuple[np.ndarray, np.ndarray] | None:
    """Per latent, the tokens its decoder row promotes and suppresses most (W_U · (g ⊙ d)),
    where g is the final norm's weight; None when the hook the decoder writes to (a
    transcoder's target) is not as wide as the residual stream."""
    model = loaded.model
    head = model.get_output_embeddings()
    if head is None or head.weight.shape[1] != sae.spec.d_out:
        return None
    W_U = head.weight.detach().float().cpu().numpy()
    norm = None
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and getattr(obj, "weight", None) is not None:
            norm = obj.weight.detach().float().cpu().numpy()
            break
    W_dec = np.asarray(sae.params["W_dec"], np.float32)
    directions = W_dec * (norm if norm is not None else 1.0)
    effects = directions @ W_U.T  # [d_sae, vocab]
    promoted = np.argsort(-effects, axis=1)[:, :n]
    suppressed = np.argsort(effects, axis=1)[:, :n]
    return promoted, suppressed


ASSETS = Path(__file__).with_name("dashboard_assets")
_CSS = (
    (ASSETS / "style.css").read_text().rstrip("\n")
)  # inlined into every page: one file per page to open
_INDEX_JS = (ASSETS / "index.js").read_text().rstrip("\n")  # sorting and search of the latent list


def _shade(text: str, value: float, peak: float, hit: bool) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, value / peak))
    cls = "tok hit" if hit else "tok"
    return (
        f'<span class="{cls}" title="{value:.3f}" data-act="{value:.4f}" '
        f'style="background:rgba(255,140,0,{alpha:.2f})">{html.escape(text)}</span>'
    )


def _histogram_svg(values: np.ndarray, bins: int = 20) -> str:
    if len(values) == 0:
        return "<p>no activations seen</p>"
    counts, edges = np.histogram(values, bins=bins)
    w, h = 400, 120
    peak = max(int(counts.max()), 1)
    bars = "".join(
        f'<rect class="bar" x="{i * w / bins:.1f}" y="{h - c / peak * h:.1f}" '
        f'width="{w / bins - 1:.1f}" height="{c / peak * h:.1f}"><title>{edges[i]:.2f}–'
        f"{edges[i + 1]:.2f}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return (
        f'<svg class="hist" width="{w}" height="{h + 16}">{bars}<text x="0" y="{h + 14}" '
        f'font-size="11">{edges[0]:.2f}</text><text x="{w - 40}" y="{h + 14}" font-size="11">'
        f"{edges[-1]:.2f}</text></svg>"
    )


def write_dashboard(
    run: str,
    out: str | None = None,
    pages: int = 128,
    llm_url: str | None = None,
    llm_model: str = "gpt-4o-mini",
    store_path: str | None = None,
    progress: bool = False,
    split_with: str | None = None,
    device: str | None = None,
    model_dtype: str | None = None,
) -> str:
    from extract.models import resolve_device, resolve_model_dtype
    from saejax.interp.eval import resolve_run_store
    from saejax.interp.features import (
        examples_key,
        quantile_examples,
        read_examples_cache,
        scan_examples,
    )
    from saejax.interp.lm import load_cached, model_for
    from saejax.train.sae_files import load_sae

    device = resolve_device(device)  # a device that is not there fails before any work
    model_dtype = resolve_model_dtype(model_dtype, device)
    default_out = os.path.join(run, "dashboard")
    final = out or default_out
    io.check_output_dir(final, "dashboard", reads=[run], allowed=[default_out])
    sae = load_sae(run)
    store, hook = resolve_run_store(run, sae, store_path)
    top, samples = 20, 64  # scan_examples' defaults; `saejax features RUN` caches the same
    result = read_examples_cache(run, examples_key(run, store, hook, top, samples, len(store)))
    if result is None:
        result = scan_examples(sae, store, hook, top, samples, progress=progress)
    n_rows = int(result["n_rows"])
    tokens = store.tokens(0, n_rows)
    doc = store.doc(0, n_rows)
    token_freq = dict(zip(*[a.tolist() for a in np.unique(tokens, return_counts=True)]))
    loaded = load_cached(*model_for(sae.info, store.meta), model_dtype, device)
    tok = loaded.tokenizer
    effects = unembedding_effects(loaded, sae)
    explainer = LLMExplainer(llm_url, llm_model) if llm_url else None
    splits = None
    if split_with:
        from saejax.interp.splitting import closest_latents

        larger = load_sae(split_with)
        if larger.spec.d_in != sae.spec.d_in:
            raise SaejaxError(f"{split_with} has d_in {larger.spec.d_in}, not {sae.spec.d_in}")
        splits = closest_latents(
            np.asarray(sae.params["W_dec"]), np.asarray(larger.params["W_dec"])
        )
        split_name = os.path.basename(os.path.abspath(split_with))

    density = result["fire_count"] / max(n_rows, 1)
    mean_act = result["act_sum"] / np.maximum(result["fire_count"], 1)
    d_sae = sae.spec.d_sae
    paged = [i for i in np.argsort(-density) if density[i] > 0][:pages]

    def context(row: int):
        lo, hi = max(0, row - CONTEXT_BEFORE), min(n_rows, row + CONTEXT_AFTER + 1)
        same = doc[lo:hi, 0] == doc[row, 0]
        idx = np.arange(lo, hi)[same]
        return idx, tokens[idx]

    with io.atomic_dir(final, kind="dashboard") as tmp:
        os.makedirs(os.path.join(tmp, "latents"))
        explanations = {}
        for latent in paged:
            latent = int(latent)
            examples = [
                (float(v), int(r))
                for v, r in zip(result["top_vals"][latent], result["top_rows"][latent])
                if r >= 0 and v > 0
            ]
            rows_needed = sorted({int(r) for _, row in examples for r in context(row)[0]})
            acts = {}
            if rows_needed:
                x = store.take(np.asarray(rows_needed), hook).astype(np.float32)
                f = np.asarray(sae.encode(x))[:, latent]
                acts = dict(zip(rows_needed, f.tolist()))
            peak = max([v for v, _ in examples] or [1.0])
            blocks, plain, top_tokens = [], [], []
            for value, row in examples:
                idx, ids = context(row)
                strings = _token_strings(tok, ids)
                spans = "".join(
                    _shade(s, acts.get(int(r), 0.0), peak, int(r) == row)
                    for s, r in zip(strings, idx)
                )
                blocks.append(f'<tr><td>{value:.3f}</td><td class="ctx">{spans}</td></tr>')
                at = int(np.flatnonzero(idx == row)[0])
                top_tokens.append(strings[at])
                plain.append(marked_context(tok, ids, at, one_line=False))
            quant = []
            for value, row in quantile_examples(result, latent):
                idx, ids = context(row)
                strings = _token_strings(tok, ids)
                quant.append(
                    f'<tr><td>{value:.3f}</td><td class="ctx">'
                    + "".join(
                        _shade(s, value if int(r) == row else 0.0, peak, int(r) == row)
                        for s, r in zip(strings, idx)
                    )
                    + "</td></tr>"
                )
            valid = result["sample_priority"][latent] >= 0
            sample_tokens = tokens[result["sample_rows"][latent][valid]].tolist()
            summary = builtin_explanation(top_tokens, sample_tokens, token_freq, tok)
            title, llm_text = "", ""
            if explainer is not None and plain:
                got = explainer.explain(plain)
                if got:
                    title, llm_text = got
            explanations[latent] = (title, summary)
            effect_html = "<p>not in the residual stream: no unembedding view</p>"
            if effects is not None:
                pro = ", ".join(
                    html.escape(repr(t)) for t in _token_strings(tok, effects[0][latent])
                )
                sup = ", ".join(
                    html.escape(repr(t)) for t in _token_strings(tok, effects[1][latent])
                )
                effect_html = (
                    f'<p class="pos">promotes: {pro}</p><p class="neg">suppresses: {sup}</p>'
                )
            split_html = ""
            if splits is not None:
                split_html = (
                    f"<h2>in the larger SAE ({html.escape(split_name)}, d_sae "
                    f'{len(larger.params["W_dec"]):,})</h2><p id="splits">'
                    + ", ".join(
                        f"latent {int(j)} (cos {c:.3f})"
                        for j, c in zip(splits[0][latent], splits[1][latent])
                    )
                    + "</p>"
                )
            page = f"""<!doctype html><html><head><meta charset="utf-8"><title>latent {latent}</title>
    <style>{_CSS}</style></head><body><p><a href="../index.html">all latents</a></p>
    <h1 id="title">latent {latent}{(" — " + html.escape(title)) if title else ""}</h1>
    <p>density {density[latent]:.4%} of {n_rows:,} rows; mean activation when active {mean_act[latent]:.3f}</p>
    <p id="explanation">{html.escape(llm_text) + "<br>" if llm_text else ""}{html.escape(summary)}</p>
    <h2>activation histogram (random activating rows)</h2>{_histogram_svg(result["sample_vals"][latent][valid])}
    <h2>output tokens (through the unembedding)</h2>{effect_html}{split_html}
    <h2>top examples</h2><table id="top">{"".join(blocks)}</table>
    <h2>at activation quantiles</h2><table id="quantiles">{"".join(quant)}</table></body></html>"""
            with open(os.path.join(tmp, "latents", f"{latent}.html"), "w") as fh:
                fh.write(page)

        rows_html = []
        for latent in range(d_sae):
            title, summary = explanations.get(latent, ("", ""))
            name = (
                f'<a href="latents/{latent}.html">{latent}</a>'
                if latent in explanations
                else str(latent)
            )
            rows_html.append(
                f'<tr><td data-v="{latent}">{name}</td><td data-v="{density[latent]:.8f}">'
                f'{density[latent]:.4%}</td><td data-v="{mean_act[latent]:.6f}">'
                f"{mean_act[latent]:.3f}</td><td>{html.escape(title)}</td>"
                f"<td>{html.escape(summary)}</td></tr>"
            )
        dead = int(np.sum(density == 0))
        index = f"""<!doctype html><html><head><meta charset="utf-8"><title>saejax dashboard</title>
    <style>{_CSS}</style></head><body><h1>{html.escape(os.path.basename(os.path.abspath(run)))}</h1>
    <p>{sae.spec.architecture} SAE, d_in {sae.spec.d_in}, d_sae {d_sae:,}, hook {html.escape(hook)};
    {n_rows:,} rows scanned; {dead:,} latents never fired; pages for the {len(paged)} densest.</p>
    {eval_summary(run)}
    <input id="q" placeholder="search latents, tokens, explanations"><table id="latents"><thead><tr>
    <th>latent</th><th>density</th><th>mean act.</th><th>title</th><th>summary</th></tr></thead>
    <tbody>{"".join(rows_html)}</tbody></table><script>{_INDEX_JS}</script></body></html>"""
        plots = _write_plots(run, density, tmp)
        if plots:
            index = index.replace(
                "<input id=",
                "".join(
                    f'<img src="{name}" alt="{name}" style="max-width:48%;margin-right:8px">'
                    for name in plots
                )
                + "<br><input id=",
                1,
            )
        with open(os.path.join(tmp, "index.html"), "w") as fh:
            fh.write(index)
    return os.path.join(final, "index.html")


def eval_summary(run: str) -> str:
    """The held-out figures of RUN/eval.json as a paragraph: FVU overall and without outlier
    rows side by side (attention-sink rows can carry most of the variance), L0; "" when the
    run has no eval.json (an SAE folder, or a run not finished)."""
    try:
        with open(os.path.join(run, "eval.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return ""
    if not isinstance(m, dict) or not isinstance(m.get("fvu"), (int, float)):
        return ""
    parts = [f"held-out FVU {m['fvu']:.4f}"]
    if isinstance(m.get("fvu_without_outliers"), (int, float)):
        parts.append(
            f"without outliers {m['fvu_without_outliers']:.4f} ({m.get('outlier_rows', 0):,} "
            f"rows with norm &gt; {m.get('outlier_norm_ratio', 10):g}× the median left out)"
        )
    if isinstance(m.get("l0"), (int, float)):
        parts.append(f"L0 {m['l0']:.1f}")
    return f'<p id="eval">{"; ".join(parts)}</p>'


def read_metrics(path: str) -> list[dict]:
    """The records of metrics.jsonl that have tokens; a line that is not a whole JSON record
    (the partial last line of a run killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("tokens"), (int, float)):
                records.append(record)
    return records


def _write_plots(run: str, density: np.ndarray, folder: str) -> list[str]:
    """density.png (log10 firing frequency over latents) and, for a run, training.png
    (FVU overall and without outlier rows, L0 and dead fraction against tokens from
    metrics.jsonl). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: no plots in the dashboard (needs matplotlib: pip install 'saejax[plots]')",
            file=sys.stderr,
        )
        return []
    names = []
    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    live = density[density > 0]
    ax.hist(np.log10(live) if len(live) else [], bins=40, color="#4a7bd0")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"density ({int(np.sum(density == 0))} never fired)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "density.png"))
    plt.close(fig)
    names.append("density.png")
    metrics_path = os.path.join(run, "metrics.jsonl")
    if os.path.exists(metrics_path):
        records = read_metrics(metrics_path)
        if records:
            tokens = [r["tokens"] for r in records]
            fig, axes = plt.subplots(1, 3, figsize=(9, 2.8), dpi=110)
            for ax, key in zip(axes, ("fvu", "l0", "dead_fraction")):
                ax.plot(tokens, [r.get(key) for r in records], label=key)
                ax.set_title(key)
                ax.set_xlabel("tokens")
            if any("fvu_without_outliers" in r for r in records):  # runs logged before lack it
                axes[0].plot(
                    tokens,
                    [r.get("fvu_without_outliers") for r in records],
                    label="without outliers",
                )
                axes[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(folder, "training.png"))
            plt.close(fig)
            names.append("training.png")
    return names
