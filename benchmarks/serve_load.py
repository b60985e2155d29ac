"""Load test of dh-serve on loopback: N concurrent WebSocket streams for N in ``--streams`` (1,2,4,8,100).

The server runs with its queue and timeouts engaged (``--max-streams``, ``--max-queue``, ``--max-connections``,
``--max-stream-seconds``, ``--start-timeout``): a round of more clients than it takes counts its refusals
(close 1013, the WebSocket's 503) and the places in line it told waiting clients. Clients send no sampler
unless ``--sampler``/``--steps`` say so: they get the engine's default, what dh-run makes.

Per round: first-frame latency (last upload byte sent -> first frame received: preparation + queueing + one
frame) p50/p95/p99 over served streams, per-stream fps (frames after the first over first-to-last frame time),
total throughput (all frames over the round's wall time), served / refused / queued streams, lost / duplicated
/ out-of-order frame indices, and the RSS of the server's process and of its preparation worker after the
round (memory should stay flat across rounds).

By default the server is started in this process (the demo engine, uvicorn on 127.0.0.1, a free port);
``--url`` points it at a running server instead, which must be on loopback. Bounded: at most
``--max-streams-per-round`` clients, ``--seconds`` of speech each (``--seconds-at 100=0.4``: less for some N),
``--timeout`` per stream.

    python -m dheads.benchmarks.serve_load --streams 1,2,4,8,100 --seconds 1 --seconds-at 100=0.4 \
        --out benchmarks/results --name serve_load_2026-12-07
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
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
    """One client: what it received and how it ended. ``refused``: a 503-style refusal (close 1013, server busy)
    before any frame; ``queue_positions``: every place in line it was told, in order."""

    frames: int
    expected: int
    first_frame_s: float
    fps: float
    check: FrameCheck
    error: str | None = None
    close_code: int | None = None
    refused: bool = False
    queue_positions: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class RoundResult:
    streams: int
    seconds: float
    wall_s: float
    total_fps: float
    per_stream_fps_median: float
    first_frame_p50_s: float
    first_frame_p95_s: float
    first_frame_p99_s: float
    served: int
    refused_busy: int
    queued: int
    max_queue_position: int
    lost: int
    duplicated: int
    out_of_order: int
    errors: int
    rss_mib_after: float
    prep_rss_mib_after: float
    refusals: dict = field(default_factory=dict)
    per_stream: list[dict] = field(default_factory=list)


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident memory, MiB (default: this one, where the in-process server runs)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def one_stream(url: str, face: bytes, audio: bytes, expected: int, start: dict, timeout: float) -> StreamResult:
    import websockets

    indices, times, positions = [], [], []
    error, done, code, sent = None, False, None, None
    try:
        async with asyncio.timeout(timeout):
            async with websockets.connect(url.replace("http", "ws", 1) + "/v1/stream", max_size=None,
                                          open_timeout=timeout) as ws:
                try:  # a busy server may refuse before the uploads are all sent
                    await ws.send(json.dumps({"type": "start", "format": "jpeg", **start}))
                    await ws.send(face)
                    await ws.send(audio)
                except websockets.ConnectionClosed:
                    pass
                sent = time.perf_counter()
                with contextlib.suppress(websockets.ConnectionClosed):
                    async for msg in ws:
                        if isinstance(msg, bytes):
                            continue
                        m = json.loads(msg)
                        if m["type"] == "frame":
                            indices.append(m["index"])
                            times.append(time.perf_counter())
                        elif m["type"] == "queued":
                            positions.append(m["position"])
                        elif m["type"] == "error":
                            error = m["error"]
                        elif m["type"] == "done":
                            done = True
                code = ws.close_code
    except TimeoutError:
        error = f"client timeout ({timeout:g} s)"
    except (OSError, asyncio.CancelledError) as e:  # a refused or reset connection
        error = f"connection failed: {type(e).__name__}: {e}"
    fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    first = times[0] - sent if times and sent is not None else float("nan")
    refused = code == 1013 and not indices
    return StreamResult(len(indices), expected, first, fps, check_frames(indices, expected), error, code, refused,
                        positions, done)


def summarize(n: int, seconds: float, results: list[StreamResult], wall: float, rss: float,
              prep_rss: float) -> RoundResult:
    """A round's figures: frames and first-frame latency over the streams that were served (not refused);
    refusals (close 1013, 503 over HTTP) counted by their message; lost/dup/out-of-order over served streams."""
    served = [r for r in results if not r.refused]
    first = [r.first_frame_s for r in served if r.frames]
    fps = [r.fps for r in served if r.frames > 1]
    refusals: dict[str, int] = {}
    for r in results:
        if r.refused:
            key = re.sub(r"\d+", "N", r.error or "closed 1013")
            refusals[key] = refusals.get(key, 0) + 1
    return RoundResult(
        streams=n, seconds=seconds, wall_s=wall, total_fps=sum(r.frames for r in results) / wall,
        per_stream_fps_median=statistics.median(fps) if fps else float("nan"),
        first_frame_p50_s=percentile(first, 50), first_frame_p95_s=percentile(first, 95),
        first_frame_p99_s=percentile(first, 99), served=sum(r.done for r in results),
        refused_busy=sum(r.refused for r in results), queued=sum(bool(r.queue_positions) for r in results),
        max_queue_position=max((p for r in results for p in r.queue_positions), default=0),
        lost=sum(len(r.check.lost) for r in served), duplicated=sum(len(r.check.duplicated) for r in served),
        out_of_order=sum(r.check.out_of_order for r in served),
        errors=sum(r.error is not None and not r.refused for r in results),
        rss_mib_after=rss, prep_rss_mib_after=prep_rss, refusals=refusals,
        per_stream=[{**asdict(r), "check": asdict(r.check)} for r in results])


async def one_round(url: str, n: int, seconds: float, face: bytes, audio: bytes, expected: int, start: dict,
                    timeout: float, rss=rss_mib, prep_rss=lambda: float("nan")) -> RoundResult:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(url, face, audio, expected, {**start, "seed": i}, timeout)
                                     for i in range(n)))
    return summarize(n, seconds, list(results), time.perf_counter() - t0, rss(), prep_rss())


def machine() -> dict:
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(), "uptime": up, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def write_results(out: Path, name: str, payload: dict) -> None:
    from dheads.engine.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    rows = ["| N | speech s (frames) | served | refused (503) | queued (max place) | first frame p50 s | p95 s | "
            "per-stream fps (median) | total fps | lost / dup / out of order | other errors | wall s | "
            "server RSS MiB | prep worker RSS MiB |", "|" + "---|" * 14]
    for r in payload["rounds"]:
        frames = r["per_stream"][0]["expected"] if r["per_stream"] else 0
        rows.append(f"| {r['streams']} | {r['seconds']:g} ({frames}) | {r['served']} | {r['refused_busy']} | "
                    f"{r['queued']} ({r['max_queue_position']}) | {r['first_frame_p50_s']:.2f} | "
                    f"{r['first_frame_p95_s']:.2f} | {r['per_stream_fps_median']:.2f} | {r['total_fps']:.2f} | "
                    f"{r['lost']} / {r['duplicated']} / {r['out_of_order']} | {r['errors']} | {r['wall_s']:.1f} | "
                    f"{r['rss_mib_after']:.0f} | {r['prep_rss_mib_after']:.0f} |")
    refusals = sorted({k for r in payload["rounds"] for k in r["refusals"]})
    m, c = payload["machine"], payload["config"]
    text = (f"# dh-serve load test (loopback, {c['engine']})\n\n"
            f"Command: `{payload['command']}`\n\n"
            f"Server: `--max-streams {c['max_streams']} --max-queue {c['max_queue']} --max-connections "
            f"{c['max_connections']} --max-stream-seconds {c['max_stream_seconds']:g} --start-timeout "
            f"{c['start_timeout']:g}`, {c['threads']} engine thread(s), the server and its clients in one process "
            f"(its RSS: server + clients), preparation in its own worker process. Sampling: "
            f"{c['sampling_note']} (`{json.dumps(c['sampling'])}`).\n\n"
            f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; load average before "
            f"{' '.join(f'{x:.2f}' for x in m['loadavg'])}, after "
            f"{' '.join(f'{x:.2f}' for x in payload['loadavg_after'])} (other work shared the machine: "
            f"`{m['uptime']}`).\n\n"
            "First frame: last upload byte sent -> first frame received (preparation + queue + one frame), over "
            "served streams. Per-stream fps: frames after the first over first-to-last frame time. Refused: "
            "closed 1013 (503 over HTTP) before any frame.\n\n" + "\n".join(rows) + "\n"
            + ("\nRefusals, by message: " + "; ".join(f"`{k}`" for k in refusals) + "\n" if refusals else ""))
    atomic_write_text(out / f"{name}.md", text)


def speech_bytes(path: str, seconds: float) -> tuple[bytes, int]:
    """The first ``seconds`` of ``path`` as WAV bytes, and the frames they make."""
    import io

    import soundfile as sf

    samples, rate = sf.read(path, dtype="float32")
    samples = samples[: int(seconds * rate)]
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue(), int(len(samples) * 16000 / rate) // 640


def server_sampling(url: str) -> dict:
    """The server's default sampling, from /healthz (what a client that sends no sampler gets)."""
    import urllib.request

    with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
        return json.loads(r.read()).get("sampling", {})


async def run(args, prep_rss=lambda: float("nan")) -> dict:
    face = Path(args.face).read_bytes()
    start = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps)) if v is not None}
    sampling = await asyncio.to_thread(server_sampling, args.url)
    rounds = []
    for n in args.streams:
        seconds = args.seconds_at.get(n, args.seconds)
        audio, expected = speech_bytes(args.audio, seconds)
        r = await one_round(args.url, n, seconds, face, audio, expected, start, args.timeout, prep_rss=prep_rss)
        log.info("N=%d: served %d, refused %d, queued %d (max place %d); first frame p50 %.2f s p95 %.2f s; "
                 "%.2f fps total, %.2f per stream; lost %d dup %d; errors %d; RSS %.0f + %.0f MiB", n, r.served,
                 r.refused_busy, r.queued, r.max_queue_position, r.first_frame_p50_s, r.first_frame_p95_s,
                 r.total_fps, r.per_stream_fps_median, r.lost, r.duplicated, r.errors, r.rss_mib_after,
                 r.prep_rss_mib_after)
        rounds.append(asdict(r))
        await asyncio.sleep(args.pause)
    return {"rounds": rounds, "sampling": sampling}


def parse_seconds_at(text: str) -> dict[int, float]:
    """``"100=0.4,8=1"`` -> {100: 0.4, 8: 1.0}: speech per stream for the rounds of those N."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        n, _, sec = part.partition("=")
        out[int(n)] = float(sec)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", default="1,2,4,8,100", help="comma-separated concurrent stream counts")
    p.add_argument("--seconds", type=float, default=1.0, help="speech per stream")
    p.add_argument("--seconds-at", default="", help="speech per stream for some N, e.g. 100=0.4")
    p.add_argument("--sampler", default=None, help="a sampler to ask for (default: none, the engine's own)")
    p.add_argument("--steps", type=int, default=None, help="steps to ask for (default: none, the engine's own)")
    p.add_argument("--max-streams", type=int, default=8, help="the in-process server's --max-streams")
    p.add_argument("--max-queue", type=int, default=32, help="the in-process server's --max-queue")
    p.add_argument("--max-connections", type=int, default=64, help="the in-process server's --max-connections")
    p.add_argument("--max-stream-seconds", type=float, default=600.0, help="the in-process server's limit")
    p.add_argument("--start-timeout", type=float, default=30.0, help="the in-process server's --start-timeout")
    p.add_argument("--threads", type=int, default=1, help="the in-process server's engine threads")
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one here)")
    p.add_argument("--face", default=str(EXAMPLES / "face.png"))
    p.add_argument("--audio", default=str(EXAMPLES / "speech.wav"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per stream at most (client side)")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between rounds")
    p.add_argument("--max-streams-per-round", type=int, default=128)
    p.add_argument("--out", default=None, help="folder for <name>.json/.md")
    p.add_argument("--name", default="serve_load_cpu")
    args = p.parse_args(argv)
    args.streams = [int(x) for x in args.streams.split(",")]
    args.seconds_at = parse_seconds_at(args.seconds_at)
    if max(args.streams) > args.max_streams_per_round or min(args.streams) < 1:
        p.error(f"--streams must be in 1..{args.max_streams_per_round}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    before = machine()
    engine = "demo" if args.url is None else args.url
    if args.url is not None:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            p.error(f"--url must be a loopback address ({', '.join(LOOPBACK)}), got {host}")
        result = asyncio.run(run(args))
    else:
        result = in_process(args)
    chose = args.sampler is not None or args.steps is not None
    payload = {"command": "python -m dheads.benchmarks.serve_load " + " ".join(argv or sys.argv[1:]),
               "config": {"engine": engine, "seconds": args.seconds,
                          "seconds_at": args.seconds_at, "sampler": args.sampler, "steps": args.steps,
                          "sampling": result["sampling"],
                          "sampling_note": "as asked by the clients" if chose else
                          "none sent by the clients: the engine's default",
                          "max_streams": args.max_streams, "max_queue": args.max_queue,
                          "max_connections": args.max_connections, "max_stream_seconds": args.max_stream_seconds,
                          "start_timeout": args.start_timeout, "threads": args.threads},
               "machine": before, "uptime_after": machine()["uptime"], "loadavg_after": os.getloadavg(),
               "rounds": result["rounds"]}
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
    cfg = ServeConfig(port=port, threads=args.threads, max_streams=args.max_streams, max_queue=args.max_queue,
                      max_connections=args.max_connections, max_stream_seconds=args.max_stream_seconds,
                      start_timeout_s=args.start_timeout)
    worker = EngineWorker(cfg)
    worker.start()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, worker), host="127.0.0.1", port=port, log_level="warning",
                                           ws_max_size=cfg.max_upload_bytes + (1 << 16)))

    def prep_rss() -> float:
        return sum(rss_mib(pid) for pid in worker.prep.pids())

    async def serve_and_load():
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        args.url = f"http://127.0.0.1:{port}"
        try:
            return await run(args, prep_rss)
        finally:
            server.should_exit = True
            await task

    try:
        return asyncio.run(serve_and_load())
    finally:
        worker.stop()


if __name__ == "__main__":
    sys.exit(main())
