"""``dh-train rollouts``: a model's own videos of the training clips, for training on its own motion frames.

At run time the motion frames are the model's previous outputs; in ``fit`` they are ground truth
(corrupted or not). This stage closes the gap one step (a DAgger-style round): for every clip of a
prepared split it generates the clip with the model (identity = the clip's first frame, the clip's own
audio embeddings, the checkpoint's default sampler) and writes ``DATA/rollouts/<clip>.npz`` (``frames``
uint8 [T, S, S, 3], T the clip's frames or more with ``seconds``, S the clip's size, and ``meta``: the
checkpoint's sha256, sampler, steps, seed, seconds). With ``data.motion_rollout_prob`` > 0, ``fit`` and ``distill`` then give that fraction of samples
the rollout's frames at the motion-frame positions instead of the clip's, the target still the real
frame: the model learns to continue from what it actually produced, drift and all.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from dheads.engine.atomic import atomic_write
from dheads.engine.bundle import sha256_file
from dheads.engine.checkpoint import load_checkpoint
from dheads.engine.image import to_tensor, to_uint8_frames
from dheads.engine.reference import generate_reference

from .dataset import ClipStore, rollout_path

log = logging.getLogger(__name__)


def long_audio(embeddings: list[np.ndarray], k: int, n_frames: int) -> np.ndarray:
    """[n_frames, D]: clip ``k``'s audio embeddings, then the next clips' in turn, cycling (as the held-out
    study makes its long runs)."""
    order = embeddings[k:] + embeddings[:k]
    out, total = [], 0
    while total < n_frames:
        for e in order:
            out.append(e)
            total += len(e)
    return np.concatenate(out)[:n_frames]


def write_rollouts(checkpoint: str | os.PathLike, data: str | os.PathLike, *, split: str = "train", seed: int = 0,
                   seconds: float = 0.0, frame_noise: str | None = None, device: str = "cpu") -> list[Path]:
    """Generate every clip of ``split`` with ``checkpoint`` (module doc); returns the files written.

    ``seconds`` > the clip's length: a longer rollout (the clip's audio, then the other clips', cycling), of
    which training uses the LAST frames, as many as the clip has: the most drifted ones, where a model's own
    errors have grown (``dataset.load_rollout``). 0: as long as the clip, frame for frame.
    ``frame_noise`` (``engine/noise.py``): how the frames' noise is correlated, e.g. ``"0.8"``, so the
    rollouts carry the patterns a correlated-noise video feeds back; None: the checkpoint's default.
    """
    ckpt = load_checkpoint(checkpoint)
    store = ClipStore(data, split)
    if ckpt.model.image_size != store.size:
        raise ValueError(f"the model makes {ckpt.model.image_size} px frames but {data} holds {store.size} px clips")
    store.require_encoder(ckpt.audio, "the model")
    sampler = ckpt.diffusion.sampling.override(frame_noise=frame_noise)  # the one merge; checked by SamplerConfig
    net = ckpt.build(device=device)
    fps = store.audio.fps
    embeddings = [np.asarray(store.clip(k).audio_emb) for k in range(len(store))]
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint), "seed": seed, "seconds": seconds,
            "sampler": sampler.name, "steps": sampler.steps, "frame_noise": sampler.frame_noise}
    written = []
    for k, clip_id in enumerate(store.ids):
        clip = store.clip(k)
        identity = to_tensor(np.array(clip.frames[0])).to(device)
        n = max(len(clip), round(seconds * fps))
        audio = torch.from_numpy(long_audio(embeddings, k, n)).float().to(device)
        with torch.no_grad():
            frames = generate_reference(net, identity, audio, sampler=sampler, diffusion=ckpt.diffusion,
                                        seed=seed + k)
        out = rollout_path(data, clip_id)
        with atomic_write(out) as f:  # makes the folder
            np.savez(f, frames=to_uint8_frames(frames), meta=json.dumps({**meta, "clip": clip_id}))
        log.info("rollout %d/%d: %s, %d frames -> %s", k + 1, len(store.ids), clip_id, len(frames), out)
        written.append(out)
    return written
