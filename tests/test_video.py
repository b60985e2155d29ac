"""engine/video.py: mp4 round trip (H.264 + AAC), atomic writes, reading the GRID clips."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from dheads.engine.video import MP4Writer, VideoError, probe, read_frame, read_frames, write_mp4

SR = 16000
AAC_FRAME_S = 1024 / SR  # one AAC frame: 64 ms at 16 kHz


def smooth_frames(n: int, size: int = 128):
    """A generator of smooth, slowly moving RGB gradients: uint8 [size, size, 3]."""
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        yield np.stack([np.clip(xx + i, 0, 255), yy + 60, np.full_like(xx, 100 + i % 3)], -1).astype(np.uint8)


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return (0.5 * np.sin(2 * np.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t))).astype(np.float32)


def decode_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_mp4_round_trip(tmp_path):
    out = tmp_path / "clip.mp4"
    audio = tone(2.03)  # not a whole number of video frames: the audio keeps its own length
    assert write_mp4(out, smooth_frames(50), fps=25, audio=audio, sample_rate=SR) == 50
    assert leftovers(tmp_path) == ["clip.mp4"]

    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, v.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (v.width, v.height, v.average_rate, v.frames) == (128, 128, 25, 50)
        assert (a.codec_context.name, a.rate, a.channels) == ("aac", SR, 1)
        assert abs(float(a.duration * a.time_base) - len(audio) / SR) <= AAC_FRAME_S
        assert v.start_time == 0 and a.start_time == 0  # both tracks start together

    info = probe(out)
    assert (info.fps, info.n_frames, info.width, info.height, info.has_audio) == (25.0, 50, 128, 128, True)

    # Decoded audio: the priming delay is trimmed (lag 0 measured), the tail is padded by < 1 AAC frame.
    decoded = decode_audio(out)
    assert 0 <= len(decoded) - len(audio) <= 1024
    assert np.corrcoef(decoded[: len(audio)], audio)[0, 1] > 0.99  # measured 0.99998

    # Lossy H.264 at crf 18 on a smooth image: mean abs error < 3 (measured 1.3).
    got = list(read_frames(out))
    assert len(got) == 50 and got[0].shape == (128, 128, 3) and got[0].flags["C_CONTIGUOUS"]
    mae = np.mean([np.abs(g.astype(np.int16) - r).mean() for g, r in zip(got, smooth_frames(50))])
    assert mae < 3.0


def test_video_only(tmp_path):
    out = tmp_path / "silent.mp4"
    write_mp4(out, list(smooth_frames(5)))
    info = probe(out)
    assert (info.n_frames, info.has_audio) == (5, False)
    assert len(list(read_frames(out, max_frames=3))) == 3


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_nothing(tmp_path, exc):
    def frames():
        yield from smooth_frames(30)
        raise exc("boom")

    with pytest.raises(exc, match="boom"):
        write_mp4(tmp_path / "out.mp4", frames(), audio=tone(2.0))
    assert leftovers(tmp_path) == []


def test_failed_write_keeps_previous_file(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    with pytest.raises(VideoError, match="expected"):
        write_mp4(out, [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)])
    assert leftovers(tmp_path) == ["out.mp4"] and out.read_bytes() == b"old"


def test_writer_streams_to_disk(tmp_path):
    """Packets reach the temporary file while frames arrive (nothing is held until close)."""
    rng = np.random.default_rng(0)
    with MP4Writer(tmp_path / "s.mp4") as w:
        for _ in range(60):
            w.write(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
        w.drain()  # the encoder thread has caught up with the frames written
        (part,) = tmp_path.glob(".s.mp4.*.part")
        assert part.stat().st_size > 100_000  # noise compresses poorly: ~60 frames of it on disk
        assert not (tmp_path / "s.mp4").exists()
    assert leftovers(tmp_path) == ["s.mp4"]


def test_writer_errors(tmp_path):
    with pytest.raises(VideoError, match=r"^H.264 yuv420p needs even frame sides, got 127x128 for "):
        write_mp4(tmp_path / "odd.mp4", [np.zeros((128, 127, 3), np.uint8)])
    with pytest.raises(VideoError, match=r"^no frames were written to "):
        write_mp4(tmp_path / "empty.mp4", iter(()))
    with pytest.raises(VideoError, match=r"^frames must be uint8 \[H, W, 3\]"):
        write_mp4(tmp_path / "f.mp4", [np.zeros((128, 128, 3), np.float32)])
    assert leftovers(tmp_path) == []


def test_grid_clip(shared_data):
    # Checked with PyAV: every GRID clip decodes to 75 frames of 360x288 at 25 fps (header: 2.98 s).
    path = shared_data / "grid" / "bbaf2n.mpg"
    info = probe(path)
    assert (info.fps, info.n_frames, info.width, info.height, info.has_audio) == (25.0, 75, 360, 288, True)
    assert info.duration == pytest.approx(2.98, abs=0.05)
    frames = list(read_frames(path))
    assert len(frames) == 75
    assert all(f.shape == (288, 360, 3) and f.dtype == np.uint8 for f in frames)
    assert np.array_equal(read_frame(path, 74), frames[74])


def test_read_errors(tmp_path, shared_data):
    path = shared_data / "grid" / "bbaf2n.mpg"
    with pytest.raises(VideoError) as e:
        read_frame(path, 75)
    assert str(e.value) == f"frame 75 is beyond the end of {path} (75 frames)"
    with pytest.raises(VideoError) as e:
        probe(tmp_path / "missing.mp4")
    assert str(e.value) == f"no such file: {tmp_path / 'missing.mp4'}"
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoError, match=rf"^cannot read video {junk}: "):
        probe(junk)
