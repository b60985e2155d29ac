"""How a model does on talking-face clips it never saw: colour, smoothness, lip sync, long-run drift.

For each held-out clip: its first frame (cropped by ``dh-run``'s rule) is the identity and its own
soundtrack the audio. Measured on the generated video, beside the real clip where that makes sense:

* ``color_flicker``, ``color_drift``, ``color_drift_max``: ``dh-eval``'s colour metrics
  (``metrics.color_metrics``: levels of 255; drift from the identity frame);
* ``fmse``, ``ofm``: as ``dh-eval`` (0..255 scale; pixels), on the generated frames and on the real
  clip's frames (the prepared clip: training framing, same size);
* lip sync: the ``dh-eval`` proxy against the clip's own audio and against every other clip's audio;
* long run (``--long-seconds``, default 10): the clip's audio followed by the other clips' audio,
  generated in one go; per 1-s bucket the colour drift and the grain (mean squared Laplacian of the
  luma), the local shading drift (``metrics.local_drift``: the worst four of 16x16 block-mean luma changes
  from the identity, mouth left out; it sees a darkening patch that the grain and the mean colour miss), and a
  strip of frames (identity, then one frame a second) as PNG.

Usage: ``python -m dheads.benchmarks.heldout_study CLIPS... --engine E [--data PREPARED] --out F.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from statistics import mean
from typing import Optional

import cv2
import numpy as np
import typer

from dheads.engine.audio import load_audio
from dheads.engine.config import SamplerConfig
from dheads.engine.pipeline import Inputs, TalkingHead

from .evaluate import mouth_signal
from .metrics import color_metrics, fmse, lip_sync_proxy, local_drift_per_second, loudness_envelope, ofm

log = logging.getLogger(__name__)


def grain(frames: np.ndarray) -> np.ndarray:
    """[N]: mean squared Laplacian of each frame's luma (0..255): high-frequency energy."""
    out = []
    for f in frames:
        y = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY).astype(np.float64)
        out.append(float((cv2.Laplacian(y, cv2.CV_64F) ** 2).mean()))
    return np.asarray(out)


def per_second(values: np.ndarray, fps: int) -> list[float]:
    return [float(values[i:i + fps].mean()) for i in range(0, len(values), fps)]


def _real_frames(data: Path | None, clip: str) -> np.ndarray | None:
    if data is None or not (data / "clips" / f"{clip}.npz").is_file():
        return None
    with np.load(data / "clips" / f"{clip}.npz") as z:
        return z["frames"]


def _generate(head: TalkingHead, inputs: Inputs, sampler: SamplerConfig, seed: int) -> np.ndarray:
    return np.stack(list(head.frames(inputs, sampler=sampler, seed=seed)))


def _strip(identity: np.ndarray, frames: np.ndarray, fps: int, scale: int = 2) -> np.ndarray:
    tiles = [identity] + [frames[i] for i in range(0, len(frames), fps)]
    row = np.concatenate(tiles, axis=1)
    return cv2.resize(row, (row.shape[1] * scale, row.shape[0] * scale), interpolation=cv2.INTER_NEAREST)


def study_sampler(default: SamplerConfig, sampler: SamplerConfig | None = None, frame_noise: str | None = None,
                  warm_steps: int = 0) -> SamplerConfig:
    """What the study samples with: ``sampler``, else the engine's ``default`` (its recorded sampler, steps
    and frame noise, as ``dh-run`` would use); ``frame_noise`` and ``warm_steps`` (when given) over it."""
    changes = {"frame_noise": frame_noise} if frame_noise is not None else {}
    if warm_steps:
        changes["warm_steps"] = warm_steps
    return dataclasses.replace(sampler or default, **changes)


def study(clips: list[Path], engine: str | None, *, controls: list[Path] = (), data: Path | None = None,
          sampler: SamplerConfig | None = None, frame_noise: str | None = None, warm_steps: int = 0,
          seed: int = 0, long_seconds: float = 10.0, strip_dir: Path | None = None) -> dict:
    """``controls``: more clips whose audio serves only as the mismatched lip-sync control (and fills the
    long run's audio). ``sampler`` None: the engine's default (``study_sampler``)."""
    head = TalkingHead.open(engine)
    sampler = study_sampler(head.default_sampler, sampler, frame_noise, warm_steps)
    fps, rate = head.info.audio.fps, head.info.audio.sample_rate
    pool = list(clips) + [c for c in controls if c not in clips]
    audio = {c.stem: load_audio(c)[0] for c in pool}
    rows, mouths, loud = {}, {}, {}
    for clip in clips:
        inputs = head.prepare(clip, clip)
        ident = (np.clip((inputs.identity[0].permute(1, 2, 0).numpy() + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
        frames = _generate(head, inputs, sampler, seed)
        real = _real_frames(data, clip.stem)
        mouths[clip.stem] = mouth_signal(list(frames))
        loud[clip.stem] = loudness_envelope(audio[clip.stem], rate, n_frames=len(frames))
        color = color_metrics(frames, fps, identity=ident)
        row = {"frames": len(frames), "color_flicker": color.flicker, "color_drift": color.drift_mean,
               "color_drift_max": color.drift_max, "fmse": fmse(list(frames)), "ofm": ofm(list(frames))}
        if real is not None:
            row.update({"real_color_flicker": color_metrics(real, fps).flicker, "real_fmse": fmse(list(real)),
                        "real_ofm": ofm(list(real)),
                        "real_local_drift_per_second": local_drift_per_second(real, real[0], fps)})
        if long_seconds > 0:
            order = [clip.stem] + [c.stem for c in pool if c != clip]
            samples = np.concatenate([audio[k] for k in order] * int(1 + long_seconds // 2))[: int(long_seconds * rate)]
            long_in = Inputs(identity=inputs.identity, samples=samples, audio_emb=head.encoder(samples))
            long_frames = _generate(head, long_in, sampler, seed)
            long_color = color_metrics(long_frames, fps, identity=ident)
            row["long"] = {"seconds": long_seconds, "color_flicker": long_color.flicker,
                           "color_drift_per_second": list(long_color.drift_per_second),
                           "grain_per_second": per_second(grain(long_frames), fps),
                           "local_drift_per_second": local_drift_per_second(long_frames, ident, fps),
                           "identity_grain": float(grain(ident[None])[0])}
            if strip_dir is not None:
                strip_dir.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(strip_dir / f"{clip.stem}_long.png"),
                            cv2.cvtColor(_strip(ident, long_frames, fps), cv2.COLOR_RGB2BGR))
        rows[clip.stem] = row
        log.info("%s: %s", clip.stem, {k: v for k, v in row.items() if k != "long"})
    for c in pool:
        if c.stem not in loud:
            loud[c.stem] = loudness_envelope(audio[c.stem], rate, n_frames=len(audio[c.stem]) // (rate // fps))
    for name, m in mouths.items():
        rows[name]["lip_own"] = lip_sync_proxy(m, loud[name]).corr
        others = [lip_sync_proxy(m[: len(loud[o])], loud[o][: len(m)]).corr for o in loud if o != name]
        rows[name]["lip_other_mean"] = mean(others) if others else float("nan")
    keys = ("color_flicker", "color_drift", "color_drift_max", "fmse", "ofm", "real_fmse", "real_color_flicker",
            "lip_own", "lip_other_mean")
    summary = {k: mean(r[k] for r in rows.values()) for k in keys if all(k in r for r in rows.values())}
    return {"engine": str(engine or "demo"), "sampler": sampler.to_dict(), "seed": seed, "clips": rows,
            "summary": summary}


def emit(result: dict, out: Path | None) -> None:
    """A study's result as JSON on stdout, and in ``out`` when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    typer.echo(text)


def main(clips: list[Path], engine: Optional[str] = typer.Option(None),
         control: Optional[list[Path]] = typer.Option(None, help="a clip whose audio is only a control (repeatable)"),
         data: Optional[Path] = typer.Option(None),
         out: Optional[Path] = typer.Option(None), sampler: Optional[str] = typer.Option(None),
         steps: Optional[int] = typer.Option(None), seed: int = 0, long_seconds: float = 10.0,
         strips: Optional[Path] = typer.Option(None),
         frame_noise: Optional[str] = typer.Option(None, help="fresh | repeat | a correlation in (0, 1) "
                                                   "(default: the engine's, or fresh with --sampler and --steps)"),
         warm_steps: int = typer.Option(0, help="warm start"),
         spacing: str = typer.Option("uniform", help="with --sampler and --steps: uniform | karras | trailing")
         ) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = SamplerConfig(sampler, steps, spacing=spacing) if sampler and steps else None
    result = study(clips, engine, controls=list(control or []), data=data, sampler=cfg, frame_noise=frame_noise,
                   warm_steps=warm_steps, seed=seed, long_seconds=long_seconds, strip_dir=strips)
    emit(result, out)


if __name__ == "__main__":
    typer.run(main)
