"""What ``--device auto`` runs a bundle with on a CPU: the fastest engine that passed quality parity for that model.

A reduced precision is offered only for a model it was measured on (keyed by the sha256 of its ``unet.onnx``)
and only when the held-out quality study scored it within the fp32 model's seed spread
(``benchmarks/heldout_study.py --backend/--precision``); the speed order is ``dh-bench --compare``'s. Anything
else, or an engine this machine cannot run (no openvino, a CPU without bf16, a bundle without
``unet_int8.onnx``), falls through to the next, and finally to ONNX Runtime fp32. ``--device cpu`` or an
explicit ``--backend`` skips the choice.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FALLBACK = ("onnxruntime", "fp32")


@dataclass(frozen=True)
class Measured:
    """Engines that passed parity for one model, fastest first, and where the numbers are."""

    engines: tuple[tuple[str, str], ...]
    evidence: str


# unet.onnx sha256 -> what passed. Filled from measurements only (see the module docstring).
# The talking demo (unet.onnx 47f8868d..., 0d922b1) passed the held-out study at seeds 0-4 with OpenVINO int8 and bf16
# (benchmarks/results/precision_parity_2026-12-07_s0-4.md); per frame at 10 calls, 2 cores, load 2.7-3.0: int8 171 ms,
# bf16 204 ms, ONNX Runtime fp32 335 ms (cpu_engines_2026-12-07_t2). It waited on two things, both understood and
# fixed: a second ov.Core in the process corrupted the heap (openvino_.core()), and with OpenVINO in dh-serve's process
# the same frames encoded to different mp4 bytes. That was libx264's AVX-512 code reading memory nothing wrote
# (issue #31, engine/video.py x264_asm): OpenVINO only changed what the heap held; x264 now runs without AVX-512.
# The demo shipped since 2026-12-08 (unet.onnx 8d95e9df...) passed with neither at seeds 0-4 (int8's F-MSE and talk
# verdict, bf16's mouth spread just outside the fp32 seeds' range) and with both at seeds 0-9
# (benchmarks/results/precision_parity_2026-12-08_s0-9.md); the same network, so the same speed order.
PASSED: dict[str, Measured] = {
    "8d95e9df57e3393f3551175e6ba3c5c935f352f3c6e530cd8be89c9df091ae10":
        Measured((("openvino", "int8"), ("openvino", "bf16")), "held-out parity at seeds 0-9"),
    "47f8868d905cb3570ad6a2d8d82a97b192513338453e41debf0cbdc1149fefb3":
        Measured((("openvino", "int8"), ("openvino", "bf16")), "held-out parity at seeds 0-4"),
}


def choose(bundle: Path) -> tuple[str, str]:
    """(backend, precision) for a bundle on the CPU: the first of its model's measured engines that runs here
    (the model is known by the sha256 of the ``unet.onnx`` on disk, not the manifest's word for it)."""
    from .bundle import UNET_ONNX, sha256_file

    onnx = bundle / UNET_ONNX
    measured = PASSED.get(sha256_file(onnx)) if PASSED and onnx.is_file() else None
    if measured is None:
        return FALLBACK
    for backend, precision in measured.engines:
        why = unavailable(bundle, backend, precision)
        if why is None:
            log.info("--device auto on the CPU: %s %s (%s)", backend, precision, measured.evidence)
            return backend, precision
        log.info("--device auto: not %s %s (%s)", backend, precision, why)
    return FALLBACK


def unavailable(bundle: Path, backend: str, precision: str) -> str | None:
    """Why ``backend`` cannot run ``precision`` of ``bundle`` here, or None when it can."""
    from .bundle import UNET_ONNX_INT8

    if precision == "int8" and not (bundle / UNET_ONNX_INT8).is_file():
        return f"no {UNET_ONNX_INT8}"
    if backend == "openvino":
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed"
        from .backends.openvino_ import OV_PRECISIONS, CpuInfo, core

        caps = CpuInfo.of(core()).capabilities
        if OV_PRECISIONS[precision][1] not in caps:
            return f"the CPU lacks {OV_PRECISIONS[precision][1]}"
    return None
