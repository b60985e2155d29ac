"""int8 UNet by post-training quantization, calibrated on real conditioning.

The calibration set is what the UNet sees when it renders real inputs: a bundle's fp32 ONNX renders each
calibration source (a face and its speech) with the engine's own sampler, and every call of every step
(identity, motion frames, audio window, timestep, x_t) is recorded. Every ``HOLD_OUT``-th frame (every step of
it) is kept out of calibration and used for the parity check. NNCF (``nncf.quantize`` on the ONNX graph) writes a QDQ ONNX,
``unet_int8.onnx``, that ONNX Runtime and OpenVINO both run.

The clips the held-out quality study scores (``HELD_OUT_STUDY_CLIPS``) are never calibration sources.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dheads.engine.backends.base import UNET_INPUTS
from dheads.engine.bundle import Int8Record, sha256_file

from .errors import ExportError, ParityError

log = logging.getLogger(__name__)

HOLD_OUT = 5  # every 5th rendered frame (all its steps): parity, not calibration
MAX_CALIBRATION = 300  # calls NNCF sees (its default subset size): drawn evenly at random from the rest, seeded
HELD_OUT_STUDY_CLIPS = ("lbax4n", "sbwe5n")  # benchmarks/heldout_study's clips: never calibrated on
# int8 vs the fp32 ONNX on held-back real calls: relative L2 of model_out must stay below this. Measured on the
# demo (2026-12-07): 0.026 overall (0.05 at t = 999, 0.007-0.011 below), bf16 0.004 beside it; see int8_scope.
# The held-out quality study, not this bound, decides whether int8 is offered as a default.
INT8_REL_L2 = 0.06


@dataclass(frozen=True)
class CalibrationSource:
    """One face and its speech (a video clip gives both), rendered for ``seconds`` with seed ``seed``."""

    face: Path
    audio: Path
    seconds: float = 2.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0, seconds: float = 2.0) -> CalibrationSource:
        """``CLIP`` (a video: its first frame and its speech) or ``FACE,AUDIO``."""
        parts = [Path(p) for p in text.split(",")]
        if len(parts) not in (1, 2):
            raise ExportError(f"--calibrate takes CLIP or FACE,AUDIO, got {text!r}")
        face, audio = (parts[0], parts[0]) if len(parts) == 1 else parts
        for p in (face, audio):
            if not p.is_file():
                raise ExportError(f"--calibrate {text}: no such file {p}")
        if face.stem in HELD_OUT_STUDY_CLIPS or audio.stem in HELD_OUT_STUDY_CLIPS:
            raise ExportError(f"--calibrate {text}: a clip of the held-out quality study; calibrating on it would "
                              "make the study's int8 row unfair")
        return cls(face=face, audio=audio, seconds=seconds, seed=seed)

    def provenance(self) -> dict:
        return {"face": self.face.name, "face_sha256": sha256_file(self.face), "audio": self.audio.name,
                "audio_sha256": sha256_file(self.audio), "seconds": self.seconds, "seed": self.seed}


@dataclass
class CallRecorder:
    """A Denoiser that runs ``inner`` and keeps every call's inputs (numpy, batch 1 each)."""

    inner: object
    calls: list[dict[str, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name, self.device, self.config = self.inner.name, self.inner.device, self.inner.config
        self.graph_safe = False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        b = args[0].shape[0]
        for i in range(b):
            self.calls.append({name: t[i:i + 1].detach().float().cpu().numpy().copy()
                               for name, t in zip(UNET_INPUTS, args)})
        return self.inner(*args)


def record_calls(bundle: Path, sources: Sequence[CalibrationSource], threads: int | None = None) -> list[dict]:
    """Render every source with the bundle's fp32 ONNX (ONNX Runtime, the engine's default sampler) and return
    every UNet call's inputs, sources in order, frames in order, steps in order."""
    from dheads.engine.config import RuntimeConfig
    from dheads.engine.pipeline import TalkingHead

    head = TalkingHead.open(bundle, RuntimeConfig(backend="onnxruntime", device="cpu", threads=threads))
    recorder = CallRecorder(head.denoiser)
    recording = TalkingHead(recorder, head.info, head.encoder, head.runtime)
    for src in sources:
        inputs = recording.prepare(src.face, src.audio, max_seconds=src.seconds)
        n = len(recorder.calls)
        for _ in recording.frames(inputs, seed=src.seed):
            pass
        log.info("calibration: %s + %s: %d calls", src.face.name, src.audio.name, len(recorder.calls) - n)
    return recorder.calls


def split_calls(calls: list[dict], steps: int, most: int = MAX_CALIBRATION,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(calibration, held back) of calls recorded ``steps`` a frame: every ``HOLD_OUT``-th frame, all its steps, is
    held back for the parity check; of the other calls at most ``most`` calibrate, drawn without replacement
    (seeded), kept in render order."""
    held_frame = [(i // steps) % HOLD_OUT == HOLD_OUT - 1 for i in range(len(calls))]
    held = [c for c, h in zip(calls, held_frame) if h]
    calib = [c for c, h in zip(calls, held_frame) if not h]
    if len(calib) > most:
        keep = np.sort(np.random.default_rng(seed).choice(len(calib), most, replace=False))
        calib = [calib[i] for i in keep]
    return calib, held


def int8_scope(model) -> tuple[list[str], list[str]]:
    """(node names, op types) NNCF must leave in fp32: everything but the inner convolutions.

    Measured on the demo (2026-12-07, 200 held-back real calls, relative L2 of model_out vs fp32): every op
    NNCF quantizes by default, 0.13; convolutions and linear layers, 0.05 on ONNX Runtime but 0.42 on
    OpenVINO; all convolutions, 0.03 / 0.43 (OpenVINO's int8 first convolution, whose input concatenates
    noise, motion frames and identity, is the one that breaks); the inner convolutions only (first and last
    in fp32), 0.026 on both runtimes. The time/audio embeddings and attention are a sliver of the compute."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    types = sorted({n.op_type for n in model.graph.node} - {"Conv"})
    return ([convs[0], convs[-1]] if len(convs) > 1 else convs), types


def quantize_onnx(fp32_onnx: Path, out: Path, calib: list[dict]) -> dict:
    """NNCF post-training quantization of ``fp32_onnx``'s inner convolutions (:func:`int8_scope`) on ``calib``
    (all of it) into the QDQ ONNX ``out``. Returns the method's settings (for the manifest). ``MIXED`` preset:
    symmetric per-channel weights, asymmetric activations (the UNet's SiLU outputs are one-sided)."""
    try:
        import nncf
        import onnx
    except ImportError:
        raise ExportError("int8 export needs NNCF and onnx: pip install 'diffused-heads[openvino]'") from None
    nncf.set_log_level(logging.WARNING)  # NNCF logs every op it leaves alone at INFO
    model = onnx.load(str(fp32_onnx))
    names, types = int8_scope(model)
    quantized = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib),
                              preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=True,
                              ignored_scope=nncf.IgnoredScope(names=names, types=types))
    onnx.save(quantized, str(out))
    n_conv = sum(1 for n in model.graph.node if n.op_type == "Conv")
    return {"tool": "nncf.quantize (ONNX backend, QDQ)", "preset": "mixed", "subset_size": len(calib),
            "fast_bias_correction": True, "quantized": f"{n_conv - len(names)} of {n_conv} Conv (all but "
            "the first and last); every other op fp32", "fp32_nodes": names}


def parity_int8(fp32_onnx: Path, int8_onnx: Path, held: list[dict], bound: float = INT8_REL_L2) -> dict:
    """int8 against fp32 (both ONNX Runtime, CPU) on the held-back calls: relative L2 over all of them and per
    timestep, the worst call's, and max abs. ParityError (one line) when the overall relative L2 exceeds
    ``bound``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    ref_s = ort.InferenceSession(str(fp32_onnx), opts, providers=["CPUExecutionProvider"])
    q_s = ort.InferenceSession(str(int8_onnx), opts, providers=["CPUExecutionProvider"])
    sums: dict[float, list[float]] = {}
    worst = max_abs = 0.0
    for call in held:
        ref, got = ref_s.run(None, call)[0], q_s.run(None, call)[0]
        d, r = float(np.sum((got - ref) ** 2)), float(np.sum(ref ** 2))
        acc = sums.setdefault(float(call["timesteps"][0]), [0.0, 0.0])
        acc[0], acc[1] = acc[0] + d, acc[1] + r
        worst = max(worst, (d / max(r, 1e-30)) ** 0.5)
        max_abs = max(max_abs, float(np.abs(got - ref).max()))
    rel = (sum(a for a, _ in sums.values()) / max(sum(b for _, b in sums.values()), 1e-30)) ** 0.5
    per_t = {f"{t:g}": (a / max(b, 1e-30)) ** 0.5 for t, (a, b) in sorted(sums.items(), reverse=True)}
    report = {"engine": "onnxruntime int8 vs onnxruntime fp32", "calls": len(held), "rel_l2": rel,
              "rel_l2_by_timestep": per_t, "worst_call_rel_l2": worst, "max_abs": max_abs, "bound_rel_l2": bound,
              "passed": rel <= bound}
    if not report["passed"]:
        raise ParityError(f"{int8_onnx.name}: int8 relative L2 error {rel:.3g} on {len(held)} held-back real calls "
                          f"exceeds {bound}")
    return report


def int8_record(fp32_onnx: Path, int8_onnx: Path, sources: Sequence[CalibrationSource], calls: list[dict],
                n_calib: int, n_held: int, method: dict, parity: dict, sampler: dict) -> Int8Record:
    """What the int8 file is and what calibrated it (sources with hashes, calls, timesteps, sampler)."""
    steps = sorted({float(c["timesteps"][0]) for c in calls}, reverse=True)
    tools = {}
    for dist in ("nncf", "onnx", "onnxruntime", "openvino"):
        try:
            tools[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    calibration = {"sources": [s.provenance() for s in sources], "recorded_calls": len(calls),
                   "calibration_calls": n_calib, "held_back_calls": n_held, "held_back": f"every {HOLD_OUT}th frame",
                   "calibration_draw": f"{n_calib} of {len(calls) - n_held} at random, seed 0",
                   "timesteps": steps, "sampler": sampler, "rendered_by": "onnxruntime fp32 " + fp32_onnx.name,
                   "excluded_clips": list(HELD_OUT_STUDY_CLIPS)}
    return Int8Record(file=int8_onnx.name, source_file=fp32_onnx.name, source_sha256=sha256_file(fp32_onnx),
                      method=method, tools=tools, calibration=calibration, parity=parity)


def default_sources(seconds: float = 2.0) -> list[CalibrationSource]:
    """The packaged example face and speech (what ``dh-run`` renders when asked for the demo)."""
    from dheads.engine.pipeline import default_engine_path

    examples = default_engine_path().parent / "examples"
    return [CalibrationSource(examples / "face.png", examples / "speech.wav", seconds=seconds)]


def make_int8(bundle: Path, fp32_onnx: Path, out: Path, sources: Sequence[CalibrationSource],
              sampler: dict, threads: int | None = None) -> Int8Record:
    """Record real calls on ``bundle``, quantize ``fp32_onnx`` into ``out``, check parity, return the record."""
    if not sources:
        raise ExportError("int8 needs at least one calibration source")
    calls = record_calls(bundle, sources, threads)
    calib, held = split_calls(calls, sampler["steps"])
    if not held:
        raise ExportError(f"calibration recorded {len(calls)} calls: too few to hold any back; give longer sources")
    method = quantize_onnx(fp32_onnx, out, calib)
    parity = parity_int8(fp32_onnx, out, held)
    return int8_record(fp32_onnx, out, sources, calls, len(calib), len(held), method, parity, sampler)
