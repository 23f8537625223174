"""The Pareto-front plot (the first two objectives), written atomically as PNG: RUN_DIR/front.png when
`search`, `resume` or `demo` ends a search, and wherever `status --plot` asks."""

from __future__ import annotations

import io
from pathlib import Path

from evomerge.search.rundir import write_atomic

FRONT_PLOT = "front.png"  # the plot's name in the run directory


def plot_front(state: dict, out: Path) -> Path | None:
    """Scatter the front on its first two objectives; None when there is nothing to draw."""
    front = state["front"]
    if not front or len(front[0]["objectives"]) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    x_name, y_name = list(front[0]["objectives"])[:2]
    points = sorted((f["objectives"][x_name], f["objectives"][y_name]) for f in front)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(*zip(*points), "o-", drawstyle="steps-post")
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.set_title(f"Pareto front, generation {state['generation']}")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    write_atomic(out, buf.getvalue())
    return out
