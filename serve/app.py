"""The HTTP and WebSocket endpoints of ``dh-serve`` (FastAPI), over one :class:`EngineWorker`.

``GET /`` the page, ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``POST /v1/render`` (multipart ->
``video/mp4``), ``WS /v1/stream`` (frames as they are made; the protocol is in README "Serving"),
``POST /v1/jobs`` + ``GET``/``DELETE /v1/jobs/{id}`` (render jobs, ``jobs.py``), ``POST /v1/ticket`` (a
short-lived WebSocket ticket for a browser), ``GET /v1/videos/{id}`` (the mp4 of a finished stream or job). Every error is JSON ``{"error": "<one line>"}`` with a 4xx (5xx: loading,
busy, shutting down or an engine failure); a WebSocket gets it as ``{"type": "error", ...}`` and a close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import os
import re
import secrets
import time

import cv2
import numpy as np
import soxr
from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from dheads.engine.audio import SAMPLE_RATE

from .config import ServeConfig
from .metrics import CONTENT_TYPE
from .jobs import Jobs, render_bytes
from .protocol import as_bool, as_int, as_str, check_fields, parse_json
from .uploads import LimitError, RequestError, UploadDir, float_to_pcm16, pcm16_to_float
from .worker import (PCM_ENCODE_EVERY, SAMPLES_PER_FRAME, SAMPLING_FIELDS, ClientError, EngineWorker, Session,
                     ShuttingDown, stream_options)

log = logging.getLogger(__name__)
FORMATS = ("jpeg", "rgb")


def _status(e: BaseException) -> int:
    if isinstance(e, LimitError):
        return 413
    return getattr(e, "status", 400)


def _close_code(e: BaseException) -> int:
    """The WebSocket close code of a refusal: 1009 over a limit, 1011 a server error (a crashed preparation),
    1012 shutting down, 1013 busy, else 1008."""
    if isinstance(e, ShuttingDown):
        return 1012
    return {413: 1009, 500: 1011, 503: 1013}.get(_status(e), 1008)


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def error_response(message: str, status: int) -> JSONResponse:
    """The one error shape of every endpoint: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": _one_line(message)}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (JSON): at once when its
    Content-Length says so, else as soon as that many bytes arrived (chunked), whatever the app then does."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            res = error_response(f"request body is {int(length)} bytes; this server takes at most {self.limit}", 413)
            return await res(scope, receive, send)
        seen, over, answered = 0, False, False
        refusal = error_response(f"request body is over {self.limit} bytes; this server takes at most {self.limit}",
                                 413)

        async def counted():
            nonlocal seen, over
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                over = True
                raise LimitError(f"request body is over {self.limit} bytes")
            return msg

        async def checked_send(msg):
            nonlocal answered
            if over and msg["type"] == "http.response.start" and not answered:
                answered = True
                return await refusal(scope, receive, send)
            if not answered:
                await send(msg)

        try:
            await self.app(scope, counted, checked_send)
        except Exception:
            if not over:
                raise
            if not answered:
                answered = True
                await refusal(scope, receive, send)


class JSONCors(CORSMiddleware):
    """Starlette's CORS policy, but a refused preflight gets the one JSON error shape (not its plain-text
    400): an origin that is not allowed is the 403 every other request from it gets; a method or header
    that is not allowed is a 400 naming what was refused."""

    def preflight_response(self, request_headers: Headers) -> Response:
        res = super().preflight_response(request_headers)
        if res.status_code == 200:
            return res
        origin = request_headers.get("origin")
        if not self.is_allowed_origin(origin=origin):
            out = error_response(f"origin {origin} is not allowed here (dh-serve --allow-origin)", 403)
        else:
            refused = bytes(res.body).decode().removeprefix("Disallowed CORS ")
            out = error_response(f"CORS preflight refused: {refused} not allowed (allowed methods: "
                                 f"{', '.join(sorted(self.allow_methods))})", 400)
        out.headers["Vary"] = "Origin"
        return out


class RedactSecrets(logging.Filter):
    """Blanks ``token=`` and ``ticket=`` values in log lines (uvicorn's access log prints the query string)."""

    _SECRET = re.compile(r"((?:token|ticket)=)[^&\s\"']*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._SECRET.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def redact_access_log() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


class Tickets:
    """Short-lived, single-use WebSocket tickets (``POST /v1/ticket``): a browser cannot send a header on a
    WebSocket, and a ticket in the URL is worth nothing once used or ``ttl_s`` old."""

    MAX_LIVE = 1024

    def __init__(self, ttl_s: float):
        self.ttl_s, self._live = ttl_s, {}

    def issue(self) -> str:
        now = time.monotonic()
        self._live = {t: end for t, end in self._live.items() if end > now}
        if len(self._live) >= self.MAX_LIVE:
            raise ClientError(f"server busy: {len(self._live)} tickets not yet used", 503)
        ticket = secrets.token_urlsafe(24)
        self._live[ticket] = now + self.ttl_s
        return ticket

    def take(self, ticket: str | None) -> bool:
        end = self._live.pop(ticket, None) if ticket else None
        return end is not None and end > time.monotonic()


def encode_frame(rgb: np.ndarray, fmt: str) -> bytes:
    """uint8 [S, S, 3] RGB -> JPEG (quality 90) or raw RGB bytes."""
    if fmt == "rgb":
        return np.ascontiguousarray(rgb).tobytes()
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


OPEN_PATHS = ("/", "/healthz")  # no token, no origin check
TOKEN_HINT = "send Authorization: Bearer <token>"
START_FIELDS = ("type", "format", "audio", *SAMPLING_FIELDS, "sample_rate", "mp4", "face_name", "audio_name")


def create_app(config: ServeConfig = ServeConfig(), worker: EngineWorker | None = None, *,
               load_in_background: bool = True) -> FastAPI:
    """The app; it starts (and at shutdown stops) its own worker unless given a started one. An owned worker
    loads its engine in the background, so /healthz answers 503 "loading" until it is ready; with
    ``load_in_background=False`` the app's start-up waits for it (Ray Serve: a replica is routed to once
    its start-up is over)."""
    owned = worker is None
    worker = worker or EngineWorker(config)
    config = worker.config
    tickets = Tickets(config.ticket_ttl_s)
    jobs = Jobs(worker)
    redact_access_log()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if owned and load_in_background:
            worker.start_in_background()
        elif owned:
            await asyncio.to_thread(worker.start)
        yield
        jobs.cancel_all()
        if owned:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="dh-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker

    def token_ok(headers) -> bool:
        if config.token is None:
            return True
        auth = headers.get("authorization") or ""
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        return hmac.compare_digest(given.encode(), config.token.encode())

    def refusal(scope_type: str, path: str, headers) -> tuple[str, int] | None:
        """Why an HTTP request or WebSocket is refused before it reaches its endpoint: origin, then token."""
        origin = headers.get("origin")
        if not config.origin_allowed(origin, headers.get("host")):
            return f"origin {origin} is not allowed here (dh-serve --allow-origin)", 403
        if scope_type == "http" and not token_ok(headers):  # WS: token or ticket, checked by the endpoint
            return f"missing or wrong token ({TOKEN_HINT})", 401
        return None

    class Gate:
        """ASGI middleware: the origin and token checks of every HTTP request but the page and /healthz (a
        finished video's URL holds an unguessable id: a link that works without the token)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            path = scope.get("path", "")
            if scope["type"] == "http" and path not in OPEN_PATHS and not path.startswith("/v1/videos/"):
                why = refusal("http", path, Headers(scope=scope))
                if why is not None:
                    return await error_response(*why)(scope, receive, send)
            return await self.app(scope, receive, send)

    # two uploads + form fields + multipart framing
    app.add_middleware(BodyLimit, limit=2 * config.max_upload_bytes + (64 << 10))
    app.add_middleware(Gate)
    origins = config.allow_origins or ()
    if origins:  # outermost: answers the preflight of an allowed origin before the token check
        app.add_middleware(JSONCors, allow_origins=list(origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.exception_handler(ClientError)
    @app.exception_handler(LimitError)
    @app.exception_handler(RequestError)
    async def client_error(_request, e):
        return error_response(str(e), _status(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e):
        return error_response(str(e.detail), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, e):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(f"{where}: {first.get('msg', 'invalid request')}", 400)

    @app.exception_handler(Exception)
    async def failure(_request, e):
        log.error("request failed: %s", _one_line(e), exc_info=e)
        return error_response(f"server error: {_one_line(e)}", 500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (importlib.resources.files("dheads.serve") / "static" / "index.html").read_text()

    @app.get("/healthz")
    async def healthz():
        if worker.stopping:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not worker.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        info, default = worker.head.info, worker.head.default_sampler
        return {"status": "ok", "pid": os.getpid(), "image_size": info.model.image_size, "fps": info.audio.fps,
                "sampler": default.name, "steps": default.steps, "sampling": default.to_dict()}

    @app.get("/metrics")
    async def metrics():
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/ticket")
    async def ticket():
        if worker.draining:
            raise ShuttingDown()
        return {"ticket": tickets.issue(), "expires_in": config.ticket_ttl_s}

    async def read_upload(part: UploadFile | None, kind: str) -> tuple[bytes, str | None]:
        if part is None or not hasattr(part, "read"):
            raise RequestError(f"missing the '{kind}' file part")
        return await part.read(config.max_upload_bytes + 1), part.filename

    @app.post("/v1/render")
    async def render(request: Request, face: UploadFile | None = File(None), audio: UploadFile | None = File(None),
                     steps: str | None = Form(None), sampler: str | None = Form(None), seed: str | None = Form(None),
                     spacing: str | None = Form(None), frame_noise: str | None = Form(None)):
        with worker.request():
            opts = stream_options(worker.head, config, steps=steps, sampler=sampler, seed=seed, spacing=spacing,
                                  frame_noise=frame_noise)
            parts = await read_upload(face, "face"), await read_upload(audio, "audio")
            job = asyncio.create_task(render_bytes(worker, *parts, opts))
            gone = asyncio.create_task(_disconnect(request))
            try:
                done, _ = await asyncio.wait({job, gone}, timeout=config.max_stream_seconds,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not job.done():
                    job.cancel()
                    with contextlib.suppress(BaseException):
                        await job
            if job not in done:
                if gone in done:
                    log.info("render cancelled: its client disconnected")
                    return error_response("client disconnected", 499)
                raise ClientError(f"render took over {config.max_stream_seconds:g} s, this server's limit", 503)
            data, frames = job.result()
        return Response(data, media_type="video/mp4", headers={"X-Frames": str(frames)})

    @app.post("/v1/jobs", status_code=202)
    async def submit_job(face: UploadFile | None = File(None), audio: UploadFile | None = File(None),
                         steps: str | None = Form(None), sampler: str | None = Form(None),
                         seed: str | None = Form(None), spacing: str | None = Form(None),
                         frame_noise: str | None = Form(None)):
        with contextlib.ExitStack() as held, contextlib.ExitStack() as queue_place:
            held.enter_context(worker.request())  # 503 now, not in a poll, when the server is busy
            queue_place.enter_context(worker.preparing())
            opts = stream_options(worker.head, config, steps=steps, sampler=sampler, seed=seed, spacing=spacing,
                                  frame_noise=frame_noise)
            parts = await read_upload(face, "face"), await read_upload(audio, "audio")
            job = jobs.submit(*parts, opts, held.pop_all(), queue_place.pop_all())  # the job releases them
        return JSONResponse({**job.view(), "poll": f"/v1/jobs/{job.id}"}, status_code=202)

    @app.get("/v1/jobs/{job_id}")
    async def poll_job(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            return error_response("no such job (finished jobs are kept for a while only)", 404)
        return job.view()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            return error_response("no such job (finished jobs are kept for a while only)", 404)
        jobs.cancel(job)
        return job.view()

    @app.get("/v1/videos/{vid}")
    async def video(vid: str):
        path = worker.video_path(vid)
        if path is None:
            return error_response("no such video (finished videos are kept for a while only)", 404)
        return FileResponse(path, media_type="video/mp4", filename="dheads.mp4")

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        await ws.accept()
        why = refusal("websocket", "/v1/stream", ws.headers)
        if why is None and not (token_ok(ws.headers) or tickets.take(ws.query_params.get("ticket"))):
            why = (f"missing or wrong token ({TOKEN_HINT}, or ?ticket= from POST /v1/ticket)", 401)
        if why is not None:
            await ws.send_json({"type": "error", "error": why[0]})
            return await ws.close(code=1008)
        try:
            with worker.request():
                async with asyncio.timeout(config.max_stream_seconds):
                    await _stream(ws, worker)
        except WebSocketDisconnect:
            pass
        except TimeoutError:
            await _send_error(ws, f"stream took over {config.max_stream_seconds:g} s, this server's limit", 1008)
        except (ClientError, LimitError, RequestError) as e:
            await _send_error(ws, e, _close_code(e))
        except Exception as e:  # an engine failure: tell the client in one line
            log.exception("stream failed")
            await _send_error(ws, f"server error: {_one_line(e)}", 1011)

    return app


async def _disconnect(request: Request) -> None:
    """Returns when the client of an HTTP request (whose body was read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(ws: WebSocket, worker: EngineWorker) -> None:
    """One WebSocket stream, start message to ``done`` (protocol: README "Serving")."""
    config, session, feeder = worker.config, None, None
    wait = config.start_timeout_s
    with UploadDir() as d:
        try:
            with worker.preparing():
                start = await _receive_json(ws, "start", wait)
                check_fields("start", start, START_FIELDS)
                opts = stream_options(worker.head, config, **{k: start.get(k) for k in SAMPLING_FIELDS})
                fmt = as_str("format", start.get("format"), FORMATS) or "jpeg"
                mode = as_str("audio", start.get("audio"), ("file", "pcm")) or "file"
                keep = as_bool("mp4", start.get("mp4"))
                names = {k: as_str(k, start.get(k)) for k in ("face_name", "audio_name")}
                rate = as_int("sample_rate", start.get("sample_rate"), 8000, 192000) or SAMPLE_RATE
                fu = d.save("face", await _receive_bytes(ws, "face", wait), names["face_name"],
                            max_bytes=config.max_upload_bytes)
                identity = await worker.run_prep(worker.load_identity, fu)
                if mode == "file":
                    au = d.save("audio", await _receive_bytes(ws, "audio", wait), names["audio_name"],
                                max_bytes=config.max_upload_bytes)
                    samples, emb = await worker.run_prep(worker.load_speech, au)
                    session = Session(worker, worker.new_stream(identity, opts, emb, True), samples, keep_frames=keep)
                    feeder = asyncio.create_task(_watch(ws, session))
                else:
                    session = Session(worker, worker.new_stream(identity, opts, None, False),
                                      np.zeros(0, np.float32), keep_frames=keep)
                    feeder = asyncio.create_task(_feed_pcm(ws, worker, session, rate))
                size = worker.head.info.model.image_size
                await ws.send_json({"type": "ready", "fps": worker.head.info.audio.fps, "size": size,
                                    "sample_rate": SAMPLE_RATE, "frames": session.stream.n_frames, "format": fmt,
                                    "sampler": opts.sampler.name, "steps": opts.sampler.steps,
                                    "sampling": opts.sampler.to_dict()})
                session.on_queued = lambda p: ws.send_json({"type": "queued", "position": p})
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
        finally:
            if session is not None:
                session.cancel()
            if feeder is not None:
                feeder.cancel()


async def _send_error(ws: WebSocket, e: BaseException | str, code: int) -> None:
    with contextlib.suppress(Exception):
        await ws.send_json({"type": "error", "error": _one_line(e)})
        await ws.close(code=code)


async def _receive(ws: WebSocket, timeout: float | None = None, what: str = "message") -> dict:
    """The client's next message; RequestError when none comes within ``timeout`` seconds."""
    try:
        msg = await asyncio.wait_for(ws.receive(), timeout)
    except TimeoutError:
        raise RequestError(f"no {what} within {timeout:g} s; closing") from None
    if msg["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(msg.get("code", 1000))
    return msg


async def _receive_json(ws: WebSocket, kind: str, timeout: float | None = None) -> dict:
    msg = await _receive(ws, timeout, f'{{"type": "{kind}"}} message')
    data = parse_json(msg.get("text"))
    if not isinstance(data, dict) or data.get("type") != kind:
        raise RequestError(f"expected a JSON text message {{\"type\": \"{kind}\", ...}}")
    return data


async def _receive_bytes(ws: WebSocket, kind: str, timeout: float | None = None) -> bytes:
    msg = await _receive(ws, timeout, f"{kind} file")
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
    """PCM mode: 16-bit mono chunks at ``rate`` until ``{"type": "end"}`` (each within ``idle_timeout_s`` of
    the last); the embeddings of the speech so far are recomputed every ``PCM_ENCODE_EVERY`` new samples and
    once at the end."""
    chunks: list[np.ndarray] = []
    encoded = 0
    try:
        while True:
            msg = await _receive(ws, worker.config.idle_timeout_s, "audio")
            final = False
            if msg.get("bytes") is not None:
                chunks.append(pcm16_to_float(msg["bytes"]))
            else:
                data = parse_json(msg.get("text"))
                final = isinstance(data, dict) and data.get("type") == "end"
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
