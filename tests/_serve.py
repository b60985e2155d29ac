"""A real dh-serve (uvicorn in a thread, 127.0.0.1, a free port) over one shared engine, for the serve tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

EXAMPLES = Path(__file__).resolve().parents[1] / "engine" / "assets" / "examples"
FACE = EXAMPLES / "face.png"
SPEECH = EXAMPLES / "speech.wav"


def short_speech(path: Path, seconds: float = 0.3) -> Path:
    """The first ``seconds`` of the example speech (16 kHz mono), written to ``path``."""
    samples, rate = sf.read(str(SPEECH), dtype="float32")
    sf.write(str(path), samples[: int(seconds * rate)], rate)
    return path


@pytest.fixture(scope="module")
def worker():
    """One engine worker for a test module (the demo engine, 1 thread, 4 streams); import it with ``url``."""
    from dheads.serve.config import ServeConfig
    from dheads.serve.worker import EngineWorker

    w = EngineWorker(ServeConfig(port=free_port(), threads=1, max_streams=4))
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def url(worker):
    """A real server on ``worker`` for the test module: its base URL."""
    with running_server(worker, worker.config) as u:
        yield u


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(worker, config, log_level="warning"):
    """Serve ``create_app(config, worker)`` on 127.0.0.1 until the block ends; yields (base URL, the server).
    ``worker`` None: the app's own, loading its engine in the background (the server is up before it is)."""
    import uvicorn

    from dheads.serve.app import create_app
    from dheads.serve.server import DrainingServer

    app = create_app(config, worker)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level=log_level,
                                           ws_max_size=config.max_upload_bytes + 65536), app.state.worker)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}", server
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def running_server(worker, config):
    """Serve ``create_app(config, worker)`` on 127.0.0.1 until the block ends; yields the base URL."""
    with serving(worker, config) as (url, _server):
        yield url


def frame_bytes(rgb: np.ndarray) -> bytes:
    return np.ascontiguousarray(rgb).tobytes()
