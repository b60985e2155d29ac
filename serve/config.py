"""The server's frozen configuration: what ``dh-serve`` flags become, and the limits a client meets."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """``engine`` None: the bundled demo model. ``token`` None: no authentication.

    ``max_streams``: streams batched together at once (more wait in the queue, ``dh_queue_depth``);
    ``max_queue``: streams allowed to be preparing or waiting before new ones get 503; ``max_connections``:
    renders and streams open at once (503 / close 1013 past it); ``max_pending_frames``: frames made for
    a stream but not yet taken by its client before the stream sits out frames (backpressure).

    ``allow_origins``: browser origins allowed besides the server's own (``"*"``: any). None: any origin when
    there is no token, none but the server's own when there is one. ``start_timeout_s``: the longest wait for
    each message of a stream's start (start, face, audio file); ``idle_timeout_s``: the longest gap between
    PCM chunks; ``max_stream_seconds``: the longest a render or stream may take, start to end.
    ``video_dir``: where finished videos are kept (the last ``keep_videos``); None: a private temp folder.
    Replicas that share one (a shared filesystem) serve each other's ``/v1/videos/{id}`` links.
    ``prep_timeout_s``: the longest one request's preparation (face or audio) may take in the preparation
    worker process before it is killed and replaced (the request gets a 500).
    ``drain_s``: after SIGTERM, how long /healthz answers 503 while open streams finish (then they are ended
    with a JSON 503 / close 1012).
    """

    engine: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_streams: int = 8
    max_queue: int = 32
    max_connections: int = 64
    token: str | None = None
    allow_origins: tuple[str, ...] | None = None
    threads: int | None = None
    max_upload_bytes: int = 20 * MIB
    max_audio_seconds: float = 60.0
    max_steps: int = 100
    max_pending_frames: int = 8
    keep_videos: int = 16
    video_dir: str | None = None
    start_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    max_stream_seconds: float = 600.0
    drain_s: float = 5.0
    ticket_ttl_s: float = 30.0
    prep_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"--max-streams must be at least 1, got {self.max_streams}")
        if self.max_queue < 1 or self.max_connections < 1:
            raise ValueError("--max-queue and --max-connections must be at least 1")
        if self.max_audio_seconds <= 0 or self.max_upload_bytes <= 0:
            raise ValueError("upload limits must be positive")
        if min(self.start_timeout_s, self.idle_timeout_s, self.max_stream_seconds, self.prep_timeout_s) <= 0 \
                or self.drain_s < 0:
            raise ValueError("timeouts must be positive (--drain-seconds may be 0)")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """May a browser page from ``origin`` call this server (reached as ``host``)? No Origin: not a browser."""
        if origin is None or (host and origin in (f"http://{host}", f"https://{host}")):
            return True
        allowed = self.allow_origins if self.allow_origins is not None else (() if self.token else ("*",))
        return "*" in allowed or origin in allowed
