"""Training samples from prepared clips (paper Section 4.1).

One sample = a clip, a target frame i, an identity frame from the same clip, the ``M`` ground-truth
frames before i as motion frames (the identity frame where the clip has none) and the audio
window ``i-w..i+w`` clamped to the clip. Which (clip, target, identity) a sample uses is a pure
function of ``(seed, step, rank, micro-batch)`` (``batch_specs``), so the data order needs no
state of its own: a resumed run, any number of DataLoader workers and every DDP rank see exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dheads.engine.conditioning import audio_window_indices, motion_transform
from dheads.engine.config import AudioConfig, ModelConfig
from dheads.engine.image import to_tensor

from .config import LossConfig
from .losses import lip_pad_pixels, pad_box

log = logging.getLogger(__name__)

MEMORY_LIMIT = 2 << 30  # cache="auto": clips of a split load into memory below this many bytes


# --------------------------------------------------------------------------- sampling rules

def choose_identity(rng: np.random.Generator, n_frames: int, target: int, mode: str = "random") -> int:
    """``"random"``: uniform over the clip's frames other than ``target``; ``"first"``: frame 0."""
    if mode == "first":
        return 0
    if n_frames < 2:
        raise ValueError("a clip needs at least 2 frames for a random identity frame")
    j = int(rng.integers(n_frames - 1))
    return j + (j >= target)


def motion_indices(target: int, motion_frames: int = 2) -> list[int]:
    """Frames ``target-M .. target-1``, oldest first; ``-1`` marks "the identity frame" (before the clip)."""
    return [j if j >= 0 else -1 for j in range(target - motion_frames, target)]


def audio_indices(target: int, n_frames: int, window: int = 2) -> np.ndarray:
    """Rows ``target-w .. target+w`` clamped to ``[0, n_frames-1]`` (the engine's rule)."""
    return audio_window_indices(n_frames, window, frames=torch.tensor([target]))[0].numpy()


def sample_spec(rng: np.random.Generator, lengths: Sequence[int], identity: str = "random",
                clip_p: np.ndarray | None = None) -> tuple[int, int, int]:
    """(clip, target, identity frame): a clip (uniform, or drawn with probabilities ``clip_p``), a uniform
    target frame, then the identity."""
    clip = int(rng.integers(len(lengths))) if clip_p is None else int(rng.choice(len(lengths), p=clip_p))
    target = int(rng.integers(lengths[clip]))
    return clip, target, choose_identity(rng, lengths[clip], target, identity)


def step_seed(seed: int, step: int, rank: int, micro: int, stream: int) -> int:
    """A 63-bit seed for one (step, rank, micro-batch) and stream (0: data, 1: noise, 2: dropout, 3: augmentation)."""
    return int(np.random.SeedSequence([seed, step, rank, micro, stream]).generate_state(1, np.uint64)[0] >> 1)


def batch_specs(seed: int, step: int, rank: int, micro: int, batch_size: int, lengths: Sequence[int],
                identity: str = "random", clip_p: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """The ``batch_size`` (clip, target, identity) triples of one micro-batch."""
    rng = np.random.default_rng(step_seed(seed, step, rank, micro, 0))
    return [sample_spec(rng, lengths, identity, clip_p) for _ in range(batch_size)]


def speaker_balanced(speakers: Sequence[str], balance: float) -> np.ndarray | None:
    """Clip probabilities where a speaker with n clips draws ``n ** (1 - balance)`` shares, split evenly over
    its clips: 0 = every clip alike (None: the uniform draw), 1 = every speaker alike. One speaker with 500
    clips beside three with one each: 0.6% of samples for the three at 0, 20% at 0.6, 75% at 1."""
    if balance <= 0:
        return None
    counts: dict[str, int] = {}
    for s in speakers:
        counts[s] = counts.get(s, 0) + 1
    w = np.array([counts[s] ** (1.0 - balance) / counts[s] for s in speakers], dtype=np.float64)
    return w / w.sum()


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields the micro-batches of steps ``start .. stop-1`` (``grad_accum`` per step) for one rank."""

    def __init__(self, lengths: Sequence[int], *, seed: int, batch_size: int, grad_accum: int = 1,
                 start: int = 0, stop: int, rank: int = 0, identity: str = "random",
                 clip_p: np.ndarray | None = None):
        self.lengths, self.seed, self.batch_size = list(lengths), seed, batch_size
        self.grad_accum, self.start, self.stop, self.rank, self.identity = grad_accum, start, stop, rank, identity
        self.clip_p = clip_p

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.stop):
            for micro in range(self.grad_accum):
                yield batch_specs(self.seed, step, self.rank, micro, self.batch_size, self.lengths, self.identity,
                                  self.clip_p)


# --------------------------------------------------------------------------- clip storage

def npz_memmap(path: str | os.PathLike, name: str) -> np.ndarray:
    """Memory-map one member of an UNCOMPRESSED npz (what ``prepare`` writes) without reading it."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path) as f:
            return f[name]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@dataclass(frozen=True, eq=False)
class Clip:
    """One prepared clip: frames uint8 [T, S, S, 3], mouth_boxes float32 [T, 4], audio_emb [T, D],
    audio int16 [T * 640] or None, meta dict."""

    frames: np.ndarray
    mouth_boxes: np.ndarray
    audio_emb: np.ndarray
    audio: np.ndarray | None
    meta: dict[str, Any]

    def __len__(self) -> int:
        return self.frames.shape[0]


def load_clip(path: str | os.PathLike, mmap: bool = False, audio: bool = True) -> Clip:
    """Read a clip file, the frames memory-mapped when ``mmap``; the audio samples only with ``audio``."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        small = {k: z[k] for k in ("mouth_boxes", "audio_emb")}
        audio = z["audio"] if audio and "audio" in z.files else None
        frames = None if mmap else z["frames"]
    if mmap:
        frames = npz_memmap(path, "frames")
    return Clip(frames, small["mouth_boxes"], small["audio_emb"], audio, meta)


class ClipStore:
    """The prepared clips of one split: ``index.json`` + ``clips/<id>.npz`` (the audio samples are
    loaded only with ``audio``: training needs just the embeddings)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", cache: str = "auto", audio: bool = False):
        self.root, self.with_audio = Path(root), audio
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.root}: no index.json; run `dh-train prepare` into it first")
        index = json.loads(index_path.read_text())
        self.audio = AudioConfig.from_dict(index["audio"])
        self.size = int(index["size"])
        entries = [e for e in index["clips"] if e["split"] == split and e["n_frames"] >= 2]
        if not entries:
            raise ValueError(f"{self.root}: no clips of at least 2 frames in split {split!r}")
        self.split = split
        self.ids = [e["id"] for e in entries]
        self.clip_speakers = [str(e.get("speaker", e["id"])) for e in entries]
        self.speakers = sorted(set(self.clip_speakers))
        self.lengths = [int(e["n_frames"]) for e in entries]
        paths = [self.path(i) for i in self.ids]
        total = sum(p.stat().st_size for p in paths)
        self.mmap = cache == "mmap" or (cache == "auto" and total > MEMORY_LIMIT)
        self._clips: dict[int, Clip] = {}
        log.info("%s/%s: %d clips, %d frames, %.1f MB (%s)", self.root, split, len(self.ids),
                 sum(self.lengths), total / 1e6, "memory-mapped" if self.mmap else "in memory")

    def path(self, clip_id: str) -> Path:
        return self.root / "clips" / f"{clip_id}.npz"

    def require_encoder(self, audio: AudioConfig, who: str) -> None:
        """``ValueError`` unless these clips carry ``audio``'s encoder and dimension (``who``: "the teacher")."""
        if (self.audio.encoder, self.audio.dim) != (audio.encoder, audio.dim):
            raise ValueError(f"{who} takes {audio.dim}-d {audio.encoder} audio features but {self.root} holds "
                             f"{self.audio.dim}-d {self.audio.encoder} ones; prepare the data with "
                             f"`dh-train prepare --encoder {audio.encoder}`")

    def __len__(self) -> int:
        return len(self.ids)

    def clip(self, k: int) -> Clip:
        """Clip ``k``, loaded on first use (per process: DataLoader workers each hold their own)."""
        c = self._clips.get(k)
        if c is None:
            c = self._clips[k] = load_clip(self.path(self.ids[k]), mmap=self.mmap, audio=self.with_audio)
        return c


# --------------------------------------------------------------------------- the model's own rollouts

def rollout_path(root: str | os.PathLike, clip_id: str) -> Path:
    """Where ``dh-train rollouts`` writes a clip's generated frames (``training/rollouts.py``)."""
    return Path(root) / "rollouts" / f"{clip_id}.npz"


def load_rollout(root: str | os.PathLike, clip_id: str, n_frames: int) -> np.ndarray:
    """The rollout frames that stand at a clip's positions, uint8 [T, S, S, 3] (T = ``n_frames``): all of a
    rollout as long as the clip, the last T of a longer one (``dh-train rollouts --seconds``); ValueError
    when missing or shorter than the clip."""
    path = rollout_path(root, clip_id)
    if not path.is_file():
        raise ValueError(f"data.motion_rollout_prob > 0 but {path} is missing; run `dh-train rollouts CKPT "
                         f"--data {root}` first")
    with np.load(path) as z:
        frames = z["frames"]
    if len(frames) < n_frames:
        raise ValueError(f"{path} has {len(frames)} frames but its clip has {n_frames}; write the rollouts again")
    return frames[len(frames) - n_frames:]


# --------------------------------------------------------------------------- samples

def _frame(clip: Clip, j: int, size: int) -> torch.Tensor:
    """Frame ``j`` as float32 [3, size, size] in [-1, 1] (area-resized if stored at another size)."""
    return _frame_of(clip.frames, j, size)


def _frame_of(frames: np.ndarray, j: int, size: int) -> torch.Tensor:
    rgb = np.array(frames[j])  # a copy: memory-mapped frames are read-only
    if rgb.shape[0] != size:
        import cv2

        interp = cv2.INTER_AREA if rgb.shape[0] > size else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (size, size), interpolation=interp)
    return to_tensor(rgb)[0]


class FrameDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by ``(clip, target, identity)`` triples (from ``StepBatchSampler``).

    Items: ``x0`` [3, S, S] (target frame), ``identity`` [3, S, S], ``motion`` [M*c, S, S] oldest
    first, ``audio`` [2w+1, D] float32, ``lip_box`` [4] int64 (x0, y0, x1, y1; end exclusive), all in
    [-1, 1] at ``model.image_size``. With ``rollouts``: also ``motion_rollout`` [M*c, S, S], the same
    positions' frames of the clip's rollout (``dh-train rollouts``; the identity where a clip has none).
    """

    def __init__(self, store: ClipStore, model: ModelConfig, loss: LossConfig, rollouts: bool = False):
        if store.audio.dim != model.audio_dim:
            raise ValueError(f"clips carry {store.audio.dim}-d {store.audio.encoder} embeddings but "
                             f"model.audio_dim is {model.audio_dim}; set model.audio_dim = {store.audio.dim}")
        self.store, self.model, self.loss = store, model, loss
        self.scale = model.image_size / store.size
        self.lip_pad = lip_pad_pixels(loss, model.image_size)
        self.rollouts = None
        if rollouts:
            self.rollouts = [load_rollout(store.root, i, n) for i, n in zip(store.ids, store.lengths)]

    def __len__(self) -> int:
        return sum(self.store.lengths)

    def __getitem__(self, spec: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        k, target, ident = spec
        clip = self.store.clip(k)
        size = self.model.image_size
        identity = _frame(clip, ident, size)
        before = motion_indices(target, self.model.motion_frames)
        audio = torch.from_numpy(clip.audio_emb[audio_indices(target, len(clip), self.model.audio_window)]).float()
        lip_from = target if self.loss.lip_frame == "target" else ident
        box = pad_box(clip.mouth_boxes[lip_from] * self.scale, self.lip_pad, size)
        item = {"x0": _frame(clip, target, size), "identity": identity,
                "motion": self._motion(clip.frames, before, identity), "audio": audio,
                "lip_box": torch.tensor(box, dtype=torch.int64)}
        if self.rollouts is not None:
            item["motion_rollout"] = self._motion(self.rollouts[k], before, identity)
        return item

    def _motion(self, frames: np.ndarray, before: list[int], identity: torch.Tensor) -> torch.Tensor:
        size = self.model.image_size
        motion = [identity if j < 0 else _frame_of(frames, j, size) for j in before]
        return motion_transform(torch.stack(motion), self.model.grayscale_motion).flatten(0, 1)


def preview_inputs(store: ClipStore, model: ModelConfig, n_frames: int, clip: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray | None]:
    """Inputs for a sample video: identity frame 0 [1, 3, S, S], audio embeddings [N, D], the real
    frames [N, 3, S, S] and the matching 16 kHz float audio (or None), N = min(n_frames, clip length)."""
    c = store.clip(clip)
    n = min(n_frames, len(c))
    real = torch.stack([_frame(c, j, model.image_size) for j in range(n)])
    audio = None
    if c.audio is not None:
        audio = c.audio[: n * store.audio.samples_per_frame].astype(np.float32) / 32767.0
    return real[:1], torch.from_numpy(np.asarray(c.audio_emb[:n])).float(), real, audio


def training_record(store: ClipStore, prior: dict | None = None) -> dict:
    """What a model was trained on, for its checkpoint's ``meta["trained_on"]`` and a bundle's manifest:
    ``{"speakers": [...], "clips": [...]}`` (sorted), the union with ``prior`` (the record of the
    checkpoint a run started from: a fine-tune or a student has seen its teacher's speakers too).

    A held-out study refuses a clip whose speaker or clip name is listed here.
    """
    prior = prior or {}
    return {"speakers": sorted(set(prior.get("speakers", ())) | set(store.speakers)),
            "clips": sorted(set(prior.get("clips", ())) | set(store.ids))}
