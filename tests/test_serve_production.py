"""dh-serve as a deploying team meets it (issue 30), on a real uvicorn on 127.0.0.1: the engine's default
sampling (the frames dh-run makes), hostile JSON and fields, one error shape, token header and tickets, the
origin check, the pixel budget, an audio bomb, timeouts, queue and connection caps, the place in line, a
render whose client leaves, render jobs, the drain, the loading state, a busy port, an engine that fails to
load, stale temp folders and replicas sharing a video folder. Streams are 0.3 s of speech (7 frames) on the
shipped demo model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import av
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
websockets = pytest.importorskip("websockets")

from dheads.engine.cli import _sampler_config
from dheads.engine.pipeline import RenderRequest
from dheads.serve.config import ServeConfig
from dheads.serve.worker import EngineWorker

from _serve import FACE, free_port, running_server, serving, short_speech, url, worker  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    return short_speech(tmp_path_factory.mktemp("prod") / "speech.wav", 0.3)


@contextlib.contextmanager
def server_with(worker, log_level="warning", **changes):
    """A second server over the same loaded engine, with ``changes`` to its config; yields (url, server)."""
    cfg = dataclasses.replace(worker.config, port=free_port(), **changes)
    w = EngineWorker(cfg, head=worker.head, prep=worker.prep)
    w.start()
    try:
        with serving(w, cfg, log_level=log_level) as (u, server):
            yield u, server
    finally:
        w.stop()


def ws_url(url: str, query: str = "") -> str:
    return url.replace("http://", "ws://") + "/v1/stream" + query


async def exchange(url, messages, *, query="", headers=None, read=True, gap=0.0):
    """Send ``messages`` (str: text, bytes: binary), then read to the close: (JSON messages, frames, close code)."""
    msgs, frames = [], []
    async with websockets.connect(ws_url(url, query), max_size=None, additional_headers=headers) as c:
        with contextlib.suppress(websockets.ConnectionClosed):
            for m in messages:
                await c.send(m)
                if gap:
                    await asyncio.sleep(gap)
        header = None
        while read:
            try:
                m = await asyncio.wait_for(c.recv(), 60)
            except websockets.ConnectionClosed:
                break
            if isinstance(m, str):
                header = json.loads(m)
                msgs.append(header)
            else:
                n = header["image_bytes"]
                frames.append(np.frombuffer(m[:n], np.uint8).reshape(header["height"], header["width"], 3))
        code = c.close_code
    return msgs, (np.stack(frames) if frames else None), code


def start_msg(**fields) -> str:
    return json.dumps({"type": "start", "format": "rgb", **fields})


def stream(url, wav, **fields):
    return asyncio.run(exchange(url, [start_msg(**fields), FACE.read_bytes(), wav.read_bytes()]))


def decoded(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def render(url, wav, data=None, headers=None, face=None, timeout=120):
    files = {"face": ("f.png", face or FACE.read_bytes()), "audio": ("s.wav", wav.read_bytes())}
    return httpx.post(url + "/v1/render", files=files, data=data or {}, headers=headers, timeout=timeout)


def metric(w: EngineWorker, name: str, **labels) -> float:
    return w.metrics.registry.get_sample_value(name, labels or None) or 0.0


# --- 1. a client that chooses nothing gets what dh-run makes -------------------------------------------------


def test_default_sampling_is_dh_runs_in_library_render_and_stream(worker, url, wav, tmp_path):
    head = worker.head
    cli_default = _sampler_config(None, None, 0.0, "float64", 0, None, head)  # dh-run with no sampling flags
    assert cli_default == head.default_sampler
    health = httpx.get(url + "/healthz").json()
    assert health["sampling"] == head.default_sampler.to_dict()  # spacing, frame noise, warm steps: all of it
    library = np.stack(list(head.frames(head.prepare(FACE, wav), seed=3)))

    msgs, frames, code = stream(url, wav, seed=3)
    assert code == 1000 and msgs[0]["sampling"] == head.default_sampler.to_dict()
    assert frames.shape == library.shape == (7, 64, 64, 3) and np.array_equal(frames, library)

    head.render(RenderRequest(FACE, wav, tmp_path / "dh_run.mp4", sampler=cli_default, seed=3))
    r = render(url, wav, {"seed": "3"})
    assert r.status_code == 200 and np.array_equal(decoded(r.content), decoded((tmp_path / "dh_run.mp4").read_bytes()))


def test_a_client_choice_goes_over_the_engine_default_as_dh_runs_flags_do(worker, url, wav):
    head = worker.head
    want = _sampler_config("ddim", 2, 0.0, "float64", 0, None, head)  # dh-run --sampler ddim --steps 2
    assert want == dataclasses.replace(head.default_sampler, name="ddim", steps=2)
    msgs, frames, code = stream(url, wav, sampler="ddim", steps=2, seed=1)
    assert code == 1000 and msgs[0]["sampling"] == want.to_dict()
    assert np.array_equal(frames, np.stack(list(head.frames(head.prepare(FACE, wav), sampler=want, seed=1))))


# --- 2. hostile JSON and fields: 400 / close 1008 with one JSON line ----------------------------------------

DIGITS = "7" * 5000
SHOWN = "'" + "7" * 36 + "..."  # a value in a message: its repr cut to 40 characters
HOSTILE_WS = [
    ('{"type": "start", "steps": Infinity}', "JSON must not contain Infinity (not a JSON number)"),
    ('{"type": "start", "seed": NaN}', "JSON must not contain NaN (not a JSON number)"),
    ('{"type": "start", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "JSON message of 200024 characters; this server takes at most 16384"),
    ('{"type": "start", "x": ' + "[" * 5000 + "]" * 5000 + "}", "JSON message nested too deeply"),
    ('{"type": "start", "steps": true}', "steps must be an integer in 1..100, got True"),
    ('{"type": "start", "seed": 1.5}', "seed must be an integer in 0..18446744073709551615, got 1.5"),
    ('{"type": "start", "seed": %s}' % DIGITS, "JSON number of 5000 digits; numbers here have at most 25"),
    ('{"type": "start", "seed": "%s"}' % DIGITS, "seed must be an integer in 0..18446744073709551615, got " + SHOWN),
    ('{"type": "start", "seed": -1}', "seed must be in 0..18446744073709551615, got -1"),
    ('{"type": "start", "steps": 101}', "steps must be in 1..100, got 101"),
    ('{"type": "start", "face_name": {"a": 1}}', "face_name must be a string, got {'a': 1}"),
    ('{"type": "start", "mp4": "yes"}', "mp4 must be true or false, got 'yes'"),
    ('{"type": "start", "spacing": "wobbly"}', "spacing must be one of uniform, karras, trailing, got 'wobbly'"),
    ('{"type": "start", "frame_noise": "2"}', "frame noise must be one of fresh, repeat or a correlation between 0 "
                                              "and 1 (e.g. 0.8), got '2'"),
    ('{"type": "start", "bogus": 1}', "unknown start field 'bogus'; known: type, format, audio, sampler, steps, "
                                      "spacing, frame_noise, seed, sample_rate, mp4, face_name, audio_name"),
    ('["start"]', 'expected a JSON text message {"type": "start", ...}'),
]


@pytest.mark.parametrize("text,error", HOSTILE_WS, ids=range(len(HOSTILE_WS)))
def test_hostile_start_message_is_a_1008_json_error(url, text, error):
    msgs, _, code = asyncio.run(exchange(url, [text]))
    assert (msgs, code) == ([{"type": "error", "error": error}], 1008)


@pytest.mark.parametrize("data,error", [
    ({"steps": "true"}, "steps must be an integer in 1..100, got 'true'"),
    ({"seed": "1.5"}, "seed must be an integer in 0..18446744073709551615, got '1.5'"),
    ({"seed": DIGITS}, "seed must be an integer in 0..18446744073709551615, got " + SHOWN),
    ({"steps": "0"}, "steps must be in 1..100, got 0"),
])
def test_hostile_form_fields_are_a_400_json_error(url, wav, data, error):
    r = render(url, wav, data)
    assert (r.status_code, r.json()) == (400, {"error": error})
    assert httpx.get(url + "/healthz").status_code == 200


def test_every_http_error_has_the_one_json_shape(url):
    assert (lambda r: (r.status_code, r.json()))(httpx.get(url + "/nope")) == (404, {"error": "Not Found"})
    r = httpx.get(url + "/v1/render")
    assert (r.status_code, r.json()) == (405, {"error": "Method Not Allowed"})
    r = httpx.post(url + "/v1/render", files={"face": ("a" * 5000 + ".png", b"\x89PNG")})  # a 5 KB header line
    assert (r.status_code, r.json()) == (400, {"error": "Invalid multipart data."})
    r = httpx.post(url + "/v1/render", files={"steps": ("x", b"2")})
    assert (r.status_code, r.json()) == (400, {"error": "steps: Input should be a valid string"})


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(worker, wav):
    with server_with(worker, max_upload_bytes=100_000) as (u, _):
        limit = 2 * 100_000 + 65536
        port = int(u.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/render HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
            part = b'--x\r\nContent-Disposition: form-data; name="face"; filename="f.png"\r\n\r\n'
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part))  # one file part that never ends
            chunk, sent = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536), len(part)
            while sent < 50 << 20 and not select.select([s], [], [], 0)[0]:  # until the server answers
                with contextlib.suppress(OSError):
                    s.sendall(chunk)
                sent += 65536
            reply = s.recv(65536).decode("latin-1")
        assert reply.startswith("HTTP/1.1 413")
        assert reply.endswith('{"error":"request body is over %d bytes; this server takes at most %d"}' % (limit, limit))
        assert sent < limit + (8 << 20)  # read up to the limit (plus socket buffers), not to the end
        assert httpx.get(u + "/healthz").status_code == 200


# --- 3. token in a header, tickets for a browser's WebSocket, never in the log; the origin check ------------


def test_token_header_ticket_and_no_secret_in_the_access_log(worker, wav):
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    with server_with(worker, log_level="info", token="s3cret") as (u, _):
        access = logging.getLogger("uvicorn.access")
        access.addHandler(handler)
        try:
            auth = {"Authorization": "Bearer s3cret"}
            assert httpx.get(u + "/metrics", headers=auth).status_code == 200
            assert httpx.get(u + "/metrics?token=s3cret").status_code == 401
            assert httpx.post(u + "/v1/ticket").status_code == 401
            ticket = httpx.post(u + "/v1/ticket", headers=auth).json()
            assert ticket["expires_in"] == 30.0
            query = f"?ticket={ticket['ticket']}"
            msgs, frames, code = asyncio.run(exchange(u, [start_msg(), FACE.read_bytes(), wav.read_bytes()], query=query))
            assert code == 1000 and frames.shape[0] == 7
            msgs, _, code = asyncio.run(exchange(u, [start_msg()], query=query))  # a ticket works once
            assert code == 1008 and msgs[0]["error"].startswith("missing or wrong token")
            msgs, _, code = asyncio.run(exchange(u, [start_msg(), FACE.read_bytes(), wav.read_bytes()], headers=auth))
            assert code == 1000 and msgs[-1]["type"] == "done"
        finally:
            access.removeHandler(handler)
    assert any("/metrics?token=<redacted>" in line for line in lines), lines
    assert not any("s3cret" in line or ticket["ticket"] in line for line in lines)


def test_origin_is_checked_cross_origin_denied_with_a_token(worker, wav):
    evil = {"Origin": "http://evil.example"}
    with server_with(worker, token="s3cret") as (u, _):
        auth = {"Authorization": "Bearer s3cret"}
        msgs, _, code = asyncio.run(exchange(u, [start_msg()], headers={**auth, **evil}))
        assert (msgs, code) == ([{"type": "error", "error": "origin http://evil.example is not allowed here "
                                                             "(dh-serve --allow-origin)"}], 1008)
        r = httpx.post(u + "/v1/ticket", headers={**auth, **evil})
        assert (r.status_code, r.json()["error"]) == (403, "origin http://evil.example is not allowed here (dh-serve "
                                                           "--allow-origin)")
        own = {"Origin": u}  # the page the server itself serves
        assert httpx.post(u + "/v1/ticket", headers={**auth, **own}).status_code == 200
    with server_with(worker, token="s3cret", allow_origins=("http://good.example",)) as (u, _):
        pre = httpx.options(u + "/v1/ticket", headers={"Origin": "http://good.example",
                                                       "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://good.example"
        r = httpx.post(u + "/v1/ticket", headers={"Authorization": "Bearer s3cret", "Origin": "http://good.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://good.example"
        assert httpx.post(u + "/v1/ticket", headers={"Authorization": "Bearer s3cret", **evil}).status_code == 403
        # a refused preflight is the one JSON error shape too, never Starlette's plain-text 400
        pre = httpx.options(u + "/v1/ticket", headers={**evil, "Access-Control-Request-Method": "POST"})
        assert (pre.status_code, pre.json()) == (403, {"error": "origin http://evil.example is not allowed here "
                                                                "(dh-serve --allow-origin)"})
        assert pre.headers["content-type"] == "application/json" and "access-control-allow-origin" not in pre.headers
        pre = httpx.options(u + "/v1/ticket", headers={"Origin": "http://good.example",
                                                       "Access-Control-Request-Method": "DELETE"})
        assert (pre.status_code, pre.json()) == (400, {"error": "CORS preflight refused: method not allowed "
                                                                "(allowed methods: GET, POST)"})
    with server_with(worker) as (u, _):  # no token, no --allow-origin: any origin, as before
        msgs, _, code = asyncio.run(exchange(u, [start_msg(), FACE.read_bytes(), wav.read_bytes()], headers=evil))
        assert code == 1000


# --- 4. the pixel budget, from the header, before decoding ----------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` (its IHDR) and holds a few bytes of pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b"")


HUGE = "big.png is 30000x30000 pixels; a face image may have at most 50 MP and 16384 px a side (scale it down)"


def test_pixel_budget_in_dh_run(tmp_path, wav):
    from typer.testing import CliRunner

    from dheads.engine.cli import app
    from dheads.engine.image import ImageTooLarge, read_rgb

    big = tmp_path / "big.png"
    big.write_bytes(png_header(30000, 30000))
    res = CliRunner().invoke(app, [str(big), str(wav), "-o", str(tmp_path / "o.mp4")])
    assert res.exit_code == 2 and res.output.strip().endswith(HUGE)
    with av.open(str(tmp_path / "wide.mkv"), "w") as c:  # a video whose frames are over the budget: refused
        s = c.add_stream("mjpeg", rate=25)               # from its stream header (not a picture format)
        s.width, s.height, s.pix_fmt = 16400, 16, "yuvj420p"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16400, 3), np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(ImageTooLarge, match="wide.mkv is 16400x16 pixels"):
        read_rgb(tmp_path / "wide.mkv")


def test_pixel_budget_in_dh_serve_leaves_no_files(worker, url, wav, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the server's upload folders land here
    big = png_header(30000, 30000)
    files = {"face": ("big.png", big), "audio": ("s.wav", wav.read_bytes())}
    r = httpx.post(url + "/v1/render", files=files, timeout=60)
    assert (r.status_code, r.json()) == (413, {"error": HUGE})
    msgs, _, code = asyncio.run(exchange(url, [start_msg(face_name="big.png"), big, wav.read_bytes()]))
    assert (msgs, code) == ([{"type": "error", "error": HUGE}], 1009)
    assert list(tmp_path.iterdir()) == [] and httpx.get(url + "/healthz").status_code == 200


# --- 5. timeouts, caps, a client that leaves, the drain, loading, a busy port ----------------------------------


def test_each_phase_of_a_stream_has_a_timeout(worker, wav):
    pcm = (sf.read(str(wav), dtype="int16")[0]).tobytes()
    with server_with(worker, start_timeout_s=0.5, idle_timeout_s=0.5, max_stream_seconds=2.0) as (u, _):
        t0 = time.monotonic()
        msgs, _, code = asyncio.run(exchange(u, []))
        assert (msgs, code) == ([{"type": "error", "error": 'no {"type": "start"} message within 0.5 s; closing'}], 1008)
        msgs, _, code = asyncio.run(exchange(u, [start_msg(), FACE.read_bytes()]))  # a face and never audio
        assert (msgs, code) == ([{"type": "error", "error": "no audio file within 0.5 s; closing"}], 1008)
        msgs, _, code = asyncio.run(exchange(u, [start_msg(audio="pcm"), FACE.read_bytes(), pcm[:3200]]))
        assert (msgs[-1], code) == ({"type": "error", "error": "no audio within 0.5 s; closing"}, 1008)
        assert time.monotonic() - t0 < 15
        # audio that keeps coming, slowly, past the longest a stream may take
        msgs, _, code = asyncio.run(exchange(u, [start_msg(audio="pcm"), FACE.read_bytes(), *[pcm[:640]] * 40],
                                             gap=0.1))
        assert (msgs[-1], code) == ({"type": "error", "error": "stream took over 2 s, this server's limit"}, 1008)


async def held_stream(url, ready: asyncio.Event, release: asyncio.Event):
    """A client that sends its start and face, then holds its place until ``release``."""
    async with websockets.connect(ws_url(url), max_size=None) as c:
        await c.send(start_msg())
        await c.send(FACE.read_bytes())
        ready.set()
        await release.wait()


def test_queue_counts_preparation_and_connections_are_capped(worker, wav):
    async def second_while_first_holds(u, w, check):
        ready, release = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(held_stream(u, ready, release))
        await asyncio.wait_for(ready.wait(), 10)
        deadline = time.monotonic() + 10
        while metric(w, "dh_streams_preparing") != 1:  # its face is prepared, it waits for audio: in the queue
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        try:
            return await check(u)
        finally:
            release.set()
            await first

    async def ws_then_http(u):
        msgs, _, code = await exchange(u, [start_msg()])
        r = await asyncio.to_thread(render, u, wav)
        return msgs, code, r.status_code, r.json()

    with server_with(worker, max_queue=1) as (u, server):
        msgs, code, status, body = asyncio.run(second_while_first_holds(u, server.worker, ws_then_http))
        assert (msgs, code) == ([{"type": "error", "error": "server busy: 1 streams already waiting"}], 1013)
        assert (status, body) == (503, {"error": "server busy: 1 streams already waiting"})
        deadline = time.monotonic() + 5
        while metric(server.worker, "dh_queue_depth") != 0:  # the first client left: its place is given back
            assert time.monotonic() < deadline
            time.sleep(0.02)
    with server_with(worker, max_connections=1) as (u, server):
        msgs, code, status, body = asyncio.run(second_while_first_holds(u, server.worker, ws_then_http))
        assert (msgs, code) == ([{"type": "error", "error": "server busy: 1 streams open, at most 1"}], 1013)
        assert (status, body) == (503, {"error": "server busy: 1 streams open, at most 1"})


def test_a_render_stops_when_its_client_leaves(worker, tmp_path):
    long = short_speech(tmp_path / "long.wav", 3.0)  # 75 frames
    with server_with(worker) as (u, server):
        w = server.worker
        req = httpx.Request("POST", u + "/v1/render", files={"face": ("f.png", FACE.read_bytes()),
                                                             "audio": ("s.wav", long.read_bytes())})
        body = req.read()
        head = f"POST /v1/render HTTP/1.1\r\nHost: x\r\nContent-Type: {req.headers['content-type']}\r\n" \
               f"Content-Length: {len(body)}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", int(u.rsplit(":", 1)[1]))) as s:
            s.sendall(head + body)
            deadline = time.monotonic() + 60
            while metric(w, "dh_frames_total") < 2:
                assert time.monotonic() < deadline, "no frame was made"
                time.sleep(0.05)
        deadline = time.monotonic() + 10
        while metric(w, "dh_streams_total", result="cancelled") < 1:
            assert time.monotonic() < deadline, "the render went on after its client left"
            time.sleep(0.05)
        made = metric(w, "dh_frames_total")
        time.sleep(0.5)
        assert metric(w, "dh_frames_total") == made < 75 and w.open_requests == 0


def test_drain_turns_health_503_then_ends_open_streams_with_json(worker, wav, tmp_path):
    long = short_speech(tmp_path / "long.wav", 3.0)

    async def run(u, server):
        async with websockets.connect(ws_url(u), max_size=None) as c:
            await c.send(start_msg())
            await c.send(FACE.read_bytes())
            await c.send(long.read_bytes())
            assert json.loads(await c.recv())["type"] == "ready"
            server.handle_exit(signal.SIGTERM, None)
            health = await asyncio.to_thread(httpx.get, u + "/healthz")
            refused = await asyncio.to_thread(render, u, wav)
            last = None
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:  # frames go on until the drain is over
                    m = await asyncio.wait_for(c.recv(), 30)
                    last = json.loads(m) if isinstance(m, str) else last
            return health, refused, last, c.close_code

    with server_with(worker, drain_s=1.0) as (u, server):
        t0 = time.monotonic()
        health, refused, last, code = asyncio.run(run(u, server))
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        assert (refused.status_code, refused.json()) == (503, {"error": "server is shutting down"})
        assert (last, code) == ({"type": "error", "error": "server is shutting down"}, 1012)
        assert time.monotonic() - t0 < 10


def test_health_says_loading_until_the_engine_is_ready(worker, wav, monkeypatch):
    from dheads.engine.pipeline import TalkingHead

    loaded = threading.Event()

    def slow_open(*_a, **_k):
        assert loaded.wait(20)
        return worker.head

    monkeypatch.setattr(TalkingHead, "open", slow_open)
    cfg = dataclasses.replace(worker.config, port=free_port())
    with serving(None, cfg) as (u, server):
        r = httpx.get(u + "/healthz")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        msgs, _, code = asyncio.run(exchange(u, [start_msg()]))
        assert (msgs, code) == ([{"type": "error", "error": "engine is loading; try again shortly"}], 1013)
        loaded.set()
        deadline = time.monotonic() + 10
        while httpx.get(u + "/healthz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert render(u, wav).status_code == 200


def test_a_busy_port_fails_before_the_engine_loads():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "dheads.serve.cli", "--port", str(port)], capture_output=True,
                             text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"dh-serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert time.monotonic() - t0 < 8  # the engine takes seconds to load; the port check does not wait for it


def test_a_waiting_stream_is_told_its_place_in_line(worker, wav, tmp_path):
    long = short_speech(tmp_path / "long.wav", 3.0)

    async def run(u):
        async with websockets.connect(ws_url(u), max_size=None) as first:
            for m in (start_msg(), FACE.read_bytes(), long.read_bytes()):
                await first.send(m)
            assert json.loads(await first.recv())["type"] == "ready"
            assert json.loads(await first.recv())["type"] == "frame"  # it holds the one batch slot
            second = asyncio.create_task(exchange(u, [start_msg(), FACE.read_bytes(), wav.read_bytes()]))
            deadline = time.monotonic() + 30
            while not (server.worker._waiting and server.worker._waiting[0].position == 1):  # told it waits
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        return await asyncio.wait_for(second, 60)  # the first left: the second gets the slot

    with server_with(worker, max_streams=1) as (u, server):
        msgs, frames, code = asyncio.run(run(u))
    assert msgs[0]["type"] == "ready" and msgs[1] == {"type": "queued", "position": 1}
    assert msgs[2]["type"] == "frame" and msgs[-1] == {"type": "done", "frames": 7} and code == 1000


def test_temp_folders_of_a_dead_server_are_removed_at_start(tmp_path, monkeypatch):
    import os

    from dheads.serve.uploads import UploadDir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = 4_999_999  # above Linux's largest pid: no process has it
    old = [tmp_path / f"dh-serve-{dead}-a1", tmp_path / f"dh-serve-videos-{dead}-b2"]
    kept = [tmp_path / f"dh-serve-{dead}-new", tmp_path / f"dh-serve-{os.getpid()}-live", tmp_path / "dh-serve-other"]
    for d in old + kept:
        d.mkdir()
        (d / "face.png").write_bytes(b"x")
    for d in old + kept[1:]:
        os.utime(d, (time.time() - 7200, time.time() - 7200))
    w = EngineWorker(ServeConfig(port=free_port()))  # removes them when it is made
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(d.name for d in kept), w.video_dir.name])
        assert w.video_dir.name.startswith(f"dh-serve-videos-{os.getpid()}-")
        with UploadDir() as u:
            assert u.path.name.startswith(f"dh-serve-{os.getpid()}-")
    finally:
        w.stop()


def test_an_audio_bomb_is_refused_from_its_header_and_never_decoded_whole(worker, tmp_path):
    import tracemalloc

    from dheads.engine.audio import load_audio
    from dheads.serve.uploads import Upload
    from dheads.serve.worker import ClientError

    bomb = tmp_path / "bomb.flac"  # 10 minutes of silence: 9.6 MB of samples, a few KB of FLAC
    with sf.SoundFile(str(bomb), "w", 8000, 1, format="FLAC") as f:
        for _ in range(600):
            f.write(np.zeros(8000, np.int16))
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ClientError, match=r"^audio is 600\.0 s; this server takes at most 60 s$") as e:
            worker.load_speech(Upload(bomb, "bomb.flac"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.status == 413 and peak < 4 << 20  # decoded whole, it would be 19 MB, 38 MB at 16 kHz
    # decoding stops near the bound on both readers (a header may lie, or state no length): PyAV (AAC), soundfile
    with av.open(str(tmp_path / "talk.m4a"), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000 * 10), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    assert 2 * 16000 < load_audio(tmp_path / "talk.m4a", silence="ignore", max_decode_s=2)[0].size < 3 * 16000
    assert load_audio(bomb, silence="ignore", max_decode_s=2)[0].size == 2 * 16000 + 2


def test_an_engine_that_fails_to_load_is_one_line_and_exit_2():
    res = subprocess.run([sys.executable, "-m", "dheads.serve.cli", "--engine", "/nonexistent/x.onnx", "--port",
                          str(free_port()), "--threads", "1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "dh-serve: error: /nonexistent/x.onnx: no such file or directory"


def test_replicas_sharing_a_video_dir_serve_each_others_links(worker, wav, tmp_path):
    shared = str(tmp_path / "videos")
    with server_with(worker, video_dir=shared, keep_videos=1) as (a, _), \
            server_with(worker, video_dir=shared, keep_videos=1) as (b, _):
        first = stream(a, wav, mp4=True)[0][-1]["video"]
        r = httpx.get(b + first)  # made on replica a, fetched from replica b
        assert r.status_code == 200 and decoded(r.content).shape == (7, 64, 64, 3)
        second = stream(b, wav, mp4=True)[0][-1]["video"]
        assert httpx.get(a + second).status_code == 200
        r = httpx.get(a + first)  # keep_videos = 1 across the folder: the older one expired
        assert (r.status_code, r.json()) == (404, {"error": "no such video (finished videos are kept for a while only)"})
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [second.rsplit("/", 1)[1] + ".mp4"]


def poll(url, job_id, until=("done", "failed", "cancelled"), timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        view = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if view["status"] in until:
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


def test_a_render_job_is_submitted_polled_and_fetched(worker, url, wav, tmp_path):
    files = {"face": ("f.png", FACE.read_bytes()), "audio": ("s.wav", wav.read_bytes())}
    r = httpx.post(url + "/v1/jobs", files=files, data={"seed": "3"})
    assert r.status_code == 202
    job = r.json()
    assert job == {"id": job["id"], "status": "queued", "frames": 0, "total": None, "poll": f"/v1/jobs/{job['id']}"}
    done = poll(url, job["id"])
    assert done == {"id": job["id"], "status": "done", "frames": 7, "total": 7, "video": f"/v1/videos/{job['id']}"}
    video = httpx.get(url + done["video"])
    assert video.status_code == 200 and np.array_equal(decoded(video.content), decoded(render(url, wav, {"seed": "3"}).content))
    bad = httpx.post(url + "/v1/jobs", files={**files, "face": ("me.png", b"not an image")}).json()
    assert poll(url, bad["id"]) == {"id": bad["id"], "status": "failed", "frames": 0, "total": None,
                                    "error": "cannot read image me.png (corrupt or unsupported format)", "code": 400}
    r = httpx.get(url + "/v1/jobs/" + "0" * 32)
    assert (r.status_code, r.json()) == (404, {"error": "no such job (finished jobs are kept for a while only)"})
    r = httpx.post(url + "/v1/jobs", files=files, data={"steps": "true"})  # checked before the job starts
    assert (r.status_code, r.json()) == (400, {"error": "steps must be an integer in 1..100, got 'true'"})


def test_a_cancelled_job_stops_its_stream(worker, tmp_path):
    long = short_speech(tmp_path / "long.wav", 3.0)
    with server_with(worker) as (u, server):
        r = httpx.post(u + "/v1/jobs", files={"face": ("f.png", FACE.read_bytes()), "audio": ("s.wav", long.read_bytes())})
        job = poll(u, r.json()["id"], until=("running",))
        assert job["total"] == 75
        assert httpx.delete(f"{u}/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        deadline = time.monotonic() + 10
        while metric(server.worker, "dh_streams_total", result="cancelled") < 1 or server.worker.open_requests:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert poll(u, job["id"])["status"] == "cancelled" and poll(u, job["id"])["frames"] < 75


# --- 9. a native crash while preparing fails that request only ------------------------------------------------


def test_a_native_crash_in_preparation_fails_that_request_and_the_server_goes_on(worker, wav, tmp_path, monkeypatch):
    from dheads.serve.prep import TEST_CRASH_HOOK

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the server's upload folders land here
    # the test hook: a file marked DH-SEGV / DH-KILL (as the OOM killer ends a process) / DH-STOP (a hang) makes
    # the prep worker signal itself so
    monkeypatch.setenv(TEST_CRASH_HOOK, "SEGV:DH-SEGV,KILL:DH-KILL,STOP:DH-STOP")
    # 10 s: a fresh worker's ordinary preparation must stay well inside it on loaded CI cores
    cfg = dataclasses.replace(worker.config, port=free_port(), prep_timeout_s=10.0)
    w = EngineWorker(cfg, head=worker.head)  # a pool of its own, started with the hook in its environment
    w.start()
    crashed = ("server error: preparing the {} crashed its worker process ({}); the server goes on (report the file "
               "if it is an ordinary {})")
    try:
        with serving(w, cfg) as (u, _):
            before = w.prep.pids()
            r = render(u, wav, face=FACE.read_bytes() + b"DH-SEGV")  # bytes after a PNG's end: no decoder looks
            assert (r.status_code, r.json()) == (500, {"error": crashed.format("face", "SIGSEGV", "face")})
            r = render(u, wav)  # the next request: a fresh worker prepares it
            assert r.status_code == 200 and len(decoded(r.content)) == int(r.headers["X-Frames"]) == 7
            assert w.prep.pids() and w.prep.pids() != before
            msgs, _, code = asyncio.run(exchange(u, [start_msg(), FACE.read_bytes() + b"DH-SEGV", wav.read_bytes()]))
            assert (msgs, code) == ([{"type": "error", "error": crashed.format("face", "SIGSEGV", "face")}], 1011)
            msgs, _, code = asyncio.run(exchange(u, [start_msg(), FACE.read_bytes(), wav.read_bytes() + b"DH-KILL"]))
            assert (msgs, code) == ([{"type": "error", "error": crashed.format("audio", "SIGKILL", "audio")}], 1011)
            t0 = time.monotonic()
            r = render(u, wav, face=FACE.read_bytes() + b"DH-STOP")  # a worker that hangs is killed at the limit
            assert (r.status_code, r.json()) == (500, {"error": "server error: preparing the face took over 10 s "
                                                                "(dh-serve --prep-timeout); its worker process was "
                                                                "stopped; the server goes on (report the file if it "
                                                                "is an ordinary face)"})
            assert 10 <= time.monotonic() - t0 < 40
            msgs, frames, code = stream(u, wav)
            assert code == 1000 and msgs[-1] == {"type": "done", "frames": 7} and len(frames) == 7
            assert metric(w, "dh_prep_crashes_total") == 4 and w.prep.restarts == 4
            assert httpx.get(u + "/healthz").json()["status"] == "ok"
        assert [p.name for p in tmp_path.iterdir()] == [w.video_dir.name]  # no upload folder left behind
    finally:
        w.stop()


def test_a_dead_workers_signal_is_read_even_when_the_pools_thread_reaped_it_first():
    """The pool's manager thread and the server both reap a dead worker; when the other thread's waitpid wins, the
    Process shows no exit code for a moment: the server must wait for it, not call the crash "it exited"."""
    import threading as _threading

    from dheads.serve.prep import _exit_reason

    class Reaped:  # a Process whose exit code the pool's thread stores 0.2 s after the server asks
        def __init__(self, code):
            self._code, self.exitcode = code, None

        def join(self, timeout=None):
            _threading.Timer(0.2, setattr, (self, "exitcode", self._code)).start()

    assert _exit_reason([Reaped(-11)]) == "SIGSEGV"
    assert _exit_reason([Reaped(-9)]) == "SIGKILL"
    assert _exit_reason([Reaped(3)]) == "exit code 3"
    assert _exit_reason([]) == "it exited"


def test_the_wait_for_a_dead_workers_exit_is_shared_by_all_the_workers(monkeypatch):
    """Several live workers in a broken pool: each join gets what is left of one EXIT_WAIT_S, not EXIT_WAIT_S each."""
    from dheads.serve import prep

    clock = [0.0]
    monkeypatch.setattr(prep.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(prep.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    asked = []

    class Alive:  # a live worker: join waits out its whole timeout, exitcode stays None
        exitcode = None

        def join(self, timeout=None):
            asked.append(timeout)
            clock[0] += timeout

    assert prep._exit_reason([Alive(), Alive(), Alive()]) == "it exited"
    assert asked == [prep.EXIT_WAIT_S, 0.0, 0.0] and clock[0] == prep.EXIT_WAIT_S
