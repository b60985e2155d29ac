"""dh-bench: latency per UNet call, per step, per frame, fps and memory, always beside a reference run.

Shape of nanoGPT's bench.py: warm up, then time each stage between device synchronisations, repeat,
report median and spread, write JSON (+ the machine and the command) and a markdown table.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dheads.engine.backends.base import UNET_INPUTS, Denoiser, example_inputs
from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import CREMA, SMALL, SamplerConfig
from dheads.engine.generate import FrameLoop, LoopConfig
from dheads.engine.model import DiffusedHeadsUNet, random_unet
from dheads.engine.config import DiffusionConfig
from dheads.engine.plan import make_plan

from .authors_loop import authors_frame

log = logging.getLogger(__name__)
MODELS = {"small": SMALL, "crema": CREMA}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``model``: small | crema (random weights) or a path any backend opens."""

    model: str = "small"
    backends: tuple[str, ...] = ("pytorch",)
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "auto"
    steps: int = 100
    frames: int = 4
    batch: int = 4
    repeats: int = 10
    warmup: int = 2
    reference: bool = True
    cuda_graph: bool = True
    timing: bool = True
    seed: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``, each between device synchronisations, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summarize(xs: list[float]) -> dict[str, float]:
    """Median and spread in milliseconds."""
    ms = sorted(x * 1000 for x in xs)
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


def _inputs(den: Denoiser, batch: int) -> list[torch.Tensor]:
    x = example_inputs(den.config, batch, device=den.device, generator=torch.Generator().manual_seed(0))
    return [x[k] for k in UNET_INPUTS]


@contextlib.contextmanager
def strict_fp32():
    """No TF32 in convolutions or matmuls (PyTorch allows it in cuDNN convolutions by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def reference_output(model: DiffusedHeadsUNet, device: torch.device, batch: int = 1) -> torch.Tensor:
    """The eager fp32 UNet (strict fp32, no TF32) on the benchmark inputs: what every backend must match."""
    den = TorchDenoiser(copy.deepcopy(model), device=device)
    with torch.no_grad(), strict_fp32():
        return den(*_inputs(den, batch)).float()


def parity(den: Denoiser, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 and max abs error of one UNet call against ``reference_output`` (same inputs)."""
    with torch.no_grad():
        out = den(*_inputs(den, ref.shape[0])).float().to(ref.device)
    return {"rel_l2": ((out - ref).norm() / ref.norm()).item(), "max_abs": (out - ref).abs().max().item()}


def bench_forward(den: Denoiser, batch: int, bc: BenchConfig) -> dict[str, float]:
    args = _inputs(den, batch)
    with torch.no_grad():
        return summarize(timed(lambda: den(*args), den.device, warmup=bc.warmup, repeats=bc.repeats))


def _fill_loop(loop: FrameLoop, seed: int) -> None:
    g = torch.Generator(device=loop.noise.device).manual_seed(seed)
    for buf in (loop.noise, loop.identity, loop.audio):
        buf.copy_(torch.randn(buf.shape, generator=g, device=buf.device))
    loop.identity.clamp_(-1, 1)
    loop.ring.reset(loop.identity)


def bench_loop(den: Denoiser, bc: BenchConfig, batch: int = 1) -> dict[str, object]:
    """First frame (incl. CUDA-graph capture), then sustained per-frame time at ``bc.steps`` steps."""
    loop = FrameLoop(den, LoopConfig(sampler=SamplerConfig(steps=bc.steps), batch=batch, cuda_graph=bc.cuda_graph))
    _fill_loop(loop, bc.seed)
    with torch.no_grad():
        t0 = time.perf_counter()
        loop.run_frame()
        _sync(den.device)
        first = time.perf_counter() - t0
        frames = timed(loop.run_frame, den.device, warmup=0, repeats=max(bc.frames, 1))
    per_frame = statistics.median(frames)
    return {"first_frame_ms": first * 1000, "frame": summarize(frames), "step_ms": per_frame / bc.steps * 1000,
            "fps": batch / per_frame, "real_time_factor": per_frame / batch * 25, "cuda_graph": loop.use_graph}


def bench_reference(model: DiffusedHeadsUNet, device: torch.device, bc: BenchConfig) -> dict[str, object]:
    """The authors' way: eager fp32, schedule uploaded per coefficient per step, fresh tensors."""
    model = model.to(device=device, dtype=torch.float32)
    cfg = model.config
    base = make_plan(DiffusionConfig(), SamplerConfig(steps=bc.steps)).base  # random weights: the default config
    g = torch.Generator().manual_seed(bc.seed)
    s = cfg.image_size
    ident = (torch.rand(1, 3, s, s, generator=g) * 2 - 1).to(device)
    motion = [ident] * cfg.motion_frames
    audio = torch.randn(1, cfg.audio_frames, cfg.audio_dim, generator=g).to(device)
    x_T = torch.randn(1, 3, s, s, generator=g).to(device)
    times = timed(lambda: authors_frame(model, base, bc.steps, ident, motion, audio, x_T), device,
                  warmup=1 if device.type == "cuda" else 0, repeats=max(bc.frames, 1))
    per_frame = statistics.median(times)
    return {"frame": summarize(times), "step_ms": per_frame / bc.steps * 1000, "fps": 1 / per_frame,
            "real_time_factor": per_frame * 25}


def _peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_device_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def machine_info(device: torch.device) -> dict[str, object]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def open_backend(name: str, model: DiffusedHeadsUNet, precision: str, device: torch.device, workdir: Path) -> Denoiser:
    """A denoiser for ``name`` over ``model``'s weights (ONNX Runtime: exported into ``workdir``)."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if name == "pytorch":  # a copy: TorchDenoiser converts its module in place (fp16, channels-last)
        return TorchDenoiser(copy.deepcopy(model), device=device, dtype=dtype)
    from dheads.engine.backends import open_denoiser
    from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
    from dheads.export.pipeline import export_bundle

    ckpt = save_checkpoint(workdir / "model.pt", checkpoint_from_model(model))
    bundle = workdir / f"bundle-{precision}"
    if not bundle.exists():
        export_bundle(ckpt, bundle, precision=precision)
    den, _ = open_denoiser(bundle, backend=name, device=str(device), precision=precision)
    return den


def time_backend(den: Denoiser, bc: BenchConfig) -> dict[str, object]:
    """UNet forward at batch 1 and ``bc.batch``, the frame loop at batch 1 (and ``bc.batch``), peak memory."""
    row: dict[str, object] = {"unet_forward_b1": bench_forward(den, 1, bc),
                              f"unet_forward_b{bc.batch}": bench_forward(den, bc.batch, bc),
                              "loop_b1": bench_loop(den, bc, 1)}
    if bc.batch > 1:
        row[f"loop_b{bc.batch}"] = bench_loop(den, bc, bc.batch)
    fwd = row["unet_forward_b1"]["median_ms"]
    frame = row["loop_b1"]["frame"]["median_ms"]
    row["outside_unet_fraction"] = max(0.0, (frame - bc.steps * fwd) / frame)
    row.update(_peak_memory(den.device))
    return row


def run_bench(bc: BenchConfig, workdir: Path) -> dict[str, object]:
    """Check every (backend, precision) against the strict-fp32 UNet, time it, then time the reference.

    With ``bc.timing`` off only the parity rows are made (and PyTorch fp16 runs on CPU too).
    """
    from dheads.engine.backends import pick_device

    device = pick_device(bc.device)
    if "tensorrt" in bc.backends:  # say so before minutes of export, not after
        from dheads.engine.backends.tensorrt_ import gpu_identity, import_tensorrt

        import_tensorrt(instead="benchmark --backends pytorch,onnxruntime instead")
        gpu_identity(device)
    cfg = MODELS[bc.model]
    model = random_unet(cfg, seed=bc.seed)
    ref_out = reference_output(model, device)
    rows = []
    for backend in bc.backends:
        for precision in bc.precisions:
            if bc.timing and precision == "fp16" and device.type == "cpu" and backend == "pytorch":
                log.warning("skipping pytorch fp16 on CPU (not a deployment target; --no-timing checks its parity)")
                continue
            den = open_backend(backend, model, precision, device, workdir)
            row = {"backend": backend, "precision": precision, "parity_vs_fp32": parity(den, ref_out)}
            if bc.timing:
                row.update(time_backend(den, bc))
            rows.append(row)
            log.info("%s %s done", backend, precision)
    result = {"machine": machine_info(device), "command": " ".join(sys.argv), "config": dataclasses.asdict(bc),
              "model": cfg.to_dict(), "results": rows}
    if bc.reference and bc.timing:
        ref = bench_reference(model, device, bc)
        result["reference"] = ref
        for row in rows:
            row["speedup_vs_reference"] = ref["frame"]["median_ms"] / row["loop_b1"]["frame"]["median_ms"]
    return result


def markdown_table(result: dict) -> str:
    m, c = result["machine"], result["config"]
    head = f"Machine: {m.get('gpu', m['cpu'])} ({m['device']}), torch {m['torch']}; model {c['model']}"
    if not c.get("timing", True):
        lines = ["| backend | precision | UNet rel. L2 error vs fp32 | max abs error |", "|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['precision']} | {r['parity_vs_fp32']['rel_l2']:.2e} | "
                  f"{r['parity_vs_fp32']['max_abs']:.2e} |" for r in result["results"]]
        return f"{head}; one UNet call, batch 1, random weights.\n\n" + "\n".join(lines) + "\n"
    lines = ["| backend | precision | UNet b1 (ms) | step (ms) | frame (ms) | first frame (ms) | fps b1 | "
             "fps batch | RTF b1 | outside UNet | speed-up vs reference | UNet rel. error vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    b = c["batch"]
    for r in result["results"]:
        lp = r["loop_b1"]
        fps_b = r.get(f"loop_b{b}", lp)["fps"]
        lines.append(f"| {r['backend']} | {r['precision']} | {r['unet_forward_b1']['median_ms']:.1f} | "
                     f"{lp['step_ms']:.1f} | {lp['frame']['median_ms']:.0f} | {lp['first_frame_ms']:.0f} | "
                     f"{lp['fps']:.3f} | {fps_b:.3f} | {lp['real_time_factor']:.1f} | "
                     f"{r['outside_unet_fraction']:.1%} | {r.get('speedup_vs_reference', float('nan')):.2f}x | "
                     f"{_err(r)} |")
    if "reference" in result:
        ref = result["reference"]
        lines.append(f"| reference (authors' loop) | fp32 | - | {ref['step_ms']:.1f} | {ref['frame']['median_ms']:.0f} "
                     f"| - | {ref['fps']:.3f} | - | {ref['real_time_factor']:.1f} | - | 1.00x | - |")
    return f"{head}, {c['steps']} steps.\n\n" + "\n".join(lines) + "\n"


def _err(row: dict) -> str:
    p = row.get("parity_vs_fp32")
    return f"{p['rel_l2']:.1e}" if p else "-"


def write_results(result: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown_table(result))
    return js, md
