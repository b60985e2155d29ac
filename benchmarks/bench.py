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
DEMO = "demo"  # the packaged demo bundle (trained weights, ONNX only: no reference loop, no parity row)


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
    threads: int = 0  # 0 = auto (dheads.engine.threads.runtime_policy)


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


class TimedDenoiser:
    """A Denoiser that adds the wall time spent inside each call to ``inside_s`` (device-synchronised on
    CUDA, so never graph-safe): the loop around it is timed in the same run, call by call."""

    graph_safe = False

    def __init__(self, den: Denoiser):
        self.inner, self.name, self.device, self.config = den, den.name, den.device, den.config
        self.inside_s, self.calls = 0.0, 0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.inner(*args)
        _sync(self.device)
        self.inside_s += time.perf_counter() - t0
        self.calls += 1
        return out


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


def bench_overhead(den: Denoiser, bc: BenchConfig) -> dict[str, float]:
    """Where a frame's time goes, measured interleaved: each UNet call is timed inside the same frame loop
    (batch 1, after one warm-up frame), so load changes between stages cannot fake or hide the overhead.

    ``outside_unet_fraction`` = 1 - (time inside the UNet calls) / (frame time); outside = the sampler's
    arithmetic, the loop, input conversion. On CUDA each call is synchronised (no CUDA graph).
    """
    timed_den = TimedDenoiser(den)
    loop = FrameLoop(timed_den, LoopConfig(sampler=SamplerConfig(steps=bc.steps), batch=1, cuda_graph=False))
    _fill_loop(loop, bc.seed)
    with torch.no_grad():
        loop.run_frame()  # warm-up
        timed_den.inside_s, timed_den.calls = 0.0, 0
        _sync(den.device)
        t0 = time.perf_counter()
        for _ in range(max(bc.frames, 1)):
            loop.run_frame()
        _sync(den.device)
        total = time.perf_counter() - t0
    outside = total - timed_den.inside_s
    return {"frames": max(bc.frames, 1), "total_ms": total * 1000, "inside_unet_ms": timed_den.inside_s * 1000,
            "outside_unet_ms_per_step": outside / timed_den.calls * 1000, "outside_unet_fraction": outside / total}


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


def _reset_peak_memory(device: torch.device) -> None:
    """Start a row's peak at what is allocated now (the process's RSS peak cannot be reset: it only grows)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(den: Denoiser) -> dict[str, float]:
    """torch's peak since the row began, and TensorRT's own memory (its contexts and plan), which torch's
    allocator never sees."""
    if den.device.type != "cuda":
        return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    row = {"peak_device_mib": torch.cuda.max_memory_allocated(den.device) / 2**20}
    trt_bytes = getattr(den, "device_memory_bytes", None)
    if trt_bytes is not None:
        row["tensorrt_device_mib"] = trt_bytes / 2**20
    return row


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


def open_backend(name: str, model: DiffusedHeadsUNet, precision: str, device: torch.device, workdir: Path,
                 intra_op_threads: int | None = None, batch: int = 1) -> Denoiser:
    """A denoiser for ``name`` over ``model``'s weights (ONNX Runtime, TensorRT: exported into ``workdir``
    for every batch 1..``batch``, the ones the benchmark runs)."""
    from dheads.engine.backends import TORCH_BACKENDS, BatchProfile, open_denoiser, torch_denoiser
    from dheads.engine.backends.base import check_batches

    if name in TORCH_BACKENDS:  # a copy: the backend converts its module in place (fp16, channels-last)
        return torch_denoiser(name, copy.deepcopy(model), device=device, precision=precision)
    from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
    from dheads.export.pipeline import export_bundle

    ckpt = save_checkpoint(workdir / "model.pt", checkpoint_from_model(model))
    bundle = workdir / f"bundle-{precision}-b{batch}"
    if not bundle.exists():
        export_bundle(ckpt, bundle, precision=precision, profile=BatchProfile(1, 1, batch),
                      tensorrt=True if name == "tensorrt" else None)
    den, _ = open_denoiser(bundle, backend=name, device=str(device), precision=precision,
                           intra_op_threads=intra_op_threads)
    check_batches(den, batch, f"--batch {batch}")
    return den


def time_backend(den: Denoiser, bc: BenchConfig) -> dict[str, object]:
    """UNet forward at batch 1 and ``bc.batch``, the frame loop at batch 1 (and ``bc.batch``), peak memory."""
    row: dict[str, object] = {"unet_forward_b1": bench_forward(den, 1, bc),
                              f"unet_forward_b{bc.batch}": bench_forward(den, bc.batch, bc),
                              "loop_b1": bench_loop(den, bc, 1)}
    if bc.batch > 1:
        row[f"loop_b{bc.batch}"] = bench_loop(den, bc, bc.batch)
    row["overhead_b1"] = bench_overhead(den, bc)
    row["outside_unet_fraction"] = row["overhead_b1"]["outside_unet_fraction"]
    row.update(_peak_memory(den))
    return row


def _threads(bc: BenchConfig, backend: str, device: torch.device) -> dict[str, int]:
    """Apply dh-run's thread policy for ``backend`` (torch gets the threads only when it runs the UNet)."""
    from dheads.engine import threads
    from dheads.engine.backends import TORCH_BACKENDS

    policy = threads.runtime_policy(bc.threads or None,
                                    unet_on_torch=backend in TORCH_BACKENDS and device.type == "cpu")
    threads.apply(policy)
    return {"torch": policy.torch, "onnxruntime": policy.onnxruntime}


def run_bench(bc: BenchConfig, workdir: Path) -> dict[str, object]:
    """Check every (backend, precision) against the strict-fp32 UNet, time it, then time the reference.

    With ``bc.timing`` off only the parity rows are made (and PyTorch fp16 runs on CPU too).
    ``bc.model == "demo"``: the packaged demo bundle on ONNX Runtime, timing only.
    """
    from dheads.engine.backends import TORCH_BACKENDS, pick_device

    device = pick_device(bc.device)
    if "tensorrt" in bc.backends:  # say so before minutes of export, not after
        from dheads.engine.backends.tensorrt_ import gpu_identity, import_tensorrt

        import_tensorrt(instead="benchmark --backends pytorch,onnxruntime instead")
        gpu_identity(device)
    if bc.model == DEMO:
        return _run_demo(bc, device)
    cfg = MODELS[bc.model]
    model = random_unet(cfg, seed=bc.seed)
    ref_out = reference_output(model, device)
    rows = []
    for backend in bc.backends:
        for precision in bc.precisions:
            if bc.timing and precision == "fp16" and device.type == "cpu" and backend in TORCH_BACKENDS:
                log.warning("skipping %s fp16 on CPU (not a deployment target; --no-timing checks its parity)",
                            backend)
                continue
            threads = _threads(bc, backend, device)
            den = None  # drop the previous row's engine: its memory must not count in this row's peak
            _reset_peak_memory(device)
            den = open_backend(backend, model, precision, device, workdir, threads["onnxruntime"], bc.batch)
            row = {"backend": backend, "precision": precision, "threads": threads,
                   "parity_vs_fp32": parity(den, ref_out)}
            if bc.timing:
                row.update(time_backend(den, bc))
            rows.append(row)
            log.info("%s %s done", backend, precision)
    result = {"machine": machine_info(device), "command": " ".join(sys.argv), "config": dataclasses.asdict(bc),
              "model": cfg.to_dict(), "results": rows}
    if bc.reference and bc.timing:
        result["reference_threads"] = _threads(bc, "pytorch", device)
        ref = bench_reference(model, device, bc)
        result["reference"] = ref
        for row in rows:
            row["speedup_vs_reference"] = ref["frame"]["median_ms"] / row["loop_b1"]["frame"]["median_ms"]
    return result


def _run_demo(bc: BenchConfig, device: torch.device) -> dict[str, object]:
    """Time the packaged demo bundle (its trained weights are only in ONNX: no parity, no reference)."""
    from dheads.engine.backends import BackendError, open_denoiser
    from dheads.engine.pipeline import default_engine_path

    if set(bc.backends) != {"onnxruntime"} or set(bc.precisions) != {"fp32"} or not bc.timing:
        raise BackendError("--model demo is the packaged fp32 ONNX bundle: use --backends onnxruntime "
                           "--precisions fp32, with timing")
    threads = _threads(bc, "onnxruntime", device)
    _reset_peak_memory(device)
    den, info = open_denoiser(default_engine_path(), backend="onnxruntime", device=str(device),
                              intra_op_threads=threads["onnxruntime"])
    row = {"backend": "onnxruntime", "precision": "fp32", "threads": threads, **time_backend(den, bc)}
    return {"machine": machine_info(device), "command": " ".join(sys.argv),
            "config": dataclasses.asdict(bc), "model": info.model.to_dict(), "results": [row]}


def markdown_table(result: dict) -> str:
    m, c = result["machine"], result["config"]
    head = f"Machine: {m.get('gpu', m['cpu'])} ({m['device']}), torch {m['torch']}; model {c['model']}"
    if not c.get("timing", True):
        lines = ["| backend | precision | UNet rel. L2 error vs fp32 | max abs error |", "|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['precision']} | {r['parity_vs_fp32']['rel_l2']:.2e} | "
                  f"{r['parity_vs_fp32']['max_abs']:.2e} |" for r in result["results"]]
        return f"{head}; one UNet call, batch 1, random weights.\n\n" + "\n".join(lines) + "\n"
    lines = ["| backend | precision | UNet b1 (ms) | step (ms) | frame (ms) | first frame (ms) | fps b1 | "
             "fps batch | RTF b1 | outside UNet | speed-up vs reference | UNet rel. error vs fp32 | threads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    b = c["batch"]
    for r in result["results"]:
        lp = r["loop_b1"]
        fps_b = r.get(f"loop_b{b}", lp)["fps"]
        lines.append(f"| {r['backend']} | {r['precision']} | {r['unet_forward_b1']['median_ms']:.1f} | "
                     f"{lp['step_ms']:.1f} | {lp['frame']['median_ms']:.0f} | {lp['first_frame_ms']:.0f} | "
                     f"{lp['fps']:.3f} | {fps_b:.3f} | {lp['real_time_factor']:.1f} | "
                     f"{r['outside_unet_fraction']:.1%} | {_speedup(r)} | "
                     f"{_err(r)} | {_threads_cell(r.get('threads'))} |")
    if "reference" in result:
        ref = result["reference"]
        lines.append(f"| reference (authors' loop) | fp32 | - | {ref['step_ms']:.1f} | {ref['frame']['median_ms']:.0f} "
                     f"| - | {ref['fps']:.3f} | - | {ref['real_time_factor']:.1f} | - | 1.00x | - | "
                     f"{_threads_cell(result.get('reference_threads'))} |")
    return f"{head}, {c['steps']} steps.\n\n" + "\n".join(lines) + "\n"


def _speedup(row: dict) -> str:
    return f"{row['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in row else "-"


def _threads_cell(t: dict | None) -> str:
    return f"torch {t['torch']}, ORT {t['onnxruntime']}" if t else "-"


def _err(row: dict) -> str:
    p = row.get("parity_vs_fp32")
    return f"{p['rel_l2']:.1e}" if p else "-"


def write_results(result: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown_table(result))
    return js, md
