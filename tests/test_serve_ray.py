"""dh-serve on Ray Serve, locally on CPU with two replicas: both come up, each answers, a stream renders.

Ray's start-up (GCS, raylet, proxy) and two engine loads take 40-80 s a test on 2 shared cores, and minutes
when other jobs load them (a replica took 310 s to initialise at load average 8): ``slow``, with long waits.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
websockets = pytest.importorskip("websockets")

from dheads.serve.config import ServeConfig

from _serve import FACE, free_port, short_speech

pytestmark = pytest.mark.slow


def test_two_replicas_serve_render_and_stream(tmp_path):
    from dheads.serve import ray_app

    wav = short_speech(tmp_path / "s.wav", 0.2)
    cfg = ServeConfig(port=free_port(), threads=1)
    ray_app.start(cfg, replicas=2, num_cpus=2, cpus_per_replica=0.5)
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        pids, deadline = set(), time.monotonic() + 300
        while len(pids) < 2 and time.monotonic() < deadline:  # the proxy spreads requests over both replicas
            r = httpx.get(url + "/healthz", timeout=30)
            assert r.status_code == 200
            pids.add(r.json()["pid"])
        assert len(pids) == 2
        r = httpx.post(url + "/v1/render", files={"face": ("f.png", FACE.read_bytes()), "audio": ("s.wav", wav.read_bytes())},
                       data={"steps": "2", "sampler": "ddim"}, timeout=300)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.headers["x-frames"] == "5"

        async def stream():
            async with websockets.connect(url.replace("http", "ws") + "/v1/stream", max_size=None) as c:
                await c.send(json.dumps({"type": "start", "steps": 2, "sampler": "ddim", "format": "jpeg"}))
                await c.send(FACE.read_bytes())
                await c.send(wav.read_bytes())
                return [json.loads(m) for m in [m async for m in c] if isinstance(m, str)]

        msgs = asyncio.run(stream())
        assert [m["index"] for m in msgs if m["type"] == "frame"] == list(range(5))
        assert msgs[-1] == {"type": "done", "frames": 5}
    finally:
        ray_app.stop()


def test_one_command_starts_two_replicas_and_stops_on_sigterm():
    """``dh-serve --replicas 2``: both replicas answer through the proxy; SIGTERM shuts Ray down, exit 0."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dheads.serve.cli", "--replicas", "2", "--port", str(port),
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        pids, deadline = set(), time.monotonic() + 240  # Ray + two engines on 2 shared cores
        while len(pids) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
            except httpx.TransportError:
                time.sleep(0.5)
        assert len(pids) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:  # SIGTERM, so that Ray's own processes are shut down too
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
