"""Does the generated mouth follow the speech? Own audio vs other clips' audio, on generated video.

For each talking-face clip: take its first frame as the identity and its own soundtrack, generate a
video, measure the generated mouth opening (MediaPipe, on frames upscaled to 256 px), and correlate
it with the loudness of (a) the audio it was generated from and (b) every other clip's audio (the
shuffled control). Usage: ``python -m dheads.benchmarks.lipsync_study CLIPS_DIR [--engine E] --out F.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from statistics import mean

import cv2
import numpy as np
import typer

from dheads.engine.audio import load_audio
from dheads.engine.pipeline import TalkingHead

from .evaluate import frame_signals
from .metrics import lip_sync_proxy, loudness_envelope

log = logging.getLogger(__name__)


def mouth_signal(frames: list[np.ndarray], size: int = 256) -> np.ndarray:
    """Per-frame mouth opening (NaN where no face) on frames upscaled to ``size`` px."""
    big = (cv2.resize(np.ascontiguousarray(f), (size, size), interpolation=cv2.INTER_CUBIC) for f in frames)
    return frame_signals(big)[0]


def study(clips: list[Path], engine: str | None, seed: int = 0) -> dict:
    head = TalkingHead.open(engine)
    d = head.info.diffusion
    from dheads.engine.config import SamplerConfig

    sampler = SamplerConfig(d.sampler, d.sampling_steps)
    loud = {}
    mouths = {}
    for clip in clips:
        inputs = head.prepare(clip, clip)  # identity: the clip's first frame; audio: its soundtrack
        frames = list(head.frames(inputs, sampler=sampler, seed=seed))
        mouths[clip.stem] = mouth_signal(frames)
        loud[clip.stem] = loudness_envelope(load_audio(clip)[0], 16000, n_frames=len(frames))
        log.info("%s: %d frames, face in %d", clip.stem, len(frames), int(np.isfinite(mouths[clip.stem]).sum()))
    rows = {}
    for name, m in mouths.items():
        own = lip_sync_proxy(m, loud[name]).corr
        others = [lip_sync_proxy(m[: len(loud[o])], loud[o][: len(m)]).corr for o in loud if o != name]
        rows[name] = {"own": own, "other_mean": mean(others), "other_max": max(others),
                      "face_fraction": float(np.isfinite(m).mean())}
    summary = {"own_mean": mean(r["own"] for r in rows.values()),
               "other_mean": mean(r["other_mean"] for r in rows.values()),
               "own_beats_other_mean": sum(r["own"] > r["other_mean"] for r in rows.values()), "clips": len(rows)}
    return {"engine": str(engine or "demo"), "sampler": sampler.to_dict(), "seed": seed, "clips": rows,
            "summary": summary}


def main(clips_dir: Path, engine: str = typer.Option(None), out: Path = typer.Option(None), seed: int = 0) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    clips = sorted(p for p in clips_dir.iterdir() if p.suffix.lower() in (".mpg", ".mp4", ".mov"))
    result = study(clips, engine, seed)
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    typer.echo(text)


if __name__ == "__main__":
    typer.run(main)
