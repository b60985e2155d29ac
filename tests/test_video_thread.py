"""MP4Writer's encoder thread: the same file as encoding in ``write``, a frame loop that does not wait for the
encoder, the thread's errors raised in the caller's thread, and no half-written file after any failure."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from dheads.engine import video
from dheads.engine.video import QUEUE_FRAMES, MP4Writer, VideoError, write_mp4

SR = 16000


def frames(n: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [np.roll(base, i, axis=1) for i in range(n)]


def speech_like(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_threaded_file_is_byte_identical_to_encoding_in_write(tmp_path):
    fs, audio = frames(40), speech_like(1.7)  # the audio outlasts the video: the rest is muxed at close
    write_mp4(tmp_path / "sync.mp4", fs, audio=audio, threaded=False)
    write_mp4(tmp_path / "thread.mp4", fs, audio=audio)
    assert (tmp_path / "sync.mp4").read_bytes() == (tmp_path / "thread.mp4").read_bytes()


def test_write_returns_while_the_encoder_is_busy(tmp_path, monkeypatch):
    """With the encoder stuck on frame 0, QUEUE_FRAMES more writes still return: the loop never waits for it
    unless it is QUEUE_FRAMES frames behind. The caller may reuse its buffer at once (write queues a copy)."""
    release, started = threading.Event(), threading.Event()
    encode = MP4Writer._encode_frame

    def slow(self, frame):
        started.set()
        assert release.wait(30)
        encode(self, frame)

    monkeypatch.setattr(MP4Writer, "_encode_frame", slow)
    fs = frames(QUEUE_FRAMES + 1)
    buf = np.empty_like(fs[0])
    with MP4Writer(tmp_path / "a.mp4") as w:
        for f in fs:
            buf[...] = f
            w.write(buf)  # returns: the frame is queued, not encoded
            buf[...] = 0  # ... and the queued copy is not this buffer
        assert started.is_set() and w.n_frames == QUEUE_FRAMES + 1
        release.set()
    monkeypatch.setattr(MP4Writer, "_encode_frame", encode)
    write_mp4(tmp_path / "b.mp4", fs, threaded=False)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


@pytest.mark.parametrize("at", [0, 7])
def test_an_encoder_thread_error_is_raised_and_leaves_nothing(tmp_path, monkeypatch, at):
    encode = MP4Writer._encode_frame

    def failing(self, frame):
        if self._encoded == at:
            raise VideoError("encoder broke")
        encode(self, frame)

    monkeypatch.setattr(MP4Writer, "_encode_frame", failing)
    (tmp_path / "out.mp4").write_bytes(b"old")
    with pytest.raises(VideoError, match="^encoder broke$"):
        write_mp4(tmp_path / "out.mp4", frames(30), audio=speech_like(1.2))
    assert leftovers(tmp_path) == ["out.mp4"] and (tmp_path / "out.mp4").read_bytes() == b"old"
    assert not [t for t in threading.enumerate() if t.name.startswith("mp4-out.mp4")]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_failing_frame_loop_stops_the_thread_and_leaves_nothing(tmp_path, monkeypatch, exc):
    """The loop fails while the encoder is still behind: queued frames are dropped, the thread ends, no file."""
    release = threading.Event()
    encode = MP4Writer._encode_frame
    monkeypatch.setattr(MP4Writer, "_encode_frame", lambda self, f: (release.wait(0.2), encode(self, f)))

    def loop():
        yield from frames(QUEUE_FRAMES + 3)
        raise exc("boom")

    with pytest.raises(exc, match="boom"):
        write_mp4(tmp_path / "out.mp4", loop(), audio=speech_like(1.0))
    assert leftovers(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("mp4-out.mp4")]


def test_bad_frames_are_refused_in_write_itself(tmp_path):
    """Checks stay in the caller's thread: the message comes from the write that got the frame."""
    with MP4Writer(tmp_path / "c.mp4") as w:
        w.write(frames(1)[0])
        with pytest.raises(VideoError, match=r"^frame 1 has shape \(32, 32, 3\), expected \(64, 64, 3\)$"):
            w.write(np.zeros((32, 32, 3), np.uint8))
        w.abort()
    assert leftovers(tmp_path) == []


def test_the_queue_is_small():
    assert 1 <= video.QUEUE_FRAMES <= 8  # memory and latency: a few 64x64 frames, never the video
