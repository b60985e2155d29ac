"""Training augmentation: mirrored samples and corrupted motion frames (training/augment.py)."""

from __future__ import annotations

import pytest
import torch

from dheads.training.augment import (SHADE_GRID, LEVEL, augment, recolor_sample, corrupt_motion, gaussian_blur,
                                     hflip_sample, ramp, reframe_sample)
from dheads.training.config import DataConfig
from dheads.training.losses import box_mask


def _batch(b: int = 6, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
            "identity": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
            "motion": torch.rand(b, 6, size, size, generator=g) * 2 - 1,
            "audio": torch.randn(b, 5, 4, generator=g),
            "lip_box": torch.tensor([[2, 9, 7, 14]] * b)}


def test_the_paper_recipe_leaves_the_batch_alone():
    b = _batch()
    out = augment(b, DataConfig(), 2, 100, torch.Generator().manual_seed(0))
    assert all(out[k] is b[k] for k in b)


def test_mirroring_moves_the_lip_box_with_the_face():
    b = _batch(2)
    out = hflip_sample(b, torch.tensor([True, False]))
    assert torch.equal(out["x0"][0], b["x0"][0].flip(-1)) and torch.equal(out["x0"][1], b["x0"][1])
    assert torch.equal(out["motion"][0], b["motion"][0].flip(-1))
    assert out["lip_box"].tolist() == [[9, 9, 14, 14], [2, 9, 7, 14]]
    # the mask of the mirrored box is the mirrored mask
    assert torch.equal(box_mask(out["lip_box"], 16, 16)[0], box_mask(b["lip_box"], 16, 16)[0].flip(-1))


def test_blur_of_sigma_zero_is_the_identity_and_blur_keeps_the_mean():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    y = gaussian_blur(x, torch.tensor([0.0, 1.5]))
    assert torch.equal(y[0], x[0])
    assert (y[1] - x[1]).abs().max() > 0.05
    const = torch.full((1, 1, 8, 8), 0.3, dtype=torch.float64)
    assert torch.allclose(gaussian_blur(const, torch.tensor([2.0])), const, atol=1e-12)


def test_colour_offset_is_shared_by_the_motion_frames_and_bounded():
    motion = torch.zeros(64, 6, 4, 4)
    out = corrupt_motion(motion, 2, noise=0.0, blur=0.0, color=6.0, prob=1.0, generator=torch.Generator().manual_seed(2))
    first, second = out[:, :3], out[:, 3:]
    assert torch.equal(first, second)  # the same offset for both frames of a sample
    levels = first[:, :, 0, 0] / LEVEL
    assert levels.abs().max() <= 6.0 + 1e-4 and levels.abs().max() > 4.0
    assert torch.equal(out, out[..., :1, :1].expand_as(out))  # uniform over the image


def test_noise_std_is_within_its_maximum_and_prob_zero_does_nothing():
    motion = torch.zeros(200, 3, 32, 32)
    out = corrupt_motion(motion, 1, noise=8.0, blur=0.0, color=0.0, prob=1.0, generator=torch.Generator().manual_seed(1))
    std = out.std(dim=(1, 2, 3)) / LEVEL
    assert std.max() < 8.0 * 1.1 and std.mean() == pytest.approx(4.0, rel=0.15)  # U(0, 8) has mean 4
    none = corrupt_motion(motion, 1, noise=8.0, blur=1.0, color=6.0, prob=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(none, motion)


def test_augmentation_is_a_pure_function_of_its_seed_and_ramps_up():
    cfg = DataConfig(hflip=0.5, motion_corrupt_prob=0.5, motion_noise=6.0, motion_blur=1.0, motion_color=6.0,
                     motion_corrupt_ramp=100)
    b = _batch()
    a1 = augment(b, cfg, 2, 1000, torch.Generator().manual_seed(7))
    a2 = augment(b, cfg, 2, 1000, torch.Generator().manual_seed(7))
    assert all(torch.equal(a1[k], a2[k]) for k in b)
    assert torch.equal(a1["audio"], b["audio"])  # audio is never touched
    assert ramp(0, 100) == 0.0 and ramp(50, 100) == 0.5 and ramp(500, 100) == 1.0 and ramp(3, 0) == 1.0
    at0 = augment(b, DataConfig(motion_corrupt_prob=1.0, motion_noise=6.0, motion_corrupt_ramp=100), 2, 0,
                  torch.Generator().manual_seed(7))
    assert torch.equal(at0["motion"], b["motion"])  # strength 0 at step 0


def test_shading_is_smooth_local_shared_and_bounded():
    """The shading field: the same for every frame and channel of a sample, peak magnitude ~ U(0, shade)
    levels, varying across the image (not a uniform offset) but smooth (no pixel-to-pixel grain)."""
    motion = torch.zeros(64, 6, 32, 32)
    out = corrupt_motion(motion, 2, noise=0.0, blur=0.0, color=0.0, prob=1.0, shade=20.0,
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(out[:, :3], out[:, 3:])  # both motion frames
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # luminance: every channel
    peak = out.abs().amax(dim=(1, 2, 3)) / LEVEL
    assert peak.max() <= 20.0 + 1e-3 and peak.max() > 15.0 and peak.mean() == pytest.approx(10.0, rel=0.25)
    field = out[:, 0] / LEVEL
    spread = field.amax(dim=(1, 2)) - field.amin(dim=(1, 2))
    assert (spread > 0.5 * peak).all()  # local: parts of the face darker, others lighter or untouched
    step = (field[:, 1:] - field[:, :-1]).abs().amax(dim=(1, 2))
    assert (step <= peak * 4.0 / (32 / (SHADE_GRID - 1)) + 1e-3).all()  # smooth: a few levels a pixel at most
    none = corrupt_motion(motion, 2, noise=0.0, blur=0.0, color=0.0, prob=0.0, shade=20.0,
                          generator=torch.Generator().manual_seed(3))
    assert torch.equal(none, motion)


def test_shading_alone_turns_the_corruption_on_and_keeps_older_recipes_draws():
    b = _batch()
    shaded = augment(b, DataConfig(motion_corrupt_prob=1.0, motion_shade=12.0), 2, 10, torch.Generator().manual_seed(4))
    assert not torch.equal(shaded["motion"], b["motion"])
    old = DataConfig(motion_corrupt_prob=0.5, motion_noise=6.0, motion_blur=1.0, motion_color=6.0)
    assert torch.equal(augment(b, old, 2, 10, torch.Generator().manual_seed(4))["motion"],
                       corrupt_motion(b["motion"], 2, noise=6.0, blur=1.0, color=6.0, prob=0.5,
                                      generator=torch.Generator().manual_seed(4)))


def test_recolouring_applies_one_colour_map_to_every_image_of_a_sample():
    b = _batch(4)
    b["motion_rollout"] = b["motion"].flip(-2)
    out = recolor_sample(b, 0.2, torch.Generator().manual_seed(6))
    for i in range(4):
        for c in range(3):
            src = torch.cat([b[k][i].view(-1, 3, 16, 16)[:, c].flatten() for k in ("x0", "identity", "motion",
                                                                                  "motion_rollout")])
            dst = torch.cat([out[k][i].view(-1, 3, 16, 16)[:, c].flatten() for k in ("x0", "identity", "motion",
                                                                                    "motion_rollout")])
            inside = (dst > -1 + 1e-6) & (dst < 1 - 1e-6)
            slope, _ = torch.linalg.lstsq(torch.stack([src[inside], torch.ones_like(src[inside])], 1),
                                          dst[inside].unsqueeze(1)).solution.flatten()
            assert 0.8 - 1e-4 <= float(slope) <= 1.2 + 1e-4  # one gain for the channel, whichever image
            fit = slope * src[inside] + _
            assert torch.allclose(fit, dst[inside], atol=1e-5)
    assert torch.equal(out["audio"], b["audio"]) and torch.equal(out["lip_box"], b["lip_box"])
    assert out["x0"].min() >= -1 and out["x0"].max() <= 1
    with pytest.raises(ValueError, match=r"data.sample_color must be in \[0, 1\), got 1.0"):
        DataConfig(sample_color=1.0)


def _square_batch(b: int, size: int = 32, box=(12, 14, 20, 22)) -> dict[str, torch.Tensor]:
    """Dark images with one bright square where the lip box is, in every image of the sample."""
    img = torch.full((b, 3, size, size), -1.0)
    x0, y0, x1, y1 = box
    img[:, :, y0:y1, x0:x1] = 1.0
    return {"x0": img.clone(), "identity": img.clone(), "motion": img.repeat(1, 2, 1, 1),
            "lip_box": torch.tensor([list(box)] * b)}


def _bright_bounds(img: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(img[0] > 0, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_reframing_moves_and_scales_every_image_and_the_lip_box_alike():
    b = _square_batch(64)
    out = reframe_sample(b, 0.1, 0.08, 1.0, torch.Generator().manual_seed(3))
    moved = 0
    for i in range(64):
        bounds = _bright_bounds(out["x0"][i])
        box = out["lip_box"][i].tolist()
        # the box holds the whole square, at most one pixel of rounding (plus bicubic ringing) wider on each side
        assert all(abs(a - c) <= 1 for a, c in zip(bounds, box)), (i, bounds, box)
        assert torch.equal(out["identity"][i], out["x0"][i]) and torch.equal(out["motion"][i, 3:], out["x0"][i])
        moved += bounds != [12, 14, 20, 22]
    assert moved > 48  # almost every sample is framed differently
    assert out["x0"].abs().max() <= 1.0


def test_reframing_by_a_pure_shift_moves_the_box_without_resizing_it():
    b = _square_batch(1)
    g = torch.Generator().manual_seed(0)
    # scale 0 and a shift drawn in [-0.125, 0.125] of 32 px: the square moves by a whole or fractional pixel count
    out = reframe_sample(b, 0.0, 0.125, 1.0, g)
    dx, dy = (out["lip_box"][0, :2] - b["lip_box"][0, :2]).tolist()
    assert abs(dx) <= 5 and abs(dy) <= 5 and (dx, dy) != (0, 0)
    assert (out["lip_box"][0, 2:] - out["lip_box"][0, :2]).tolist() in ([8, 8], [9, 8], [8, 9], [9, 9])  # same size
    assert torch.equal(reframe_sample(b, 0.1, 0.1, 0.0, g)["x0"], b["x0"])  # probability 0: unchanged


def test_reframing_is_off_in_the_paper_recipe_and_on_through_the_config():
    b = _square_batch(8)
    on = augment(b, DataConfig(reframe=1.0, reframe_scale=0.1), 2, 0, torch.Generator().manual_seed(1))
    assert not torch.equal(on["x0"], b["x0"])
    with pytest.raises(ValueError, match="data.reframe_shift must be in \\[0, 0.5\\), got 0.6"):
        DataConfig(reframe_shift=0.6)
    with pytest.raises(ValueError, match="data.reframe must be in \\[0, 1\\], got 2"):
        DataConfig(reframe=2)


def test_bad_augmentation_values_are_refused():
    with pytest.raises(ValueError, match="data.hflip must be in \\[0, 1\\], got 1.5"):
        DataConfig(hflip=1.5)
    with pytest.raises(ValueError, match="data.motion_noise must be >= 0, got -1"):
        DataConfig(motion_noise=-1)
    with pytest.raises(ValueError, match="data.motion_shade must be >= 0, got -2"):
        DataConfig(motion_shade=-2)
