"""One call from a face and a speech file to a talking-head video: the library behind ``dh-run``.

``TalkingHead.open(engine)`` picks the backend from the artifact; ``.render(RenderRequest(face, audio, out))``
writes an mp4 atomically; ``.frames(.prepare(face, audio))`` yields uint8 frames as they are made.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.resources
import logging
import statistics
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import AudioFile, AudioScan, check_max_seconds, num_frames
from .backends.base import BackendError, Denoiser
from .config import RuntimeConfig, SamplerConfig
from .encoders import StreamedRows
from .generate import FrameLoop, LoopConfig, generate_frames
from .image import load_face, to_uint8_frames
from .noise import NoiseFn
from .plan import default_sampler
from .video import MP4Writer, check_output

log = logging.getLogger(__name__)
MAX_LOOPS = 4


def default_engine_path() -> Path:
    """The small demo model shipped inside the package (used when no engine is given)."""
    return Path(str(importlib.resources.files("dheads.engine") / "assets" / "demo"))


@dataclass(frozen=True)
class RunStats:
    """What a run did and how fast: per-frame latency is wall time between consecutive frames."""

    frames: int
    seconds_of_video: float
    total_s: float
    first_frame_s: float
    frame_latencies_s: list[float] = field(default_factory=list)
    prepare_s: float = float("nan")  # face crop + audio load + encoding, before the first frame
    first_frame_at: float = float("nan")  # time.perf_counter() when the first frame was written
    prepare_stages: dict[str, float] = field(default_factory=dict)  # seconds: face, audio load, audio encode

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
    """Prepared conditioning: identity [1,3,S,S] in [-1,1], 16 kHz samples, embeddings [N, D].

    ``samples`` is None where the speech was streamed (longer than the encoder takes whole: 30 s for Whisper);
    ``speech`` then reads it again from its file, and :meth:`soundtrack` gives the samples either way.
    ``audio_emb`` is then, where ``prepare(stream=True)`` asked, a :class:`~dheads.engine.encoders.StreamedRows`
    (``n_frames`` known, the rows encoded while the frames are made; ``.whole()`` gives them all).
    """

    identity: torch.Tensor
    samples: np.ndarray | None
    audio_emb: torch.Tensor | StreamedRows
    stages: dict[str, float] = field(default_factory=dict, compare=False)  # seconds per preparation stage
    speech: AudioFile | None = field(default=None, compare=False)

    @property
    def n_frames(self) -> int:
        return int(self.audio_emb.shape[0])

    def soundtrack(self) -> np.ndarray | Iterator[np.ndarray]:
        """The 16 kHz samples: the array, or blocks read again from the file where they were streamed."""
        return self.samples if self.samples is not None else self.speech.blocks()


@dataclass(frozen=True)
class RenderRequest:
    """One video to render: the face, the speech, where its mp4 goes, and how it is made. The one value a
    front end builds (dh-run from its flags) for ``TalkingHead.render`` / ``render_batch``.

    ``sampler`` None: the engine's recorded sampling (``TalkingHead.default_sampler``; build another with
    ``SamplerConfig.override``). ``seed``: of all the video's noise; the same request on the same device gives the
    same video, alone or in a batch. ``crop``: ``auto`` (find the face) or ``none``; ``frame``: which frame of
    a face video; ``max_seconds``: use only the first seconds of the speech; ``allow_silence``: accept silent
    speech. Where the engine runs (device, backend, threads, CUDA graphs) is the head's ``RuntimeConfig``.
    """

    face: str | Path
    audio: str | Path
    out: str | Path
    sampler: SamplerConfig | None = None
    seed: int = 0
    crop: str = "auto"
    frame: int = 0
    max_seconds: float | None = None
    allow_silence: bool = False


def _sum_stages(stages) -> dict[str, float]:
    total: dict[str, float] = {}
    for d in stages:
        for k, v in d.items():
            total[k] = total.get(k, 0.0) + v
    return total


class TalkingHead:
    """A loaded engine (denoiser + the configs it carries) and the audio encoder it expects."""

    def __init__(self, denoiser: Denoiser, info, encoder, runtime: RuntimeConfig | None = None):
        self.denoiser, self.info, self.encoder = denoiser, info, encoder
        self.runtime = runtime or RuntimeConfig()
        self._loops: dict[LoopConfig, FrameLoop] = {}  # idle loops, least recently used first
        self._lock = threading.Lock()
        self._landmarker = None  # the face crop's MediaPipe graph, made by the first prepare and kept
        self._face_lock = threading.Lock()
        self.encode_ahead = 0  # batches of streamed speech encoded ahead of the frames (open() decides: _encode_ahead)

    @classmethod
    def open(cls, engine: str | Path | None = None, runtime: RuntimeConfig | None = None,
             **overrides) -> TalkingHead:
        """Load ``engine`` (plan, bundle dir, ONNX, or checkpoint; None = the bundled demo model) to run as
        ``runtime`` says; keyword ``overrides`` replace its fields (``TalkingHead.open(e, device="cpu")``).

        A bundle that holds an exported audio encoder (``audio_encoder.onnx``) runs on it unless
        ``runtime.audio_encoder`` names another file; otherwise the encoder comes from ``load_encoder``.
        ``runtime.threads`` (None = auto, see :mod:`dheads.engine.threads`) go to the engine that runs the
        UNet and to the Whisper encoder; this sets torch's thread count for the process: ``threads`` when
        torch runs the UNet on the CPU, else 1 (torch then only does the sampler's arithmetic, and a woken
        pool costs more than that arithmetic).
        """
        from . import threads as thread_policy
        from .backends import TORCH_BACKENDS, open_denoiser, pick_device
        from .encoders import load_encoder

        rt = dataclasses.replace(runtime or RuntimeConfig(), **overrides)
        path = Path(engine) if engine is not None else default_engine_path()
        dev = "auto" if rt.device == "auto" else str(pick_device(rt.device))  # auto: the engine's backend decides
        policy = thread_policy.runtime_policy(rt.threads, unet_on_torch=True)
        denoiser, info = open_denoiser(path, backend=rt.backend, device=dev, precision=rt.precision,
                                       intra_op_threads=policy.onnxruntime)
        encoder = None
        if rt.audio_encoder is None and info.manifest is not None:  # a bundle runs on the encoder it carries
            from .encoders.sda_onnx import bundled_encoder

            encoder = bundled_encoder(info.manifest, path if path.is_dir() else path.parent)
        audio = info.audio
        if audio.encoder == "whisper" and "threads" not in audio.options:
            audio = dataclasses.replace(audio, options={**audio.options, "threads": policy.onnxruntime})
        encoder = encoder or load_encoder(audio, rt.audio_encoder)
        # After the encoder: CTranslate2 sets the process's OpenMP thread count when it loads a model.
        on_torch = info.backend in TORCH_BACKENDS and denoiser.device.type == "cpu"
        thread_policy.apply(dataclasses.replace(policy, torch=policy.onnxruntime if on_torch else 1))
        if encoder.dim != info.model.audio_dim:
            raise BackendError(f"{path}: model expects {info.model.audio_dim}-d audio features but the "
                               f"{info.audio.encoder} encoder gives {encoder.dim}-d; this engine was built for "
                               f"another audio encoder")
        head = cls(denoiser, info, encoder, rt)
        head.encode_ahead = _encode_ahead(rt.threads, policy.onnxruntime, denoiser.device)
        return head

    def prepare(self, face: str | Path, audio: str | Path, *, crop: str = "auto", frame: int = 0,
                max_seconds: float | None = None, allow_silence: bool = False, stream: bool = False) -> Inputs:
        """Load and crop the face, load + resample the speech, and encode it to per-frame embeddings.

        ``stream``: speech the encoder streams (longer than one Whisper window) is checked and its length known,
        but not encoded here: ``audio_emb`` is a ``StreamedRows`` the frame loop encodes batch by batch as its
        frames need it (the first frame waits for the first batch of windows, not all of them; rows behind the
        frames are let go). Its frames are those of ``stream=False``, which encodes all the rows here.

        The speech is loaded and encoded on a thread while the face is cropped (both wait on native code that
        releases the GIL); the face's errors come first, as before. The face landmarker is made once per head
        and reused (the same crop as a fresh one; ~0.5 s the first time in a process, ~10 ms after).
        ``stages`` holds each stage's own seconds (face, audio load, audio encode: the audio ones overlap the
        face). Silent audio (of what is used, after ``max_seconds``) is an AudioError unless ``allow_silence``.
        """
        check_max_seconds(max_seconds)
        size = self.info.model.image_size
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dh-audio")
        try:
            speech = pool.submit(self._speech, audio, max_seconds, allow_silence, stream)
            t0 = time.perf_counter()
            identity = self._face(face, frame=frame, crop=crop, size=size)
            face_s = time.perf_counter() - t0
            samples, emb, audio_stages, source = speech.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a face error does not wait for the encoder
        return Inputs(identity=identity, samples=samples, audio_emb=emb, stages={"face": face_s, **audio_stages},
                      speech=None if samples is not None else source)

    def _face(self, face: str | Path, *, frame: int, crop: str, size: int) -> torch.Tensor:
        """``load_face`` with this head's landmarker (one graph per head, one crop at a time)."""
        if crop != "auto":
            return load_face(face, frame=frame, crop=crop, size=size)
        with self._face_lock:
            if self._landmarker is None:
                from .face import FaceLandmarker

                self._landmarker = FaceLandmarker(max_faces=2)
                weakref.finalize(self, self._landmarker.close)
            return load_face(face, frame=frame, crop=crop, size=size, landmarker=self._landmarker)

    def _speech(self, audio: str | Path, max_seconds: float | None, allow_silence: bool, stream: bool = False
                ) -> tuple[np.ndarray | None, torch.Tensor | StreamedRows, dict[str, float], AudioFile]:
        """Load + resample the speech (``max_seconds`` of it) and encode it: (samples or None where streamed,
        [N, D] embeddings, stages, the speech's file).

        One pass checks the file and, for an encoder that streams (``first_pass``/``encode_batches``), takes what
        its first pass needs; speech longer than the encoder takes whole (``max_whole_samples``) is not kept but
        read again for the second pass (and the mp4's soundtrack), so memory does not grow with its length.
        ``audio_load`` is that first pass, ``audio_encode`` the encoding (0 where ``stream`` leaves it to the frames).
        """
        t1 = time.perf_counter()
        # --max-seconds decodes only that much (+ the resampler's look-ahead, so the kept samples are the same)
        source = AudioFile(Path(audio), max_seconds)
        streams = callable(getattr(self.encoder, "encode_batches", None))
        scan = AudioScan(source, keep=self.encoder.max_whole_samples if streams else None)
        first = self.encoder.first_pass(scan) if streams else None
        samples = scan.result("warn" if allow_silence else "error")
        t2 = time.perf_counter()
        if samples is not None:
            emb = self.encoder(samples)
        else:
            rows = StreamedRows(num_frames(first.n_samples, self.encoder.config.samples_per_frame), self.encoder.dim,
                                lambda: self.encoder.encode_batches(source.blocks(), first))
            emb = rows if stream else rows.whole()
        return samples, emb, {"audio_load": t2 - t1, "audio_encode": time.perf_counter() - t2}, source

    def frames(self, inputs: Inputs, *, sampler: SamplerConfig | None = None, seed: int = 0,
               noise: torch.Tensor | NoiseFn | None = None) -> Iterator[np.ndarray]:
        """Yield uint8 frames [S, S, 3] in order as they are generated (streaming). ``sampler`` None: the
        engine's recorded sampler and steps (``default_sampler``)."""
        with contextlib.closing(self.frames_batch([inputs], sampler=sampler, seeds=[seed], noise=noise)) as frames:
            for imgs in frames:
                yield imgs[0]

    @property
    def default_sampler(self) -> SamplerConfig:
        """The sampler and steps the engine records (its ``DiffusionConfig``); every call's default."""
        return default_sampler(self.info.diffusion)

    @contextlib.contextmanager
    def _checkout(self, cfg: LoopConfig) -> Iterator[FrameLoop]:
        """A FrameLoop for ``cfg`` that no other stream holds, for the life of one stream.

        Loops (their buffers and CUDA graph) are reused across calls, but a loop is taken out of the cache
        while a stream runs: two generators interleaved on one head each get their own
        state and give the frames each would give alone. Returned after use; the ``MAX_LOOPS`` most
        recently used are kept.
        """
        with self._lock:
            loop = self._loops.pop(cfg, None)
        loop = loop or FrameLoop(self.denoiser, cfg)
        try:
            yield loop
        finally:
            with self._lock:
                self._loops.setdefault(cfg, loop)  # most recently used last
                while len(self._loops) > MAX_LOOPS:
                    del self._loops[next(iter(self._loops))]

    def frames_batch(self, inputs: Sequence[Inputs], *, sampler: SamplerConfig | None = None,
                     seeds: Sequence[int] | None = None, noise: torch.Tensor | NoiseFn | None = None
                     ) -> Iterator[np.ndarray]:
        """Several videos as one batch of streams: yield uint8 ``[B, S, S, 3]`` per frame index.

        Stream b's noise is seeded with ``seeds[b]`` (default 0 each), as a batch of one would be, unless
        ``noise`` is given. Streams shorter than the longest repeat their last audio window: keep the
        first ``inputs[b].n_frames`` frames of stream b. CUDA graphs: as the head's ``runtime.cuda_graph``.
        """
        cfg = LoopConfig(sampler=sampler or self.default_sampler, batch=len(inputs),
                         cuda_graph=self.runtime.cuda_graph, diffusion=self.info.diffusion)
        seeds = list(seeds) if seeds is not None else [0] * len(inputs)  # one per stream: each as alone
        identity = torch.cat([x.identity for x in inputs]).to(self.denoiser.device)
        with self._checkout(cfg) as loop, contextlib.closing(
                generate_frames(self.denoiser, identity, [x.audio_emb for x in inputs], config=cfg, seed=seeds,
                                noise=noise, loop=loop, encode_ahead=self.encode_ahead)) as frames:
            for x in frames:
                yield to_uint8_frames(x)

    def render_batch(self, requests: Sequence[RenderRequest], *, noise: torch.Tensor | NoiseFn | None = None,
                     on_frame=None) -> RunStats:
        """Write every request's mp4 from one batched loop (one UNet call per step for all of them); each video
        comes out as ``render`` makes it alone. The requests must share one sampler (None: the engine's).

        Each mp4 is atomic: a failed run leaves none of them behind. Stats count batch steps (frames of
        the longest video); ``on_frame(done, total)`` is called per batch step. ``noise`` as in
        ``frames_batch`` (it replaces the seeds).
        """
        outs = [Path(r.out).resolve() for r in requests]
        if not requests or len(set(outs)) != len(outs):
            raise ValueError("render_batch needs at least one request and a different output path for each")
        samplers = {r.sampler or self.default_sampler for r in requests}
        if len(samplers) > 1:
            raise ValueError(f"render_batch runs one sampler for all its videos, got {len(samplers)} different ones")
        for r in requests:
            check_output(r.out, inputs=(r.face, r.audio))
        t_prep = time.perf_counter()
        inputs = [self.prepare(r.face, r.audio, crop=r.crop, frame=r.frame, max_seconds=r.max_seconds,
                               allow_silence=r.allow_silence, stream=True) for r in requests]
        prepare_s = time.perf_counter() - t_prep
        fps, total = self.info.audio.fps, max(x.n_frames for x in inputs)
        lat: list[float] = []
        t0 = last = time.perf_counter()
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(MP4Writer(r.out, fps=fps, audio=x.soundtrack(),
                                                     sample_rate=self.info.audio.sample_rate))
                       for r, x in zip(requests, inputs)]
            frames = stack.enter_context(contextlib.closing(self.frames_batch(
                inputs, sampler=samplers.pop(), seeds=[r.seed for r in requests], noise=noise)))
            for i, imgs in enumerate(frames):
                for b, (w, x) in enumerate(zip(writers, inputs)):
                    if i < x.n_frames:
                        w.write(imgs[b])
                now = time.perf_counter()
                lat.append(now - last)
                last = now
                if on_frame is not None:
                    on_frame(i + 1, total)
        return RunStats(frames=len(lat), seconds_of_video=len(lat) / fps, total_s=time.perf_counter() - t0,
                        first_frame_s=lat[0] if lat else float("nan"), frame_latencies_s=lat[1:] or lat,
                        prepare_s=prepare_s, first_frame_at=t0 + lat[0] if lat else float("nan"),
                        prepare_stages=_sum_stages(x.stages for x in inputs))

    def render(self, request: RenderRequest, *, noise: torch.Tensor | NoiseFn | None = None,
               on_frame=None) -> RunStats:
        """Write ``request.out`` (H.264 + AAC, 25 fps): ``render_batch`` of this one video. Nothing exists at
        ``out`` unless the whole run succeeded."""
        return self.render_batch([request], noise=noise, on_frame=on_frame)


def _encode_ahead(threads: int | None, unet_threads: int, device: torch.device) -> int:
    """Batches of streamed speech the encoder may run ahead of the frames (``_RowFeed``), by the thread policy:
    2 when the UNet runs off the CPU; on the CPU 1 where the cores hold both engines' threads (the encoder has as
    many as the UNet's engine), else 0: auto threads (``threads`` None) are all the free cores, and an encoder
    overlapping the UNet would oversubscribe them, so it encodes while the frame loop waits for it."""
    from . import threads as thread_policy

    if device.type != "cpu":
        return 2
    return 1 if threads and thread_policy.usable_cores() >= 2 * unet_threads else 0
