"""``dh-train rollouts`` and training on the model's own motion frames (``data.motion_rollout_prob``):
the files match the engine's reference loop, the dataset serves them at the motion-frame positions, the
augmentation swaps them in by its seed, and a missing rollout is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dheads.engine.checkpoint import checkpoint_from_model, load_checkpoint, save_checkpoint
from dheads.engine.config import AudioConfig, DiffusionConfig, ModelConfig, SamplerConfig
from dheads.engine.image import to_tensor, to_uint8_frames
from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.reference import generate_reference
from dheads.training.augment import augment
from dheads.training.cli import main as dh_train
from dheads.training.config import DataConfig, LossConfig, load_config
from dheads.training.dataset import ClipStore, FrameDataset, load_rollout, rollout_path
from dheads.training.prepare import write_clip
from dheads.training.rollouts import long_audio, write_rollouts
from dheads.training.train import fit

SIZE, DIM, N = 16, 24, 6
MODEL = ModelConfig(image_size=SIZE, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                    num_head_channels=32, audio_dim=DIM, groups=8)
DIFFUSION = DiffusionConfig(sampling_steps=2, sampler="ddpm")


@pytest.fixture()
def data(tmp_path) -> Path:
    root = tmp_path / "prepared"
    rng = np.random.default_rng(1)
    index = []
    for k, split in enumerate(("train", "train", "test")):
        meta = {"id": f"c{k}", "n_frames": N}
        write_clip(root / "clips" / f"c{k}.npz",
                   dict(frames=rng.integers(0, 255, (N, SIZE, SIZE, 3), dtype=np.uint8),
                        mouth_boxes=np.tile(np.array([[4, 10, 12, 14]], np.float32), (N, 1)),
                        face_found=np.ones(N, bool), audio_emb=rng.standard_normal((N, DIM)).astype(np.float32),
                        meta=np.array(json.dumps(meta))))
        index.append({"id": f"c{k}", "speaker": f"s{k}", "split": split, "n_frames": N})
    audio = AudioConfig(encoder="sda", dim=DIM).to_dict()
    (root / "index.json").write_text(json.dumps({"audio": audio, "size": SIZE, "fps": 25, "clips": index}))
    return root


@pytest.fixture()
def model_path(tmp_path) -> Path:
    torch.manual_seed(0)
    net = DiffusedHeadsUNet(MODEL, DIFFUSION).eval()
    ckpt = checkpoint_from_model(net, AudioConfig(encoder="sda", dim=DIM), diffusion=DIFFUSION)
    return save_checkpoint(tmp_path / "model.pt", ckpt)


def test_rollouts_are_the_reference_loop_on_each_training_clip(data, model_path):
    written = write_rollouts(model_path, data, seed=3)
    assert written == [rollout_path(data, "c0"), rollout_path(data, "c1")]  # the training split only
    store = ClipStore(data, "train")
    net = load_checkpoint(model_path).build()
    for k, clip_id in enumerate(store.ids):
        clip = store.clip(k)
        with torch.no_grad():
            want = generate_reference(net, to_tensor(clip.frames[0]), torch.from_numpy(clip.audio_emb).float(),
                                      diffusion=DIFFUSION, seed=3 + k)
        got = load_rollout(data, clip_id, N)
        assert got.dtype == np.uint8 and got.shape == (N, SIZE, SIZE, 3)
        np.testing.assert_array_equal(got, to_uint8_frames(want))
        with np.load(rollout_path(data, clip_id)) as z:
            meta = json.loads(str(z["meta"]))
        assert (meta["clip"], meta["seed"], meta["sampler"], meta["steps"]) == (clip_id, 3, "ddpm", 2)
        assert len(meta["checkpoint_sha256"]) == 64


def test_rollouts_with_correlated_frame_noise_are_the_reference_loop_with_that_noise(data, model_path, capsys):
    write_rollouts(model_path, data, seed=5, frame_noise="0.8")
    store = ClipStore(data, "train")
    net = load_checkpoint(model_path).build()
    clip = store.clip(0)
    args = (net, to_tensor(clip.frames[0]), torch.from_numpy(clip.audio_emb).float())
    with torch.no_grad():
        want = generate_reference(*args, sampler=SamplerConfig(name="ddpm", steps=2, frame_noise="0.8"),
                                  diffusion=DIFFUSION, seed=5)
        fresh = generate_reference(*args, diffusion=DIFFUSION, seed=5)
    got = load_rollout(data, "c0", N)
    np.testing.assert_array_equal(got, to_uint8_frames(want))
    assert not np.array_equal(got, to_uint8_frames(fresh))
    with np.load(rollout_path(data, "c0")) as z:
        assert json.loads(str(z["meta"]))["frame_noise"] == "0.8"
    with pytest.raises(SystemExit) as e:
        dh_train(["rollouts", str(model_path), "--data", str(data), "--frame-noise", "1.5", "--threads", "1"])
    assert e.value.code != 0
    assert "frame noise must be one of fresh, repeat or a correlation between 0 and 1" in capsys.readouterr().err


def test_a_longer_rollout_continues_on_the_other_clips_audio_and_training_takes_its_end(data, model_path):
    a, b = np.arange(6.0).reshape(3, 2), -np.arange(4.0).reshape(2, 2)
    np.testing.assert_array_equal(long_audio([a, b], 1, 7), np.concatenate([b, a, b])[:7])
    np.testing.assert_array_equal(long_audio([a, b], 0, 2), a[:2])
    write_rollouts(model_path, data, seconds=0.4)  # 10 frames at 25 fps; the clips have 6
    with np.load(rollout_path(data, "c1")) as z:
        full, meta = z["frames"], json.loads(str(z["meta"]))
    assert full.shape == (10, SIZE, SIZE, 3) and meta["seconds"] == 0.4
    np.testing.assert_array_equal(load_rollout(data, "c1", N), full[-N:])
    store = ClipStore(data, "train")
    net = load_checkpoint(model_path).build()
    emb = [torch.from_numpy(store.clip(k).audio_emb).float() for k in (1, 0)]
    with torch.no_grad():
        want = generate_reference(net, to_tensor(store.clip(1).frames[0]), torch.cat(emb)[:10], diffusion=DIFFUSION,
                                  seed=1)
    np.testing.assert_array_equal(full, to_uint8_frames(want))


def test_the_dataset_serves_rollout_frames_and_augment_swaps_them_in(data, model_path):
    write_rollouts(model_path, data)
    store = ClipStore(data, "train")
    ds = FrameDataset(store, MODEL, LossConfig(), rollouts=True)
    item = ds[(1, 3, 0)]  # clip 1, target 3: motion frames 1 and 2
    roll = load_rollout(data, "c1", N)
    want = torch.cat([to_tensor(roll[1])[0], to_tensor(roll[2])[0]])
    torch.testing.assert_close(item["motion_rollout"], want)
    assert not torch.equal(item["motion"], item["motion_rollout"])
    first = ds[(0, 0, 2)]  # no frame before the target: the identity, in both
    torch.testing.assert_close(first["motion_rollout"], first["motion"])
    batch = {k: torch.stack([ds[(0, 4, 1)][k], ds[(1, 3, 0)][k]]) for k in item}
    swapped = augment(batch, DataConfig(motion_rollout_prob=1.0), 2, 0, torch.Generator().manual_seed(0))
    assert "motion_rollout" not in swapped and torch.equal(swapped["motion"], batch["motion_rollout"])
    kept = augment(batch, DataConfig(), 2, 0, torch.Generator().manual_seed(0))
    assert "motion_rollout" not in kept and torch.equal(kept["motion"], batch["motion"])
    half = augment(batch, DataConfig(motion_rollout_prob=0.5), 2, 0, torch.Generator().manual_seed(5))
    again = augment(batch, DataConfig(motion_rollout_prob=0.5), 2, 0, torch.Generator().manual_seed(5))
    assert torch.equal(half["motion"], again["motion"])  # a pure function of the step's seed
    for i in range(2):
        assert torch.equal(half["motion"][i], batch["motion"][i]) or torch.equal(half["motion"][i],
                                                                                 batch["motion_rollout"][i])


def test_fit_on_rollouts_and_the_missing_rollout_error(data, model_path, tmp_path, capsys):
    cfg = load_config("tiny", [f"model.image_size={SIZE}", f"model.audio_dim={DIM}", "model.channel_mult=[1, 2]",
                               "model.attention_levels=[1]", "train.steps=1", "train.batch_size=2",
                               "train.checkpoint_every=100", "data.motion_rollout_prob=0.5"])
    with pytest.raises(ValueError, match=r"data.motion_rollout_prob > 0 but .*c0.npz is missing; run `dh-train "
                                         r"rollouts CKPT --data .*` first"):
        fit(cfg, data, tmp_path / "run0", progress=False)
    with pytest.raises(SystemExit) as e:
        dh_train(["rollouts", str(model_path), "--data", str(data), "--threads", "1"])
    assert e.value.code == 0 and rollout_path(data, "c1").is_file()
    result = fit(cfg, data, tmp_path / "run", progress=False)
    assert result.end_step == 1 and np.isfinite(result.losses).all()
    np.savez(rollout_path(data, "c0"), frames=np.zeros((N - 1, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(ValueError, match="has 5 frames but its clip has 6; write the rollouts again"):
        fit(cfg, data, tmp_path / "run2", progress=False)
    other = checkpoint_from_model(DiffusedHeadsUNet(MODEL, DIFFUSION), AudioConfig(encoder="whisper", dim=DIM),
                                  diffusion=DIFFUSION)
    with pytest.raises(ValueError, match=rf"^the model takes {DIM}-d whisper audio features but .* holds {DIM}-d sda "
                                         r"ones; prepare the data with `dh-train prepare --encoder whisper`$"):
        write_rollouts(save_checkpoint(tmp_path / "whisper.pt", other), data)
    with pytest.raises(ValueError, match=r"data.motion_rollout_prob must be in \[0, 1\], got 2"):
        DataConfig(motion_rollout_prob=2.0)
