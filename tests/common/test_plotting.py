"""The library's PNG writers leave matplotlib's global state alone (issue 12, point 7): no ``matplotlib.use`` in
library code, the user's backend is kept, and no figure is left in pyplot's list."""

from __future__ import annotations

import ast
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from common.plotting import colormap, save_figure, subplots

REPO_ROOT = Path(__file__).resolve().parents[2]


def _global_matplotlib_uses(tree: ast.AST) -> list[int]:
    """Lines of ``matplotlib.use(...)`` calls and of pyplot imports in a parsed module."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "matplotlib":
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name == "matplotlib.pyplot" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module == "matplotlib.pyplot" or (
                node.module == "matplotlib" and any(a.name == "pyplot" for a in node.names))):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_source_check_finds_what_it_looks_for():
    code = "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nfrom matplotlib import pyplot\n"
    assert _global_matplotlib_uses(ast.parse(code)) == [2, 3, 4]


def test_no_library_module_chooses_the_backend_or_uses_pyplot():
    offenders = [f"{path.relative_to(REPO_ROOT)}:{line}" for path in sorted((REPO_ROOT / "common").rglob("*.py"))
                 for line in _global_matplotlib_uses(ast.parse(path.read_text()))]
    assert not offenders, "library modules must not choose the backend or use pyplot: " + ", ".join(offenders)


@pytest.fixture
def user_backend():
    """A backend the library would not choose itself (a notebook user's choice), restored afterwards."""
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    yield "pdf"
    matplotlib.use(before)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_engine_plots_keep_the_users_backend_and_leave_no_pyplot_figures(user_backend, tmp_path):
    import matplotlib.pyplot as plt

    from common.engines.echo_inference import plot_echo_overlay
    from common.engines.paired import _robustness_plot
    from common.engines.registration import plot_registration_examples
    from common.engines.tracking import plot_strain_curve, plot_temporal_invariance, plot_tracks_on_frame

    rng = np.random.default_rng(0)
    frame = rng.random((32, 40))
    tracks = rng.random((5, 3, 2)) * 30
    lab = (frame > 0.5).astype(np.int64)
    pngs = [
        plot_tracks_on_frame(frame, tracks, tmp_path / "tracks.png", query_frame=0, reference=tracks),
        plot_strain_curve(np.linspace(0, -20, 10), tmp_path / "strain.png", fps=30.0, ed=0, es=5, gls=-20.0),
        plot_temporal_invariance([{"phase": 0.1, "delta_avg": 50.0, "mte": 2.0},
                                  {"phase": 0.5, "delta_avg": 60.0, "mte": 1.0}], tmp_path / "ti.png"),
        plot_registration_examples([{"name": "p", "source": frame, "target": frame, "warped": frame, "score": frame,
                                     "displacement": np.zeros((2, 32, 40)), "source_mask": lab, "target_mask": lab}],
                                   tmp_path / "reg.png"),
        plot_echo_overlay(np.stack([frame, frame]), np.stack([lab, lab]), tmp_path / "echo.png",
                          label=np.stack([lab, lab]), uncertainty=np.stack([frame, frame])),
    ]
    _robustness_plot([{"condition": "clean", "kind": "clean", "severity": 0.0, "mDice_ED": 0.8, "mDice_ES": 0.7},
                      {"condition": "blur", "kind": "blur", "severity": 0.1, "mDice_ED": 0.7, "mDice_ES": 0.6}],
                     tmp_path / "robust.png")
    pngs.append(tmp_path / "robust.png")
    for p in pngs:
        w, h = png_size(Path(p))
        assert w > 100 and h > 100, (p, w, h)
    assert matplotlib.get_backend() == user_backend
    assert plt.get_fignums() == []


def test_helper_figure_is_rendered_on_its_own_canvas(user_backend, tmp_path):
    fig, axes = subplots(2, 3, figsize=(6, 4), squeeze=False, sharex=True)
    assert axes.shape == (2, 3) and fig.get_size_inches().tolist() == [6.0, 4.0]
    axes[0, 0].imshow(np.arange(12.0).reshape(3, 4), cmap=colormap("turbo"))
    out = save_figure(fig, tmp_path / "sub" / "fig.png", dpi=50)
    assert out == tmp_path / "sub" / "fig.png" and png_size(out) == (300, 200)
    assert matplotlib.get_backend() == user_backend
