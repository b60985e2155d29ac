"""Does a model talk on speakers it never saw? Measured on the mp4 a user gets, against two baselines.

For each held-out clip: its first frame (cropped by ``dh-run``'s rule) is the identity and its own
soundtrack the audio. Four videos are made, each written to mp4 the way ``dh-run`` writes one (H.264,
the engine's crf) and decoded again, so encoder-removed grain does not count:

* ``real``: the real clip (the prepared clip from ``--data``: training framing, the model's size);
* ``generated``: the model driven by the clip's own speech, once per seed;
* ``still``: the identity frame repeated (a photo);
* ``shuffled``: the model driven by another clip's speech, a different one for each seed (the clips after
  it in turn, ``shuffle_source``; ``controls`` add speech to draw from).

Each is scored against the clip's own speech (``score_video``): mouth motion (the 5-95% spread of
MediaPipe's mouth opening and its std per second, as ratios to the real clip's), the mouth-vs-speech
correlation at the best lag within +-5 frames (the lag is the AV offset), the correlation with the other
clips' speech, OFM and F-MSE as ratios to real video (judged two-sided), and colour flicker and drift.
``talk_gate.judge`` then says whether each variant talks: the generated video must, the baselines must not;
the generated video's long runs must also end as they started (``talk_gate.long_run_rule``).

A clip counts as held out only when neither its speaker (from the prepared data's index) nor its name
is among those that trained the model (the bundle manifest's ``training`` record, or a checkpoint's
``meta["trained_on"]``); otherwise the study refuses it (``--allow-trained`` measures it anyway, marked).

Long run (``--long-seconds``, default 10; at every seed unless ``--no-long-all-seeds``): the clip's speech
followed by the other clips', in one go; per 1-s bucket the colour drift, the grain (mean squared Laplacian
of the luma) and the local shading drift (``metrics.local_drift``). Strips (``--strips``): real vs generated vs
shuffled at the same times, each with its mouth enlarged; and the first seed's long run: the identity + one
frame a second.

Usage: ``python -m dheads.benchmarks.heldout_study CLIPS... --data PREPARED [--engine E] [--seed 0 --seed 1]
--out F.json [--table F.md] [--strips DIR]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any, Optional

import cv2
import numpy as np
import typer

from dheads.engine.audio import load_audio
from dheads.engine.backends.base import BackendError
from dheads.engine.config import SamplerConfig
from dheads.engine.pipeline import Inputs, TalkingHead
from dheads.engine.video import read_frames, write_mp4

from . import metrics as M
from .evaluate import mouth_signal
from .talk_gate import VARIANTS, TalkGate, judge

log = logging.getLogger(__name__)


class StudyError(ValueError):
    """A study that cannot be run as asked (a clip that is not held out, missing data); one line."""


# ----------------------------------------------------------------------------- small pieces


def grain(frames: np.ndarray) -> np.ndarray:
    """[N]: mean squared Laplacian of each frame's luma (0..255): high-frequency energy."""
    out = []
    for f in frames:
        y = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY).astype(np.float64)
        out.append(float((cv2.Laplacian(y, cv2.CV_64F) ** 2).mean()))
    return np.asarray(out)


def per_second(values: np.ndarray, fps: int) -> list[float]:
    return [float(values[i:i + fps].mean()) for i in range(0, len(values), fps)]


def roundtrip_mp4(frames: np.ndarray, fps: int = 25) -> np.ndarray:
    """``uint8 [N, H, W, 3]`` -> the same frames after an mp4 round trip, written as ``dh-run`` writes them."""
    with tempfile.TemporaryDirectory(prefix="dh-study-") as tmp:
        path = Path(tmp) / "video.mp4"
        write_mp4(path, frames, fps=fps)
        return np.stack(list(read_frames(path)))


def study_sampler(default: SamplerConfig, sampler: SamplerConfig | None = None, frame_noise: str | None = None,
                  warm_steps: int = 0) -> SamplerConfig:
    """What the study samples with: ``sampler``, else the engine's ``default`` (its recorded sampler, steps
    and frame noise, as ``dh-run`` would use); ``frame_noise`` and ``warm_steps`` (when given; 0 = not given)
    over it, by ``SamplerConfig.override``, the merge dh-run uses."""
    return (sampler or default).override(frame_noise=frame_noise, warm_steps=warm_steps or None)


def not_held_out(training: dict, clip: str, speaker: str | None) -> str | None:
    """Why ``clip`` (a file stem) with ``speaker`` is not held out from a model trained on ``training``
    (``{"speakers": [...], "clips": [...]}``), or None when it is."""
    if speaker is not None and speaker in set(training.get("speakers", ())):
        return f"its speaker {speaker!r} trained the model"
    if clip in {Path(c).name for c in training.get("clips", ())}:
        return f"clip {clip!r} trained the model"
    return None


def training_of(head: TalkingHead) -> dict | None:
    """The engine's training record (what trained it), or None where it records none."""
    if head.info.manifest is not None:
        return head.info.manifest.training or None
    from dheads.engine.checkpoint import load_checkpoint

    return load_checkpoint(head.info.path).meta.get("trained_on")


# ----------------------------------------------------------------------------- prepared data


def _data_index(data: Path) -> dict[str, dict]:
    """File stem -> the prepared clip's index entry (``id``, ``speaker``, ``split``)."""
    index = data / "index.json"
    if not index.is_file():
        raise StudyError(f"{data}: no index.json; prepare the clips with `dh-train prepare` first")
    return {Path(e["id"]).name: e for e in json.loads(index.read_text())["clips"]}


def _real_frames(data: Path, entry: dict) -> np.ndarray:
    with np.load(data / "clips" / f"{entry['id']}.npz") as z:
        return z["frames"]


def _uint8(identity) -> np.ndarray:
    return (np.clip((identity[0].permute(1, 2, 0).numpy() + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


# ----------------------------------------------------------------------------- scores


def score_video(frames: np.ndarray, loud: np.ndarray, fps: int, *, identity: np.ndarray | None = None,
                real: dict | None = None, other_louds: Sequence[np.ndarray] = ()) -> dict[str, Any]:
    """One video's scores against its clip's speech envelope ``loud`` ``[N]``; ratios to ``real`` (that clip's
    scores; None: the video is the real clip, its ratios 1); ``sync_other_audio``: the mean correlation with ``other_louds`` (other clips' speech)."""
    mouth = mouth_signal(list(frames))
    motion = M.mouth_motion(mouth, fps)
    sync = M.speech_sync(mouth, loud)
    color = M.color_metrics(frames, fps, identity=identity)
    row: dict[str, Any] = {
        "frames": len(frames), **motion.to_dict(), "sync": sync.corr, "sync_lag": sync.lag,
        "sync_curve": [None if math.isnan(r) else float(r) for r in M.sync_curve(mouth, loud, max_lag=M.SYNC_MAX_LAG)],
        "ofm": M.ofm(list(frames)), "fmse": M.fmse(list(frames)),
        "color_flicker": color.flicker, "color_drift": color.drift_mean, "color_drift_max": color.drift_max,
        "mouth": [None if math.isnan(v) else round(float(v), 4) for v in mouth],
    }
    if other_louds:
        row["sync_other_audio"] = mean(M.speech_sync(mouth[: len(o)], o[: len(mouth)]).corr for o in other_louds)
    return row | real_ratios(row, row if real is None else real)


def real_ratios(row: dict, real: dict) -> dict[str, float | None]:
    """``KEY_ratio``: ``row[KEY] / real[KEY]`` for the metrics judged as closeness to real video (the real
    clip's own row gets 1.0)."""
    return {f"{k}_ratio": M.ratio_to_real(row[k], real[k]) for k in ("mouth_spread", "mouth_std_per_s", "ofm", "fmse")}


def _curve_for_judge(row: dict) -> dict:
    return {**row, "sync_curve": [math.nan if r is None else r for r in row["sync_curve"]]}


# ----------------------------------------------------------------------------- strips


def _label(img: np.ndarray, text: str) -> np.ndarray:
    img = np.ascontiguousarray(img)
    cv2.putText(img, text, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
    return img


STRIP_MOUTH = (0.28, 0.5, 0.72, 0.86)  # (x0, y0, x1, y1) fractions of a face crop in the training framing


def mouth_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """The mouth region (``STRIP_MOUTH``) of a face crop, enlarged to ``size`` x ``size``."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = STRIP_MOUTH
    crop = frame[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)


def comparison_strip(rows: dict[str, np.ndarray], times: Sequence[int], tile: int = 128) -> np.ndarray:
    """Rows ``name -> frames [N, H, W, 3]`` at the same frame indices ``times``: for each, the frames and
    below them their mouths enlarged. ``[2 * len(rows) * tile, len(times) * tile, 3]`` RGB."""
    out = []
    for name, frames in rows.items():
        full = [cv2.resize(frames[t], (tile, tile), interpolation=cv2.INTER_NEAREST) for t in times]
        mouths = [mouth_crop(frames[t], tile) for t in times]
        full[0] = _label(full[0], name)
        mouths[0] = _label(mouths[0], "mouth")
        out += [np.concatenate(full, axis=1), np.concatenate(mouths, axis=1)]
    return np.concatenate(out, axis=0)


def _strip(identity: np.ndarray, frames: np.ndarray, fps: int, scale: int = 2) -> np.ndarray:
    tiles = [identity] + [frames[i] for i in range(0, len(frames), fps)]
    row = np.concatenate(tiles, axis=1)
    return cv2.resize(row, (row.shape[1] * scale, row.shape[0] * scale), interpolation=cv2.INTER_NEAREST)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


# ----------------------------------------------------------------------------- the study


def _generate(head: TalkingHead, inputs: Inputs, sampler: SamplerConfig, seed: int) -> np.ndarray:
    return np.stack(list(head.frames(inputs, sampler=sampler, seed=seed)))


def _speech(head: TalkingHead, inputs: Inputs, samples: np.ndarray) -> Inputs:
    """``inputs`` with another speech track (its identity kept)."""
    return Inputs(identity=inputs.identity, samples=samples, audio_emb=head.encoder(samples))


def _long_run(head: TalkingHead, inputs: Inputs, ident: np.ndarray, speech: np.ndarray, sampler: SamplerConfig,
              seed: int, seconds: float, strip: Path | None) -> dict:
    fps, rate = head.info.audio.fps, head.info.audio.sample_rate
    samples = np.concatenate([speech] * int(1 + seconds * rate // max(1, len(speech))))[: int(seconds * rate)]
    frames = _generate(head, _speech(head, inputs, samples), sampler, seed)
    color = M.color_metrics(frames, fps, identity=ident)
    if strip is not None:
        _write_png(strip, _strip(ident, frames, fps))
    return {"seconds": seconds, "color_flicker": color.flicker, "color_drift_per_second": list(color.drift_per_second),
            "grain_per_second": per_second(grain(frames), fps),
            "local_drift_per_second": M.local_drift_per_second(frames, ident, fps),
            "identity_grain": float(grain(ident[None])[0])}


def _check_held_out(clips: Sequence[Path], index: dict[str, dict], training: dict | None,
                    allow_trained: bool) -> dict[str, str | None]:
    """Clip stem -> why it is not held out (None: held out). Raises unless ``allow_trained``."""
    if training is None:
        log.warning("this engine records no training speakers: the clips cannot be checked as held out")
        return {c.stem: "unknown: the engine records no training data" for c in clips}
    reasons = {c.stem: not_held_out(training, c.stem, index[c.stem].get("speaker")) for c in clips}
    bad = {k: v for k, v in reasons.items() if v}
    if bad and not allow_trained:
        k, v = next(iter(bad.items()))
        raise StudyError(f"{k} is not held out: {v}; pass held-out clips (or --allow-trained to measure it anyway)")
    return reasons


def study(clips: list[Path], engine: str | None, *, data: Path, controls: Sequence[Path] = (),
          sampler: SamplerConfig | None = None, frame_noise: str | None = None, warm_steps: int = 0,
          seeds: Sequence[int] = (0,), long_seconds: float = 10.0, strip_dir: Path | None = None,
          allow_trained: bool = False, gate: TalkGate = TalkGate(), backend: str | None = None,
          precision: str = "fp32", long_all_seeds: bool = True) -> dict:
    """The study's JSON document: per clip the four variants' scores, the verdicts, a summary.

    ``controls``: more clips whose speech only drives the shuffled baseline and fills the long run.
    ``sampler`` None: the engine's default (``study_sampler``). ``backend``, ``precision``: what runs the UNet
    (as dh-run's flags; e.g. openvino bf16 to score a reduced precision against the fp32 seed spread).
    ``long_all_seeds``: a long run at every seed (the first seed's alone has a strip), all judged; one
    seed's run can miss a face that breaks up at another seed.
    """
    head = TalkingHead.open(engine, backend=backend, precision=precision)
    sampler = study_sampler(head.default_sampler, sampler, frame_noise, warm_steps)
    fps, rate = head.info.audio.fps, head.info.audio.sample_rate
    index = _data_index(Path(data))
    missing = [c.name for c in clips if c.stem not in index]
    if missing:
        raise StudyError(f"{missing[0]} is not in {data}; prepare it with `dh-train prepare` (as a test speaker)")
    held = _check_held_out(clips, index, training_of(head), allow_trained)
    pool = list(clips) + [c for c in controls if c not in clips]
    if len(pool) < 2:
        raise StudyError("the shuffled-audio baseline needs a second clip's speech: pass another clip or --control")
    speech = {c.stem: load_audio(c)[0] for c in pool}
    scores: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    per_clip: dict[str, Any] = {}
    for k, clip in enumerate(clips):
        inputs = head.prepare(clip, clip)
        ident = _uint8(inputs.identity)
        real_raw = _real_frames(Path(data), index[clip.stem])
        n = min(inputs.n_frames, len(real_raw))
        loud = M.loudness_envelope(speech[clip.stem], rate, n_frames=n, fps=fps)
        others = [M.loudness_envelope(speech[o.stem], rate, n_frames=n, fps=fps) for o in pool if o != clip]
        others_in_pool = [o for o in pool if o != clip]
        real_frames = roundtrip_mp4(real_raw[:n], fps)
        real = score_video(real_frames, loud, fps, identity=ident, other_louds=others)
        rows = {"real": real, "still": score_video(roundtrip_mp4(np.repeat(ident[None], n, 0), fps), loud, fps,
                                                   identity=ident, real=real)}
        gens, shufs, shown = [], [], {}
        for i, seed in enumerate(seeds):
            gen = roundtrip_mp4(_generate(head, inputs, sampler, seed)[:n], fps)
            source = shuffle_source(others_in_pool, pool.index(clip), i)
            shuf = roundtrip_mp4(_generate(head, _speech(head, inputs, speech[source.stem]), sampler, seed)[:n], fps)
            gens.append(score_video(gen, loud, fps, identity=ident, real=real, other_louds=others) | {"seed": seed})
            shufs.append(score_video(shuf, loud, fps, identity=ident, real=real) | {"seed": seed,
                                                                                    "speech_from": source.stem})
            shown = shown or {"real": real_frames, "generated": gen, "shuffled": shuf}
        rows.update(generated=gens, shuffled=shufs)
        for v in VARIANTS:
            scores[v] += [_curve_for_judge(r) for r in (rows[v] if isinstance(rows[v], list) else [rows[v]])]
        per_clip[clip.stem] = {"speaker": index[clip.stem].get("speaker"), "not_held_out": held[clip.stem],
                               "shuffled_speech_from": [r["speech_from"] for r in shufs], **rows}
        if strip_dir is not None:
            times = list(range(0, n, max(1, n // 10)))[:10]
            _write_png(strip_dir / f"{clip.stem}_talk.png", comparison_strip(shown, times))
        if long_seconds > 0:
            order = [clip] + [c for c in pool if c != clip]
            long_speech = np.concatenate([speech[c.stem] for c in order])
            strip = strip_dir / f"{clip.stem}_long.png" if strip_dir is not None else None
            first, *more = [
                _long_run(head, inputs, ident, long_speech, sampler, s, long_seconds, None if i else strip)
                | {"seed": s} for i, s in enumerate(seeds if long_all_seeds else seeds[:1])]
            per_clip[clip.stem]["long"] = first
            if more:
                per_clip[clip.stem]["long_more_seeds"] = more
        log.info("%s: %s", clip.stem, {v: _brief(rows[v]) for v in VARIANTS})
    longs = long_runs_of(per_clip)
    verdicts = {v: judge(scores, v, gate, max_lag=M.SYNC_MAX_LAG, long_runs=longs if v == "generated" else None)
                for v in VARIANTS}
    return {"engine": str(engine or "demo"), "backend": head.info.backend, "precision": head.info.precision,
            "sampler": sampler.to_dict(), "seeds": list(seeds),
            "measured_on": "decoded mp4 (H.264, as dh-run writes)", "gate": dataclasses.asdict(gate),
            "clips": per_clip, "summary": summarize(scores),
            "verdicts": {v: {"talks": d.passed, "failed": d.failures(), "rules": d.rules} for v, d in verdicts.items()}}


def long_runs_of(per_clip: dict[str, Any]) -> dict[str, dict]:
    """Every long run of a study's clips for ``talk_gate.long_run_rule``: ``clip`` (the first seed's) and
    ``clip@seed`` for the others (``long_more_seeds``)."""
    runs = {}
    for stem, row in per_clip.items():
        if "long" in row:
            runs[stem] = row["long"]
        for run in row.get("long_more_seeds", []):
            runs[f"{stem}@{run['seed']}"] = run
    return runs


def shuffle_source(others: Sequence[Path], clip_index: int, seed_index: int) -> Path:
    """Whose speech drives the shuffled baseline of a clip (at ``clip_index`` in the pool) for its
    ``seed_index``-th seed: the clips after it in turn, so several seeds spread the baseline over several
    other sentences (one other sentence can share this one's rhythm by chance)."""
    return others[(clip_index + seed_index) % len(others)]


def _brief(rows) -> str:
    rows = rows if isinstance(rows, list) else [rows]
    return ", ".join(f"spread {r['mouth_spread']:.3f} sync {r['sync']:.2f}@{r['sync_lag']:+d}" for r in rows)


SUMMARY_KEYS = ("mouth_spread", "mouth_spread_ratio", "mouth_std_per_s_ratio", "sync", "sync_other_audio",
                "ofm_ratio", "fmse_ratio", "ofm", "fmse", "color_flicker", "color_drift")


def summarize(scores: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    """Per variant, the mean over clips (and seeds) of each summary key, with min and max of the spread ratio."""
    out = {}
    for variant, rows in scores.items():
        s: dict[str, float | None] = {}
        for key in SUMMARY_KEYS:
            vals = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
            s[key] = mean(vals) if vals else None
        ratios = [r["mouth_spread_ratio"] for r in rows if r.get("mouth_spread_ratio") is not None]
        s["mouth_spread_ratio_min"] = min(ratios) if ratios else None
        s["mouth_spread_ratio_max"] = max(ratios) if ratios else None
        out[variant] = s
    return out


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def table_markdown(result: dict) -> str:
    """The study's summary as a markdown table: the model beside real video and both baselines."""
    head = ("| variant | talks | mouth spread / real (min-max) | mouth std per s / real | sync own speech | "
            "sync other speech | AV offset | OFM / real | F-MSE / real | colour flicker |")
    lines = [head, "|" + "---|" * 10]
    for v in VARIANTS:
        s, verdict = result["summary"][v], result["verdicts"][v]
        lag = verdict["rules"]["AV offset within +-2 frames"]["lag"]
        lines.append(
            f"| {v} | {'yes' if verdict['talks'] else 'no'} | {_fmt(s['mouth_spread_ratio'])} "
            f"({_fmt(s['mouth_spread_ratio_min'])}-{_fmt(s['mouth_spread_ratio_max'])}) | "
            f"{_fmt(s['mouth_std_per_s_ratio'])} | {_fmt(s['sync'])} | {_fmt(s['sync_other_audio'])} | {lag:+d} | "
            f"{_fmt(s['ofm_ratio'])} | {_fmt(s['fmse_ratio'])} | {_fmt(s['color_flicker'], '.3f')} |")
    return "\n".join(lines) + "\n"


def emit(result: dict, out: Path | None, table: Path | None = None) -> None:
    """A study's result as JSON (to ``out``) and its table on stdout (and in ``table``)."""
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    text = table_markdown(result)
    if table:
        table.write_text(text)
    typer.echo(text)


def main(clips: list[Path], data: Path = typer.Option(..., help="prepared clips (dh-train prepare) holding CLIPS: "
                                                      "the real frames, speakers"),
         engine: Optional[str] = typer.Option(None),
         control: Optional[list[Path]] = typer.Option(None, help="a clip whose speech only drives the shuffled "
                                                      "baseline and the long run (repeatable)"),
         out: Optional[Path] = typer.Option(None, help="JSON with every score"),
         table: Optional[Path] = typer.Option(None, help="the summary table as markdown"),
         sampler: Optional[str] = typer.Option(None), steps: Optional[int] = typer.Option(None),
         seed: Optional[list[int]] = typer.Option(None, help="repeatable (default 0)"),
         long_seconds: float = 10.0, strips: Optional[Path] = typer.Option(None),
         frame_noise: Optional[str] = typer.Option(None, help="fresh | repeat | a correlation in (0, 1) "
                                                   "(default: the engine's, or fresh with --sampler and --steps)"),
         warm_steps: int = typer.Option(0, help="warm start"),
         spacing: str = typer.Option("uniform", help="with --sampler and --steps: uniform | karras | trailing"),
         allow_trained: bool = typer.Option(False, help="measure clips whose speaker trained the model (marked)"),
         backend: Optional[str] = typer.Option(None, help="what runs the UNet, as dh-run --backend"),
         precision: str = typer.Option("fp32", help="as dh-run --precision: fp32 | fp16 | bf16 | int8"),
         long_all_seeds: bool = typer.Option(True, help="a long run at every seed, all judged (else the first "
                                             "seed's only)"),
         ) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = SamplerConfig(sampler, steps, spacing=spacing) if sampler and steps else None
    try:
        result = study(clips, engine, data=data, controls=list(control or []), sampler=cfg, frame_noise=frame_noise,
                       warm_steps=warm_steps, seeds=seed or [0], long_seconds=long_seconds, strip_dir=strips,
                       allow_trained=allow_trained, backend=backend, precision=precision,
                       long_all_seeds=long_all_seeds)
    except (StudyError, BackendError) as e:
        typer.echo(f"heldout_study: error: {e}", err=True)
        raise typer.Exit(2) from None
    emit(result, out, table)


if __name__ == "__main__":
    typer.run(main)
