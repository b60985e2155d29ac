"""dh-serve on Ray Serve, locally on CPU with two replicas: both come up, each answers, a stream renders.

Ray's start-up (GCS, raylets, proxy) and two engine loads take about a minute on 2 loaded cores: ``slow``.
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
        pids, deadline = set(), time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:  # the proxy spreads requests over both replicas
            r = httpx.get(url + "/healthz", timeout=30)
            assert r.status_code == 200
            pids.add(r.json()["pid"])
        assert len(pids) == 2
        r = httpx.post(url + "/v1/render", files={"face": ("f.png", FACE.read_bytes()), "audio": ("s.wav", wav.read_bytes())},
                       data={"steps": "2", "sampler": "ddim"}, timeout=120)
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
