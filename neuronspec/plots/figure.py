"""The one way neuronspec makes and saves a figure: ``Figure`` + Agg canvas, no pyplot state.

Matplotlib is imported when a figure is made, not with this module: a run without
``--plots-dir`` (a warm cached rerun above all) does not pay its start-up.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120


def new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def interval_half_widths(rows: list[dict], name: str, scale: float = 1.0) -> list[float] | None:
    """95% half-widths of ``name`` per row (``name_se`` times the t quantile of the row's
    ``se_df``, normal without it), or None when a row has no SE: error bars."""
    from neuronspec.uncertainty import t_quantile

    errors = [row.get(f"{name}_se") for row in rows]
    if any(error is None for error in errors):
        return None
    return [
        t_quantile(0.975, row.get("se_df")) * scale * e for row, e in zip(rows, errors, strict=True)
    ]


def plot_path(plots_dir: Path, figure_name: str, model_id: str) -> Path:
    """``plots_dir/<figure_name>_<model>.png`` with the model id made safe for a file name
    (a checkpoint path becomes its last component)."""
    name = Path(model_id).name if ("/" in model_id or "\\" in model_id) else model_id
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return Path(plots_dir) / f"{figure_name}_{safe}.png"
