"""dh-serve end to end on a real server (uvicorn on 127.0.0.1): endpoints, the WS protocol, limits, routing.

Streams are short (0.3 s of speech = 7 frames, 2 DDIM steps) so the file runs in seconds on 2 cores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import av
import cv2
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
websockets = pytest.importorskip("websockets")

from dheads.engine.batcher import Batcher
from dheads.engine.config import SamplerConfig
from dheads.serve.config import ServeConfig
from dheads.serve.worker import EngineWorker, Session

from _serve import FACE, free_port, running_server, short_speech, url, worker  # noqa: F401 (fixtures)

OPTS = {"steps": 2, "sampler": "ddim"}


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    return short_speech(tmp_path_factory.mktemp("serve") / "speech.wav", 0.3)


def ws_url(url: str, path: str = "/v1/stream") -> str:
    return url.replace("http://", "ws://") + path


async def ws_run(url, face: bytes, audio, *, start=None, read_delay=0.0, query=""):
    """One WS stream: returns (messages as dicts, frames [N, S, S, 3] if rgb, audio PCM bytes)."""
    msgs, frames, pcm = [], [], b""
    async with websockets.connect(ws_url(url) + query, max_size=None) as c:
        try:
            await c.send(json.dumps({"type": "start", "format": "rgb", **OPTS, **(start or {})}))
            await c.send(face)
            if isinstance(audio, bytes):
                await c.send(audio)
            elif audio is not None:  # PCM chunks of int16
                for i in range(0, len(audio), 1600):
                    await c.send(audio[i : i + 1600].tobytes())
                await c.send(json.dumps({"type": "end"}))
        except websockets.ConnectionClosed:  # the server refused early; its message is still to be read
            pass
        header = None
        while True:
            try:
                m = await c.recv()
            except websockets.ConnectionClosed:
                break
            if isinstance(m, str):
                header = json.loads(m)
                msgs.append(header)
                continue
            n = header["image_bytes"]
            if header["format"] == "jpeg":
                frames.append(cv2.cvtColor(cv2.imdecode(np.frombuffer(m[:n], np.uint8), cv2.IMREAD_COLOR),
                                           cv2.COLOR_BGR2RGB))
            else:
                frames.append(np.frombuffer(m[:n], np.uint8).reshape(header["height"], header["width"], 3))
            pcm += m[n:]
            if read_delay:
                await asyncio.sleep(read_delay)
    return msgs, (np.stack(frames) if frames else None), pcm


def lone_frames(worker, face_path, wav_path, sampler, seed):
    """What the batcher makes for these inputs with no other stream: the reference a client must get."""
    identity = worker.load_identity(type("U", (), {"path": face_path, "explain": str})())
    _, emb = worker.head.prepare(face_path, wav_path).samples, worker.head.prepare(face_path, wav_path).audio_emb
    s = worker.new_stream(identity, type("O", (), {"sampler": sampler, "seed": seed})(), emb, True)
    b, out = Batcher(worker.head.denoiser), []
    while not s.done:
        out += [f.rgb for f in b.step([s])]
    return np.stack(out)


def test_healthz_and_page(url):
    r = httpx.get(url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["image_size"] == 64
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/v1/stream" in page.text and 'type="file"' in page.text


def test_render_returns_mp4(url, wav):
    r = httpx.post(url + "/v1/render", files={"face": ("me.png", FACE.read_bytes()), "audio": ("s.wav", wav.read_bytes())},
                   data={**OPTS, "seed": "3"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert c.streams.audio, "the mp4 carries the speech"
    assert len(frames) == 7 == int(r.headers["x-frames"]) and frames[0].shape == (64, 64, 3)


@pytest.mark.parametrize("files,data,message", [
    ({"face": ("me.png", b"not an image"), "audio": "WAV"}, {}, "cannot read image me.png (corrupt or unsupported format)"),
    ({"face": "FACE", "audio": ("talk.wav", b"RIFF garbage")}, {},
     "talk.wav: not a readable audio or video file (Invalid data found when processing input); give "
     "wav/flac/mp3/ogg/m4a or a video with sound"),
    ({"face": "FACE", "audio": "WAV"}, {"steps": "abc"}, "steps must be an integer in 1..100, got 'abc'"),
    ({"face": "FACE", "audio": "WAV"}, {"sampler": "euler"},
     "unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc"),
    ({"audio": "WAV"}, {}, "missing the 'face' file part"),
    ({"face": ("../../etc/x.png", b"\x89PNG\r\n\x1a\nbroken"), "audio": "WAV"}, {},
     "cannot read image x.png (corrupt or unsupported format)"),
])
def test_render_bad_input_is_one_json_line(url, wav, files, data, message):
    real = {"FACE": ("face.png", FACE.read_bytes()), "WAV": ("s.wav", wav.read_bytes())}
    files = {k: real.get(v, v) if isinstance(v, str) else v for k, v in files.items()}
    r = httpx.post(url + "/v1/render", files=files, data=data, timeout=60)
    assert r.status_code == 400 and r.json() == {"error": message}


def test_silent_audio_is_refused_as_dh_run_does(url, tmp_path):
    silent = tmp_path / "quiet.wav"
    sf.write(str(silent), np.zeros(8000, np.float32), 16000)
    r = httpx.post(url + "/v1/render", files={"face": ("f.png", FACE.read_bytes()), "audio": ("quiet.wav", silent.read_bytes())},
                   data=OPTS, timeout=60)
    assert r.status_code == 400
    assert r.json() == {"error": "quiet.wav: audio is silent (peak below -80 dBFS); give a file with speech"}


def test_two_clients_get_their_own_frames(worker, url, wav, tmp_path):
    """Two concurrent streams (different faces and seeds) share the batch; each gets exactly its own frames."""
    flipped = tmp_path / "flipped.png"
    cv2.imwrite(str(flipped), cv2.imread(str(FACE))[:, ::-1])

    async def both():
        return await asyncio.gather(ws_run(url, FACE.read_bytes(), wav.read_bytes(), start={"seed": 1}),
                                    ws_run(url, flipped.read_bytes(), wav.read_bytes(), start={"seed": 2}))

    (m1, f1, a1), (m2, f2, a2) = asyncio.run(both())
    # the client's sampler and steps over the engine's recorded spacing and frame noise, as dh-run merges them
    sampler = dataclasses.replace(worker.head.default_sampler, name="ddim", steps=2)
    ref1, ref2 = lone_frames(worker, FACE, wav, sampler, 1), lone_frames(worker, flipped, wav, sampler, 2)
    assert np.abs(f1.astype(int) - ref1).max() <= 1 and np.abs(f2.astype(int) - ref2).max() <= 1
    assert np.abs(f1.astype(int) - f2.astype(int)).max() > 10  # the two streams really differ
    for msgs in (m1, m2):
        assert msgs[0]["type"] == "ready" and msgs[0]["frames"] == 7 and msgs[-1] == {"type": "done", "frames": 7}
        idx = [m["index"] for m in msgs if m["type"] == "frame"]
        assert idx == list(range(7)) and [m["timestamp"] for m in msgs if m["type"] == "frame"][1] == 0.04
    pcm = (np.clip(sf.read(str(wav), dtype="float32")[0], -1, 32767 / 32768) * 32768).round().astype("<i2")
    assert a1 == pcm[: 7 * 640].tobytes() == a2  # each frame carries its 40 ms of speech


def test_pcm_streaming_and_mp4_download(url, wav):
    pcm = sf.read(str(wav), dtype="int16")[0]
    msgs, frames, audio = asyncio.run(ws_run(url, FACE.read_bytes(), pcm, start={"audio": "pcm", "format": "jpeg",
                                                                                  "mp4": True}))
    assert msgs[0]["frames"] is None  # not known until the speech ends
    done = msgs[-1]
    assert frames.shape == (7, 64, 64, 3) and frames.std() > 5  # JPEG frames that decode to a picture
    assert done["type"] == "done" and done["frames"] == 7 and audio == pcm[: 7 * 640].tobytes()
    r = httpx.get(url + done["video"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 7
    assert httpx.get(url + "/v1/videos/../../etc/passwd").status_code == 404
    assert httpx.get(url + "/v1/videos/" + "0" * 32).json()["error"].startswith("no such video")


def test_ws_bad_face_is_one_error_message(url, wav):
    msgs, frames, _ = asyncio.run(ws_run(url, b"GIF89a nope", wav.read_bytes(), start={"face_name": "cat.gif"}))
    assert frames is None and msgs == [{"type": "error", "error": "cannot decode video cat.gif: Invalid data found when processing input"}]
    msgs, _, _ = asyncio.run(ws_run(url, FACE.read_bytes(), None, start={"format": "png"}))
    assert msgs == [{"type": "error", "error": "format must be one of jpeg, rgb, got 'png'"}]


def test_metrics_count_streams_and_frames(url, wav):
    httpx.post(url + "/v1/render", files={"face": ("f.png", FACE.read_bytes()), "audio": ("s.wav", wav.read_bytes())},
               data=OPTS, timeout=120)
    text = httpx.get(url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values['dh_streams_total{result="done"}'] >= 1 and values["dh_frames_total"] >= 7
    assert values["dh_unet_calls_total"] >= 14 and values["dh_first_frame_latency_seconds_count"] >= 1
    for name in ("dh_streams_active", "dh_queue_depth", "dh_frames_per_second"):
        assert name in values


def test_token_and_limits(worker, wav, tmp_path):
    cfg = ServeConfig(port=free_port(), token="s3cret", max_upload_bytes=200_000, max_audio_seconds=0.2)
    strict = EngineWorker(cfg, head=worker.head, prep=worker.prep)
    strict.start()
    try:
        with running_server(strict, cfg) as u:
            assert httpx.get(u + "/healthz").status_code == 200  # health needs no token
            assert httpx.get(u + "/metrics").status_code == 401
            assert httpx.get(u + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            files = {"face": ("f.png", FACE.read_bytes()), "audio": ("s.wav", wav.read_bytes())}
            r = httpx.post(u + "/v1/render", files=files, data=OPTS)
            assert r.status_code == 401 and r.json()["error"].startswith("missing or wrong token")
            r = httpx.post(u + "/v1/render?token=s3cret", files=files, data=OPTS)  # the query form is gone
            assert r.status_code == 401
            auth = {"Authorization": "Bearer s3cret"}
            r = httpx.post(u + "/v1/render", files=files, data=OPTS, headers=auth)
            assert r.status_code == 413 and r.json() == {"error": "audio is 0.3 s; this server takes at most 0.2 s"}
            big = {"face": ("f.png", b"\x89PNG\r\n\x1a\n" + bytes(300_000)), "audio": ("s.wav", wav.read_bytes())}
            r = httpx.post(u + "/v1/render", files=big, data=OPTS, headers=auth)
            assert r.status_code == 413 and r.json() == {"error": "face: upload is over 200000 bytes, this server's limit"}
            huge = {"face": ("f.png", bytes(500_000)), "audio": ("s.wav", wav.read_bytes())}
            r = httpx.post(u + "/v1/render", files=huge, data=OPTS, headers=auth)
            assert r.status_code == 413 and r.json()["error"].startswith("request body is ")
            assert r.json()["error"].endswith("bytes; this server takes at most 465536")
            msgs, _, _ = asyncio.run(ws_run(u, FACE.read_bytes(), wav.read_bytes()))
            assert msgs == [{"type": "error", "error": "missing or wrong token (send Authorization: Bearer <token>, "
                                                       "or ?ticket= from POST /v1/ticket)"}]
    finally:
        strict.stop()


def test_backpressure_pauses_a_slow_reader(worker):
    async def run():
        s = Session(worker, worker.new_stream(worker.load_identity(type("U", (), {"path": FACE, "explain": str})()),
                                              type("O", (), {"sampler": SamplerConfig(name="ddim", steps=2), "seed": 0})(),
                                              worker.head.encoder(np.random.default_rng(0).standard_normal(6400).astype(np.float32) * 0.1),
                                              True), np.zeros(6400, np.float32))
        frames = Batcher(worker.head.denoiser)
        for _ in range(worker.config.max_pending_frames):
            for f in frames.step([s.stream]):
                s.deliver(f)
        assert s.stream.paused and not s.stream.ready  # the client took none: the stream sits out
        await asyncio.sleep(0)
        assert (await s.next()).index == 0
        assert not s.stream.paused and s.stream.ready  # one taken: it may go on

    asyncio.run(run())


def test_sigterm_drains_then_stops_cleanly(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dheads.serve.cli", "--port", str(port), "--threads", "1",
                             "--drain-seconds", "2"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        r = httpx.get(f"http://127.0.0.1:{port}/healthz")  # still serving, telling the balancer to go away
        assert (r.status_code, r.json()) == (503, {"status": "draining"})
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "Shutting down" in err and "stopped (interrupted by SIGTERM)" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_help_is_fast_and_missing_extra_is_one_line(monkeypatch):
    from typer.testing import CliRunner

    from dheads.serve import cli

    monkeypatch.setattr(cli, "SERVE_MODULES", ("fastapi", "not_a_module_dh"))
    res = CliRunner().invoke(cli.app, [])
    assert res.exit_code == 2
    assert res.output.strip() == ("dh-serve: error: not_a_module_dh not installed; install the serve extra from "
                                  "the project's folder: pip install -e '.[serve]'")
    res = CliRunner().invoke(cli.app, ["--replicas", "2"])
    assert res.exit_code == 2 and res.output.strip().endswith("serve and ray extras from the project's folder: "
                                                              "pip install -e '.[serve,ray]'")
    code = "import sys, dheads.serve.cli; assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
