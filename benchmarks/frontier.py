"""The quality-vs-calls frontier: every sampler at 2..100 UNet calls per frame on held-out talking-face clips.

For each clip the identity is its first frame and the speech its own soundtrack. Per run: colour
flicker (frame-to-frame change of the mean colour) and colour drift (mean colour against the identity
frame), F-MSE and OFM of the video beside the real clip's, the lip-sync proxy (MediaPipe mouth opening
vs loudness) and the speed. The reference (DDPM at 100 steps) is run with several seeds; a candidate
matches when every quality metric lies within the reference's run-to-run spread, and the fewest calls
per frame that match is the real-time choice. JSON + markdown table + PNG plot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dheads.benchmarks import metrics as M
from dheads.engine.config import SamplerConfig

log = logging.getLogger(__name__)
QUALITY = ("flicker", "colour_drift", "fmse", "ofm", "lip_corr")


@dataclass(frozen=True)
class FrontierConfig:
    """What the frontier runs: samplers x calls per frame, warm-start rows, reference seeds, clip length."""

    samplers: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m", "unipc")
    calls: tuple[int, ...] = (2, 3, 4, 6, 8, 10, 15, 20, 25, 50, 100)
    warm: tuple[int, ...] = (2, 4, 6)  # warm-start rows: warm_sampler at warm_base steps, these calls
    warm_sampler: str = "dpmpp_2m"
    warm_base: int = 20
    reference: tuple[str, int] = ("ddpm", 100)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_seconds: float | None = 3.0
    face: bool = True

    def runs(self) -> list[SamplerConfig]:
        rows = [SamplerConfig(name, n) for name in self.samplers for n in self.calls]
        rows += [SamplerConfig(self.warm_sampler, self.warm_base, warm_steps=w) for w in self.warm]
        return rows


def colour_stats(frames: np.ndarray, identity: np.ndarray) -> dict[str, float]:
    """frames: uint8 [N, S, S, 3]; identity uint8 [S, S, 3]. Flicker: mean over i of the largest channel
    change of the mean colour between frames i-1 and i; drift: the same against the identity frame."""
    m = frames.reshape(len(frames), -1, 3).astype(np.float64).mean(axis=1)
    ref = identity.reshape(-1, 3).astype(np.float64).mean(axis=0)
    flicker = float(np.abs(np.diff(m, axis=0)).max(axis=1).mean()) if len(m) > 1 else 0.0
    return {"flicker": flicker, "colour_drift": float(np.abs(m - ref).max(axis=1).mean())}


def video_metrics(frames: np.ndarray, identity: np.ndarray, samples: np.ndarray, face: bool) -> dict[str, float]:
    """Quality metrics of one generated video (uint8 [N, S, S, 3]) with its 16 kHz speech."""
    out = colour_stats(frames, identity)
    out["fmse"], out["ofm"] = M.fmse(list(frames)), M.ofm(list(frames))
    if face:
        from .evaluate import mouth_signal

        loud = M.loudness_envelope(samples, 16000, n_frames=len(frames))
        out["lip_corr"] = float(M.lip_sync_proxy(mouth_signal(list(frames)), loud).corr)
    return out


def real_frames(clip: Path, size: int, face: bool, n: int) -> np.ndarray:
    """The clip's first ``n`` frames cropped like the identity frame (face box of frame 0), uint8."""
    from dheads.engine.face import FaceLandmarker, crop_and_resize, crop_box, detect_faces, single_face
    from dheads.engine.image import center_square
    from dheads.engine.video import read_frames

    frames = list(read_frames(clip, max_frames=n))
    if face:
        lm = FaceLandmarker(max_faces=2)
        try:
            box = crop_box(single_face(detect_faces(lm, frames[0]), clip).landmarks, frames[0].shape[:2])
        finally:
            lm.close()
    else:
        box = center_square(frames[0])
    return np.stack([crop_and_resize(f, box, size) for f in frames])


def run_one(head, inputs, sampler: SamplerConfig, seed: int, face: bool) -> dict[str, float]:
    """Generate one video and measure it; ``s_per_frame`` is wall time over frames (incl. the first)."""
    t0 = time.perf_counter()
    frames = np.stack(list(head.frames(inputs, sampler=sampler, seed=seed)))
    dt = time.perf_counter() - t0
    ident = ((inputs.identity[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    row = video_metrics(frames, ident, inputs.samples, face)
    row["s_per_frame"] = dt / len(frames)
    return row


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def frontier(head, clips: list[Path], cfg: FrontierConfig, previous: dict | None = None) -> dict:
    """Run the reference seeds and every candidate on ``clips``; return the JSON document.

    ``previous``: a document of an earlier run on the same engine, clips and settings (reference sampler,
    seeds, length, face): its reference and rows are kept and only the rows it lacks are run.
    """
    inputs = [head.prepare(c, c, crop="auto" if cfg.face else "none", max_seconds=cfg.max_seconds) for c in clips]
    if previous is not None:
        _check_same_setting(previous, clips, cfg)
        real, ref = previous["real"], previous["reference"]
        rows = [{**r, "matches_reference": matches(r, ref)} for r in previous["rows"]]  # today's rule
    else:
        real, ref, rows = _real(clips, inputs, head.info.model.image_size, cfg), _reference(head, inputs, cfg), []
    done = {(r["sampler"], r["steps"], r["warm_steps"]) for r in rows}
    for sampler in cfg.runs():
        if (sampler.name, sampler.steps, sampler.warm_steps) in done:
            continue
        calls = sampler.warm_steps or sampler.steps
        m = _mean_rows([run_one(head, x, sampler, cfg.seeds[0], cfg.face) for x in inputs])
        row = {"sampler": sampler.name, "steps": sampler.steps, "warm_steps": sampler.warm_steps,
               "calls_per_frame": calls, **m}
        row["matches_reference"] = matches(row, ref)
        rows.append(row)
        log.info("%s %d (warm %d): %s", sampler.name, sampler.steps, sampler.warm_steps, row)
    config = dataclasses.asdict(cfg)
    if previous is not None:  # the rows now cover both runs' samplers and calls
        config = {**config, "samplers": sorted({r["sampler"] for r in rows}),
                  "calls": sorted({r["steps"] for r in rows if not r["warm_steps"]})}
    return {"clips": [c.stem for c in clips], "config": config, "real": real,
            "reference": ref, "rows": rows, "realtime": fewest_matching(rows)}


def _real(clips: list[Path], inputs, size: int, cfg: FrontierConfig) -> dict:
    real = {}
    for c, x in zip(clips, inputs):
        r = real_frames(c, size, cfg.face, x.n_frames)
        real[c.stem] = {"fmse": M.fmse(list(r)), "ofm": M.ofm(list(r))}
    return real


def _reference(head, inputs, cfg: FrontierConfig) -> dict:
    ref_cfg = SamplerConfig(*cfg.reference)
    ref_runs = [_mean_rows([run_one(head, x, ref_cfg, s, cfg.face) for x in inputs]) for s in cfg.seeds]
    return {"sampler": ref_cfg.to_dict(), "seeds": list(cfg.seeds), "runs": ref_runs, "mean": _mean_rows(ref_runs),
            "spread": {k: max(r[k] for r in ref_runs) - min(r[k] for r in ref_runs) for k in ref_runs[0]}}


def _check_same_setting(previous: dict, clips: list[Path], cfg: FrontierConfig) -> None:
    """ValueError (one line) unless ``previous`` was measured on these clips with these settings."""
    old = previous["config"]
    want = {"clips": [c.stem for c in clips], "reference": list(cfg.reference), "seeds": list(cfg.seeds),
            "max_seconds": cfg.max_seconds, "face": cfg.face}
    got = {"clips": previous["clips"], "reference": list(old["reference"]), "seeds": list(old["seeds"]),
           "max_seconds": old["max_seconds"], "face": old["face"]}
    diff = sorted(k for k in want if want[k] != got[k])
    if diff:
        raise ValueError(f"--extend: the earlier run differs in {', '.join(diff)} "
                         f"({', '.join(f'{k}={got[k]}' for k in diff)}); rerun it whole")


# Differences no viewer can see: a tenth of a level of 255 in a frame's mean colour. Without it a model whose
# colour is pinned (the identity colour anchor: flicker ~0.009 levels for every seed) matches nothing,
# its seeds' colour spread being ~0.0005 levels.
MATCH_FLOOR = {"flicker": 0.1, "colour_drift": 0.1}


def matches(row: dict, ref: dict) -> bool:
    """Every quality metric present within the reference seeds' range (min..max), or within one range (at
    least ``MATCH_FLOOR``) of their mean."""
    lo = {k: min(r[k] for r in ref["runs"]) for k in ref["runs"][0]}
    hi = {k: max(r[k] for r in ref["runs"]) for k in ref["runs"][0]}
    return all(lo[k] <= row[k] <= hi[k]
               or abs(row[k] - ref["mean"][k]) <= max(ref["spread"][k], MATCH_FLOOR.get(k, 0.0))
               for k in QUALITY if k in row and k in lo)


def fewest_matching(rows: list[dict]) -> dict | None:
    """The matching row with the fewest calls per frame (then the fastest)."""
    ok = [r for r in rows if r["matches_reference"]]
    return min(ok, key=lambda r: (r["calls_per_frame"], r["s_per_frame"])) if ok else None


def markdown(doc: dict) -> str:
    keys = [k for k in QUALITY if k in doc["reference"]["mean"]]
    head = "| sampler | steps | warm | calls/frame | " + " | ".join(keys) + " | ms/frame | matches DDPM-100 |"
    lines = [head, "|" + "---|" * (len(keys) + 6)]
    ref = doc["reference"]
    lines.append(f"| {ref['sampler']['name']} (ref, {len(ref['seeds'])} seeds) | {ref['sampler']['steps']} | 0 | "
                 f"{ref['sampler']['steps']} | " + " | ".join(f"{ref['mean'][k]:.3f} ± {ref['spread'][k] / 2:.3f}"
                                                            for k in keys)
                 + f" | {ref['mean']['s_per_frame'] * 1000:.0f} | - |")
    for r in doc["rows"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['warm_steps']} | {r['calls_per_frame']} | "
                     + " | ".join(f"{r[k]:.3f}" for k in keys)
                     + f" | {r['s_per_frame'] * 1000:.0f} | {'yes' if r['matches_reference'] else 'no'} |")
    rt = doc["realtime"]
    pick = (f"{rt['sampler']} {rt['steps']} steps" + (f", warm {rt['warm_steps']}" if rt["warm_steps"] else "")
            + f": {rt['calls_per_frame']} calls per frame") if rt else "none matched"
    real = "; ".join(f"{c}: F-MSE {v['fmse']:.2f}, OFM {v['ofm']:.3f}" for c, v in doc["real"].items())
    return (f"Clips: {', '.join(doc['clips'])} (identity = first frame, own audio). Real video: {real}.\n\n"
            + "\n".join(lines) + f"\n\nFewest calls per frame matching DDPM-100 within its seed spread: {pick}.\n")


def plot(doc: dict, path: Path) -> Path:
    """Each quality metric against calls per frame (log x), one line per sampler, the reference band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in QUALITY if k in doc["reference"]["mean"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    ref = doc["reference"]
    for ax, k in zip(axes[0], keys):
        for name in dict.fromkeys(r["sampler"] + ("+warm" if r["warm_steps"] else "") for r in doc["rows"]):
            pts = sorted((r["calls_per_frame"], r[k]) for r in doc["rows"]
                         if r["sampler"] + ("+warm" if r["warm_steps"] else "") == name)
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        lo, hi = (f(r[k] for r in ref["runs"]) for f in (min, max))
        ax.axhspan(lo, hi, color="grey", alpha=0.3, label="DDPM-100 seeds")
        ax.set_xscale("log")
        ticks = sorted({r["calls_per_frame"] for r in doc["rows"]})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=6)
        ax.minorticks_off()
        if k in ("fmse", "ofm"):
            ax.set_yscale("log")
        ax.set_xlabel("UNet calls per frame")
        ax.set_title(k)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(doc: dict, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md, png = (out_dir / f"{name}{ext}" for ext in (".json", ".md", ".png"))
    js.write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(markdown(doc))
    plot(doc, png)
    return [js, md, png]
