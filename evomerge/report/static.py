"""The page of the dashboard and of the report: one self-contained HTML document (CSS and script inline).

The same script serves both. Live (`evomerge dashboard`): it polls the server's /api endpoints every few seconds
and loads plotly.js from the server (/plotly.js, the copy inside the plotly wheel). Static (`evomerge report`):
plotly.js and every view's data are inlined, so the file opens offline, from anywhere. Nothing is fetched from
the internet either way. Text from the run directory (ids, error messages, recipes) only ever enters the page as
text nodes, never as markup.
"""

from __future__ import annotations

import json
from typing import Any

PLOTLY_ROUTE = "plotly.js"  # relative: the page works under any prefix a proxy may add


def plotly_js() -> str:
    """plotly.js as shipped inside the plotly wheel (no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _script_json(value: Any) -> str:
    # JSON inside <script type="application/json">: "</" would end the element early, so it is escaped
    return json.dumps(value, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")


def live_page(title: str, poll_ms: int) -> str:
    """The dashboard's page: data from /api, plotly.js from /plotly.js."""
    return _page(title, {"mode": "live", "poll_ms": poll_ms}, f'<script src="{PLOTLY_ROUTE}"></script>')


def static_page(title: str, bundle: dict[str, Any]) -> str:
    """The report: plotly.js and `bundle` ({"overview", "fronts", "candidates"}) inlined."""
    return _page(title, {"mode": "static", "bundle": bundle}, f"<script>{plotly_js()}</script>")


def _page(title: str, config: dict[str, Any], plotly_tag: str) -> str:
    from html import escape

    from evomerge.report.figures import theme

    config = {**config, "theme": theme()}
    return (_HTML.replace("{{TITLE}}", escape(title)).replace("{{PLOTLY}}", plotly_tag)
            .replace("{{CONFIG}}", _script_json(config)))


_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2329;
         background: #f4f6f8; }
  header { background: #1f2d3d; color: #fff; padding: 12px 24px; }
  header h1 { font-size: 20px; margin: 0 0 4px 0; }
  header .sub { font-size: 13px; opacity: .85; }
  main { padding: 12px 24px 40px; max-width: 1500px; margin: auto; }
  section { background: #fff; border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.12); padding: 12px 16px;
            margin: 14px 0; }
  section h2 { font-size: 17px; margin: 4px 0 8px 0; }
  .row { display: flex; gap: 16px; flex-wrap: wrap; } .row > div { flex: 1 1 480px; min-width: 0; }
  .note { font-size: 13px; color: #56616c; margin: 4px 0; }
  table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
  th, td { border-bottom: 1px solid #e3e7eb; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr.pick { cursor: pointer; } tr.pick:hover { background: #eef4fb; }
  .id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
  .badge { display: inline-block; border-radius: 9px; padding: 1px 8px; font-size: 12px; color: #fff; }
  .ok { background: #2e9d57; } .failed { background: #d0342c; } .running { background: #9aa3ad; }
  .live { color: #7be07b; } .stale { color: #ffb4a9; }
  .cells { display: flex; flex-wrap: wrap; gap: 2px; margin: 2px 0 8px; }
  .cell { width: 14px; height: 14px; border-radius: 2px; }
  .c1 { background: #2e9d57; } .c0 { background: #d0342c; }
  pre { background: #f4f6f8; padding: 8px; overflow: auto; max-height: 320px; font-size: 12px; }
  input[type=range] { width: 320px; vertical-align: middle; }
  .error { color: #b3261e; white-space: pre-wrap; }
</style>
{{PLOTLY}}
</head>
<body>
<header><h1 id="title">evomerge</h1><div class="sub" id="summary">loading...</div></header>
<main>
<section id="front-section">
  <h2>Pareto front per generation</h2>
  <div>generation <input type="range" id="generation" min="0" max="0" value="0" step="1">
    <b id="generation-label">0</b> <span class="note" id="follow-note"></span></div>
  <div id="front-figure"></div>
  <div class="note">Estimated objectives (task accuracies estimated by IRT from the anchor items; costs as counted).
    Grey: every ok evaluation up to this generation (x: over max_path_length). Click a point or a row to open it
    below.</div>
  <table id="front-table"></table>
</section>
<section>
  <h2>Hypervolume</h2>
  <div id="hypervolume-figure"></div>
  <div class="note" id="hypervolume-note"></div>
</section>
<section>
  <h2>Evaluations and failures</h2>
  <div class="row"><div id="evaluations-figure"></div><div id="throughput-figure"></div></div>
  <div class="note" id="failures-note"></div>
  <table id="failures-table"></table>
</section>
<section>
  <h2>Workers</h2>
  <table id="workers-table"></table>
  <div id="timeline-figure"></div>
</section>
<section id="candidate-section">
  <h2>Candidate</h2>
  <div><input id="candidate-input" list="candidate-ids" size="34" placeholder="candidate id (or a unique prefix)">
    <button id="candidate-button">show</button> <span class="note" id="candidate-status"></span></div>
  <datalist id="candidate-ids"></datalist>
  <div id="candidate"></div>
</section>
</main>
<script type="application/json" id="config">{{CONFIG}}</script>
<script>
"use strict";
const CONFIG = JSON.parse(document.getElementById("config").textContent);
const PLOT_OPTIONS = {responsive: true, displaylogo: false};
const state = {busy: false, version: null, overview: null, generation: null, follow: true, candidate: null};

// ---- where data comes from: the server (live) or the page itself (static) -------------------------------------
async function getJSON(path) {
  const response = await fetch(path, {cache: "no-store"});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}
const source = CONFIG.mode === "live" ? {
  overview: (version) => getJSON("api/overview" + (version ? "?version=" + encodeURIComponent(version) : "")),
  front: (g) => getJSON("api/front?generation=" + g),
  candidate: (id) => getJSON("api/candidate/" + encodeURIComponent(id)),
} : {
  overview: async (version) => version === CONFIG.bundle.overview.data.version ? {unchanged: true}
                                                                              : CONFIG.bundle.overview,
  front: async (g) => CONFIG.bundle.fronts[g],
  candidate: async (id) => {
    const ids = Object.keys(CONFIG.bundle.candidates);
    const hit = CONFIG.bundle.candidates[id] ? id : ids.filter((k) => k.startsWith(id));
    if (typeof hit === "string") return CONFIG.bundle.candidates[hit];
    if (hit.length === 1) return CONFIG.bundle.candidates[hit[0]];
    throw new Error(hit.length ? `${hit.length} ids start with ${id}: give more of it` : `no candidate ${id} in this report`);
  },
};

// ---- small DOM helpers: text only, never markup from the run ---------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v); else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}
function fill(id, ...children) { const node = document.getElementById(id); node.replaceChildren(...children.flat(Infinity)); return node; }
const pct = (v) => v === null || v === undefined ? "-" : (100 * v).toFixed(2) + "%";
const num = (v, d = 4) => v === null || v === undefined ? "-" : Number(v).toFixed(d);
const int = (v) => v === null || v === undefined ? "-" : Math.round(v).toLocaleString("en-US");
const secs = (v) => v === null || v === undefined ? "-" : Number(v).toFixed(2) + " s";
const time = (t) => t ? new Date(t * 1000).toLocaleString() : "-";
function shown(objective, v) { return objective.kind === "accuracy" ? pct(v) : int(v); }
function draw(div, figure) {
  Plotly.react(div, figure.data, {...figure.layout, template: CONFIG.theme}, PLOT_OPTIONS);
}
function plot(id, figure) {
  const div = document.getElementById(id);
  draw(div, figure);
  if (!div.dataset.clicks) {  // a click on any point that carries an id opens that candidate
    div.dataset.clicks = "1";
    div.on("plotly_click", (ev) => { const p = ev.points && ev.points[0];
      if (p && Array.isArray(p.customdata) && typeof p.customdata[0] === "string") showCandidate(p.customdata[0]); });
  }
}
function candidateLink(id) { return el("span", {class: "id"}, id); }
function pickRow(id, cells) { return el("tr", {class: "pick", onclick: () => showCandidate(id)}, cells); }

// ---- the overview ------------------------------------------------------------------------------------------------
async function refresh() {
  if (state.busy) return;  // a slow update is still drawing: skip this tick
  state.busy = true;
  try { await update(); } finally { state.busy = false; }
}

async function update() {
  let body;
  try { body = await source.overview(state.version); }
  catch (e) { setLive(false, e); return; }
  setLive(true);
  if (body.unchanged) return;
  const ov = body.data;
  state.version = ov.version; state.overview = ov;
  renderSummary(ov);
  const last = Math.max(ov.fronts.length - 1, 0);
  const slider = document.getElementById("generation");
  slider.max = last;
  if (state.follow || state.generation === null || state.generation > last) state.generation = last;
  slider.value = state.generation;
  await showGeneration(state.generation);
  for (const name of ["hypervolume", "evaluations", "throughput", "timeline"]) plot(name + "-figure", body.figures[name]);
  renderHypervolumeNote(ov); renderFailures(ov); renderWorkers(ov);
  fill("candidate-ids", ov.candidates.map((id) => el("option", {value: id})));
  if (state.candidate === null && ov.front.length) await showCandidate(newest(ov.front).id, true);
  else if (state.candidate !== null) await showCandidate(state.candidate, true);
}

// the front member evaluated last (highest generation, then index): what the search found most recently
function newest(front) { return front.reduce((a, b) => (b.id.slice(0, 11) > a.id.slice(0, 11) ? b : a)); }

function setLive(ok, error) {
  if (CONFIG.mode !== "live") return;
  const mark = document.getElementById("live-mark");
  if (!mark) return;
  mark.className = ok ? "live" : "stale";
  mark.textContent = ok ? `live, updated ${new Date().toLocaleTimeString()}` : `not updating (${error.message}); retrying`;
}

function renderSummary(ov) {
  const r = ov.run, e = ov.evaluations;
  document.title = `evomerge: ${r.name}`;
  fill("title", `evomerge search "${r.name}"`);
  fill("summary",
    `${r.path} · generation ${r.generation}/${r.generations} told` +
    (r.last_generation !== null ? ` (latest evaluated: ${r.last_generation})` : "") +
    ` · ${e.done} evaluations (${e.failed} failed, ${e.running} running) · ${r.algorithm}, population ${r.pop_size}, ` +
    `${r.space} space, estimator ${r.estimator} · `,
    CONFIG.mode === "live" ? el("span", {id: "live-mark", class: "live"}, "live")
                           : el("span", {}, `report written ${CONFIG.bundle.written}`));
}

async function showGeneration(g) {
  state.generation = g;
  const last = state.overview ? state.overview.fronts.length - 1 : 0;
  fill("generation-label", String(g));
  fill("follow-note", state.follow && CONFIG.mode === "live" ? "(following the latest generation)" :
                      g < last ? `(latest: ${last})` : "");
  const body = await source.front(g);
  if (!body) return;
  plot("front-figure", body.figure);
  const objectives = state.overview.objectives;
  fill("front-table",
    el("tr", {}, el("th", {}, "id"), objectives.map((o) => el("th", {class: "num"}, o.label)),
       el("th", {class: "num"}, "ties"), el("th", {class: "num"}, "generation")),
    body.front.map((p) => pickRow(p.id, [el("td", {}, candidateLink(p.id)),
      objectives.map((o) => el("td", {class: "num"}, shown(o, p.objectives[o.name]))),
      el("td", {class: "num"}, String(p.ties)), el("td", {class: "num"}, String(p.generation))])));
}

function renderHypervolumeNote(ov) {
  const hv = ov.hypervolume;
  fill("hypervolume-note", `Hypervolume of the front of all ok evaluations up to each generation, in the space of the ` +
    `objectives (accuracies, costs); reference point: ${hv.reference_note}. ` +
    (hv.baseline ? `Baseline: ${hv.baseline.note}.` : ""));
}

function renderFailures(ov) {
  const t = ov.throughput;
  fill("failures-note", `${ov.evaluations.done} evaluations finished` +
    (t.per_hour ? `, ${int(t.per_hour)} per hour over ${secs(t.span_s)}` : "") + `; ${ov.failures.length} failed` +
    (ov.failures.length ? " (click a row for the full message):" : "."));
  fill("failures-table", ov.failures.length ? [
    el("tr", {}, el("th", {}, "id"), el("th", {}, "generation"), el("th", {}, "worker"), el("th", {}, "error")),
    ov.failures.map((f) => pickRow(f.id, [el("td", {}, candidateLink(f.id)), el("td", {class: "num"}, String(f.generation)),
      el("td", {}, `${f.worker || "?"} @ ${f.node || "?"}`), el("td", {class: "error"}, f.error)]))] : []);
}

function renderWorkers(ov) {
  fill("workers-table",
    el("tr", {}, ["worker", "node(s)", "finished", "ok", "failed", "running", "busy", "busy share", "first", "last"]
      .map((h, i) => el("th", {class: i > 1 && i < 8 ? "num" : null}, h))),
    ov.workers.map((w) => el("tr", {}, el("td", {class: "id"}, w.worker), el("td", {}, w.nodes.join(", ")),
      el("td", {class: "num"}, String(w.evaluations)), el("td", {class: "num"}, String(w.ok)),
      el("td", {class: "num"}, String(w.failed)), el("td", {class: "num"}, String(w.running)),
      el("td", {class: "num"}, secs(w.busy_s)), el("td", {class: "num"}, w.busy_share === null ? "-" : pct(w.busy_share)),
      el("td", {}, time(w.first)), el("td", {}, time(w.last)))));
}

// ---- one candidate -------------------------------------------------------------------------------------------------
async function showCandidate(id, quiet) {
  if (!id) return;
  let body;
  try { body = await source.candidate(id); }
  catch (e) { if (!quiet) fill("candidate-status", `${e.message}`); return; }
  const c = body.data;
  state.candidate = c.id;
  document.getElementById("candidate-input").value = c.id;
  fill("candidate-status", "");
  const node = fill("candidate", renderCandidate(c));
  const figures = el("div", {id: "candidate-figures"});
  node.insertBefore(figures, node.querySelector("#candidate-responses"));
  body.figures.forEach((f, i) => { const div = el("div", {id: `recipe-figure-${i}`}); figures.append(div);
                                   draw(div, f); });
  if (!quiet) document.getElementById("candidate-section").scrollIntoView({behavior: "smooth", block: "start"});
}

function renderCandidate(c) {
  const objectives = state.overview ? state.overview.objectives : [];
  const t = c.timings || {};
  const place = c.front ? (c.front.representative === c.id ? `on the current front` +
      (c.front.ties > 1 ? ` (${c.front.ties} candidates share its scores)` : "")
      : `ties with front member ${c.front.representative}`) : "not on the current front";
  const parts = [
    el("h3", {class: "id", id: "candidate-id"}, c.id, " ", el("span", {class: `badge ${c.status}`}, c.status)),
    el("div", {class: "note"}, `generation ${c.generation}, index ${c.index} · ${place} · worker ${c.worker || "?"} @ ` +
      `${c.node || "?"} · seed ${c.seed ?? "-"} · finished ${time(c.finished)} · materialize ${secs(t.materialize)}, ` +
      `score ${secs(t.score)}, total ${secs(t.total)}` +
      (c.extra && c.extra.params ? ` · ${int(c.extra.params)} parameters` : "") +
      (c.extra && c.extra.path_length ? ` · path of ${int(c.extra.path_length)} layers` : "")),
  ];
  if (c.error) parts.push(el("pre", {class: "error"}, c.error));
  if (Object.keys(c.objectives).length) parts.push(el("div", {}, "objectives: ",
    objectives.filter((o) => o.name in c.objectives).map((o) => `${o.name} ${shown(o, c.objectives[o.name])}`).join(" · ")));
  parts.push(scoresTable(c));
  parts.push(el("div", {class: "note"}, c.verify ? `full-task scores from ${c.verify.path}; anchors: ` +
      `${c.verify.anchors ? c.verify.anchors.checked - c.verify.anchors.mismatches.length : "?"}/` +
      `${c.verify.anchors ? c.verify.anchors.checked : "?"} match the ledger` :
      "full-task scores: not exported with --verify (export it with `evomerge export --verify`, then start this " +
      "page with --exports OUT)"));
  parts.push(recipeNote(c.view));
  const responses = el("div", {id: "candidate-responses"}, el("h4", {}, "Anchor answers (green: correct)"));
  for (const [task, items] of Object.entries(c.responses)) {
    const ids = Object.keys(items).sort((a, b) => (Number(a) - Number(b)) || a.localeCompare(b));
    const s = c.response_summary[task];
    responses.append(el("div", {}, `${task}: ${s.correct}/${s.items} correct`),
      el("div", {class: "cells"}, ids.map((i) => el("span", {class: `cell c${items[i] ? 1 : 0}`,
                                                             title: `item ${i}: ${items[i] ? "correct" : "wrong"}`}))));
  }
  if (!Object.keys(c.responses).length) responses.append(el("div", {class: "note"}, "no anchor answers recorded"));
  parts.push(responses);
  parts.push(el("details", {}, el("summary", {}, "recipe (as stored in the ledger)"),
                el("pre", {}, JSON.stringify(c.recipe, null, 1))));
  return parts;
}

function scoresTable(c) {
  const verified = c.verify ? c.verify.tasks : {};
  const tasks = [...new Set([...Object.keys(c.estimates), ...Object.keys(c.responses), ...Object.keys(verified)])];
  if (!tasks.length) return el("div");
  const estimators = [...new Set(tasks.flatMap((t) => typeof c.estimates[t] === "object" && c.estimates[t] !== null
                                                      ? Object.keys(c.estimates[t]) : []))];
  const order = [c.estimator, ...estimators.filter((e) => e !== c.estimator)].filter((e) => estimators.includes(e));
  const head = el("tr", {}, el("th", {}, "task"), order.map((e) => el("th", {class: "num"},
      e === c.estimator ? `estimate: ${e} (the run's)` : e)), el("th", {class: "num"}, "anchors correct"),
    el("th", {class: "num"}, "full-task accuracy"), el("th", {class: "num"}, "items"),
    el("th", {class: "num"}, "full - estimate"));
  const rows = tasks.map((task) => {
    const est = c.estimates[task] || {}, v = verified[task], s = c.response_summary[task];
    const mine = typeof est === "object" ? est[c.estimator] : est;
    return el("tr", {}, el("td", {}, task),
      order.map((e) => el("td", {class: "num"}, e === c.estimator ? el("b", {}, pct(est[e])) : pct(est[e]))),
      el("td", {class: "num"}, s ? `${s.correct}/${s.items}` : "-"),
      el("td", {class: "num"}, v ? pct(v.accuracy) : "-"), el("td", {class: "num"}, v ? String(v.items) : "-"),
      el("td", {class: "num"}, v && mine !== undefined && mine !== null ? ((v.accuracy - mine) * 100).toFixed(2) + " pt" : "-"));
  });
  return el("table", {id: "scores-table"}, head, rows);
}

function recipeNote(view) {
  if (view.kind === "ps") return el("div", {class: "note"}, `Parameter-space merge: ${view.method}` +
    (view.base_model ? ` with base model ${view.base_model}` : "") + `, ${view.layers} layers. Heatmaps: each source's value per ` +
    "layer (rows: source · the tensors a filter picks); embeddings and other non-layer tensors take layer 0's value.");
  if (view.kind === "dataflow" || view.kind === "hybrid") return el("div", {class: "note"},
    `${view.kind === "hybrid" ? "Hybrid" : "Data-flow"} merge: a path of ${view.length} layers through ` +
    `${view.sources.map((s) => s.name + (s.merge ? " (merged)" : "")).join(", ")}` +
    (view.max_layers ? ` (at most ${view.max_layers})` : "") + ".");
  if (view.kind === "unreadable") return el("div", {class: "note"}, `The recipe could not be drawn: ${view.reason}`);
  return el("div", {class: "note"}, "No recipe (the genome did not decode).");
}

// ---- wiring ---------------------------------------------------------------------------------------------------------
document.getElementById("generation").addEventListener("input", (ev) => {
  const g = Number(ev.target.value);
  state.follow = state.overview && g === state.overview.fronts.length - 1;
  showGeneration(g);
});
document.getElementById("candidate-button").addEventListener("click",
  () => showCandidate(document.getElementById("candidate-input").value.trim()));
document.getElementById("candidate-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter") showCandidate(ev.target.value.trim()); });
refresh().then(() => { document.body.dataset.ready = "1"; });
if (CONFIG.mode === "live") setInterval(refresh, CONFIG.poll_ms);
</script>
</body>
</html>
"""
