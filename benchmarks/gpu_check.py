"""The one-command GPU check (``make gpu-check``): the GPU/TensorRT tests, then every backend side by side.

1. ``pytest -m "gpu or tensorrt" tests/test_gpu.py``: the tests export their own small bundle and build
   its TensorRT plan (batch 1..2), then drive each backend through the frame loop with CUDA graphs.
2. ``run_bench`` on the full-size model: PyTorch, ONNX Runtime (when its CUDA provider is installed) and
   TensorRT (when installed), fp16, batch 1 and ``--batch``, beside the authors' loop; the TensorRT plan
   is built here for batches 1..``--batch``.

Writes ``<out>/gpu_<date>.json`` (machine, test outcomes, benchmark rows) and the benchmark's table as
``gpu_<date>.md``. Sized for under 10 minutes on one H100 (not yet measured: no GPU has run it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def run_tests(timeout_s: float) -> dict[str, object]:
    """The GPU tests in a child pytest; their outcomes from its JUnit XML."""
    with tempfile.TemporaryDirectory(prefix="dh-gpu-check-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-rs", "-q", f"--junitxml={xml}",
               str(REPO / "tests" / "test_gpu.py")]
        try:
            rc = subprocess.run(cmd, cwd=REPO, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return {"returncode": None, "error": f"timed out after {timeout_s:.0f} s"}
        return {"returncode": rc, **_outcomes(xml)} if xml.is_file() else {"returncode": rc}


def _outcomes(xml: Path) -> dict[str, object]:
    cases = ET.parse(xml).getroot().iter("testcase")
    out: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        out["failed" if kind in ("failure", "error") else kind].append(name)
    return out


def available_backends() -> tuple[str, ...]:
    """pytorch, plus onnxruntime where its CUDA provider is installed and tensorrt where it imports."""
    from dheads.engine.backends.onnxruntime_ import has_cuda_provider

    names = ["pytorch"]
    if importlib.util.find_spec("onnxruntime") is not None and has_cuda_provider():
        names.append("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None:
        names.append("tensorrt")
    return tuple(names)


def run(args: argparse.Namespace) -> Path:
    from dheads.benchmarks.bench import BenchConfig, markdown_table, run_bench

    t0 = time.perf_counter()
    tests = run_tests(args.test_timeout)
    log.info("tests: %s", {k: len(v) if isinstance(v, list) else v for k, v in tests.items()})
    bc = BenchConfig(model=args.model, backends=available_backends(), precisions=("fp16",), device="cuda",
                     steps=args.steps, frames=args.frames, batch=args.batch, repeats=args.repeats)
    with tempfile.TemporaryDirectory(prefix="dh-gpu-bench-") as tmp:
        bench = run_bench(bc, Path(tmp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_{date.today().isoformat()}"
    report = {"machine": bench["machine"], "tests": tests, "bench_config": dataclasses.asdict(bc), "bench": bench,
              "elapsed_s": round(time.perf_counter() - t0, 1)}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown_table(bench))
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--model", default="crema", choices=("small", "crema"))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--test-timeout", type=float, default=300.0, help="seconds for the GPU tests")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = run(args)
    report = json.loads(path.read_text())
    failed = report["tests"].get("failed") or report["tests"].get("error")
    log.info("wrote %s in %.0f s%s", path, report["elapsed_s"], "; TESTS FAILED" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
