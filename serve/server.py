"""The uvicorn server of ``dh-serve``: its port bound before the engine loads, and a drain on SIGTERM.

A load balancer needs time to see that a replica is going: on the first SIGTERM (or Ctrl-C) the worker starts
draining (``/healthz`` and new requests answer 503, open streams go on) for ``drain_s`` seconds; then the
streams still open are ended with a JSON 503 / close 1012 and uvicorn shuts down. A second signal skips the
rest of the drain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:  # the worker imports torch: not before the port is bound
    from .worker import EngineWorker

log = logging.getLogger(__name__)
TELL_CLIENTS_S = 2.0  # after ending the streams, the longest wait for their handlers to tell the clients


class BindError(OSError):
    pass


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening): a busy port fails here, before anything loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its graceful shutdown, and an exit when the engine fails to load."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker):
        super().__init__(config)
        self.worker = worker
        self.drain_until: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_until is None and not self.should_exit and self.worker.config.drain_s > 0:
            self._captured_signals.append(sig)  # re-raised after the shutdown, as uvicorn does
            self.drain_until = time.monotonic() + self.worker.config.drain_s
            self.worker.begin_drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.worker.load_error is not None:
            self.should_exit = True
        elif self.drain_until is not None and not self.should_exit and time.monotonic() >= self.drain_until:
            await self.end_streams()
            self.should_exit = True
        return await super().on_tick(counter)

    async def end_streams(self) -> None:
        """End the streams still open with a JSON 503 / close 1012, and give their handlers a moment to send it."""
        from .worker import ShuttingDown

        if self.worker.open_requests:
            log.info("drain over: ending %d open stream(s)", self.worker.open_requests)
        self.worker.end_sessions(ShuttingDown())
        deadline = time.monotonic() + TELL_CLIENTS_S
        while self.worker.open_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
