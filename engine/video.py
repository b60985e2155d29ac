"""Video I/O with PyAV: probe and read frames (any container ffmpeg knows), write H.264 + AAC mp4.

Frames cross this module as ``np.ndarray`` uint8 ``[H, W, 3]`` RGB, C-contiguous (PyAV's
``to_ndarray`` keeps the decoder's line padding; MediaPipe silently finds no face on such
strided arrays, so every frame is made contiguous here).

Writing streams: ``MP4Writer.write`` checks a frame and hands a copy to the writer's encoder thread through a
queue of ``QUEUE_FRAMES`` frames, so the caller's frame loop waits for the encoder only when it is that many
frames behind; the thread encodes and muxes each frame in order and interleaves the audio track frame by frame,
so memory does not grow with the video's length (``threaded=False`` encodes in ``write`` itself; the file is the
same byte for byte). An error on the encoder thread is raised by the next ``write`` or by ``close``. The audio is a whole
array or an iterable of chunks (read as it is needed); either way it reaches the AAC encoder in frames of
at most ``AUDIO_CHUNK`` samples, the rest of a track longer than the video too. The file is
written to a hidden temporary name in the target directory and renamed over the target with
``os.replace`` only when everything succeeded; on any exception (``KeyboardInterrupt`` included)
the temporary file is removed and the target is left as it was.

libx264 runs without its AVX-512 code (:func:`x264_asm`): on a CPU with AVX-512, x264 core 165 (PyAV 18's) encoded the
same frames to different bytes depending on what the heap held before (issue #31).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from .atomic import file_mode

log = logging.getLogger(__name__)

# libx264 quality: crf 18 is "visually lossless" for natural video; 128x128 encodes in ~1 ms a frame.
DEFAULT_CRF = 18
DEFAULT_PRESET = "fast"
AUDIO_BIT_RATE = 64_000  # mono speech; AAC-LC at 16 kHz
AUDIO_CHUNK = 1 << 14  # samples at most in one audio frame handed to the encoder
QUEUE_FRAMES = 4  # frames waiting for MP4Writer's encoder thread at most (64x64 RGB: 12 KB each)
_STOP = object()  # tells the encoder thread that no more frames come
X264_CPU_AVX512 = 1 << 16  # x264.h's X264_CPU_AVX512 (1U<<16); non-x86 CPUs use low bits only
# x264 builds (X264_BUILD, the number in x264_encoder_open_NNN) where that flag is asked for: from 152 (mid-2017,
# about when x264's AVX-512 code came; older builds are left alone) to a bound that only keeps the search finite
X264_FIRST_AVX512_BUILD, X264_LAST_BUILD = 152, 400


# Issue #31: with libx264's AVX-512 code (PyAV 18.1's x264 core 165, AMD EPYC with AVX-512, 64x64 frames), the same
# frames encoded to different bytes whenever the heap held something else before: with glibc's MALLOC_PERTURB_ at 1,
# 77 and 200 the demo's frames gave three different mp4s, and 4 encodes in one process differed too (OpenVINO only
# changed what the heap held; without it dh-serve's tests happened to meet the same bytes). With asm=0 (no SIMD) or
# every instruction set up to AVX2 they gave one mp4 (at 64x64 the same as asm=0's). Its AVX-512 code reads memory
# nothing wrote, apparently in the macroblock-tree lookahead: mbtree=0, rc-lookahead=0 or bframes=0 each hid it too.
# Without AVX-512 x264 was as fast here (4-8 ms a 256x256 frame either way, 2 cores under load).
@functools.cache
def x264_asm() -> int | None:
    """x264's own CPU detection less AVX-512, for its ``asm`` option; None where nothing needs to change (no AVX-512
    here, an x264 before any AVX-512 code) or where this process's libx264 cannot be asked (one linked into
    libavcodec; then x264 keeps AVX-512 and a warning says so)."""
    lib = _libx264()
    if lib is None:
        log.warning("libx264 not found as its own library: its AVX-512 code stays on (encodes may differ, issue #31)")
        return None
    build = next((b for b in range(X264_FIRST_AVX512_BUILD, X264_LAST_BUILD)
                  if hasattr(lib, f"x264_encoder_open_{b}")), None)
    if build is None:
        return None
    lib.x264_cpu_detect.restype = ctypes.c_uint32
    cpu = lib.x264_cpu_detect()
    if not cpu & X264_CPU_AVX512:
        return None
    log.debug("libx264 (build %d) without AVX-512: asm=%#x instead of %#x", build, cpu & ~X264_CPU_AVX512, cpu)
    return cpu & ~X264_CPU_AVX512


def _libx264() -> ctypes.CDLL | None:
    """The libx264 PyAV's libavcodec loaded (Linux: from the process's map; else the wheel's bundled copy), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if "/libx264" in line]
    except OSError:
        here = Path(av.__file__).parent
        paths = [p for d in (here / ".dylibs", here.parent / "av.libs") for p in glob.glob(str(d / "libx264*"))]
    for path in dict.fromkeys(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "x264_cpu_detect"):
            return lib
    return None


class VideoError(ValueError):
    """A video that cannot be read or written; the message is one line naming the file."""


class NoVideoStream(VideoError):
    """The file opens as a container but holds no video stream (an audio file, say)."""


# The hidden temporary name MP4Writer writes first: "." + name + "." + 8 random characters + ".part".
PART_NAME_EXTRA = len(".") + len(".") + 8 + len(".part")


def check_output(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path the writer could not use, or one that would overwrite an input (VideoError).

    Checked before any work: the path is not a directory nor one of ``inputs``, its nearest existing
    ancestor is a directory (not a file), and its name leaves room for the temporary ``.part`` name.
    """
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise VideoError(f"output {path}: {parent} is a file, not a directory")
    limit = _name_max(parent)
    if len(os.fsencode(path.name)) + PART_NAME_EXTRA > limit:
        raise VideoError(f"output file name is too long ({len(os.fsencode(path.name))} bytes; at most "
                         f"{limit - PART_NAME_EXTRA} here, room is needed for the temporary .part name)")
    if path.is_dir():
        raise VideoError(f"output {path} is a directory; give a file name such as {path / 'out.mp4'}")
    for src in inputs:
        same = path.exists() and Path(src).exists() and os.path.samefile(src, path)
        if same or path.resolve() == Path(src).resolve():
            raise VideoError(f"output {path} is the input {src}; writing it would destroy the input, "
                             "choose another output path")
    return path


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` reads from a container.

    ``n_frames`` comes from the header where the container stores it (mp4) and otherwise from
    counting video packets (MPEG-PS ``.mpg`` has no count); ``duration`` is the container's
    duration in seconds (all streams) where known, else ``n_frames / fps``.
    """

    fps: float
    n_frames: int
    width: int
    height: int
    has_audio: bool
    duration: float


def _open_input(path: str | os.PathLike) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(f"cannot read video {path}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    """A short one-line reason: FFmpeg's own text (``strerror``) without errno and file name."""
    text = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike) -> av.VideoStream:
    if not container.streams.video:
        raise NoVideoStream(f"no video stream in {path}")
    return container.streams.video[0]


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    """Count the video packets that carry data (one per frame for the codecs we meet)."""
    return sum(1 for p in container.demux(stream) if p.size > 0)


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's frame rate, frame count, size, audio presence and duration (no decoding)."""
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise VideoError(f"unknown frame rate in {path}")
        fps = float(rate)
        has_audio = bool(container.streams.audio)
        n_frames = stream.frames or _count_packets(container, stream)
        duration = container.duration / av.time_base if container.duration else n_frames / fps
        return VideoInfo(fps, n_frames, stream.width, stream.height, has_audio, float(duration))


def read_frames(path: str | os.PathLike, *, max_frames: int | None = None,
                check_size: Callable[[int, int], None] | None = None) -> Iterator[np.ndarray]:
    """Decode a video's frames in order: yields ``np.ndarray`` uint8 ``[H, W, 3]`` RGB, contiguous.

    Stops after ``max_frames`` frames where given. Raises ``VideoError`` (one line) for a missing
    or undecodable file. ``check_size(width, height)``, where given, sees the stream's header size before
    any frame is decoded (and may raise).
    """
    if max_frames is not None and max_frames <= 0:
        return
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        if check_size is not None:
            check_size(stream.codec_context.width, stream.codec_context.height)
        stream.thread_type = "AUTO"
        n = 0
        try:
            for frame in container.decode(stream):
                yield np.ascontiguousarray(frame.to_ndarray(format="rgb24"))
                n += 1
                if max_frames is not None and n >= max_frames:
                    return
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode video {path}: {_reason(e)}") from None


def read_frame(path: str | os.PathLike, index: int = 0,
               check_size: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Decode frame ``index`` (0-based) of a video: uint8 ``[H, W, 3]`` RGB (``check_size``: as ``read_frames``).

    Raises ``VideoError`` when the video has no frame ``index``.
    """
    if index < 0:
        raise VideoError(f"frame index must be >= 0, got {index} for {path}")
    last, n = None, 0
    for n, last in enumerate(read_frames(path, max_frames=index + 1, check_size=check_size), start=1):
        pass
    if last is None or n <= index:
        raise VideoError(f"frame {index} is beyond the end of {path} ({n} frames)")
    return last


def _as_mono_float(audio: np.ndarray) -> np.ndarray:
    """Audio as float32 ``[S]`` in [-1, 1]; accepts ``[S]`` or ``[S, 1]`` float or int16."""
    audio = np.asarray(audio)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise VideoError(f"audio must be mono [samples], got shape {tuple(audio.shape)}")
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    return np.clip(audio.astype(np.float32, copy=False), -1.0, 1.0)


class MP4Writer:
    """Stream RGB frames (and one mono audio track) into an H.264 + AAC mp4, atomically.

    Use as a context manager::

        with MP4Writer("out.mp4", fps=25, audio=wave, sample_rate=16000) as w:
            for frame in frames:          # np.ndarray uint8 [H, W, 3]
                w.write(frame)

    The frame size is taken from the first frame (H.264 yuv420p needs even sides). The audio
    track keeps its own length: it is not cut or padded to the video's. ``audio``: mono samples
    ``[S]`` (float in [-1, 1] or int16), or an iterable of such chunks, pulled as the video needs them
    (a long track need never be in memory whole). ``threaded``: encode on a thread of the writer's own, fed by a
    queue of ``QUEUE_FRAMES`` frames (``write`` returns once the frame is checked and queued); False: in ``write``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fps: float = 25,
        audio: np.ndarray | Iterable[np.ndarray] | None = None,
        sample_rate: int = 16000,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        threaded: bool = True,
    ) -> None:
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.sample_rate = int(sample_rate)
        self.crf, self.preset = crf, preset
        self.n_frames = 0  # frames accepted by write
        self._encoded = 0  # frames handed to the video encoder (the encoder thread's count)
        self.has_audio = audio is not None
        if isinstance(audio, np.ndarray) and audio.ndim == 2 and 1 in audio.shape:
            audio = audio.reshape(-1)
        if isinstance(audio, np.ndarray):
            if audio.ndim != 1:
                raise VideoError(f"audio must be mono [samples], got shape {tuple(audio.shape)}")
            whole = audio
            audio = (whole[i : i + AUDIO_CHUNK] for i in range(0, len(whole), AUDIO_CHUNK))  # views, no copy
        self._audio_src: Iterator[np.ndarray] | None = None if audio is None else iter(audio)
        self._pending = np.zeros(0, np.float32)  # pulled from the source, not yet encoded
        self._audio_pos = 0  # samples encoded
        self._shape: tuple[int, ...] | None = None
        self._container = None
        self._vstream = self._astream = None
        self._tmp: Path | None = None
        self._closed = False
        self._threaded = threaded
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None  # what stopped the encoder thread
        self._abandon = False  # abort: the encoder thread drops what is left

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> MP4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self, height: int, width: int) -> None:
        """Create the temporary file and the streams, once the first frame gives the size."""
        if height % 2 or width % 2:
            raise VideoError(f"H.264 yuv420p needs even frame sides, got {width}x{height} for {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        self._tmp = Path(tmp)  # at once: abort() removes it whatever stops the lines below (a stop signal too)
        try:
            os.chmod(tmp, file_mode())  # an ordinary file once renamed, not mkstemp's 0600
        finally:
            os.close(fd)
        self._container = av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"})
        options = {"crf": str(self.crf), "preset": self.preset}
        if (asm := x264_asm()) is not None:
            options["x264-params"] = f"asm={asm}"
        v = self._container.add_stream("libx264", rate=self.fps, options=options)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.codec_context.time_base = 1 / self.fps
        self._vstream = v
        if self.has_audio:
            a = self._container.add_stream("aac", rate=self.sample_rate, layout="mono")
            a.bit_rate = AUDIO_BIT_RATE
            self._astream = a
        log.debug("writing %s via %s (%dx%d @ %s fps)", self.path, self._tmp, width, height, self.fps)

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame: uint8 ``[H, W, 3]`` RGB, all frames the same size."""
        if self._closed:
            raise VideoError(f"writer for {self.path} is already closed")
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise VideoError(f"frames must be uint8 [H, W, 3], got {frame.dtype} {tuple(frame.shape)}")
        if self._shape is None:
            self._open(frame.shape[0], frame.shape[1])
            self._shape = frame.shape
            if self._threaded:
                self._start_worker()
        elif frame.shape != self._shape:
            raise VideoError(f"frame {self.n_frames} has shape {tuple(frame.shape)}, expected {self._shape}")
        if self._worker is None:
            self._encode_frame(frame)
        else:
            self._put(np.array(frame, dtype=np.uint8, order="C", copy=True))  # the caller may reuse its buffer
        self.n_frames += 1

    def _encode_frame(self, frame: np.ndarray) -> None:
        """Encode and mux one checked frame, then the audio up to its end (on the encoder thread where threaded)."""
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self._encoded
        self._mux(self._vstream.encode(vf))
        self._encoded += 1
        self._write_audio_until(round(self._encoded * self.sample_rate / self.fps))

    # -- the encoder thread --------------------------------------------------------------------
    def _start_worker(self) -> None:
        self._queue = queue.Queue(maxsize=QUEUE_FRAMES)
        worker = threading.Thread(target=self._run, name=f"mp4-{self.path.name}", daemon=True)
        try:
            worker.start()
        except BaseException:
            # start() launches the thread, then waits for it to run; a stop signal's exception (cli_errors) can come
            # out of that wait (on a busy machine the new thread may not run for milliseconds; CI met it). Such a
            # thread runs later all the same, and join() refuses it until then ("cannot join thread before it is
            # started", which replaced the interrupt: exit 1 and the .part left). So it is not kept for abort() to
            # join: it is left a _STOP (the queue is new, empty) to end on as soon as it runs, if it ever does.
            self._queue.put_nowait(_STOP)
            raise
        self._worker = worker

    def _run(self) -> None:
        """The encoder thread: encode queued frames in order until ``_STOP``; the first error ends it."""
        try:
            while (item := self._queue.get()) is not _STOP:
                try:
                    if not self._abandon:
                        self._encode_frame(item)
                finally:
                    self._queue.task_done()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by _raise_worker_error
            self._error = e

    def drain(self) -> None:
        """Wait until every frame written so far is encoded and muxed (at once where not threaded); raises the
        encoder thread's error."""
        while self._worker is not None and self._worker.is_alive() and self._queue.unfinished_tasks:
            with self._queue.all_tasks_done:
                self._queue.all_tasks_done.wait(timeout=0.1)
        self._raise_worker_error()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, item) -> None:
        """Queue ``item`` for the encoder thread, waiting while the queue is full; raises the thread's error."""
        while True:
            self._raise_worker_error()
            if not self._worker.is_alive():
                return  # it ended without an error only after _STOP: nothing more to hand it
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _join_worker(self, *, abandon: bool) -> None:
        """Stop the encoder thread: after the queued frames (``abandon`` False), or dropping them (True)."""
        if self._worker is None:
            return
        if abandon:
            self._abandon = True
            with self._queue.mutex:
                self._queue.queue.clear()
                self._queue.not_full.notify_all()
        while self._worker.is_alive():  # one that ended on an error takes no _STOP; close() raises its error
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._worker.join()
        self._worker = None

    def _write_audio_until(self, end: int | None) -> None:
        """Encode audio samples ``[_audio_pos, end)`` (to the end of the track where ``end`` is None), in
        frames of at most ``AUDIO_CHUNK`` samples, pulling chunks from the source as needed."""
        if self._astream is None:
            return
        while end is None or self._audio_pos < end:
            want = AUDIO_CHUNK if end is None else min(AUDIO_CHUNK, end - self._audio_pos)
            while self._pending.size < want and self._audio_src is not None:
                chunk = next(self._audio_src, None)
                if chunk is None:
                    self._audio_src = None
                else:
                    self._pending = np.concatenate([self._pending, _as_mono_float(chunk)])
            if self._pending.size == 0:
                return
            chunk, self._pending = self._pending[:want], self._pending[want:]
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk)[None, :], format="flt", layout="mono")
            af.sample_rate, af.pts = self.sample_rate, self._audio_pos
            af.time_base = Fraction(1, self.sample_rate)
            self._mux(self._astream.encode(af))
            self._audio_pos += chunk.size

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoders, finish the file and move it onto ``path``."""
        if self._closed:
            return
        if self._container is None:
            self._closed = True
            raise VideoError(f"no frames were written to {self.path}")
        try:
            self._join_worker(abandon=False)
            self._raise_worker_error()
            self._write_audio_until(None)
            self._mux(self._vstream.encode(None))
            if self._astream is not None:
                self._mux(self._astream.encode(None))
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
            self._tmp = None
            self._closed = True
        except BaseException:
            self.abort()
            raise
        log.info("wrote %s: %d frames @ %s fps%s", self.path, self.n_frames, self.fps,
                 "" if not self.has_audio else f", {self._audio_pos / self.sample_rate:.2f} s audio")

    def abort(self) -> None:
        """Drop the partial file; the target path is left untouched. Safe to call twice."""
        self._join_worker(abandon=True)  # its error, if any, was the caller's to raise: the file goes either way
        if self._container is not None:
            try:
                self._container.close()
            except Exception as e:  # a half-written container may refuse its trailer
                log.debug("ignored while aborting %s: %s", self._tmp, e)
            self._container = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self._closed = True


def write_mp4(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float = 25,
    audio: np.ndarray | Iterable[np.ndarray] | None = None,
    sample_rate: int = 16000,
    **kwargs,
) -> int:
    """Write frames (uint8 ``[H, W, 3]`` RGB, any iterable incl. a generator) + mono audio (an array or an
    iterable of chunks, see ``MP4Writer``) to mp4.

    H.264 (libx264, yuv420p, crf 18) and AAC; ``kwargs`` go to ``MP4Writer`` (``crf``,
    ``preset``). Atomic: on any exception no file is left at ``path``. Returns the frame count.
    """
    with MP4Writer(path, fps=fps, audio=audio, sample_rate=sample_rate, **kwargs) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.n_frames
