"""Figures for the PNGs the library writes, without touching matplotlib's global state.

Library code must not call ``matplotlib.use(...)`` or go through ``pyplot``: in a notebook that would switch the
user's backend (or register figures in pyplot's global list). :func:`subplots` builds a :class:`Figure` with
matplotlib's object API on the Agg canvas, which renders PNGs on any machine (no display needed), whatever
backend the user has chosen; :func:`save_figure` writes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["colormap", "save_figure", "subplots"]

# keyword arguments of ``plt.subplots`` that belong to the Figure, the rest go to ``Figure.subplots``
_FIGURE_KWARGS = ("figsize", "dpi", "facecolor", "edgecolor", "layout")


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """Like ``plt.subplots``: returns ``(figure, axes)``, with ``figsize``/``dpi``/... for the figure and
    ``squeeze``/``sharex``/``sharey``/``subplot_kw``/``gridspec_kw`` for the axes, but on an Agg canvas of its own
    (no pyplot, no backend switch; the figure is freed with its last reference, no ``close`` needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**{k: kwargs.pop(k) for k in _FIGURE_KWARGS if k in kwargs})
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def colormap(name: str) -> Any:
    """The registered colormap ``name`` (``plt.get_cmap`` without importing pyplot)."""
    import matplotlib

    return matplotlib.colormaps[name]


def save_figure(fig: Any, out_png: str | Path, dpi: int = 90, tight: bool = True) -> Path:
    """Lay out (``tight``) and write ``fig`` as a PNG, creating the parent folder; returns the PNG path.

    A figure made by pyplot (e.g. in a user's script) is also closed, so pyplot's figure list does not grow."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(out_png, dpi=dpi)
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:  # only when pyplot is already loaded: importing it here is what this module avoids
        plt.close(fig)
    return out_png
