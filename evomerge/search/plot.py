"""The Pareto-front plot (the first two objectives), written atomically as PNG: RUN_DIR/front.png when
`search`, `resume` or `demo` ends a search, and wherever `status --plot` asks."""

from __future__ import annotations

import io
from pathlib import Path

from evomerge.search.rundir import write_atomic

FRONT_PLOT = "front.png"  # the plot's name in the run directory
MIN_ACCURACY_SPAN = 0.02  # an axis of accuracies spans at least 2 points: 5e-6 apart must not look like a cliff
COST_UNITS = {"cost:params": "parameters", "cost:path_length": "layers on the path"}


def axis_label(objective: str) -> str:
    """What an objective's axis shows: a task's estimated accuracy, or a cost with its unit."""
    if objective.startswith("cost:"):
        return f"{objective.removeprefix('cost:')} ({COST_UNITS.get(objective, 'cost')}, lower is better)"
    return f"{objective}: estimated accuracy (higher is better)"


def plot_front(state: dict, out: Path) -> Path | None:
    """Scatter the front on its first two objectives, ties counted; None when there is nothing to draw."""
    fig = front_figure(state)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    write_atomic(out, buf.getvalue())
    return out


def front_figure(state: dict):
    """The matplotlib figure of plot_front (None when the front is empty or has one objective)."""
    front = state["front"]
    if not front or len(front[0]["objectives"]) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter, StrMethodFormatter

    x_name, y_name = list(front[0]["objectives"])[:2]
    points = sorted((f["objectives"][x_name], f["objectives"][y_name], f.get("ties", 1)) for f in front)
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    xs, ys, ties = zip(*points)
    ax.plot(xs, ys, "o-", drawstyle="steps-post")
    for x, y, n in points:
        if n > 1:
            ax.annotate(f"×{n}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for axis, name, values, set_lim in ((ax.xaxis, x_name, xs, ax.set_xlim), (ax.yaxis, y_name, ys, ax.set_ylim)):
        axis.set_major_locator(MaxNLocator(nbins=5))  # few enough that percent labels never overlap
        if name.startswith("cost:"):
            axis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # whole numbers: no offset, no 1e9
        else:
            axis.set_major_formatter(PercentFormatter(xmax=1.0))  # as many decimals as the ticks need
            low, high = min(values), max(values)
            pad = max(0.0, MIN_ACCURACY_SPAN - (high - low)) / 2 + 0.05 * (high - low)
            set_lim(low - pad, high + pad)
    ax.set_xlabel(axis_label(x_name))
    ax.set_ylabel(axis_label(y_name))
    clones = sum(ties) - len(ties)
    ax.set_title(f"Pareto front, generation {state['generation']}: {len(points)} distinct"
                 + (f" (+{clones} tied)" if clones else ""))
    ax.grid(alpha=0.3)
    return fig
