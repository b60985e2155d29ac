"""Load test of dh-serve on loopback: N concurrent WebSocket streams for N in ``--streams`` (1,2,4,8).

Per round: per-stream fps (frames after the first over the time from first to last frame), first-frame
latency (last upload byte sent -> first frame received: preparation + queueing + one frame) p50/p99,
total throughput (all frames over the round's wall time), lost / duplicated / out-of-order frame indices
per stream, and the server's RSS after the round (memory should stay flat across rounds).

By default the server is started in this process (the demo engine, uvicorn on 127.0.0.1, a free port);
``--url`` points it at a running server instead, which must be on loopback. Bounded: at most
``--max-streams-per-round`` clients, ``--seconds`` of speech each, ``--timeout`` per round.

    python -m dheads.benchmarks.serve_load --streams 1,2,4,8 --seconds 1 --steps 4 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
EXAMPLES = Path(__file__).resolve().parents[1] / "engine" / "assets" / "examples"


@dataclass(frozen=True)
class FrameCheck:
    """What a stream's received frame indices say: expected 0..n-1 once each, in order."""

    received: int
    lost: list[int]
    duplicated: list[int]
    out_of_order: int

    @property
    def ok(self) -> bool:
        return not self.lost and not self.duplicated and not self.out_of_order


def check_frames(indices: list[int], expected: int) -> FrameCheck:
    """Compare received indices with ``range(expected)``: missing ones, repeated ones, and backward steps."""
    seen: dict[int, int] = {}
    for i in indices:
        seen[i] = seen.get(i, 0) + 1
    lost = [i for i in range(expected) if i not in seen]
    dup = sorted(i for i, n in seen.items() if n > 1 or not 0 <= i < expected)
    backward = sum(1 for a, b in zip(indices, indices[1:]) if b <= a)
    return FrameCheck(len(indices), lost, dup, backward)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] (numpy's default method)."""
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else float("nan")


@dataclass
class StreamResult:
    frames: int
    expected: int
    first_frame_s: float
    fps: float
    check: FrameCheck
    error: str | None = None


@dataclass
class RoundResult:
    streams: int
    wall_s: float
    total_fps: float
    per_stream_fps_median: float
    first_frame_p50_s: float
    first_frame_p99_s: float
    lost: int
    duplicated: int
    out_of_order: int
    errors: int
    rss_mib_after: float
    per_stream: list[dict] = field(default_factory=list)


def rss_mib() -> float:
    """This process's resident memory (the in-process server's), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def one_stream(url: str, face: bytes, audio: bytes, expected: int, start: dict, timeout: float) -> StreamResult:
    import websockets

    indices, times = [], []
    async with websockets.connect(url.replace("http", "ws", 1) + "/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "jpeg", **start}))
        await ws.send(face)
        await ws.send(audio)
        sent = time.perf_counter()
        error = None
        async with asyncio.timeout(timeout):
            async for msg in ws:
                if isinstance(msg, bytes):
                    continue
                m = json.loads(msg)
                if m["type"] == "frame":
                    indices.append(m["index"])
                    times.append(time.perf_counter())
                elif m["type"] == "error":
                    error = m["error"]
    fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return StreamResult(len(indices), expected, times[0] - sent if times else float("nan"), fps,
                        check_frames(indices, expected), error)


async def one_round(url: str, n: int, face: bytes, audio: bytes, expected: int, start: dict, timeout: float,
                    rss=rss_mib) -> RoundResult:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(url, face, audio, expected, {**start, "seed": i}, timeout)
                                     for i in range(n)))
    wall = time.perf_counter() - t0
    first = [r.first_frame_s for r in results if r.frames]
    return RoundResult(
        streams=n, wall_s=wall, total_fps=sum(r.frames for r in results) / wall,
        per_stream_fps_median=statistics.median([r.fps for r in results]),
        first_frame_p50_s=percentile(first, 50), first_frame_p99_s=percentile(first, 99),
        lost=sum(len(r.check.lost) for r in results), duplicated=sum(len(r.check.duplicated) for r in results),
        out_of_order=sum(r.check.out_of_order for r in results), errors=sum(r.error is not None for r in results),
        rss_mib_after=rss(), per_stream=[{**asdict(r), "check": asdict(r.check)} for r in results])


def machine() -> dict:
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(), "uptime": up, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def write_results(out: Path, name: str, payload: dict) -> None:
    from dheads.engine.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    rows = ["| streams | wall s | total fps | per-stream fps (median) | first frame p50 s | p99 s | lost | dup | "
            "out of order | errors | server RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rounds"]:
        rows.append(f"| {r['streams']} | {r['wall_s']:.1f} | {r['total_fps']:.2f} | {r['per_stream_fps_median']:.2f} | "
                    f"{r['first_frame_p50_s']:.2f} | {r['first_frame_p99_s']:.2f} | {r['lost']} | {r['duplicated']} | "
                    f"{r['out_of_order']} | {r['errors']} | {r['rss_mib_after']:.0f} |")
    m = payload["machine"]
    text = (f"# dh-serve load test (loopback, {payload['config']['engine']})\n\n"
            f"Command: `{payload['command']}`\n\n"
            f"Each stream: {payload['config']['seconds']:g} s of speech = {payload['config']['frames']} frames, "
            f"{payload['config']['sampler']} {payload['config']['steps']} steps; `--max-streams` "
            f"{payload['config']['max_streams']}. Machine: {m['cpus']} CPUs, {m['platform']}; load before: "
            f"`{m['uptime']}`; after: `{payload['uptime_after']}`.\n\n" + "\n".join(rows) + "\n")
    atomic_write_text(out / f"{name}.md", text)


async def run(args) -> dict:
    import soundfile as sf

    face = Path(args.face).read_bytes()
    samples, rate = sf.read(args.audio, dtype="float32")
    samples = samples[: int(args.seconds * rate)]
    import io

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    audio = buf.getvalue()
    expected = int(len(samples) * 16000 / rate) // 640
    start = {"steps": args.steps, "sampler": args.sampler}
    rounds = []
    for n in args.streams:
        r = await one_round(args.url, n, face, audio, expected, start, args.timeout)
        log.info("N=%d: %.2f fps total, %.2f per stream, first frame p50 %.2f s, lost %d dup %d, RSS %.0f MiB",
                 n, r.total_fps, r.per_stream_fps_median, r.first_frame_p50_s, r.lost, r.duplicated, r.rss_mib_after)
        rounds.append(asdict(r))
    return {"rounds": rounds, "frames": expected}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", default="1,2,4,8", help="comma-separated concurrent stream counts")
    p.add_argument("--seconds", type=float, default=1.0, help="speech per stream")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--max-streams", type=int, default=8, help="the in-process server's --max-streams")
    p.add_argument("--threads", type=int, default=1, help="the in-process server's engine threads")
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one here)")
    p.add_argument("--face", default=str(EXAMPLES / "face.png"))
    p.add_argument("--audio", default=str(EXAMPLES / "speech.wav"))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per stream at most")
    p.add_argument("--max-streams-per-round", type=int, default=16)
    p.add_argument("--out", default=None, help="folder for serve_load_<name>.json/.md")
    p.add_argument("--name", default="serve_load_cpu")
    args = p.parse_args(argv)
    args.streams = [int(x) for x in args.streams.split(",")]
    if max(args.streams) > args.max_streams_per_round or min(args.streams) < 1:
        p.error(f"--streams must be in 1..{args.max_streams_per_round}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    before = machine()
    if args.url is not None:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            p.error(f"--url must be a loopback address ({', '.join(LOOPBACK)}), got {host}")
        result = asyncio.run(run(args))
    else:
        result = in_process(args)
    payload = {"command": "python -m dheads.benchmarks.serve_load " + " ".join(argv or sys.argv[1:]),
               "config": {"engine": "demo", "seconds": args.seconds, "frames": result["frames"], "steps": args.steps,
                          "sampler": args.sampler, "max_streams": args.max_streams},
               "machine": before, "uptime_after": machine()["uptime"], "rounds": result["rounds"]}
    if args.out:
        write_results(Path(args.out), args.name, payload)
    bad = sum(r["lost"] + r["duplicated"] + r["out_of_order"] + r["errors"] for r in result["rounds"])
    return 1 if bad else 0


def in_process(args) -> dict:
    import socket

    import uvicorn

    from dheads.serve.app import create_app
    from dheads.serve.config import ServeConfig
    from dheads.serve.worker import EngineWorker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(port=port, threads=args.threads, max_streams=args.max_streams)
    worker = EngineWorker(cfg)
    worker.start()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, worker), host="127.0.0.1", port=port, log_level="warning"))

    async def serve_and_load():
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        args.url = f"http://127.0.0.1:{port}"
        try:
            return await run(args)
        finally:
            server.should_exit = True
            await task

    try:
        return asyncio.run(serve_and_load())
    finally:
        worker.stop()


if __name__ == "__main__":
    sys.exit(main())
