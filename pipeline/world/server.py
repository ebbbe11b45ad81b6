"""A web server for the world that misbehaves the way the web does; it listens on loopback only.

Every URL is `/{kind}/{row}.jpg`; `kind` picks the behaviour (see `World` for which row has which fault).
`/file/{name}` serves the bodies in `files` (odd images a test brings: strips, 16-bit PNGs, names with `#`).
`jitter` delays every answer by a random time up to that many seconds, so two crawls see other timings.
The server counts the requests it receives per path, so tests can check what a crawler did and did not fetch.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import struct
import threading

from aiohttp import web

from pipeline.world.world import World

CHUNK = b"\0" * (1 << 20)


class WorldServer:
    def __init__(
        self,
        world: World,
        host: str = "127.0.0.1",
        port: int = 0,
        files: dict[str, bytes] | None = None,
        jitter: float = 0.0,
        seed: int | None = None,
    ):
        self.world = world
        self.host, self.port = host, port
        self.files = dict(files or {})
        self.jitter = float(jitter)
        self._random = random.Random(seed)
        self.requests: collections.Counter[str] = collections.Counter()
        self.user_agents: collections.Counter[str] = collections.Counter()
        self._bodies: dict[int, bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def warm(self) -> None:
        """Render every body now, so that serving costs no drawing (benchmarks call this)."""
        for row in range(self.world.n):
            self._bodies[row] = self.world.body(row)

    # -- handlers ------------------------------------------------------------------------------------
    async def _body(self, row: int) -> bytes:
        if row not in self._bodies:
            self._bodies[row] = await asyncio.get_running_loop().run_in_executor(None, self.world.body, row)
        return self._bodies[row]

    async def handle_file(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        await self._delay()
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[name], headers={"Content-Type": "application/octet-stream"})

    async def _delay(self) -> None:
        if self.jitter:
            await asyncio.sleep(self._random.uniform(0, self.jitter))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.path] += 1
        await self._delay()
        self.user_agents[request.headers.get("User-Agent", "")] += 1
        kind = request.match_info["kind"]
        try:
            row = int(request.match_info["row"])
        except ValueError:
            raise web.HTTPNotFound() from None
        if not 0 <= row < self.world.n:
            raise web.HTTPNotFound() from None
        cfg = self.world.cfg
        if cfg.get("latency"):
            await asyncio.sleep(float(cfg["latency"]))
        if kind == "http_404":
            raise web.HTTPNotFound() from None
        if kind == "http_500":
            raise web.HTTPInternalServerError()
        if kind == "flaky" and self.requests[request.path] <= int(cfg["flaky_failures"]):
            raise web.HTTPServiceUnavailable()
        if kind == "slow":
            await asyncio.sleep(float(cfg["slow_seconds"]))
        if kind == "reset":
            return self._reset(request)
        if kind == "redirect":
            raise web.HTTPFound(f"/img/{row}.jpg")
        if kind == "redirect_internal":
            # Another loopback address stands for "inside the network": a guard that allows only this
            # server's address must refuse it, and if it failed the request would still stay on this machine.
            raise web.HTTPFound(f"http://127.0.0.2:{self.port}/img/{row}.jpg")
        if kind in ("loop_a", "loop_b"):
            raise web.HTTPFound(f"/{'loop_b' if kind == 'loop_a' else 'loop_a'}/{row}.jpg")
        if kind == "huge":
            return await self._huge(request, declared=row % 2 == 0)
        headers = {"Content-Type": "image/jpeg"}
        opt_out = self.world.opt_out_header(row)
        if opt_out:
            headers["X-Robots-Tag"] = opt_out
        return web.Response(body=await self._body(row), headers=headers)

    def _reset(self, request: web.Request) -> web.Response:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN: "connection reset by peer".
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        request.transport.abort()
        return web.Response(status=500)

    async def _huge(self, request: web.Request, declared: bool) -> web.StreamResponse:
        total = int(self.world.cfg["huge_bytes"])
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if declared:
            response.content_length = total
        await response.prepare(request)
        sent = 0
        try:
            while sent < total:
                await response.write(CHUNK)
                sent += len(CHUNK)
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading: that is what a byte cap should do
        return response

    # -- running -------------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/file/{name}", self.handle_file)
        app.router.add_get("/{kind}/{row}.jpg", self.handle)
        return app

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> WorldServer:
        """Serve from a background thread; returns once the port is bound."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as err:  # surfaced in start(), not lost in the thread
                errors.append(err)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="world-server", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
