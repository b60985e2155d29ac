"""The HTTP and WebSocket endpoints of ``dh-serve`` (FastAPI), over one :class:`EngineWorker`.

``GET /`` the page, ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``POST /v1/render`` (multipart ->
``video/mp4``), ``WS /v1/stream`` (frames as they are made; the protocol is in README "Serving"),
``GET /v1/videos/{id}`` (the mp4 of a finished stream that asked for one). Errors are JSON
``{"error": "<one line>"}`` with a 4xx (5xx: shutting down or an engine failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import logging
import os
import re

import cv2
import numpy as np
import soxr
from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from dheads.engine.audio import SAMPLE_RATE

from .config import ServeConfig
from .metrics import CONTENT_TYPE
from .uploads import LimitError, RequestError, UploadDir, float_to_pcm16, pcm16_to_float
from .worker import PCM_ENCODE_EVERY, SAMPLES_PER_FRAME, ClientError, EngineWorker, Session, stream_options

log = logging.getLogger(__name__)
_VIDEO_ID = re.compile(r"[0-9a-f]{32}")
FORMATS = ("jpeg", "rgb")


def _status(e: BaseException) -> int:
    if isinstance(e, LimitError):
        return 413
    return getattr(e, "status", 400)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is parsed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            res = JSONResponse({"error": f"request body is {int(length)} bytes; this server takes at most "
                                         f"{self.limit}"}, status_code=413)
            return await res(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise LimitError(f"request body is over {self.limit} bytes")
            return msg

        return await self.app(scope, counted, send)


def encode_frame(rgb: np.ndarray, fmt: str) -> bytes:
    """uint8 [S, S, 3] RGB -> JPEG (quality 90) or raw RGB bytes."""
    if fmt == "rgb":
        return np.ascontiguousarray(rgb).tobytes()
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def create_app(config: ServeConfig = ServeConfig(), worker: EngineWorker | None = None) -> FastAPI:
    """The app; it starts (and at shutdown stops) its own worker unless given a started one."""
    owned = worker is None
    worker = worker or EngineWorker(config)
    config = worker.config

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if owned:
            await asyncio.to_thread(worker.start)
        yield
        if owned:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="dh-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    # two uploads + form fields + multipart framing
    app.add_middleware(BodyLimit, limit=2 * config.max_upload_bytes + (64 << 10))

    def authorised(headers, query) -> bool:
        if config.token is None:
            return True
        given = query.get("token") or ""
        auth = headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), config.token.encode())

    @app.exception_handler(ClientError)
    @app.exception_handler(LimitError)
    @app.exception_handler(RequestError)
    async def client_error(_request, e):
        return JSONResponse({"error": _one_line(e)}, status_code=_status(e))

    @app.middleware("http")
    async def token_gate(request: Request, call_next):
        if request.url.path not in ("/", "/healthz") and not authorised(request.headers, request.query_params):
            return JSONResponse({"error": "missing or wrong token (send Authorization: Bearer <token>)"},
                                status_code=401)
        try:
            return await call_next(request)
        except LimitError as e:
            return JSONResponse({"error": _one_line(e)}, status_code=413)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (importlib.resources.files("dheads.serve") / "static" / "index.html").read_text()

    @app.get("/healthz")
    async def healthz():
        if not worker.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        info = worker.head.info
        return {"status": "ok", "pid": os.getpid(), "image_size": info.model.image_size, "fps": info.audio.fps,
                "sampler": worker.head.default_sampler.name, "steps": worker.head.default_sampler.steps}

    @app.get("/metrics")
    async def metrics():
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE)

    async def read_upload(part: UploadFile | None, kind: str) -> tuple[bytes, str | None]:
        if part is None or not hasattr(part, "read"):
            raise RequestError(f"missing the '{kind}' file part")
        return await part.read(config.max_upload_bytes + 1), part.filename

    @app.post("/v1/render")
    async def render(face: UploadFile | None = File(None), audio: UploadFile | None = File(None),
                     steps: str | None = Form(None), sampler: str | None = Form(None), seed: str | None = Form(None)):
        opts = stream_options(worker.head, config, steps=steps, sampler=sampler, seed=seed)
        with UploadDir() as d:
            fu = d.save("face", *(await read_upload(face, "face")), max_bytes=config.max_upload_bytes)
            au = d.save("audio", *(await read_upload(audio, "audio")), max_bytes=config.max_upload_bytes)
            identity = await worker.run_prep(worker.load_identity, fu)
            samples, emb = await worker.run_prep(worker.load_speech, au)
            session = Session(worker, worker.new_stream(identity, opts, emb, True), samples, keep_frames=True)
            worker.submit(session)
            try:
                while await session.next() is not None:
                    pass
            finally:
                session.cancel()
            out = await run_in_threadpool(worker.write_video, d.path / "out.mp4", session.kept, samples)
            data = out.read_bytes()
        return Response(data, media_type="video/mp4", headers={"X-Frames": str(len(session.kept))})

    @app.get("/v1/videos/{vid}")
    async def video(vid: str):
        path = worker.videos.get(vid) if _VIDEO_ID.fullmatch(vid) else None
        if path is None or not path.is_file():
            return JSONResponse({"error": "no such video (finished videos are kept for a while only)"},
                                status_code=404)
        return FileResponse(path, media_type="video/mp4", filename="dheads.mp4")

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        await ws.accept()
        if not authorised(ws.headers, ws.query_params):
            await ws.send_json({"type": "error", "error": "missing or wrong token (add ?token=<token>)"})
            return await ws.close(code=1008)
        session, feeder, d = None, None, UploadDir()
        try:
            start = await _receive_json(ws, "start")
            opts = stream_options(worker.head, config, steps=start.get("steps"), sampler=start.get("sampler"),
                                  seed=start.get("seed"))
            fmt, mode = start.get("format", "jpeg"), start.get("audio", "file")
            if fmt not in FORMATS:
                raise RequestError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
            if mode not in ("file", "pcm"):
                raise RequestError(f"audio must be 'file' or 'pcm', got {mode!r}")
            fu = d.save("face", await _receive_bytes(ws, "face"), start.get("face_name"),
                        max_bytes=config.max_upload_bytes)
            identity = await worker.run_prep(worker.load_identity, fu)
            if mode == "file":
                au = d.save("audio", await _receive_bytes(ws, "audio"), start.get("audio_name"),
                            max_bytes=config.max_upload_bytes)
                samples, emb = await worker.run_prep(worker.load_speech, au)
                session = Session(worker, worker.new_stream(identity, opts, emb, True), samples,
                                  keep_frames=bool(start.get("mp4")))
                feeder = asyncio.create_task(_watch(ws, session))
            else:
                rate = _sample_rate(start.get("sample_rate", SAMPLE_RATE))
                session = Session(worker, worker.new_stream(identity, opts, None, False),
                                  np.zeros(0, np.float32), keep_frames=bool(start.get("mp4")))
                feeder = asyncio.create_task(_feed_pcm(ws, worker, session, rate))
            size = worker.head.info.model.image_size
            await ws.send_json({"type": "ready", "fps": worker.head.info.audio.fps, "size": size,
                                "sample_rate": SAMPLE_RATE, "frames": session.stream.n_frames, "format": fmt,
                                "sampler": opts.sampler.name, "steps": opts.sampler.steps})
            worker.submit(session)
            n = 0
            while (frame := await session.next()) is not None:
                img = encode_frame(frame.rgb, fmt)
                pcm = float_to_pcm16(session.audio_of(frame.index))
                await ws.send_json({"type": "frame", "index": frame.index,
                                    "timestamp": frame.index / worker.head.info.audio.fps, "format": fmt,
                                    "width": size, "height": size, "image_bytes": len(img),
                                    "audio_bytes": len(pcm)})
                await ws.send_bytes(img + pcm)
                n += 1
            done = {"type": "done", "frames": n}
            if session.kept is not None:
                path = await run_in_threadpool(worker.write_video, worker.video_dir / f"{session.id}.mp4",
                                               session.kept, session.samples)
                done["video"] = f"/v1/videos/{worker.store_video(session.id, path)}"
            await ws.send_json(done)
            await ws.close(code=1000)
        except WebSocketDisconnect:
            pass
        except (ClientError, LimitError, RequestError) as e:
            await _send_error(ws, e, 1009 if _status(e) == 413 else 1008)
        except Exception as e:  # an engine failure or shutdown: tell the client in one line
            log.exception("stream failed")
            await _send_error(ws, e, 1011)
        finally:
            if session is not None:
                session.cancel()
            if feeder is not None:
                feeder.cancel()
            d.close()

    return app


def _sample_rate(value) -> int:
    try:
        rate = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"sample_rate must be an integer in Hz, got {value!r}") from None
    if not 8000 <= rate <= 192000:
        raise RequestError(f"sample_rate must be in 8000..192000 Hz, got {rate}")
    return rate


async def _send_error(ws: WebSocket, e: BaseException, code: int) -> None:
    with contextlib.suppress(Exception):
        await ws.send_json({"type": "error", "error": _one_line(e)})
        await ws.close(code=code)


async def _receive(ws: WebSocket) -> dict:
    msg = await ws.receive()
    if msg["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(msg.get("code", 1000))
    return msg


async def _receive_json(ws: WebSocket, kind: str) -> dict:
    msg = await _receive(ws)
    try:
        data = json.loads(msg.get("text") or "")
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("type") != kind:
        raise RequestError(f"expected a JSON text message {{\"type\": \"{kind}\", ...}}")
    return data


async def _receive_bytes(ws: WebSocket, kind: str) -> bytes:
    msg = await _receive(ws)
    if msg.get("bytes") is None:
        raise RequestError(f"expected the {kind} file as one binary message")
    return msg["bytes"]


async def _watch(ws: WebSocket, session: Session) -> None:
    """Whole-file mode: the client sends nothing more; a disconnect cancels the stream."""
    with contextlib.suppress(Exception):
        while True:
            await _receive(ws)
    session.cancel()
    session.queue.put_nowait(WebSocketDisconnect(1001))


async def _feed_pcm(ws: WebSocket, worker: EngineWorker, session: Session, rate: int) -> None:
    """PCM mode: 16-bit mono chunks at ``rate`` until ``{"type": "end"}``; the embeddings of the speech so far
    are recomputed every ``PCM_ENCODE_EVERY`` new samples and once at the end."""
    chunks: list[np.ndarray] = []
    encoded = 0
    try:
        while True:
            msg = await _receive(ws)
            final = False
            if msg.get("bytes") is not None:
                chunks.append(pcm16_to_float(msg["bytes"]))
            else:
                try:
                    final = json.loads(msg.get("text") or "").get("type") == "end"
                except (ValueError, AttributeError):
                    final = False
                if not final:
                    raise RequestError('expected binary PCM chunks or {"type": "end"}')
            raw = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            samples = raw if rate == SAMPLE_RATE else soxr.resample(raw, rate, SAMPLE_RATE).astype(np.float32)
            worker.check_seconds(samples.size)
            if final and samples.size < SAMPLES_PER_FRAME:
                raise RequestError(f"audio: {samples.size} samples ({1000 * samples.size / SAMPLE_RATE:.1f} ms) "
                                   f"is shorter than one video frame ({SAMPLES_PER_FRAME} samples, 40 ms)")
            if final or samples.size - encoded >= PCM_ENCODE_EVERY:
                emb = await worker.run_prep(worker.encode, samples)
                session.samples = samples
                session.stream.feed(emb, final=final)
                encoded = samples.size
                worker.wake()
            if final:
                return
    except WebSocketDisconnect:
        session.cancel()
        session.queue.put_nowait(WebSocketDisconnect(1001))
    except (ClientError, LimitError, RequestError) as e:
        session.cancel()
        session.queue.put_nowait(e)
    except Exception as e:  # an encoder failure: end this stream with one line, not a silent stall
        log.exception("PCM feed failed")
        session.cancel()
        session.queue.put_nowait(RuntimeError(f"audio encoding failed: {_one_line(e)}"))
