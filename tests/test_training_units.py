"""Unit tests of the training stack: sampling rules, lip boxes, the VLB terms, loss weights, config."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from dheads.engine.config import AudioConfig, ModelConfig
from dheads.engine.face import LIPS
from dheads.engine.schedule import cosine_schedule
from dheads.training import dataset as ds
from dheads.training.config import (PRESETS, LossConfig, OptimConfig, TrainingConfig, dumps_toml,
                                    load_config)
from dheads.training.diffusion import (approx_standard_normal_cdf, discretized_gaussian_log_likelihood,
                                       make_tables, normal_kl, q_sample, vb_terms_bpd)
from dheads.training.losses import box_mask, diffusion_losses, lip_pad_pixels, masked_mse, pad_box
from dheads.training.prepare import (ClipSource, fill_and_smooth, lip_boxes, resample_indices,
                                     speaker_and_split, split_by_speaker, to_crop_coords, write_clip)
from dheads.training.train import EMA, lr_at

TINY = ModelConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_levels=(1,), num_head_channels=16, groups=8, audio_dim=4, dropout=0.0)


# --------------------------------------------------------------------------- sampling rules

def test_identity_is_never_the_target_and_covers_the_clip():
    rng = np.random.default_rng(0)
    n = 6
    for target in range(n):
        seen = {ds.choose_identity(rng, n, target, "random") for _ in range(300)}
        assert target not in seen
        assert seen == set(range(n)) - {target}
    assert ds.choose_identity(rng, n, 4, "first") == 0
    with pytest.raises(ValueError):
        ds.choose_identity(rng, 1, 0, "random")


def test_motion_frames_are_padded_with_the_identity_at_clip_start():
    assert ds.motion_indices(0, 2) == [-1, -1]
    assert ds.motion_indices(1, 2) == [-1, 0]
    assert ds.motion_indices(5, 2) == [3, 4]
    assert ds.motion_indices(2, 3) == [-1, 0, 1]


def test_audio_window_is_clamped_at_clip_ends():
    assert ds.audio_indices(0, 10, 2).tolist() == [0, 0, 0, 1, 2]
    assert ds.audio_indices(1, 10, 2).tolist() == [0, 0, 1, 2, 3]
    assert ds.audio_indices(5, 10, 2).tolist() == [3, 4, 5, 6, 7]
    assert ds.audio_indices(9, 10, 2).tolist() == [7, 8, 9, 9, 9]


def test_batch_specs_are_a_pure_function_of_seed_step_rank_micro():
    lengths = [5, 9, 3]
    a = ds.batch_specs(0, 7, 0, 0, 16, lengths)
    assert a == ds.batch_specs(0, 7, 0, 0, 16, lengths)
    assert a != ds.batch_specs(0, 8, 0, 0, 16, lengths)
    assert a != ds.batch_specs(0, 7, 1, 0, 16, lengths)
    assert a != ds.batch_specs(0, 7, 0, 1, 16, lengths)
    for clip, target, ident in a:
        assert 0 <= target < lengths[clip] and 0 <= ident < lengths[clip] and ident != target
    sampler = ds.StepBatchSampler(lengths, seed=0, batch_size=16, grad_accum=2, start=7, stop=9)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 and batches[0] == a


def _fake_prepared(root: Path, n_frames=(4, 6), size=16, dim=4) -> Path:
    """A prepared folder without MediaPipe: frame j of clip k is filled with the value 10*k + j."""
    index = []
    for k, n in enumerate(n_frames):
        frames = np.zeros((n, size, size, 3), np.uint8) + (10 * k + np.arange(n, dtype=np.uint8))[:, None, None, None]
        boxes = np.array([[2 + j, 3, 6 + j, 5] for j in range(n)], np.float32)  # moves right with j
        emb = (100 * k + np.arange(n, dtype=np.float32))[:, None].repeat(dim, 1)
        meta = {"id": f"c{k}", "n_frames": n}
        write_clip(root / "clips" / f"c{k}.npz", dict(frames=frames, mouth_boxes=boxes, face_found=np.ones(n, bool),
                                                      audio_emb=emb, meta=np.array(json.dumps(meta))))
        index.append({"id": f"c{k}", "speaker": "s", "split": "train", "n_frames": n})
    audio = AudioConfig(encoder="whisper", dim=dim).to_dict()
    (root / "index.json").write_text(json.dumps({"audio": audio, "size": size, "fps": 25, "clips": index}))
    return root


def _value(x: torch.Tensor) -> float:
    """The uint8 fill value of a constant frame in [-1, 1]."""
    return round((float(x.mean()) + 1) * 127.5)


@pytest.mark.parametrize("cache", ["memory", "mmap"])
def test_frame_dataset_assembles_identity_motion_audio_and_lip_box(tmp_path, cache):
    store = ds.ClipStore(_fake_prepared(tmp_path), "train", cache)
    data = ds.FrameDataset(store, TINY, LossConfig(lip_pad=8.0, lip_pad_at=128))  # 1 px at 16x16
    item = data[(1, 0, 3)]  # clip 1, target 0, identity 3
    assert _value(item["x0"]) == 10 and _value(item["identity"]) == 13
    motion = item["motion"].view(2, 3, 16, 16)
    assert [_value(m) for m in motion] == [13, 13]  # both before the clip: the identity frame
    item = data[(1, 1, 4)]
    assert [_value(m) for m in item["motion"].view(2, 3, 16, 16)] == [14, 10]  # identity, frame 0
    item = data[(1, 5, 0)]
    assert [_value(m) for m in item["motion"].view(2, 3, 16, 16)] == [13, 14]
    assert item["audio"][:, 0].tolist() == [103, 104, 105, 105, 105]
    assert item["lip_box"].tolist() == [2 + 5 - 1, 2, 6 + 5 + 1, 6]  # the TARGET frame's box, padded 1 px
    ident = ds.FrameDataset(store, TINY, LossConfig(lip_pad=8.0, lip_frame="identity"))
    assert ident[(1, 5, 0)]["lip_box"].tolist() == [1, 2, 7, 6]  # the identity frame's (frame 0)
    gray = ds.FrameDataset(store, ModelConfig(**{**TINY.to_dict(), "grayscale_motion": True}), LossConfig())
    assert gray[(0, 2, 0)]["motion"].shape == (2, 16, 16)
    with pytest.raises(ValueError, match="audio_dim"):
        ds.FrameDataset(store, ModelConfig(**{**TINY.to_dict(), "audio_dim": 8}), LossConfig())


def test_dataset_resizes_frames_and_boxes_stored_at_another_size(tmp_path):
    store = ds.ClipStore(_fake_prepared(tmp_path, size=32), "train")
    data = ds.FrameDataset(store, TINY, LossConfig(lip_pad=0.0))
    item = data[(0, 2, 0)]
    assert item["x0"].shape == (3, 16, 16) and _value(item["x0"]) == 2
    assert item["lip_box"].tolist() == [2, 1, 4, 3]  # [4, 3, 8, 5] at 32 px, halved


def test_npz_memmap_matches_np_load(tmp_path):
    arr = np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3)
    write_clip(tmp_path / "x.npz", {"a": np.zeros(3), "frames": arr})
    mm = ds.npz_memmap(tmp_path / "x.npz", "frames")
    assert isinstance(mm, np.memmap) and np.array_equal(mm, arr)


# --------------------------------------------------------------------------- lip boxes

def test_lip_box_from_landmarks_and_padding():
    lm = np.full((2, 478, 2), 50.0)
    lips = list(LIPS)
    lm[0, lips] = np.stack([np.linspace(40.2, 60.7, len(lips)), np.linspace(70.5, 80.1, len(lips))], 1)
    lm[1, lips] = lm[0, lips] + 1.0
    boxes = lip_boxes(lm)
    np.testing.assert_allclose(boxes[0], [40.2, 70.5, 60.7, 80.1], rtol=1e-6)
    np.testing.assert_allclose(boxes[1], [41.2, 71.5, 61.7, 81.1], rtol=1e-6)
    assert pad_box(boxes[0], 5, 128) == (35, 65, 66, 86)  # floor(40.2-5), floor(70.5-5), ceil(65.7), ceil(85.1)
    assert pad_box((1.0, 2.0, 126.5, 127.0), 5, 128) == (0, 0, 128, 128)  # clipped to the image
    assert lip_pad_pixels(LossConfig(), 128) == 5.0 and lip_pad_pixels(LossConfig(), 32) == 1.25
    # source pixels -> crop pixels: crop (x0=20, y0=10, side=200) resized to 100
    np.testing.assert_allclose(to_crop_coords(np.array([[120.0, 60.0]]), (20, 10, 200), 100), [[50.0, 25.0]])


def test_fill_and_smooth_interpolates_gaps():
    lm = np.zeros((5, 2, 2))
    lm[:, :, 0] = np.arange(5)[:, None] * 2.0
    lm[2] = np.nan
    out = fill_and_smooth(lm, window=1)
    np.testing.assert_allclose(out[:, 0, 0], [0, 2, 4, 6, 8])
    out3 = fill_and_smooth(lm, window=3)
    np.testing.assert_allclose(out3[:, 0, 0], [2 / 3, 2, 4, 6, 22 / 3])


def test_box_mask_and_masked_mse():
    mask = box_mask(torch.tensor([[1, 2, 4, 3], [0, 0, 0, 0]]), 5, 6)
    assert mask.shape == (2, 1, 5, 6)
    assert mask[0].sum() == 3 and mask[0, 0, 2, 1:4].sum() == 3 and mask[1].sum() == 0
    pred = torch.zeros(2, 3, 5, 6)
    target = torch.zeros(2, 3, 5, 6)
    target[0, :, 2, 1] = 3.0  # inside the box: squared error 9 on 3 channels of 1 of 3 pixels
    target[0, :, 0, 0] = 100.0  # outside: ignored
    assert masked_mse(pred, target, mask).item() == pytest.approx((9 * 3 / 9 + 0) / 2)


def test_resample_indices():
    assert resample_indices(6, 25, 25).tolist() == list(range(6))
    assert resample_indices(30, 30, 25).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 18, 19, 20,
                                                     21, 22, 24, 25, 26, 27, 28]


def test_speaker_ids_for_dataset_layouts():
    assert speaker_and_split(PurePosixPath("1001_DFA_ANG_XX.flv"), "auto") == ("1001", None)
    assert speaker_and_split(PurePosixPath("ABOUT/val/ABOUT_00003.mp4"), "auto") == ("ABOUT/ABOUT_00003", "val")
    assert speaker_and_split(PurePosixPath("s12/video/bbaf2n.mpg"), "auto") == ("s12", None)
    assert speaker_and_split(PurePosixPath("alice/take1.mp4"), "auto") == ("alice", None)
    assert speaker_and_split(PurePosixPath("take1.mp4"), "folder", "mydata") == ("mydata", None)
    with pytest.raises(ValueError):
        speaker_and_split(PurePosixPath("alice/take1.mp4"), "crema")


def test_split_by_speaker_keeps_speakers_apart():
    clips = [ClipSource(f"{s}/{i}", Path("x"), f"s{s}") for s in range(10) for i in range(3)]
    splits = split_by_speaker(clips, 0.2)
    test_speakers = {c.speaker for c in clips if splits[c.id] == "test"}
    assert len(test_speakers) == 2
    for c in clips:  # a speaker is wholly on one side
        assert (splits[c.id] == "test") == (c.speaker in test_speakers)
    one = [ClipSource(str(i), Path("x"), "a") for i in range(3)]
    assert set(split_by_speaker(one, 0.5).values()) == {"train"}
    assert split_by_speaker(clips, 0.0, test_speakers=("s3",))["3/0"] == "test"
    lrw = [ClipSource("A/test/A_1", Path("x"), "A/A_1", "test"), ClipSource("A/train/A_2", Path("x"), "A/A_2", "train")]
    assert split_by_speaker(lrw) == {"A/test/A_1": "test", "A/train/A_2": "train"}


# --------------------------------------------------------------------------- VLB terms

def test_normal_kl_by_hand():
    got = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.5)).item()
    want = 0.5 * (-1 + 0.5 - 0.0 + math.exp(-0.5) + 1.0 * math.exp(-0.5))
    assert got == pytest.approx(want, rel=1e-6)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_discretized_gaussian_nll_by_hand():
    x = torch.tensor([0.2, -1.0, 1.0])
    mean = torch.tensor([0.21, -0.99, 0.98])
    log_scale = torch.full((3,), math.log(0.01))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale).tolist()
    b = 1 / 255
    want = [math.log(_phi((0.2 - 0.21 + b) / 0.01) - _phi((0.2 - 0.21 - b) / 0.01)),
            math.log(_phi((-1.0 + 0.99 + b) / 0.01)),
            math.log(1 - _phi((1.0 - 0.98 - b) / 0.01))]
    # the tanh approximation of Phi (improved-diffusion's) is within 3e-4 of the exact CDF
    np.testing.assert_allclose(got, want, rtol=3e-3)
    xs = torch.linspace(-4, 4, 81)
    exact = torch.tensor([_phi(float(v)) for v in xs])
    assert (approx_standard_normal_cdf(xs) - exact).abs().max() < 3e-4


def test_vb_term_against_a_hand_computed_value():
    """L_t for one pixel, every coefficient computed here from the float64 schedule with plain floats."""
    sched = cosine_schedule(1000)
    tables = make_tables(sched, dtype=torch.float64)
    x0, xt, eps, v, t = 0.3, -0.4, 0.25, -0.2, 500
    abar, abar_prev, beta = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1], sched.betas[t]
    x0_hat = xt / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps
    def post_mean(a):
        return beta * math.sqrt(abar_prev) / (1 - abar) * a + (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar) * xt
    log_tilde = math.log(beta * (1 - abar_prev) / (1 - abar))
    nu = (v + 1) / 2
    logvar = nu * math.log(beta) + (1 - nu) * log_tilde
    m1, m2 = post_mean(x0), post_mean(x0_hat)
    kl = 0.5 * (-1 + logvar - log_tilde + math.exp(log_tilde - logvar) + (m1 - m2) ** 2 * math.exp(-logvar))
    want = kl / math.log(2)

    shape = (1, 3, 1, 1)
    out = torch.cat([torch.full(shape, eps), torch.full(shape, v)], 1).double()
    got = vb_terms_bpd(out, torch.full(shape, x0).double(), torch.full(shape, xt).double(),
                       torch.tensor([t]), tables)
    # -1 + (logvar - log_tilde) + exp(log_tilde - logvar) cancels to ~1e-6: float64 rounding of O(1)
    # terms leaves ~1e-10 absolute, i.e. ~1e-8 relative to this KL
    assert got.item() == pytest.approx(want, rel=1e-7)

    # t = 0: the decoder NLL of x0 in bits (x0 on a bin centre)
    x0 = 2 * 140 / 255 - 1
    got0 = vb_terms_bpd(out, torch.full(shape, x0).double(), torch.full(shape, xt).double(), torch.tensor([0]), tables)
    a0, b0 = sched.alphas_cumprod[0], sched.betas[0]
    x0_hat = xt / math.sqrt(a0) - math.sqrt(1 / a0 - 1) * eps
    mean0 = b0 / (1 - a0) * x0_hat + 0 * xt  # abar_prev = 1 at t = 0: the mean is x0_hat
    logvar0 = nu * math.log(b0) + (1 - nu) * sched.posterior_log_variance_clipped[0]
    s = math.exp(0.5 * logvar0)
    p = _phi((x0 - mean0 + 1 / 255) / s) - _phi((x0 - mean0 - 1 / 255) / s)
    assert got0.item() == pytest.approx(-math.log(max(p, 1e-12)) / math.log(2), rel=3e-3)


def test_q_sample_matches_the_schedule():
    sched = cosine_schedule(1000)
    tables = make_tables(sched, dtype=torch.float64)
    x0, noise, t = torch.ones(2, 3, 2, 2).double(), torch.full((2, 3, 2, 2), 2.0).double(), torch.tensor([0, 999])
    xt = q_sample(x0, t, noise, tables)
    for i, ti in enumerate(t.tolist()):
        a = sched.alphas_cumprod[ti]
        assert xt[i, 0, 0, 0].item() == pytest.approx(math.sqrt(a) + 2 * math.sqrt(1 - a), rel=1e-12)


# --------------------------------------------------------------------------- loss weights

def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(2, 6, 8, 8, generator=g).requires_grad_(True)
    noise, x0 = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 700])
    tables = make_tables(cosine_schedule(1000))
    x_t = q_sample(x0, t, noise, tables)
    mask = box_mask(torch.tensor([[1, 1, 5, 4], [2, 2, 8, 8]]), 8, 8)
    return out, noise, x0, x_t, t, tables, mask


def test_loss_weights_and_defaults():
    assert LossConfig().lambda_vlb == 1e-4 and LossConfig().lambda_lip == 0.2 and LossConfig().lip_pad == 5.0
    out, noise, x0, x_t, t, tables, mask = _loss_inputs()
    terms = diffusion_losses(out, noise, x0, x_t, t, tables, mask, LossConfig(lambda_vlb=0.5, lambda_lip=0.25))
    assert terms.loss.item() == pytest.approx((terms.mse + 0.5 * terms.vlb + 0.25 * terms.lip).item(), rel=1e-6)
    assert terms.mse.item() == pytest.approx(((out[:, :3] - noise) ** 2).mean().item(), rel=1e-6)
    want_lip = masked_mse(out[:, :3], noise, mask)
    assert terms.lip.item() == pytest.approx(want_lip.item(), rel=1e-6)
    only_mse = diffusion_losses(out, noise, x0, x_t, t, tables, mask, LossConfig(lambda_vlb=0, lambda_lip=0))
    assert only_mse.loss.item() == pytest.approx(terms.mse.item(), rel=1e-6)
    full = box_mask(torch.tensor([[0, 0, 8, 8]] * 2), 8, 8)  # a lip box over the whole frame = the MSE
    whole = diffusion_losses(out, noise, x0, x_t, t, tables, full, LossConfig())
    assert whole.lip.item() == pytest.approx(whole.mse.item(), rel=1e-6)


def test_vlb_trains_only_the_variance_output():
    out, noise, x0, x_t, t, tables, mask = _loss_inputs()
    terms = diffusion_losses(out, noise, x0, x_t, t, tables, mask, LossConfig())
    terms.vlb.backward()
    assert torch.count_nonzero(out.grad[:, :3]) == 0 and torch.count_nonzero(out.grad[:, 3:]) > 0
    out.grad = None
    terms = diffusion_losses(out, noise, x0, x_t, t, tables, mask, LossConfig())
    (terms.mse + terms.lip).backward()
    assert torch.count_nonzero(out.grad[:, 3:]) == 0


# --------------------------------------------------------------------------- config, lr, EMA

def test_presets_load_and_round_trip():
    for name in PRESETS:
        cfg = load_config(name)
        assert TrainingConfig.from_dict(tomllib.loads(dumps_toml(cfg))) == cfg
    crema, lrw, tiny = (load_config(n) for n in ("crema", "lrw", "tiny"))
    assert crema.model.in_channels == 12 and lrw.model.in_channels == 8
    assert crema.optim.lr == 5e-5 and crema.train.batch_size == 10 and crema.model.dropout == 0.1
    assert crema.loss.lambda_vlb == 1e-4 and crema.loss.lambda_lip == 0.2
    assert tiny.model.image_size == 32 and tiny.model.audio_dim == 384
    cfg = load_config("tiny", ["optim.lr=1e-3", "data.identity=first", "model.channel_mult=[1, 2]"])
    assert cfg.optim.lr == 1e-3 and cfg.data.identity == "first" and cfg.model.channel_mult == (1, 2)
    with pytest.raises(ValueError, match="unknown"):
        load_config("tiny", ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="identity"):
        load_config("tiny", ["data.identity=last"])


def test_lr_schedule():
    o = OptimConfig(lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(o, 0, 110) == pytest.approx(0.1) and lr_at(o, 9, 110) == pytest.approx(1.0)
    assert lr_at(o, 10, 110) == pytest.approx(1.0) and lr_at(o, 60, 110) == pytest.approx(0.55)
    assert lr_at(o, 110, 110) == pytest.approx(0.1)
    assert lr_at(OptimConfig(lr=2.0), 1234, 10) == 2.0


def test_ema_update():
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9, warmup=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m, 0)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 2), 0.1))
    assert EMA(m, 0.999, warmup=True).decay_at(0) == pytest.approx(0.1)


def test_vb_term_clamps_the_predicted_x0_like_the_authors():
    """With clip_x0 the posterior mean uses clamp(x0_hat, -1, 1) (their get_q_params); eps = -2 at t = 700
    puts x0_hat far above 1, so the two differ, and the clamped one equals the term at x0_hat = 1."""
    sched = cosine_schedule(1000)
    tables = make_tables(sched, dtype=torch.float64)
    t, xt, x0 = 700, 0.2, 0.5
    abar = sched.alphas_cumprod[t]
    eps = -2.0
    assert xt / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps > 1.5
    eps_at_one = (xt / math.sqrt(abar) - 1.0) / math.sqrt(1 / abar - 1)  # the eps whose x0_hat is exactly 1
    shape = (1, 3, 1, 1)

    def term(e: float, clip: bool) -> float:
        out = torch.cat([torch.full(shape, e), torch.full(shape, 0.1)], 1).double()
        return vb_terms_bpd(out, torch.full(shape, x0).double(), torch.full(shape, xt).double(),
                            torch.tensor([t]), tables, clip_x0=clip).item()

    assert term(eps, True) == pytest.approx(term(eps_at_one, False), rel=1e-7)  # KL cancellation: see above
    assert term(eps, False) > 2 * term(eps, True)


def test_dc_loss_weighs_the_noise_mean_like_a_whole_image():
    from dheads.training.losses import dc_loss

    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    blind = noise - noise.mean(dim=(2, 3), keepdim=True)  # right everywhere but the mean
    level = torch.tensor([1.0, 0.5])
    want = ((noise.mean(dim=(2, 3)) ** 2 * 64).mean(dim=1) * level).mean()
    assert dc_loss(blind, noise, level).item() == pytest.approx(want.item(), rel=1e-6)
    assert dc_loss(noise + 0.3 * blind, noise, level).item() == pytest.approx(0.0, abs=1e-10)  # means agree
    out, noise, x0, x_t, t, tables, mask = _loss_inputs()
    terms = diffusion_losses(out, noise, x0, x_t, t, tables, mask, LossConfig(lambda_dc=0.5))
    assert terms.dc.item() == pytest.approx(dc_loss(out[:, :3], noise, 1 - tables.sqrt_alphas_cumprod[t] ** 2).item())
    assert terms.loss.item() == pytest.approx((terms.mse + 1e-4 * terms.vlb + 0.2 * terms.lip + 0.5 * terms.dc).item(),
                                              rel=1e-6)
    assert diffusion_losses(out, noise, x0, x_t, t, tables, mask, LossConfig()).dc.item() == 0.0  # paper: off


def test_speaker_balanced_draws():
    speakers = ["s1"] * 500 + ["a", "b", "c"]
    assert ds.speaker_balanced(speakers, 0.0) is None  # the uniform draw, bit for bit as before
    p = ds.speaker_balanced(speakers, 0.6)
    assert p.shape == (503,) and abs(p.sum() - 1) < 1e-12
    assert abs(p[500:].sum() - 3 / (3 + 500 ** 0.4)) < 1e-12  # 20% for the three single-clip speakers
    assert np.allclose(p[:500], p[0]) and abs(p[500] / p[0] - 500 ** 0.6) < 1e-9  # 41.6x a clip of s1
    assert np.allclose(ds.speaker_balanced(speakers, 1.0)[500:], 0.25)  # every speaker alike
    lengths = [75] * 503
    a = ds.batch_specs(0, 7, 0, 0, 4000, lengths, clip_p=p)
    assert a == ds.batch_specs(0, 7, 0, 0, 4000, lengths, clip_p=p)
    assert 0.17 < np.mean([c >= 500 for c, _, _ in a]) < 0.23
    assert ds.batch_specs(0, 7, 0, 0, 16, lengths) == ds.batch_specs(0, 7, 0, 0, 16, lengths, clip_p=None)
