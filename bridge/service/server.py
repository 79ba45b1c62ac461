"""The uvicorn server ``pdl1 serve`` runs: on Ctrl-C or SIGTERM the worker stops at once, and open requests get a
bounded time to finish."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

# How long requests still open when the service is stopped may go on (an upload still arriving, a result page being
# sent) before their connections are closed.
DRAIN_S = 5.0


class ServiceServer(uvicorn.Server):
    """uvicorn's server, stopping the app's worker as its shutdown begins and closing what is still open after
    ``drain_s`` seconds.

    uvicorn reaches the app's lifespan shutdown, where the worker stopped, only once every connection has closed: a
    client that stalled mid-upload kept the service at "Waiting for connections to close" after a Ctrl-C, its worker
    starting queued jobs meanwhile, until a second Ctrl-C killed it mid-analysis (a C++ "terminate called", the
    job's temporary folder left in /tmp). Connections are closed rather than their requests cancelled (uvicorn's
    ``timeout_graceful_shutdown``, kept as the last resort): a request reading its body is told that the client
    went away, and ends as it does then, without a traceback in the log.
    """

    def __init__(self, config: uvicorn.Config, *, app: FastAPI, drain_s: float = DRAIN_S) -> None:
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = int(drain_s) + 5
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s

    def _halt_worker(self) -> None:
        worker = getattr(self.app.state, "worker", None)  # None: the lifespan has not started one
        if worker is not None:
            worker.halt()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()  # for handle_exit, which runs in a signal handler
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's handler of SIGINT and SIGTERM, which sets ``should_exit``; its main loop sees that at its next
        tick (0.1 s) and only then shuts down: a job submitted meanwhile was accepted (202), then cancelled with the
        service, its client never told. The worker is halted on the event loop at once (not here: a signal handler
        may interrupt a request holding the worker's lock), so such a job gets the 503 of a stopping service."""
        super().handle_exit(sig, frame)
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._halt_worker)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._halt_worker()
        loop = asyncio.get_running_loop()
        closing = loop.call_later(
            self.drain_s, self._close_connections, f"still open {self.drain_s:g} s after the service was told to stop"
        )
        try:
            await super().shutdown(sockets)
        finally:
            closing.cancel()
        if self.force_exit:
            # A second Ctrl-C: uvicorn skips the lifespan's shutdown (the worker's join) and leaves open requests to
            # be cancelled, each with a traceback; the process then ended inside the running job's analysis. The
            # worker stops at that job's next tile.
            self._close_connections("still open at a second Ctrl-C")
            for _ in range(20):  # a request whose client is gone ends within a few turns of the loop
                if not self.server_state.tasks:
                    break
                await asyncio.sleep(0.05)
            await self.lifespan.shutdown()

    def _close_connections(self, when: str) -> None:
        open_connections = list(self.server_state.connections)
        if open_connections:
            log.warning("closing %d connection(s) %s", len(open_connections), when)
        for connection in open_connections:
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()


def run_service(app: FastAPI, *, host: str, port: int) -> None:
    """Serve ``app`` on ``host``:``port`` until Ctrl-C or SIGTERM (:class:`ServiceServer`)."""
    ServiceServer(uvicorn.Config(app, host=host, port=port, log_level="info"), app=app).run()
