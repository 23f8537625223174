"""Watching a search: `evomerge dashboard` (a live local page) and `evomerge report` (one static HTML file).

data.py computes every view as JSON-able dicts from the run directory (torch-free, reads only); recipes.py turns a
ledgered recipe into what the candidate view draws; figures.py makes plotly figures of them; bundle.py pairs data
with figures and writes the report; static.py is the page; server.py the aiohttp app of the dashboard.
"""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # loopback: a run's ledger is shown to no one else unless --host says so
DEFAULT_PORT = 8710  # Ray's dashboard holds 8265
