"""The server's frozen configuration: what ``dh-serve`` flags become, and the limits a client meets."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """``engine`` None: the bundled demo model. ``token`` None: no authentication.

    ``max_streams``: streams batched together at once (more wait in the queue, ``dh_queue_depth``);
    ``max_queue``: streams allowed to wait before new ones get 503; ``max_pending_frames``: frames made for
    a stream but not yet taken by its client before the stream sits out frames (backpressure).
    """

    engine: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_streams: int = 8
    max_queue: int = 32
    token: str | None = None
    threads: int | None = None
    max_upload_bytes: int = 20 * MIB
    max_audio_seconds: float = 60.0
    max_steps: int = 100
    max_pending_frames: int = 8
    keep_videos: int = 16

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"--max-streams must be at least 1, got {self.max_streams}")
        if self.max_audio_seconds <= 0 or self.max_upload_bytes <= 0:
            raise ValueError("upload limits must be positive")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
