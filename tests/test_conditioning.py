"""Audio windows and the motion-frame ring follow the authors' rules."""

from __future__ import annotations

import torch

from dheads.engine.conditioning import MotionRing, audio_window_indices, audio_windows, motion_transform


def test_audio_window_indices_first_middle_last():
    idx = audio_window_indices(10, 2)
    assert idx.shape == (10, 5)
    assert idx[0].tolist() == [0, 0, 0, 1, 2]
    assert idx[1].tolist() == [0, 0, 1, 2, 3]
    assert idx[5].tolist() == [3, 4, 5, 6, 7]
    assert idx[9].tolist() == [7, 8, 9, 9, 9]
    assert audio_window_indices(1, 2).tolist() == [[0, 0, 0, 0, 0]]


def test_audio_windows_gather_rows():
    emb = torch.arange(6, dtype=torch.float32)[:, None].expand(6, 3)
    w = audio_windows(emb, 2)
    assert w.shape == (6, 5, 3)
    assert w[0, :, 0].tolist() == [0, 0, 0, 1, 2]
    assert w[5, :, 1].tolist() == [3, 4, 5, 5, 5]


def test_motion_ring_starts_with_identity_and_shifts():
    ident = torch.full((1, 3, 4, 4), 0.5)
    ring = MotionRing(1, 2, 3, 4)
    ring.reset(ident)
    assert torch.equal(ring.buffer[0, 0], ident[0]) and torch.equal(ring.buffer[0, 1], ident[0])
    f1, f2 = torch.full_like(ident, 0.1), torch.full_like(ident, 0.2)
    ring.push(f1)
    assert torch.equal(ring.buffer[0, 0], ident[0]) and torch.equal(ring.buffer[0, 1], f1[0])
    ring.push(f2)
    assert torch.equal(ring.buffer[0, 0], f1[0]) and torch.equal(ring.buffer[0, 1], f2[0])
    assert ring.flat.shape == (1, 6, 4, 4)
    assert torch.equal(ring.flat[:, 3:], f2)  # newest last


def test_grayscale_motion_is_luma():
    frame = torch.zeros(1, 3, 2, 2)
    frame[:, 0] = 1.0
    assert motion_transform(frame, True).shape == (1, 1, 2, 2)
    assert torch.allclose(motion_transform(frame, True), torch.full((1, 1, 2, 2), 0.2989))
    ring = MotionRing(1, 2, 1, 2, grayscale=True)
    ring.reset(frame)
    assert torch.allclose(ring.flat, torch.full((1, 2, 2, 2), 0.2989))


def test_audio_window_rows_for_chosen_frames_equal_the_full_table():
    full = audio_window_indices(10, 2)
    assert torch.equal(audio_window_indices(10, 2, frames=torch.tensor([9, 0, 4])), full[[9, 0, 4]])
