"""Is a reduced precision within the fp32 model's seed spread? Held-out study results side by side.

Each input is a ``heldout_study`` JSON of the same model, clips and seeds, run with a different
``--backend/--precision``. For every video metric (mouth motion, sync, OFM and F-MSE ratios, colour), the
generated videos' mean over clips is taken per seed. The fp32 run's per-seed values give the spread
``[min, max]``; a reduced precision passes a metric when its mean over seeds lies inside that spread, and passes
when it passes every metric and the study's talk verdict is the fp32 one. One that fails is not offered as a
default (``engine/cpu_choice.py``).

Usage: ``python -m dheads.benchmarks.precision_parity FP32.json OTHER.json... [--out parity.json] [--table t.md]``;
``A.json,B.json`` joins studies of one engine run on different seeds (same clips) into one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from statistics import mean
from typing import Optional

import typer

log = logging.getLogger(__name__)

METRICS = ("mouth_spread_ratio", "mouth_std_per_s_ratio", "sync", "ofm_ratio", "fmse_ratio", "color_flicker",
           "color_drift")


def per_seed(result: dict, metric: str) -> list[float]:
    """The generated videos' ``metric``, mean over clips, one value per seed (in ``result['seeds']`` order)."""
    n = len(result["seeds"])
    values: list[list[float]] = [[] for _ in range(n)]
    for clip in result["clips"].values():
        rows = clip["generated"] if isinstance(clip["generated"], list) else [clip["generated"]]
        for i, row in enumerate(rows[:n]):
            v = row.get(metric)
            if v is not None and math.isfinite(v):
                values[i].append(v)
    return [mean(v) for v in values if v]


def join(studies: list[dict]) -> dict:
    """Studies of one engine and clips on disjoint seeds as one: seeds and per-clip generated rows concatenated;
    it talks when every part does. ValueError for different clips or engines, or a seed run twice."""
    first = studies[0]
    for st in studies[1:]:
        if sorted(st["clips"]) != sorted(first["clips"]) or (st.get("backend"), st.get("precision")) != (
                first.get("backend"), first.get("precision")):
            raise ValueError("joined studies must share clips, backend and precision")
    seeds = [s for st in studies for s in st["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"joined studies repeat a seed: {seeds}")
    clips = {c: {"generated": [r for st in studies for r in _rows(st["clips"][c]["generated"])]} for c in first["clips"]}
    talks = all(st["verdicts"]["generated"]["talks"] for st in studies)
    return {"backend": first.get("backend"), "precision": first.get("precision"), "seeds": seeds, "clips": clips,
            "verdicts": {"generated": {"talks": talks}}}


def _rows(generated) -> list[dict]:
    return generated if isinstance(generated, list) else [generated]


def load(spec: str) -> dict:
    """A study JSON, or several joined (``A.json,B.json``)."""
    parts = [json.loads(Path(p).read_text()) for p in spec.split(",")]
    return parts[0] if len(parts) == 1 else join(parts)


def compare(reference: dict, other: dict) -> dict:
    """``other`` against ``reference``'s seed spread, metric by metric (the two must share clips and seeds)."""
    if sorted(reference["clips"]) != sorted(other["clips"]) or reference["seeds"] != other["seeds"]:
        raise ValueError("the studies differ in clips or seeds; run both with the same CLIPS and --seed")
    rows = {}
    for m in METRICS:
        ref, got = per_seed(reference, m), per_seed(other, m)
        if not ref or not got:
            continue
        lo, hi, value = min(ref), max(ref), mean(got)
        rows[m] = {"fp32_per_seed": ref, "fp32_min": lo, "fp32_max": hi, "per_seed": got, "mean": value,
                   "paired_diff": [g - r for g, r in zip(got, ref)], "within": lo <= value <= hi}
    talks = other["verdicts"]["generated"]["talks"] == reference["verdicts"]["generated"]["talks"]
    return {"engine": f"{other.get('backend')} {other.get('precision')}", "metrics": rows, "same_talk_verdict": talks,
            "passed": talks and all(r["within"] for r in rows.values())}


def markdown(reference: dict, results: list[dict]) -> str:
    lines = ["| engine | " + " | ".join(METRICS) + " | talks as fp32 | passed |", "|---" * (len(METRICS) + 3) + "|"]
    ref_cells = []
    for m in METRICS:
        vals = per_seed(reference, m)
        ref_cells.append(f"{mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})" if vals else "-")
    lines.append(f"| {reference.get('backend')} {reference.get('precision')} (seed spread) | "
                 + " | ".join(ref_cells) + " | - | - |")
    for r in results:
        cells = [f"{r['metrics'][m]['mean']:.3f} {'in' if r['metrics'][m]['within'] else 'OUT'}"
                 if m in r["metrics"] else "-" for m in METRICS]
        lines.append(f"| {r['engine']} | " + " | ".join(cells) + f" | {'yes' if r['same_talk_verdict'] else 'no'} | "
                     f"{'yes' if r['passed'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(reference: str, others: list[str], out: Optional[Path] = typer.Option(None),
         table: Optional[Path] = typer.Option(None)) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ref = load(reference)
    results = [compare(ref, load(p)) for p in others]
    text = markdown(ref, results)
    if out is not None:
        out.write_text(json.dumps({"reference": reference, "others": list(others), "seeds": ref["seeds"],
                                   "metrics": list(METRICS), "results": results}, indent=2) + "\n")
    if table is not None:
        table.write_text(text)
    typer.echo(text)


if __name__ == "__main__":
    typer.run(main)
