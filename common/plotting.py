"""Small plotting helpers shared by the generators, engines and tools (headless matplotlib)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["new_figure", "save_figure"]


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``plt.subplots`` on the non-interactive Agg backend (works on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, **kwargs)


def save_figure(fig, out_png: str | Path, dpi: int = 90, tight: bool = True) -> Path:
    """Lay out, write and close ``fig``; creates the parent folder; returns the PNG path."""
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png
