"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FPS_WINDOW_S = 10.0


class Metrics:
    """``dh_*`` metrics; ``frames_per_second`` is the frame rate over the last ``FPS_WINDOW_S`` seconds."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.streams_active = Gauge("dh_streams_active", "streams in the batch now", registry=r)
        self.queue_depth = Gauge("dh_queue_depth", "streams preparing or waiting for a batch slot", registry=r)
        self.preparing = Gauge("dh_streams_preparing", "of those, streams still uploading or being prepared",
                               registry=r)
        self.streams = Counter("dh_streams", "streams started, by how they ended", ["result"], registry=r)
        self.prep_crashes = Counter("dh_prep_crashes", "preparation worker processes that died on a request or "
                                    "were killed past --prep-timeout (each replaced by a fresh one)", registry=r)
        self.frames = Counter("dh_frames", "frames made, all streams", registry=r)
        self.unet_calls = Counter("dh_unet_calls", "batched denoiser calls", registry=r)
        self.fps = Gauge("dh_frames_per_second", f"frames made per second over the last {FPS_WINDOW_S:g} s",
                         registry=r)
        self.fps.set_function(self._fps)
        self.first_frame = Histogram("dh_first_frame_latency_seconds", "stream admitted -> its first frame made",
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32), registry=r)
        self.batch = Histogram("dh_batch_streams", "streams per batched frame step",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self._times: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def frames_made(self, n: int, calls: int) -> None:
        self.frames.inc(n)
        self.unet_calls.inc(calls)
        self.batch.observe(n)
        with self._lock:
            self._times.append((time.monotonic(), n))

    def _fps(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._times and self._times[0][0] < now - FPS_WINDOW_S:
                self._times.popleft()
            return sum(n for _, n in self._times) / FPS_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
