"""The coordinator's public port: only Flower's Fleet API, what robots need, reaches the SuperLink.

In Flower 1.42 one HTTP listener serves the Fleet API (robots), the Control API (submit and stop
runs, stream logs, register SuperNode keys) and the Runtime API, and nothing authenticates Control
callers short of Flower Enterprise (docs/flower-1.42-notes.md). Whoever reaches the robots' port
could start a run whose app code every robot executes, or register a key and join as a robot.
So the SuperLink listens on 127.0.0.1 only (where `fedbot-coordinator` drives it with `flwr`), and
this gateway listens on the public address: it forwards `POST /v1/fleet/<rpc>` and `GET /health`
unchanged (SuperNode authentication headers included) and answers 404 to anything else, logging
who asked. With TLS it serves the SuperLink's certificate and talks TLS to the SuperLink too.

Written with starlette, uvicorn and httpx (Flower's own HTTP stack) rather than a separate proxy
so the coordinator stays one service with nothing else to install or configure.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("fedbot.coordinator.gateway")
MAX_BODY_BYTES = 256 << 20  # Flower moves models as objects of a few MB; a message is far below this
UPSTREAM_TIMEOUT_S = 600.0
FORWARDED_HEADERS = ("content-type", "accept")  # plus Flower's own (SuperNode auth) headers


class FleetGateway:
    """Forwards the Fleet API from `host:port` to the SuperLink at 127.0.0.1:`upstream_port`."""

    def __init__(self, host: str, port: int, upstream_port: int, tls_files: tuple[Path, Path, Path] | None):
        self.host, self.port = host, port
        scheme = "https" if tls_files else "http"
        verify: ssl.SSLContext | bool = False
        if tls_files:
            verify = ssl.create_default_context(cafile=str(tls_files[0]))  # the lab CA signed the SuperLink's cert
        self.upstream = httpx.AsyncClient(
            base_url=f"{scheme}://127.0.0.1:{upstream_port}", verify=verify, timeout=UPSTREAM_TIMEOUT_S
        )
        routes = [
            Route("/v1/fleet/{rpc}", self.forward, methods=["POST"]),
            Route("/health", self.forward, methods=["GET"]),
        ]
        app = Starlette(routes=routes)
        app.add_exception_handler(404, self.refuse)
        app.add_exception_handler(405, self.refuse)
        ssl_options = {} if not tls_files else {"ssl_certfile": str(tls_files[1]), "ssl_keyfile": str(tls_files[2])}
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, **ssl_options)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="fleet-gateway", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the fleet gateway could not listen on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fleet gateway did not start on {self.host}:{self.port}")
            self._thread.join(timeout=0.05)  # returns at once if the server thread died
        log.info("fleet gateway on %s:%d: Fleet API only, to the SuperLink on 127.0.0.1", self.host, self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return PlainTextResponse("request too large", status_code=413)
        headers = {k: v for k, v in request.headers.items() if k in FORWARDED_HEADERS or k.startswith("flwr-")}
        try:
            reply = await self.upstream.request(request.method, request.url.path, content=body, headers=headers)
        except httpx.HTTPError as error:
            log.warning("SuperLink unreachable for %s: %s", request.url.path, error)
            return PlainTextResponse("SuperLink unavailable", status_code=503)
        kept = {k: v for k, v in reply.headers.items() if k in FORWARDED_HEADERS or k.startswith("flwr-")}
        return Response(reply.content, status_code=reply.status_code, headers=kept)

    async def refuse(self, request: Request, _exc) -> Response:
        client = request.client.host if request.client else "?"
        log.warning(
            "refused %s %s from %s: only the Fleet API is served here", request.method, request.url.path, client
        )
        return PlainTextResponse("not found", status_code=404)
