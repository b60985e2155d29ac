"""Renders from uploads: ``POST /v1/render`` (the mp4 in the response) and render jobs, which hold no connection
open (``POST /v1/jobs`` submits, ``GET /v1/jobs/{id}`` polls, the mp4 comes from ``/v1/videos/{id}``), so no
response has to outlive a load balancer's idle timeout. Both make their frames with :func:`render_frames`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

import numpy as np
from starlette.concurrency import run_in_threadpool

from .uploads import LimitError, RequestError, UploadDir
from .worker import ClientError, EngineWorker, Session, StreamOptions

log = logging.getLogger(__name__)
Part = tuple[bytes, "str | None"]  # an upload's bytes and the client's file name
KEEP_JOBS = 256  # finished jobs remembered for polling


async def render_frames(worker: EngineWorker, d: UploadDir, face: Part, audio: Part, opts: StreamOptions, *,
                        job: Job | None = None, queue_place=None) -> tuple[list[np.ndarray], np.ndarray]:
    """Uploads -> (every frame, 16 kHz samples): prepare (counted in the queue: ``queue_place``, else a place
    taken here), join the batch, make the frames; ``job`` follows the progress. Cancelling it cancels the stream."""
    config, session = worker.config, None
    try:
        with queue_place or worker.preparing():
            fu = d.save("face", *face, max_bytes=config.max_upload_bytes)
            au = d.save("audio", *audio, max_bytes=config.max_upload_bytes)
            identity = await worker.run_prep(worker.load_identity, fu)
            samples, emb = await worker.run_prep(worker.load_speech, au)
            session = Session(worker, worker.new_stream(identity, opts, emb, True), samples, keep_frames=True)
            if job is not None:
                job.session, job.total = session, session.stream.n_frames
            worker.submit(session)
        while await session.next() is not None:
            if job is not None:
                job.frames, job.status = job.frames + 1, "running"
    finally:
        if session is not None:
            session.cancel()
    return session.kept, samples


async def render_bytes(worker: EngineWorker, face: Part, audio: Part, opts: StreamOptions) -> tuple[bytes, int]:
    """``POST /v1/render``: uploads -> the mp4's bytes and its frame count; nothing is left on disk."""
    with UploadDir() as d:
        frames, samples = await render_frames(worker, d, face, audio, opts)
        out = await run_in_threadpool(worker.write_video, d.path / "out.mp4", frames, samples)
        return out.read_bytes(), len(frames)


@dataclass
class Job:
    """A render job: ``status`` queued -> running -> done | failed | cancelled."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"
    frames: int = 0
    total: int | None = None
    error: str | None = None
    code: int | None = None  # the HTTP status a synchronous render would have answered with
    session: Session | None = None
    task: asyncio.Task | None = None

    def view(self) -> dict:
        out = {"id": self.id, "status": self.status, "frames": self.frames, "total": self.total}
        if self.status == "queued" and self.session is not None and self.session.position:
            out["position"] = self.session.position
        if self.status == "done":
            out["video"] = f"/v1/videos/{self.id}"
        if self.error is not None:
            out.update(error=self.error, code=self.code)
        return out


class Jobs:
    """The jobs of one server (polling goes to the replica that took the job; its video to any replica that
    shares ``--video-dir``)."""

    def __init__(self, worker: EngineWorker):
        self.worker = worker
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def submit(self, face: Part, audio: Part, opts: StreamOptions, held: contextlib.ExitStack,
               queue_place: contextlib.ExitStack) -> Job:
        """Start a job; ``held`` (its connection slot) and ``queue_place`` were taken by the request, so a busy
        server refused it with 503 there and then."""
        job = Job()
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, face, audio, opts, held, queue_place))
        finished = [k for k, j in self._jobs.items() if j.task is not None and j.task.done()]
        for k in finished[: max(0, len(finished) - KEEP_JOBS)]:
            del self._jobs[k]
        return job

    async def _run(self, job: Job, face: Part, audio: Part, opts: StreamOptions, held, queue_place) -> None:
        w = self.worker
        with held:
            try:
                async with asyncio.timeout(w.config.max_stream_seconds):
                    with UploadDir() as d:
                        frames, samples = await render_frames(w, d, face, audio, opts, job=job,
                                                              queue_place=queue_place)
                    path = await run_in_threadpool(w.write_video, w.video_dir / f"{job.id}.mp4", frames, samples)
                w.store_video(job.id, path)
                job.status = "done"
            except asyncio.CancelledError:
                job.status = "cancelled"
                raise
            except TimeoutError:
                self._fail(job, f"render took over {w.config.max_stream_seconds:g} s, this server's limit", 503)
            except (ClientError, LimitError, RequestError) as e:
                self._fail(job, e, 413 if isinstance(e, LimitError) else getattr(e, "status", 400))
            except Exception as e:  # an engine failure: the job says so in one line
                log.exception("render job %s failed", job.id)
                self._fail(job, f"server error: {e}", 500)

    @staticmethod
    def _fail(job: Job, error, code: int) -> None:
        job.status, job.error, job.code = "failed", " ".join(str(error).split()), code

    def cancel(self, job: Job) -> None:
        if job.task is not None and not job.task.done():
            job.task.cancel()
            job.status = "cancelled"

    def cancel_all(self) -> None:
        for job in self._jobs.values():
            self.cancel(job)
