"""Does the generated mouth follow the speech? Own audio vs other clips' audio, on generated video.

For each talking-face clip: take its first frame as the identity and its own soundtrack, generate a
video, and correlate its mouth opening with its own audio and with every other clip's audio (the
shuffled control): ``heldout_study.study`` over all the clips, without the long run.
Usage: ``python -m dheads.benchmarks.lipsync_study CLIPS_DIR [--engine E] --out F.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from .heldout_study import emit, study


def main(clips_dir: Path, engine: str = typer.Option(None), out: Path = typer.Option(None), seed: int = 0) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    clips = sorted(p for p in clips_dir.iterdir() if p.suffix.lower() in (".mpg", ".mp4", ".mov"))
    emit(study(clips, engine, seed=seed, long_seconds=0), out)


if __name__ == "__main__":
    typer.run(main)
