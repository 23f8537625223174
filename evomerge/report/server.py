"""`evomerge dashboard`: an aiohttp app serving the page and its JSON endpoints, re-reading the run as it changes.

Routes (all GET):
  /                       the page (static.live_page), which polls /api/overview every few seconds
  /plotly.js              plotly.js from the plotly wheel (nothing from a CDN)
  /api/overview           summary, current front, hypervolume, evaluations, failures, workers, with their figures;
                          ?version=V answers {"version": V, "unchanged": true} while the run has not changed
  /api/front?generation=G the front after generation G (default: the latest), with its figure
  /api/candidate/{id}     one candidate (an id or a unique prefix), with its recipe figures; 404 when unknown

Ledger reads run in a thread (SQLite blocks), one at a time; the overview is recomputed only when the run's
fingerprint changes (a row added or finished, a generation told, an export verified).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from evomerge.errors import EvomergeError
from evomerge.report import DEFAULT_HOST, DEFAULT_PORT
from evomerge.report.bundle import candidate_view, dumps, front_view, overview_view
from evomerge.report.data import CandidateNotFound, ReportError, RunSource, candidate
from evomerge.report.static import live_page, plotly_js

POLL_MS = 3000

log = logging.getLogger(__name__)


class DashboardError(ReportError):
    """The dashboard cannot listen where it was asked to (port in use, unknown host)."""


class Views:
    """The views of one run, the overview cached until the run's fingerprint changes. Thread-safe."""

    def __init__(self, src: RunSource) -> None:
        self.src = src
        self._lock = threading.Lock()
        self._overview: dict[str, Any] | None = None

    def overview(self) -> dict[str, Any]:
        with self._lock:
            if self._overview is None or self._overview["data"]["version"] != self.src.fingerprint():
                self._overview = overview_view(self.src)
            return self._overview

    def front(self, generation: int | None) -> dict[str, Any]:
        return front_view(self.overview()["data"], generation)

    def candidate(self, key: str) -> dict[str, Any]:
        front = self.overview()["data"]["front"]
        return candidate_view(candidate(self.src, key, front))


def make_app(src: RunSource, *, poll_ms: int = POLL_MS) -> web.Application:
    views = Views(src)
    page = live_page(f"evomerge: {src.prepared.config.name}", poll_ms)
    script: list[bytes] = []  # plotly.js, read on first request (4.8 MB)

    def reply(body: Any, status: int = 200) -> web.Response:
        return web.Response(text=dumps(body), status=status, content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def plotly(request: web.Request) -> web.Response:
        if not script:
            script.append(plotly_js().encode("utf-8"))
        return web.Response(body=script[0], content_type="application/javascript",
                            headers={"Cache-Control": "max-age=86400"})

    async def api_overview(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(views.overview)
        seen = request.query.get("version")
        if seen is not None and seen == body["data"]["version"]:
            return reply({"version": seen, "unchanged": True})
        return reply(body)

    async def api_front(request: web.Request) -> web.Response:
        raw = request.query.get("generation")
        try:
            generation = None if raw in (None, "") else int(raw)
        except ValueError:
            return reply({"error": f"generation {raw!r}: expected a whole number"}, 400)
        return reply(await asyncio.to_thread(views.front, generation))

    async def api_candidate(request: web.Request) -> web.Response:
        try:
            return reply(await asyncio.to_thread(views.candidate, request.match_info["key"]))
        except CandidateNotFound as e:
            return reply({"error": str(e)}, 404)

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except EvomergeError as e:  # the run directory changed under us (an edited config, a damaged ledger)
            log.warning("%s: %s", request.path, e)
            return reply({"error": str(e)}, 500)

    app = web.Application(middlewares=[errors])
    app.add_routes([web.get("/", index), web.get("/plotly.js", plotly), web.get("/api/overview", api_overview),
                    web.get("/api/front", api_front), web.get("/api/candidate/{key}", api_candidate)])
    return app


def url_of(host: str, port: int) -> str:
    try:
        bracket = ipaddress.ip_address(host).version == 6
    except ValueError:
        bracket = False
    return f"http://[{host}]:{port}/" if bracket else f"http://{host}:{port}/"


def serve(src: RunSource, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
          on_ready: Callable[[str], None] = lambda url: None, poll_ms: int = POLL_MS) -> None:
    """Serve the dashboard of `src` until interrupted: Ctrl-C raises KeyboardInterrupt after the server has closed,
    SIGTERM returns.
    on_ready(url) is called once it listens (port 0: the port the system chose)."""
    asyncio.run(_serve(make_app(src, poll_ms=poll_ms), host, port, on_ready))


async def _serve(app: web.Application, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DashboardError(f"--port {port}: {host}:{port} is in use (another dashboard, Ray's "
                                     "dashboard?): pass another --port") from None
            raise DashboardError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}): "
                                 "pass an address of this machine (default 127.0.0.1) and a free port") from None
        bound = runner.addresses[0]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, stop.set)  # `kill`: stop as cleanly as Ctrl-C
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread, or no signals here
            pass
        on_ready(url_of(host, bound[1]))
        try:
            await stop.wait()  # until SIGTERM, or cancelled by Ctrl-C
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
    finally:
        await runner.cleanup()
