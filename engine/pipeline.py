"""One call from a face and a speech file to a talking-head video: the library behind ``dh-run``.

``TalkingHead.open(engine)`` picks the backend from the artifact; ``.render(face, audio, out)`` writes
an mp4 atomically; ``.stream(face, audio)`` yields uint8 frames as they are made.
"""

from __future__ import annotations

import importlib.resources
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import AudioError, check_silence, load_audio
from .backends.base import BackendError, Denoiser
from .config import SamplerConfig
from .generate import FrameLoop, LoopConfig, generate_frames
from .image import load_face, to_uint8_frames
from .noise import NoiseFn
from .video import MP4Writer

log = logging.getLogger(__name__)


def default_engine_path() -> Path:
    """The small demo model shipped inside the package (used when no engine is given)."""
    return Path(str(importlib.resources.files("dheads.engine") / "assets" / "demo"))


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


@dataclass(frozen=True)
class RunStats:
    """What a run did and how fast: per-frame latency is wall time between consecutive frames."""

    frames: int
    seconds_of_video: float
    total_s: float
    first_frame_s: float
    frame_latencies_s: list[float] = field(default_factory=list)

    @property
    def median_frame_s(self) -> float:
        return statistics.median(self.frame_latencies_s) if self.frame_latencies_s else float("nan")

    @property
    def fps(self) -> float:
        return self.frames / self.total_s if self.total_s > 0 else float("nan")

    @property
    def real_time_factor(self) -> float:
        """Compute time over video time: below 1 is faster than real time."""
        return self.total_s / self.seconds_of_video if self.seconds_of_video else float("nan")


@dataclass(frozen=True)
class Inputs:
    """Prepared conditioning: identity [1,3,S,S] in [-1,1], 16 kHz samples, embeddings [N, D]."""

    identity: torch.Tensor
    samples: np.ndarray
    audio_emb: torch.Tensor

    @property
    def n_frames(self) -> int:
        return int(self.audio_emb.shape[0])


class TalkingHead:
    """A loaded engine (denoiser + the configs it carries) and the audio encoder it expects."""

    def __init__(self, denoiser: Denoiser, info, encoder):
        self.denoiser, self.info, self.encoder = denoiser, info, encoder
        self._loop: FrameLoop | None = None

    @classmethod
    def open(cls, engine: str | Path | None = None, *, backend: str | None = None, device: str = "auto",
             precision: str = "fp32", audio_encoder: str | Path | None = None) -> TalkingHead:
        """Load ``engine`` (plan, bundle dir, ONNX, or checkpoint; None = the bundled demo model)."""
        from .backends import open_denoiser
        from .encoders import load_encoder

        path = Path(engine) if engine is not None else default_engine_path()
        denoiser, info = open_denoiser(path, backend=backend, device=str(pick_device(device)), precision=precision)
        encoder = load_encoder(info.audio, audio_encoder)
        if encoder.dim != info.model.audio_dim:
            raise BackendError(f"{path}: model expects {info.model.audio_dim}-d audio features but the "
                               f"{info.audio.encoder} encoder gives {encoder.dim}-d; this engine was built for "
                               f"another audio encoder")
        return cls(denoiser, info, encoder)

    def prepare(self, face: str | Path, audio: str | Path, *, crop: str = "auto", frame: int = 0,
                max_seconds: float | None = None, allow_silence: bool = False) -> Inputs:
        """Load and crop the face, load + resample the speech, and encode it to per-frame embeddings.

        Silent audio (of what is used, after ``max_seconds``) is an AudioError unless ``allow_silence``.
        """
        size = self.info.model.image_size
        identity = load_face(face, frame=frame, crop=crop, size=size)
        samples, rate = load_audio(audio, silence="ignore")
        if max_seconds is not None:
            samples = samples[: int(max_seconds * rate)]
            if samples.size < rate // 25:
                raise AudioError(f"{audio}: --max-seconds {max_seconds} leaves less than one video frame of audio")
        check_silence(audio, samples, "warn" if allow_silence else "error")
        emb = self.encoder(samples)
        return Inputs(identity=identity, samples=samples, audio_emb=emb)

    def frames(self, inputs: Inputs, *, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
               noise: torch.Tensor | NoiseFn | None = None, cuda_graph: bool = True) -> Iterator[np.ndarray]:
        """Yield uint8 frames [S, S, 3] in order as they are generated (streaming)."""
        cfg = LoopConfig(sampler=sampler, batch=1, cuda_graph=cuda_graph)
        if self._loop is None or self._loop.config != cfg:
            self._loop = FrameLoop(self.denoiser, cfg)  # reused across calls: the CUDA graph is kept
        dev = self.denoiser.device
        for x in generate_frames(self.denoiser, inputs.identity.to(dev), inputs.audio_emb, config=cfg,
                                 seed=seed, noise=noise, loop=self._loop):
            yield to_uint8_frames(x)[0]

    def render(self, face: str | Path, audio: str | Path, out: str | Path, *, sampler: SamplerConfig = SamplerConfig(),
               seed: int = 0, crop: str = "auto", frame: int = 0, max_seconds: float | None = None,
               allow_silence: bool = False, noise: torch.Tensor | NoiseFn | None = None, cuda_graph: bool = True,
               on_frame=None) -> RunStats:
        """Write ``out`` (H.264 + AAC, 25 fps). Nothing exists at ``out`` unless the whole run succeeded."""
        inputs = self.prepare(face, audio, crop=crop, frame=frame, max_seconds=max_seconds,
                              allow_silence=allow_silence)
        fps = self.info.audio.fps
        lat: list[float] = []
        t0 = last = time.perf_counter()
        with MP4Writer(out, fps=fps, audio=inputs.samples, sample_rate=self.info.audio.sample_rate) as writer:
            for i, img in enumerate(self.frames(inputs, sampler=sampler, seed=seed, noise=noise,
                                                cuda_graph=cuda_graph)):
                writer.write(img)
                now = time.perf_counter()
                lat.append(now - last)
                last = now
                if on_frame is not None:
                    on_frame(i + 1, inputs.n_frames)
        total = time.perf_counter() - t0
        return RunStats(frames=len(lat), seconds_of_video=len(lat) / fps, total_s=total,
                        first_frame_s=lat[0] if lat else float("nan"), frame_latencies_s=lat[1:] or lat)
