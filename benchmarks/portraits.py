"""Does a model keep a face it was not trained on, with no box where its mouth mask is? Photos, no real video.

For each face image: ``dh-run``'s crop, the given speech, the engine's default sampling (or the one given),
written to mp4 and decoded as a user gets it. Scored per face:

* ``mouth_spread`` and ``sync`` (``metrics.mouth_motion``, ``metrics.speech_sync`` with the speech): the mouth
  must move with the speech on a photo too;
* ``identity_ssim_upper``: SSIM of each frame's upper half (eyes, hair, brow: no mouth) to the identity's,
  the mean over frames: 1 is the photo's own eyes and texture;
* ``mask_seam``: how much more the frame differs from the identity just inside the edges of the model's
  motion-frame mask box (left, right, lower) than just outside them, the largest of the three (mean
  absolute difference, levels of 255; cheeks and chin bands barely move when a face talks, so a box the
  network leaves on the output shows as a step there);
* ``color_drift``: the frames' mean colour against the identity's.

A strip (``--strip``) shows each face's frames at ten times with the mouth enlarged, for the eyes to judge.
Usage: ``python -m dheads.benchmarks.portraits FACE... --speech S.wav [--engine E] --strip F.png --out F.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from dheads.benchmarks import metrics as M
from dheads.benchmarks.heldout_study import _generate, _uint8, _write_png, comparison_strip, roundtrip_mp4
from dheads.engine.pipeline import TalkingHead

log = logging.getLogger(__name__)
SEAM_BAND = 0.06  # the bands' height, a fraction of the frame


def mask_seam(frames: np.ndarray, identity: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """The largest step at the mask box's left, right and lower edges: mean |frame - identity| in a band just
    inside the edge minus that in the band just outside it (along the box's own extent), levels of 255; near
    0 with no box on the output. An edge with no room for its outside band (a box that reaches the frame's
    border) is no edge on the output and is skipped; NaN when no edge is left."""
    h, w = identity.shape[:2]
    x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)
    bh, bw = max(1, int(SEAM_BAND * h)), max(1, int(SEAM_BAND * w))
    diff = np.abs(frames.astype(np.float32) - identity.astype(np.float32)).mean(axis=(0, 3))
    steps = []
    if y1 + bh <= h:  # lower edge
        steps.append(diff[y1 - bh:y1, x0:x1].mean() - diff[y1:y1 + bh, x0:x1].mean())
    if x0 - bw >= 0:  # left edge
        steps.append(diff[y0:y1, x0:x0 + bw].mean() - diff[y0:y1, x0 - bw:x0].mean())
    if x1 + bw <= w:  # right edge
        steps.append(diff[y0:y1, x1 - bw:x1].mean() - diff[y0:y1, x1:x1 + bw].mean())
    return float(max(steps)) if steps else float("nan")


def identity_ssim_upper(frames: np.ndarray, identity: np.ndarray) -> float:
    """Mean SSIM of the frames' upper halves to the identity's."""
    half = identity.shape[0] // 2
    return float(np.mean([M.ssim(f[:half], identity[:half]) for f in frames]))


def score_face(frames: np.ndarray, identity: np.ndarray, loud: np.ndarray, fps: int,
               box: tuple[float, float, float, float] | None) -> dict[str, Any]:
    from dheads.benchmarks.evaluate import mouth_signal

    mouth = mouth_signal(list(frames))
    sync = M.speech_sync(mouth, loud)
    color = M.color_metrics(frames, fps, identity=identity)
    return {"frames": len(frames), "mouth_spread": M.mouth_motion(mouth, fps).spread, "sync": sync.corr,
            "sync_lag": sync.lag, "identity_ssim_upper": identity_ssim_upper(frames, identity),
            "mask_seam": mask_seam(frames, identity, box) if box else None, "color_drift": color.drift_mean,
            "color_flicker": color.flicker}


def portraits(faces: list[Path], speech: Path, engine: str | None, *, seed: int = 0, strip: Path | None = None,
              **sampling) -> dict:
    """``sampling``: the ``SamplerConfig`` fields chosen over the engine's default (``SamplerConfig.override``; the plan checks the steps against the model)."""
    head = TalkingHead.open(engine)
    sampler = head.default_sampler.override(**sampling)
    fps, rate = head.info.audio.fps, head.info.audio.sample_rate
    box = tuple(head.info.model.motion_mask) if head.info.model.motion_mask else None
    rows, shown = {}, {}
    for face in faces:
        inputs = head.prepare(face, speech)
        ident = _uint8(inputs.identity)
        frames = roundtrip_mp4(_generate(head, inputs, sampler, seed), fps)
        loud = M.loudness_envelope(inputs.samples, rate, n_frames=len(frames), fps=fps)
        rows[face.stem] = score_face(frames, ident, loud, fps, box)
        shown[face.stem] = np.concatenate([ident[None], frames])
        log.info("%s: %s", face.stem, {k: round(v, 3) for k, v in rows[face.stem].items()
                                       if isinstance(v, float)})
    if strip is not None:
        n = min(len(f) for f in shown.values())
        _write_png(strip, comparison_strip(shown, [0, *np.linspace(1, n - 1, 9).astype(int).tolist()]))
    return {"engine": str(engine or "demo"), "sampler": sampler.to_dict(), "seed": seed, "speech": speech.name,
            "measured_on": "decoded mp4 (H.264, as dh-run writes)", "mask_box": box, "faces": rows}


def main(faces: list[Path], speech: Path = typer.Option(..., help="the speech that drives every face"),
         engine: Optional[str] = typer.Option(None), seed: int = 0,
         sampler: Optional[str] = typer.Option(None, help="default: the engine's"),
         steps: Optional[int] = typer.Option(None), spacing: Optional[str] = typer.Option(None),
         frame_noise: Optional[str] = typer.Option(None),
         strip: Optional[Path] = typer.Option(None, help="PNG: each face's identity then nine frames, mouths "
                                                         "enlarged"),
         out: Optional[Path] = typer.Option(None, help="JSON with every score")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = portraits(faces, speech, engine, seed=seed, strip=strip, name=sampler, steps=steps, spacing=spacing,
                       frame_noise=frame_noise)
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
    typer.echo(table_markdown(result))


def table_markdown(result: dict) -> str:
    keys = ("mouth_spread", "sync", "identity_ssim_upper", "mask_seam", "color_drift")
    lines = ["| face | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in result["faces"].items():
        cells = ["-" if row[k] is None else f"{row[k]:.3f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    typer.run(main)
