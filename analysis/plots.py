"""Figures in the style of the paper: one curve per model against relative depth."""

from __future__ import annotations

from saejax.io import save_figure


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_depth_curves(
    curves: dict, ylabel: str, title: str, path: str, zero_line: bool = True
) -> str:
    """curves: {label: (relative_depth, values)}; written atomically as PNG (or by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=150)
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=label)
    if zero_line:
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("relative depth (layer / (L − 1))")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
