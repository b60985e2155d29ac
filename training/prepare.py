"""Preprocess talking-face videos into training clips (``dh-train prepare``).

Per clip: frames at 25 fps (nearest-frame resampling from other rates), MediaPipe landmarks
(tracked, VIDEO mode), ONE square crop per clip from the median landmark box (``face.crop_box``:
it cannot jitter), frames cut and resized to ``size``; per-frame lip boxes from the landmarks,
gaps filled by interpolation and smoothed over ``smooth`` frames; 16 kHz mono audio and its
per-frame embeddings from the chosen encoder.

Alignment: the encoder gives ``num_frames(n_samples) = n_samples // 640`` rows (one per 25 fps
frame); a clip keeps ``T = min(video frames, audio rows)`` frames, rows and ``T * 640`` samples.

Output folder::

    prepare.json          settings + the encoder's AudioConfig (a re-run must match them)
    clips/<id>.npz        one uncompressed npz per clip (members below), written atomically
    failures.jsonl        clips skipped (no face in enough frames, unreadable...) with the reason
    index.json            every finished clip: id, speaker, split, n_frames
    train.txt, test.txt   clip ids per split (by speaker; LRW keeps its own train/val/test)

Clip members: ``frames`` uint8 [T, S, S, 3] RGB; ``mouth_boxes`` float32 [T, 4] (x0, y0, x1, y1) of
the lip landmarks in frame pixels, unpadded; ``face_found`` bool [T]; ``audio_emb`` float32
[T, D]; ``audio`` int16 [T * 640] (16 kHz; only with ``keep_audio``); ``meta`` a JSON string.

Resumable: finished clips (their npz exists) and recorded failures are skipped on a re-run
(``retry_failed`` retries the failures). Parallel over clips in spawned worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dheads.engine.atomic import atomic_write, atomic_write_text
from dheads.engine.audio import load_audio, num_frames
from dheads.engine.config import AudioConfig
from dheads.engine.encoders import default_audio_config

log = logging.getLogger(__name__)

FORMAT = "dheads-clips"
VERSION = 1
VIDEO_SUFFIXES = frozenset({".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v"})
LAYOUTS = ("auto", "crema", "lrw", "grid", "folder")
_CREMA = re.compile(r"^(\d{4})_[A-Z]{3}_[A-Z]{3}_[A-Z]{2}$")
_GRID_SPEAKER = re.compile(r"^s(\d+)(_processed)?$")
_LRW_SPLITS = ("train", "val", "test")


class SkipClip(Exception):
    """A clip that cannot be used (no face in enough frames, too short...): reported, not fatal."""


@dataclass(frozen=True)
class PrepareConfig:
    """Settings that shape the clips. A re-run into the same folder must use the same values."""

    size: int = 128
    fps: int = 25
    audio: AudioConfig = field(default_factory=lambda: default_audio_config("whisper"))
    min_face_fraction: float = 0.9  # skip a clip with a face in fewer of its frames
    min_frames: int = 8
    smooth: int = 3  # lip-box smoothing window, frames (odd; 1 = none)
    keep_audio: bool = True
    layout: str = "auto"
    test_fraction: float = 0.1
    test_speakers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if self.fps != self.audio.fps:
            raise ValueError(f"fps {self.fps} differs from the encoder's {self.audio.fps}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["audio"] = self.audio.to_dict()
        d["test_speakers"] = list(self.test_speakers)
        return d

    def shaping(self) -> dict[str, Any]:
        """The settings that change a clip's content (compared on a re-run)."""
        return {k: v for k, v in self.to_dict().items()
                if k in ("size", "fps", "audio", "min_face_fraction", "min_frames", "smooth", "keep_audio")}


@dataclass(frozen=True)
class ClipSource:
    """One input video: ``id`` is its path relative to the input root, without suffix (posix)."""

    id: str
    path: Path
    speaker: str
    split: str | None = None  # fixed by the layout (LRW), else chosen by speaker


@dataclass
class PrepareReport:
    done: list[str] = field(default_factory=list)  # written in this run
    existing: list[str] = field(default_factory=list)  # already there
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason (this run or recorded earlier)
    splits: dict[str, list[str]] = field(default_factory=dict)


# --------------------------------------------------------------------------- discovering clips

def speaker_and_split(rel: PurePosixPath, layout: str, root_name: str = "root") -> tuple[str, str | None]:
    """Speaker id (and a fixed split, for LRW) from a clip path relative to the input root.

    crema: ``1001_DFA_ANG_XX`` -> 1001; lrw: ``ABOUT/train/ABOUT_00001`` -> speaker unknown (the clip),
    split ``train``; grid: a folder ``s<N>`` on the path -> ``s<N>``; folder: the parent folder's name.
    ``auto`` tries crema, lrw, grid, then folder. Clips directly in the root get ``root_name``.
    """
    stem, parts = rel.stem, rel.parts[:-1]
    if layout in ("auto", "crema"):
        m = _CREMA.match(stem)
        if m:
            return m.group(1), None
        if layout == "crema":
            raise ValueError(f"{rel}: not a CREMA-D file name (SPEAKER_SENTENCE_EMOTION_LEVEL)")
    if layout in ("auto", "lrw"):
        if len(parts) >= 2 and parts[-1] in _LRW_SPLITS and stem.startswith(parts[-2] + "_"):
            return f"{parts[-2]}/{stem}", parts[-1]
        if layout == "lrw":
            raise ValueError(f"{rel}: not an LRW path (WORD/{{train,val,test}}/WORD_NNNNN)")
    if layout in ("auto", "grid"):
        for p in reversed(parts):
            m = _GRID_SPEAKER.match(p)
            if m:
                return f"s{m.group(1)}", None
    return (parts[-1] if parts else root_name), None


def find_clips(source: str | os.PathLike, layout: str = "auto") -> list[ClipSource]:
    """Videos under a folder (recursively, by suffix) or listed in a text file.

    A list file has one video per line, optionally followed by a TAB and the speaker id; relative
    paths are relative to the list file; ``#`` starts a comment.
    """
    source = Path(source)
    if source.is_dir():
        root = source
        entries = [(p, None) for p in sorted(source.rglob("*"))
                   if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
    elif source.is_file():
        entries = []
        for line in source.read_text().splitlines():
            line = line.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            path, _, speaker = line.partition("\t")
            p = Path(path.strip())
            entries.append((p if p.is_absolute() else source.parent / p, speaker.strip() or None))
        root = Path(os.path.commonpath([p.resolve().parent for p, _ in entries])) if entries else source.parent
    else:
        raise FileNotFoundError(f"{source}: no such folder or file list")
    clips, seen = [], set()
    for path, speaker in entries:
        rel = PurePosixPath(Path(os.path.relpath(path.resolve() if source.is_file() else path, root)).as_posix())
        cid = str(rel.with_suffix(""))
        if cid in seen:
            raise ValueError(f"two inputs map to the same clip id {cid!r}; rename one")
        seen.add(cid)
        spk, split = speaker_and_split(rel, layout, root.resolve().name or "root")
        clips.append(ClipSource(cid, path, speaker or spk, split))
    return clips


def split_by_speaker(clips: list[ClipSource], test_fraction: float = 0.1,
                     test_speakers: tuple[str, ...] = ()) -> dict[str, str]:
    """clip id -> split. Layout-given splits are kept; the rest go to ``test`` by speaker.

    ``test_speakers`` if given, else the ``round(test_fraction * n)`` speakers (at least one, and
    never all) that come first when ordered by the SHA-1 of their id: stable when clips are added.
    With a single speaker everything is ``train``.
    """
    free = sorted({c.speaker for c in clips if c.split is None})
    if test_speakers:
        test = set(test_speakers)
    elif len(free) < 2 or test_fraction <= 0:
        test = set()
    else:
        n = min(len(free) - 1, max(1, round(test_fraction * len(free))))
        test = set(sorted(free, key=lambda s: hashlib.sha1(s.encode()).hexdigest())[:n])
    return {c.id: c.split or ("test" if c.speaker in test else "train") for c in clips}


# --------------------------------------------------------------------------- per-clip processing

def resample_indices(n_src: int, fps_src: float, fps_dst: float) -> np.ndarray:
    """Source frame index for each output frame: nearest earlier-or-equal frame at the new rate."""
    if abs(fps_src - fps_dst) < 1e-3:
        return np.arange(n_src)
    n_dst = int(np.floor(n_src * fps_dst / fps_src + 1e-6))
    return np.minimum(np.floor(np.arange(n_dst) * fps_src / fps_dst + 1e-6).astype(np.int64), n_src - 1)


def _frames_at(path: Path, keep: np.ndarray) -> Iterator[np.ndarray]:
    """Decode ``path`` once, yielding the frames whose indices are in ``keep`` (repeats allowed)."""
    from dheads.engine.video import read_frames

    counts = np.bincount(keep, minlength=int(keep.max()) + 1) if len(keep) else np.zeros(0, np.int64)
    for i, frame in enumerate(read_frames(path, max_frames=len(counts))):
        for _ in range(counts[i]):
            yield frame


def fill_and_smooth(landmarks: np.ndarray, window: int = 3) -> np.ndarray:
    """[T, K, 2] with NaN rows (no face) -> gaps filled by linear interpolation over time (edges:
    nearest), then a centred moving average over ``window`` frames (edges replicated)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    t = lm.shape[0]
    found = np.isfinite(lm).all(axis=(1, 2))
    if not found.any():
        raise SkipClip("no face in any frame")
    idx, have = np.arange(t), np.flatnonzero(found)
    nxt = np.clip(np.searchsorted(have, idx), 0, len(have) - 1)
    prv = np.clip(nxt - (have[nxt] > idx), 0, len(have) - 1)
    a, b = have[prv], have[nxt]
    w = np.where(b > a, (idx - a) / np.maximum(b - a, 1), 0.0)[:, None, None]
    out = (1 - w) * lm[a] + w * lm[b]
    if window > 1:
        half = window // 2
        padded = np.concatenate([out[:1].repeat(half, 0), out, out[-1:].repeat(half, 0)])
        csum = np.concatenate([np.zeros_like(out[:1]), np.cumsum(padded, axis=0)])
        out = (csum[window:] - csum[:-window]) / window
    return out


def lip_boxes(landmarks: np.ndarray) -> np.ndarray:
    """[T, 478, 2] MediaPipe landmarks -> [T, 4] float32 (x0, y0, x1, y1) extent of the 40 lip points."""
    from dheads.engine.face import LIPS

    pts = np.asarray(landmarks)[:, list(LIPS)]
    return np.concatenate([pts.min(axis=1), pts.max(axis=1)], axis=1).astype(np.float32)


def to_crop_coords(landmarks: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """Pixel landmarks of the source frame -> pixels of the ``size`` x ``size`` crop of ``box``."""
    x0, y0, side = box
    return (landmarks - np.array([x0, y0], dtype=np.float64)) * (size / side)


def process_clip(src: ClipSource, cfg: PrepareConfig, encoder: Callable[[np.ndarray], Any]) -> dict[str, np.ndarray]:
    """One video -> the arrays of its clip file (see the module docstring). Raises SkipClip."""
    from dheads.engine.face import FaceError, crop_and_resize, crop_box, track_landmarks
    from dheads.engine.video import probe

    info = probe(src.path)
    keep = resample_indices(info.n_frames, info.fps, cfg.fps)
    if len(keep) < cfg.min_frames:
        raise SkipClip(f"{len(keep)} frames at {cfg.fps} fps, fewer than {cfg.min_frames}")
    landmarks = track_landmarks(_frames_at(src.path, keep))
    found = np.isfinite(landmarks).all(axis=(1, 2))
    if found.mean() < cfg.min_face_fraction:
        raise SkipClip(f"face found in {found.sum()}/{len(found)} frames "
                       f"(< {cfg.min_face_fraction:.0%})")
    try:
        box = crop_box(landmarks, (info.height, info.width))
    except FaceError as e:
        raise SkipClip(str(e)) from None
    frames = np.stack([crop_and_resize(f, box, cfg.size) for f in _frames_at(src.path, keep[: len(landmarks)])])
    mouths = lip_boxes(to_crop_coords(fill_and_smooth(landmarks, cfg.smooth), box, cfg.size))

    samples, _ = load_audio(src.path, cfg.audio.sample_rate, cfg.audio.fps)
    emb = np.asarray(encoder(samples), dtype=np.float32)
    if emb.shape[0] != num_frames(samples.size, cfg.audio.samples_per_frame) or emb.shape[1] != cfg.audio.dim:
        raise RuntimeError(f"encoder returned {emb.shape}, expected [{num_frames(samples.size)}, {cfg.audio.dim}]")
    t = min(len(frames), emb.shape[0])
    if t < cfg.min_frames:
        raise SkipClip(f"{t} frames with both video and audio, fewer than {cfg.min_frames}")
    meta = dict(format=FORMAT, version=VERSION, id=src.id, source=str(src.path), speaker=src.speaker,
                n_frames=t, video_frames=len(frames), audio_frames=int(emb.shape[0]), fps=cfg.fps,
                size=cfg.size, crop_box=[int(v) for v in box], source_hw=[info.height, info.width],
                source_fps=info.fps, face_fraction=float(found.mean()), audio=cfg.audio.to_dict())
    out = dict(frames=frames[:t], mouth_boxes=mouths[:t], face_found=found[:t], audio_emb=emb[:t],
               meta=np.array(json.dumps(meta)))
    if cfg.keep_audio:
        spf = cfg.audio.samples_per_frame
        out["audio"] = (np.clip(samples[: t * spf], -1.0, 1.0) * 32767.0).round().astype(np.int16)
    return out


def write_clip(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz atomically (temp file in the same folder, fsync, rename)."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` member of a clip file (reads only that member)."""
    with zipfile.ZipFile(path) as z, z.open("meta.npy") as f:
        return json.loads(str(np.lib.format.read_array(io.BytesIO(f.read()))))


# --------------------------------------------------------------------------- workers

_ENCODER: Callable[[np.ndarray], Any] | None = None


def _worker_encoder(audio: AudioConfig, encoder_path: str | None, threads: int) -> Callable:
    from dheads.engine.encoders import load_encoder

    opts = dict(audio.options)
    if audio.encoder == "whisper" and threads:
        opts.setdefault("threads", threads)
    return load_encoder(dataclasses.replace(audio, options=opts), encoder_path)


def _init_worker(audio: dict, encoder_path: str | None, threads: int) -> None:
    global _ENCODER
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _ENCODER = _worker_encoder(AudioConfig.from_dict(audio), encoder_path, threads)


def _run_one(src: ClipSource, cfg: PrepareConfig, out: Path,
             encoder: Callable | None = None) -> tuple[str, str | None, dict | None]:
    """(id, failure reason or None, meta). Never raises for a bad clip."""
    try:
        arrays = process_clip(src, cfg, encoder or _ENCODER)
    except SkipClip as e:
        return src.id, str(e), None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a broken file must not end the run
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return src.id, f"{type(e).__name__}: {first[:300]}", None
    write_clip(clip_path(out, src.id), arrays)
    return src.id, None, json.loads(str(arrays["meta"]))


def clip_path(out: Path, clip_id: str) -> Path:
    return out / "clips" / f"{clip_id}.npz"


# --------------------------------------------------------------------------- the run

def _check_settings(out: Path, cfg: PrepareConfig) -> None:
    settings = out / "prepare.json"
    if settings.is_file():
        old = json.loads(settings.read_text())
        if old.get("shaping") != cfg.shaping():
            raise ValueError(f"{out} was prepared with different settings ({old.get('shaping')}); "
                             "use a new output folder or the same settings")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings, json.dumps({"format": FORMAT, "version": VERSION, "shaping": cfg.shaping(),
                                            "settings": cfg.to_dict(), "audio": cfg.audio.to_dict()}, indent=2))


def _read_failures(out: Path) -> dict[str, str]:
    path = out / "failures.jsonl"
    failed = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                failed[rec["id"]] = rec["reason"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill
    return failed


def _progress(enabled: bool, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeRemainingColumn(), disable=not enabled)
    return progress, progress.add_task("clips", total=total, note="")


def prepare(source: str | os.PathLike, out: str | os.PathLike, cfg: PrepareConfig = PrepareConfig(), *,
            jobs: int = 1, encoder_path: str | None = None, retry_failed: bool = False,
            progress: bool = True, encoder: Callable[[np.ndarray], Any] | None = None) -> PrepareReport:
    """Preprocess every video under ``source`` into ``out`` (see the module docstring).

    ``jobs``: worker processes (1 = in this process). ``encoder``: an already-built audio encoder
    (only with ``jobs=1``; by default one is loaded from ``cfg.audio`` and ``encoder_path``).
    """
    out = Path(out)
    clips = find_clips(source, cfg.layout)
    if not clips:
        raise FileNotFoundError(f"{source}: no videos found ({', '.join(sorted(VIDEO_SUFFIXES))})")
    _check_settings(out, cfg)
    report = PrepareReport()
    recorded = _read_failures(out)
    metas: dict[str, dict] = {}
    todo = []
    for c in clips:
        path = clip_path(out, c.id)
        if path.is_file():
            report.existing.append(c.id)
            metas[c.id] = read_meta(path)
        elif c.id in recorded and not retry_failed:
            report.failed[c.id] = recorded[c.id]
        else:
            todo.append(c)
    log.info("%d clips: %d to do, %d done before, %d failed before", len(clips), len(todo),
             len(report.existing), len(report.failed))
    failures = open(out / "failures.jsonl", "a")
    bar, task = _progress(progress, len(todo))
    try:
        with bar:
            for cid, reason, meta in _execute(todo, cfg, out, jobs, encoder_path, encoder):
                if reason is None:
                    report.done.append(cid)
                    metas[cid] = meta
                else:
                    report.failed[cid] = reason
                    log.warning("skipped %s: %s", cid, reason)
                    failures.write(json.dumps({"id": cid, "reason": reason}) + "\n")
                    failures.flush()
                bar.update(task, advance=1, note=f"{len(report.failed)} skipped")
    finally:
        failures.close()
    _write_index(out, clips, metas, cfg, report)
    return report


def _execute(todo: list[ClipSource], cfg: PrepareConfig, out: Path, jobs: int, encoder_path: str | None,
             encoder: Callable | None) -> Iterator[tuple[str, str | None, dict | None]]:
    if not todo:
        return
    if jobs <= 1:
        enc = encoder or _worker_encoder(cfg.audio, encoder_path, 0)
        for c in todo:
            yield _run_one(c, cfg, out, enc)
        return
    if encoder is not None:
        raise ValueError("a prebuilt encoder works only with jobs=1")
    ctx = multiprocessing.get_context("spawn")  # MediaPipe and torch threads do not survive fork
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                initargs=(cfg.audio.to_dict(), encoder_path, 1)) as pool:
        futures = [pool.submit(_run_one, c, cfg, out) for c in todo]
        try:
            for fut in cf.as_completed(futures):
                yield fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _write_index(out: Path, clips: list[ClipSource], metas: dict[str, dict], cfg: PrepareConfig,
                 report: PrepareReport) -> None:
    splits = split_by_speaker(clips, cfg.test_fraction, cfg.test_speakers)
    index = []
    for c in clips:
        if c.id in metas:
            index.append({"id": c.id, "speaker": c.speaker, "split": splits[c.id],
                          "n_frames": metas[c.id]["n_frames"]})
    names = sorted({"train", "test"} | {e["split"] for e in index})
    report.splits = {s: [e["id"] for e in index if e["split"] == s] for s in names}
    atomic_write_text(out / "index.json", json.dumps({"format": FORMAT, "version": VERSION,
                                                  "audio": cfg.audio.to_dict(), "size": cfg.size,
                                                  "fps": cfg.fps, "clips": index}, indent=1))
    for s, ids in report.splits.items():
        atomic_write_text(out / f"{s}.txt", "".join(i + "\n" for i in ids))


__all__ = ["PrepareConfig", "ClipSource", "PrepareReport", "SkipClip", "prepare", "process_clip",
           "find_clips", "speaker_and_split", "split_by_speaker", "lip_boxes", "fill_and_smooth",
           "to_crop_coords", "resample_indices", "read_meta", "write_clip", "clip_path"]
