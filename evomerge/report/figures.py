"""Plotly figures (as JSON dicts, for Plotly.react in the page) of what data.py computes.

Axes of accuracies read in percent with a minimum span (as the front plot of `status --plot`), costs as plain
integers with thousands separators: no offset or SI notation anywhere. Every point of a front figure carries its
candidate id (customdata), which is what a click in the page opens.
"""

from __future__ import annotations

import datetime as dt
from itertools import combinations
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from evomerge.search.plot import MIN_ACCURACY_SPAN

FRONT_COLOR, NEW_COLOR, CLOUD_COLOR = "#1f6fb4", "#e8710a", "#b9c0c8"
STATUS_COLORS = {"ok": "#2e9d57", "failed": "#d0342c", "running": "#9aa3ad"}
# The page applies this template to every figure; figures carry none (a template set per figure costs ~0.1 s to
# validate and ~7 KB of JSON each: minutes and tens of MB for a report of a few thousand candidates).
THEME = "plotly_white"
_BARE = {"template": "none"}  # what figures are built with (plotly's default template would be copied into each)
_MARGIN = {"l": 70, "r": 30, "t": 50, "b": 60}


def as_json(fig: go.Figure) -> dict[str, Any]:
    out = fig.to_plotly_json()
    out["layout"].pop("template", None)  # the page applies theme()
    return out


def theme() -> dict[str, Any]:
    """The plotly template the page applies to every figure."""
    import plotly.io as pio

    return pio.templates[THEME].to_plotly_json()


def _figure(*data) -> go.Figure:
    return go.Figure(list(data), layout=_BARE)


def when(t: float | None) -> str | None:
    """Unix seconds -> a local date-time string for a plotly date axis."""
    return None if t is None else dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="milliseconds")


def _axis(objective: dict[str, Any], values: list[float]) -> dict[str, Any]:
    axis: dict[str, Any] = {"title": {"text": objective["label"]}, "exponentformat": "none", "zeroline": False}
    if objective["kind"] == "accuracy":
        axis["tickformat"] = ".1%"
        if values:
            low, high = min(values), max(values)
            pad = max(0.0, MIN_ACCURACY_SPAN - (high - low)) / 2 + 0.05 * (high - low)
            axis["range"] = [low - pad, high + pad]
    else:
        axis["tickformat"] = ",d"
        axis["separatethousands"] = True
        if values and max(values) - min(values) <= 10:  # a few whole numbers (path lengths): one tick each
            low, high = min(values), max(values)
            axis["dtick"] = 1
            axis["range"] = [low - 0.5, high + 0.5]
    return axis


def _hover(objectives: list[dict[str, Any]]) -> str:
    fmt = {"accuracy": ":.4f", "cost": ":,.0f"}
    lines = [f"{o['name']}: %{{customdata[{i + 2}]{fmt[o['kind']]}}}" for i, o in enumerate(objectives)]
    return "<b>%{customdata[0]}</b><br>" + "<br>".join(lines) + "%{customdata[1]}<extra></extra>"


def _round(v: float) -> float:
    return float(f"{v:.6g}")  # what a plot can show; halves the JSON of a large cloud


def _custom(point: dict[str, Any], objectives: list[dict[str, Any]]) -> list:
    ties = point.get("ties", 1)
    note = f"<br>{ties} tied (same scores)" if ties > 1 else ""
    if not point.get("feasible", True):
        note += "<br>over max_path_length: not on any front"
    return [point["id"], note, *(point["objectives"][o["name"]] for o in objectives)]


# ---------------------------------------------------------------------------------------------------- front


def front_figure(ov: dict[str, Any], generation: int | None = None) -> dict[str, Any]:
    """The front after `generation` (default: the latest), over the evaluated cloud of generations 0..generation:
    a scatter for two objectives, one panel per pair for more, objective per generation for one."""
    objectives = ov["objectives"]
    fronts = ov["fronts"]
    if not fronts:
        fig = go.Figure(layout={**_BARE, "height": 420, "margin": _MARGIN,
                                "title": {"text": "Pareto front: no evaluation has finished yet"}})
        return as_json(fig)
    g = len(fronts) - 1 if generation is None else max(0, min(generation, len(fronts) - 1))
    front = fronts[g]["front"]
    cloud = [p for p in ov["points"] if p["generation"] <= g]
    n = len(objectives)
    pairs = list(combinations(range(n), 2)) if n > 1 else []
    cols = min(len(pairs), 3) or 1
    rows = -(-len(pairs) // cols) if pairs else 1
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.12, vertical_spacing=0.18, figure=_figure())
    clones = sum(p["ties"] for p in front) - len(front)
    title = (f"Pareto front after generation {g}: {len(front)} distinct point(s)" + (f" (+{clones} tied)" if clones
             else "") + f", {len(cloud)} ok evaluation(s) so far")
    if n == 1:
        _front_panel(fig, objectives, cloud, front, g, None, 1, 1, True)
    for k, (i, j) in enumerate(pairs):
        _front_panel(fig, objectives, cloud, front, g, (i, j), k // cols + 1, k % cols + 1, k == 0)
    fig.update_layout(title={"text": title}, height=max(440, 380 * rows), margin=_MARGIN,
                      legend={"orientation": "h", "y": -0.18 if rows == 1 else -0.08}, hovermode="closest",
                      clickmode="event")
    return as_json(fig)


def _front_panel(fig, objectives, cloud, front, g, pair, row, col, legend) -> None:
    fmt = {"accuracy": ":.4f", "cost": ":,.0f"}
    if pair is None:  # one objective: its value per generation
        o = objectives[0]
        xy = lambda pts: ([p["generation"] for p in pts], [_round(p["objectives"][o["name"]]) for p in pts])
        xaxis = {"title": {"text": "generation"}, "tickformat": "d"}
        yaxis = _axis(o, [p["objectives"][o["name"]] for p in cloud])
        cloud_hover = f"generation %{{x}}<br>{o['name']}: %{{y{fmt[o['kind']]}}}"
    else:
        ox, oy = objectives[pair[0]], objectives[pair[1]]
        xy = lambda pts: ([_round(p["objectives"][ox["name"]]) for p in pts],
                          [_round(p["objectives"][oy["name"]]) for p in pts])
        xaxis = _axis(ox, [p["objectives"][ox["name"]] for p in cloud])
        yaxis = _axis(oy, [p["objectives"][oy["name"]] for p in cloud])
        cloud_hover = f"{ox['name']}: %{{x{fmt[ox['kind']]}}}<br>{oy['name']}: %{{y{fmt[oy['kind']]}}}"
    hover = _hover(objectives)
    shown = sorted(front, key=lambda p: xy([p])[0][0])
    new = [p for p in front if p["generation"] == g]
    feasible = all(p["feasible"] for p in cloud)
    traces = [  # the cloud carries only ids (a report holds one cloud per generation: keep it small)
        go.Scatter(x=xy(cloud)[0], y=xy(cloud)[1], mode="markers", name=f"evaluated (generations 0-{g})",
                   customdata=[[p["id"]] for p in cloud],
                   hovertemplate="<b>%{customdata[0]}</b><br>" + cloud_hover + "<extra></extra>",
                   marker={"color": CLOUD_COLOR, "size": 7,
                           "symbol": "circle" if feasible else ["circle" if p["feasible"] else "x" for p in cloud]}),
        go.Scatter(x=xy(shown)[0], y=xy(shown)[1], mode="lines+markers", name="front (click a point)",
                   customdata=[_custom(p, objectives) for p in shown], hovertemplate=hover,
                   line={"color": FRONT_COLOR, "width": 1, "dash": "dot"},
                   marker={"color": FRONT_COLOR, "size": [11 + 2 * min(p["ties"] - 1, 5) for p in shown],
                           "line": {"color": "white", "width": 1}}),
        go.Scatter(x=xy(new)[0], y=xy(new)[1], mode="markers", name=f"new on the front in generation {g}",
                   customdata=[_custom(p, objectives) for p in new], hovertemplate=hover,
                   marker={"color": "rgba(0,0,0,0)", "size": 17, "line": {"color": NEW_COLOR, "width": 2.5}}),
    ]
    for t in traces:
        t.showlegend = legend
        fig.add_trace(t, row=row, col=col)
    fig.update_xaxes(row=row, col=col, **xaxis)
    fig.update_yaxes(row=row, col=col, **yaxis)


# ---------------------------------------------------------------------------------------------------- overview


def overview_figures(ov: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"hypervolume": hypervolume_figure(ov), "evaluations": evaluations_figure(ov),
            "throughput": throughput_figure(ov), "timeline": timeline_figure(ov)}


def hypervolume_figure(ov: dict[str, Any]) -> dict[str, Any]:
    hv = ov["hypervolume"]
    gens = [p["generation"] for p in hv["per_generation"]]
    fig = _figure()
    fig.add_trace(go.Scatter(x=gens, y=[p["hypervolume"] for p in hv["per_generation"]], mode="lines+markers",
                             name="hypervolume of the front of generations 0..g", line={"color": FRONT_COLOR},
                             hovertemplate="generation %{x}: %{y:.6f}<extra></extra>"))
    if hv["baseline"] is not None and gens:
        fig.add_trace(go.Scatter(x=[min(gens), max(gens)], y=[hv["baseline"]["hypervolume"]] * 2, mode="lines",
                                 name=f"baseline: {hv['baseline']['label']}",
                                 line={"color": NEW_COLOR, "dash": "dash"}, hoverinfo="skip"))
    fig.update_layout(height=360, margin=_MARGIN,
                      title={"text": f"Hypervolume per generation (reference: {hv['reference_note']})"},
                      xaxis={"title": {"text": "generation"}, "tickformat": "d", "dtick": 1 if len(gens) <= 20 else None},
                      yaxis={"title": {"text": "hypervolume"}, "exponentformat": "none", "separatethousands": True},
                      legend={"orientation": "h", "y": -0.25})
    return as_json(fig)


def evaluations_figure(ov: dict[str, Any]) -> dict[str, Any]:
    stats = ov["generation_stats"]
    gens = [s["generation"] for s in stats]
    fig = make_subplots(specs=[[{"secondary_y": True}]], figure=_figure())
    for status in ("ok", "failed", "running"):
        fig.add_trace(go.Bar(x=gens, y=[s[status] for s in stats], name=status, marker_color=STATUS_COLORS[status],
                             hovertemplate=f"generation %{{x}}: %{{y}} {status}<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=gens, y=[s["per_hour"] for s in stats], mode="lines+markers",
                             name="evaluations per hour", line={"color": "#333"},
                             hovertemplate="generation %{x}: %{y:,.0f} evaluations per hour<extra></extra>"),
                  secondary_y=True)
    fig.update_layout(barmode="stack", height=360, margin=_MARGIN,
                      title={"text": "Evaluations per generation"}, legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(title_text="generation", tickformat="d", dtick=1 if len(gens) <= 20 else None)
    fig.update_yaxes(title_text="evaluations", tickformat="d", secondary_y=False)
    fig.update_yaxes(title_text="evaluations per hour", exponentformat="none", tickformat=",.0f",
                     rangemode="tozero", showgrid=False, secondary_y=True)
    return as_json(fig)


def throughput_figure(ov: dict[str, Any]) -> dict[str, Any]:
    done = ov["throughput"]["finished"]
    fig = _figure(go.Scatter(x=[when(p["t"]) for p in done], y=[p["done"] for p in done], mode="lines",
                               line={"shape": "hv", "color": FRONT_COLOR}, name="finished evaluations",
                               hovertemplate="%{x}: %{y} finished<extra></extra>"))
    rate = ov["throughput"]["per_hour"]
    fig.update_layout(height=320, margin=_MARGIN,
                      title={"text": "Finished evaluations over time" + (f" ({rate:,.0f} per hour overall)" if rate
                                                                         else "")},
                      xaxis={"title": {"text": "time"}, "type": "date"},
                      yaxis={"title": {"text": "evaluations finished"}, "tickformat": "d", "rangemode": "tozero"})
    return as_json(fig)


def timeline_figure(ov: dict[str, Any]) -> dict[str, Any]:
    """One row per worker, one bar per evaluation (start = finish - measured total), coloured by status."""
    items = ov["timeline"]
    workers = sorted({i["worker"] for i in items})
    fig = _figure()
    for status in ("ok", "failed", "running"):
        mine = [i for i in items if i["status"] == status]
        if not mine:
            continue
        end = lambda i: i["end"] if i["end"] is not None else max(i["start"], _now(ov))
        fig.add_trace(go.Bar(
            orientation="h", y=[i["worker"] for i in mine], base=[when(i["start"]) for i in mine],
            x=[max(end(i) - i["start"], 0.0) * 1000 for i in mine], name=status,  # bar length: milliseconds
            marker={"color": STATUS_COLORS[status], "line": {"color": "white", "width": 0.5}},
            customdata=[[i["id"], i["generation"], end(i) - i["start"]] for i in mine],
            hovertemplate="<b>%{customdata[0]}</b><br>generation %{customdata[1]}, %{customdata[2]:.2f} s"
                          "<extra></extra>"))
    fig.update_layout(barmode="overlay", height=180 + 40 * max(len(workers), 1), margin=_MARGIN,
                      title={"text": "Worker activity (one bar per evaluation)"},
                      xaxis={"type": "date", "title": {"text": "time"}},
                      yaxis={"title": {"text": "worker"}, "categoryorder": "array", "categoryarray": workers,
                             "type": "category"},
                      legend={"orientation": "h", "y": -0.3})
    return as_json(fig)


def _now(ov: dict[str, Any]) -> float:
    ends = [i["end"] for i in ov["timeline"] if i["end"] is not None]
    return max(ends, default=0.0)


# ---------------------------------------------------------------------------------------------------- candidate


def candidate_figures(c: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe drawn: per-layer heatmaps of a parameter-space recipe (one per parameter), or the layer path of a
    data-flow one (then the heatmaps of a hybrid's merged source)."""
    view = c["view"]
    if view["kind"] == "ps":
        return _ps_heatmaps(view, "")
    if view["kind"] in ("dataflow", "hybrid"):
        figs = [_path_figure(view)]
        for s in view["sources"]:
            if s["merge"] is not None:
                figs += _ps_heatmaps(s["merge"], f"{s['name']} (merged source): ")
        return figs
    return []


# Per-candidate figures are plain plotly.js specs, not graph_objects: a report draws thousands of them, and plotly's
# validation costs ~10 ms each. tests/test_dashboard.py checks that plotly accepts them (go.Figure(spec)).


def _ps_heatmaps(view: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    figs = []
    params = list(dict.fromkeys(r["param"] for r in view["rows"]))
    scalars = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in view["scalars"].items())
    for param in params:
        rows = [r for r in view["rows"] if r["param"] == param]
        z = [r["values"] for r in rows]
        flat = [v for row in z for v in row]
        heatmap = {"type": "heatmap", "z": z, "x": list(range(view["layers"])),
                   "y": [f"{r['source']} · {r['tensors']}" for r in rows], "colorscale": "Viridis",
                   "zmin": min(0.0, min(flat)), "zmax": max(1.0, max(flat)), "texttemplate": "%{z:.2f}",
                   "colorbar": {"title": {"text": param}},
                   "hovertemplate": "%{y}<br>layer %{x}: " + param + " %{z:.4f}<extra></extra>"}
        layout = {"height": 140 + 46 * len(rows), "margin": {**_MARGIN, "l": 170},
                  "title": {"text": f"{prefix}{param} per layer and source ({view['method']}"
                                    + (f"; {scalars}" if scalars else "") + ")"},
                  "xaxis": {"title": {"text": "layer"}, "tickformat": "d",
                            **({"dtick": 1} if view["layers"] <= 40 else {})},
                  "yaxis": {"autorange": "reversed", "type": "category"}}
        figs.append({"data": [heatmap], "layout": layout})
    return figs


def _path_figure(view: dict[str, Any]) -> dict[str, Any]:
    path = view["path"]
    order = [s["name"] for s in view["sources"]]
    trace = {"type": "scatter", "x": [p["step"] for p in path], "y": [p["source"] for p in path],
             "mode": "lines+markers+text", "text": [str(p["layer"]) for p in path], "textposition": "top center",
             "cliponaxis": False, "line": {"color": CLOUD_COLOR},
             "marker": {"size": 16, "color": [p["scale"] for p in path], "colorscale": "RdBu", "cmid": 1.0,
                        "colorbar": {"title": {"text": "scale"}}, "line": {"color": "#333", "width": 1}},
             "customdata": [[p["layer"], p["scale"]] for p in path],
             "hovertemplate": "step %{x}: %{y} layer %{customdata[0]}, scale %{customdata[1]:.3f}<extra></extra>"}
    layout = {"height": 200 + 40 * len(order), "margin": {**_MARGIN, "l": 120},
              "title": {"text": f"Layer path: {view['length']} layers (labels: the source's layer; colour: the "
                                "scale of the hidden state entering it)"},
              "xaxis": {"title": {"text": "step on the path"}, "tickformat": "d",
                        **({"dtick": 1} if view["length"] <= 40 else {})},
              "yaxis": {"title": {"text": "source"}, "type": "category", "categoryorder": "array",
                        "categoryarray": order[::-1]}}
    return {"data": [trace], "layout": layout}
