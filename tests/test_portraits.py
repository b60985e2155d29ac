"""The portrait check's measures on frames with known answers (no model)."""

from __future__ import annotations

import math

import numpy as np

from dheads.benchmarks.portraits import identity_ssim_upper, mask_seam

BOX = (0.34, 0.58, 0.66, 0.92)


def _face(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((64, 64, 3)) * 200 + 20).astype(np.uint8)


def test_a_box_painted_over_the_mask_region_shows_as_a_seam():
    ident = _face()
    frames = np.repeat(ident[None], 5, 0).astype(np.int16)
    assert mask_seam(frames, ident, BOX) == 0.0  # the photo itself: no seam
    y0, y1, x0, x1 = int(0.58 * 64), int(0.92 * 64), int(0.34 * 64), int(0.66 * 64)
    frames[:, y0:y1, x0:x1] += 30  # the box's inside changed by 30 levels, nothing around it
    assert math.isclose(mask_seam(np.clip(frames, 0, 255).astype(np.uint8), ident, BOX), 30.0, abs_tol=1.5)
    side = np.repeat(ident[None], 5, 0).astype(np.int16)
    side[:, y0:y1, x1 - 4:x1] -= 20  # only a band at the right edge: a step there
    assert math.isclose(mask_seam(np.clip(side, 0, 255).astype(np.uint8), ident, BOX), 20.0, abs_tol=1.5)
    everywhere = np.clip(ident.astype(np.int16) + 30, 0, 255).astype(np.uint8)[None]
    assert abs(mask_seam(everywhere, ident, BOX)) < 1.5  # a change that crosses the edge is no seam
    low = (0.34, 0.58, 0.66, 1.0)  # a box down to the frame's border: no lower edge on the output
    tall = np.repeat(ident[None], 5, 0).astype(np.int16)
    tall[:, y0:, x0:x1] += 30
    assert math.isclose(mask_seam(np.clip(tall, 0, 255).astype(np.uint8), ident, low), 30.0, abs_tol=1.5)
    tall[:, y0:, x0:x1] -= 30
    tall[:, 56:, x0 + 4:x1 - 4] += 30  # the box's bottom middle changed: no left/right step, no lower edge to measure
    assert mask_seam(np.clip(tall, 0, 255).astype(np.uint8), ident, low) == 0.0
    assert math.isnan(mask_seam(frames.astype(np.uint8), ident, (0.0, 0.5, 1.0, 1.0)))  # no edge with room outside


def test_identity_ssim_of_the_upper_half_ignores_the_mouth():
    ident = _face()
    frames = np.repeat(ident[None], 3, 0)
    assert math.isclose(identity_ssim_upper(frames, ident), 1.0, abs_tol=1e-9)
    talking = frames.copy()
    talking[:, 40:] = _face(1)[40:]  # a new lower half only
    assert math.isclose(identity_ssim_upper(talking, ident), 1.0, abs_tol=1e-9)
    assert identity_ssim_upper(np.repeat(_face(2)[None], 3, 0), ident) < 0.2  # another face
