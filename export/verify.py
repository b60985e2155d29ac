"""Parity of an exported engine against the eager PyTorch UNet, on fresh random inputs.

Error measures, per output part (``model_out[eps]`` = channels 0-2, ``model_out[v]`` = 3-5 for learned
variance; the two have different scales, so one cannot hide the other):

* ``max_abs``: max |engine - torch|;
* ``rel``: ``max_abs / max |torch|``, the error relative to the output's scale. (Element-wise relative
  error is meaningless where the reference crosses zero.)

A part passes when ``max_abs <= atol + rtol * max|torch|`` and everything is finite. Tolerances:

* ``ORT_FP32`` (rtol 1e-4, atol 1e-5): fp32 against fp32 differs only by summation order and kernel
  choice (rounding 6e-8 per op; convolutions sum up to 6912 products, ~60 layers deep). Measured:
  ~2e-7 relative on the small config and ~1e-6 on the full CREMA UNet (see docs_export.md). A real
  export bug (a wrong reshape, a missing op, an fp16 rounding anywhere) is >= 1e-3 relative.
* ``TRT_FP32`` (rtol 1e-3, atol 1e-4): TensorRT fp32 with TF32 disabled; its kernels reorder sums more
  aggressively than ONNX Runtime's CPU kernels.
* ``FP16`` (rtol 3e-2, atol 1e-3): fp16 carries 11 significant bits (unit roundoff 4.9e-4); rounding
  at every layer of a ~60-layer UNet with fp32 accumulation adds up to ~0.3-1 % of the output scale.
  3 % leaves headroom for that and still fails overflow (inf/NaN) or a layer gone wrong.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dheads.engine.backends.base import BatchProfile, Denoiser, example_inputs
from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import ModelConfig
from dheads.engine.model import DiffusedHeadsUNet


class ParityError(RuntimeError):
    """An exported engine disagrees with PyTorch beyond tolerance (one-line message)."""


@dataclass(frozen=True)
class Tolerance:
    name: str
    rtol: float
    atol: float


ORT_FP32 = Tolerance("fp32", rtol=1e-4, atol=1e-5)
TRT_FP32 = Tolerance("tensorrt-fp32", rtol=1e-3, atol=1e-4)
FP16 = Tolerance("fp16", rtol=3e-2, atol=1e-3)


@dataclass(frozen=True)
class ParityStats:
    """Errors of one output part over all compared batches."""

    max_abs: float
    rel: float
    ref_max: float
    mean_abs: float
    finite: bool

    def passes(self, tol: Tolerance) -> bool:
        return self.finite and self.max_abs <= tol.atol + tol.rtol * self.ref_max

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "rel": self.rel, "ref_max": self.ref_max, "mean_abs": self.mean_abs,
                "finite": self.finite}


@dataclass(frozen=True)
class ParityReport:
    """Parity of one engine: stats per output part, the tolerance, batches and seed used."""

    engine: str
    tolerance: Tolerance
    stats: dict[str, ParityStats]
    batches: tuple[int, ...]
    seed: int
    seconds_per_call: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(s.passes(self.tolerance) for s in self.stats.values())

    def worst(self) -> tuple[str, ParityStats]:
        return max(self.stats.items(), key=lambda kv: (not kv[1].finite, kv[1].rel))

    def summary(self) -> str:
        name, s = self.worst()
        return (f"{self.engine}: max abs {s.max_abs:.3g}, rel {s.rel:.3g} on {name} "
                f"(tolerance rtol {self.tolerance.rtol:g} + atol {self.tolerance.atol:g})")

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ParityError(f"parity check failed: {self.summary()}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-native (lists, no tuples) so the manifest round-trips exactly."""
        return {"engine": self.engine, "tolerance": {"name": self.tolerance.name, "rtol": self.tolerance.rtol,
                                                     "atol": self.tolerance.atol},
                "passed": self.passed, "batches": list(self.batches), "seed": self.seed,
                "seconds_per_call": self.seconds_per_call,
                "outputs": {k: v.to_dict() for k, v in self.stats.items()}, **self.extra}


def output_parts(cfg: ModelConfig) -> dict[str, slice]:
    """Named channel ranges of ``model_out``: eps, and the variance interpolation v when learned."""
    parts = {"model_out[eps]": slice(0, 3)}
    if cfg.learn_sigma:
        parts["model_out[v]"] = slice(3, 6)
    return parts


def measure(out: torch.Tensor, ref: torch.Tensor) -> ParityStats:
    """Error statistics of ``out`` against ``ref`` (computed in float64)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = bool(torch.isfinite(out).all())
    diff = (out - ref).abs()
    max_abs = float(diff.max()) if finite else math.inf
    ref_max = float(ref.abs().max())
    return ParityStats(max_abs=max_abs, rel=max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf),
                       ref_max=ref_max, mean_abs=float(diff.mean()) if finite else math.inf, finite=finite)


def combine(a: ParityStats | None, b: ParityStats) -> ParityStats:
    """Worst case over two comparisons (the mean is of the per-batch means)."""
    if a is None:
        return b
    ref_max = max(a.ref_max, b.ref_max)
    max_abs = max(a.max_abs, b.max_abs)
    return ParityStats(max_abs=max_abs, rel=max_abs / ref_max if ref_max > 0 else max(a.rel, b.rel),
                       ref_max=ref_max, mean_abs=(a.mean_abs + b.mean_abs) / 2, finite=a.finite and b.finite)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """Disable TF32 in torch's CUDA matmuls/convolutions so the reference is true fp32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def profile_batches(profile: BatchProfile) -> tuple[int, ...]:
    """The batch sizes a parity check runs: the profile's ends (each axis value the engine must accept)."""
    return tuple(sorted({profile.min, profile.max}))


@torch.no_grad()
def check_parity(engine: Denoiser, reference: DiffusedHeadsUNet, *, name: str, tolerance: Tolerance,
                 batches: Iterable[int] = (1,), seed: int | None = None,
                 reference_device: torch.device | str = "cpu") -> ParityReport:
    """Run ``engine`` and the eager fp32 ``reference`` on the same fresh random inputs and compare.

    ``seed``: of the inputs (random when None; recorded in the report).
    """
    import time

    cfg = engine.config
    seed = secrets.randbits(31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    ref_engine = TorchDenoiser(reference, device=reference_device)
    parts = output_parts(cfg)
    stats: dict[str, ParityStats | None] = dict.fromkeys(parts)
    elapsed, calls = 0.0, 0
    for b in batches:
        inputs = list(example_inputs(cfg, b, generator=gen).values())
        with strict_fp32():
            ref = ref_engine(*(t.to(ref_engine.device) for t in inputs)).float()
        t0 = time.perf_counter()
        out = engine(*(t.to(engine.device) for t in inputs))
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        elapsed, calls = elapsed + time.perf_counter() - t0, calls + 1
        out = out.float().clone()
        for part, sl in parts.items():
            stats[part] = combine(stats[part], measure(out[:, sl], ref[:, sl]))
    return ParityReport(engine=name, tolerance=tolerance, stats={k: v for k, v in stats.items() if v is not None},
                        batches=tuple(batches), seed=seed, seconds_per_call=elapsed / max(calls, 1))


def verify_onnx(onnx_path, reference: DiffusedHeadsUNet, profile: BatchProfile, *, tolerance: Tolerance = ORT_FP32,
                seed: int | None = None, intra_op_threads: int | None = None) -> ParityReport:
    """ONNX Runtime (CPU) on ``onnx_path`` against the eager model at the profile's batch ends."""
    from dheads.engine.backends.onnxruntime_ import OrtDenoiser

    engine = OrtDenoiser(onnx_path, reference.config, device="cpu", intra_op_threads=intra_op_threads)
    return check_parity(engine, reference, name=f"onnxruntime:{engine.path.name}", tolerance=tolerance,
                        batches=profile_batches(profile), seed=seed)


def verify_plan(plan_path, manifest, reference: DiffusedHeadsUNet, *, seed: int | None = None,
                device: torch.device | str = "cuda") -> ParityReport:
    """The TensorRT plan against the eager model on the same GPU (strict fp32 reference)."""
    from dheads.engine.backends.tensorrt_ import TrtDenoiser

    engine = TrtDenoiser(plan_path, manifest, device=device)
    tolerance = FP16 if manifest.precision == "fp16" else TRT_FP32
    reference = reference.to(engine.device)
    try:
        return check_parity(engine, reference, name=f"tensorrt:{engine.path.name}", tolerance=tolerance,
                            batches=profile_batches(manifest.profile), seed=seed, reference_device=engine.device)
    finally:
        reference.to("cpu")
