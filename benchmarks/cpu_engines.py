"""CPU engines side by side: ONNX Runtime and OpenVINO at each precision, one process, interleaved frame by frame.

Every engine renders the same prepared face and speech (the packaged example unless given) with the bundle's
own sampler and seed. Frames are taken round-robin: engine A's frame i, engine B's frame i, ... so a change of
load on the shared cores lands on every engine alike. Per engine: time to open (compile, or load from the
cache), the first frame, the median and spread of the following frames, fps and the real-time factor (compute
seconds per video second; below 1 is real time), the time to the first frame from a cold start (open +
prepare + first frame) and in a warm process (prepare + first frame), UNet calls interleaved the same way, and
the error of one real call against ONNX Runtime fp32. The machine, its load before and after, and the versions
go with it.

A speed benchmark, not a test: numbers depend on the machine and whatever else runs on it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_ENGINES = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
                   ("openvino", "int8"))


@dataclass(frozen=True)
class CompareConfig:
    """What to compare: ``engines`` (backend, precision) pairs on ``bundle`` (None: the packaged demo), rendering
    ``face`` + ``audio`` (None: the packaged example) for ``frames`` frames after the first, ``calls`` interleaved
    UNet calls each, ``threads`` for every engine (0: dh-run's auto policy)."""

    engines: tuple[tuple[str, str], ...] = DEFAULT_ENGINES
    bundle: str | None = None
    face: str | None = None
    audio: str | None = None
    frames: int = 50
    calls: int = 30
    threads: int = 0
    seed: int = 0


def parse_engines(text: str) -> tuple[tuple[str, str], ...]:
    """``"onnxruntime:fp32,openvino:bf16"`` -> pairs; ValueError (one line) for a malformed or unknown one."""
    from dheads.engine.backends import BACKEND_PRECISIONS

    pairs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        backend, _, precision = item.partition(":")
        if backend not in ("onnxruntime", "openvino") or precision not in BACKEND_PRECISIONS[backend]:
            raise ValueError(f"{item!r}: use onnxruntime:fp32|fp16|int8 or openvino:fp32|bf16|int8")
        pairs.append((backend, precision))
    if not pairs:
        raise ValueError("no engines given")
    return tuple(pairs)


def load_average() -> dict[str, float | int | None]:
    """The 1/5/15-minute load averages and the tasks runnable now (other work on the cores)."""
    from dheads.engine.threads import runnable_others

    one, five, fifteen = os.getloadavg()
    return {"load1": one, "load5": five, "load15": fifteen, "runnable_others": runnable_others()}


def machine() -> dict[str, object]:
    """CPU, cores, OS and the versions that shape the numbers."""
    from dheads.engine.threads import usable_cores

    info: dict[str, object] = {"platform": platform.platform(), "python": platform.python_version(),
                               "cpu": _cpu_name(), "usable_cores": usable_cores(), "torch": torch.__version__}
    for dist in ("onnxruntime", "openvino", "nncf"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        from dheads.engine.backends.openvino_ import CpuInfo, core

        info["openvino_capabilities"] = list(CpuInfo.of(core()).capabilities)
    except Exception:  # noqa: BLE001 - absent or broken openvino: reported per engine
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class _Engine:
    name: str
    head: object
    open_s: float
    frames: object = None
    first_frame_s: float = float("nan")
    frame_s: list[float] = dataclasses.field(default_factory=list)
    call_s: list[float] = dataclasses.field(default_factory=list)


def _open_engines(cc: CompareConfig, path: Path, threads: int):
    """The reference head (ONNX Runtime fp32, which also loads the audio encoder) and one head per engine that
    opens here; ``skipped`` says why the others did not."""
    from dheads.engine.backends import BackendError, open_denoiser
    from dheads.engine.config import RuntimeConfig
    from dheads.engine.pipeline import TalkingHead

    ref = TalkingHead.open(path, RuntimeConfig(backend="onnxruntime", device="cpu", threads=threads))
    engines, skipped = [], {}
    for backend, precision in cc.engines:
        name = f"{backend} {precision}"
        t0 = time.perf_counter()
        try:
            den, info = open_denoiser(path, backend=backend, device="cpu", precision=precision,
                                      intra_op_threads=threads)
        except BackendError as e:
            skipped[name] = str(e)
            log.warning("%s: skipped (%s)", name, e)
            continue
        engines.append(_Engine(name, TalkingHead(den, info, ref.encoder, ref.runtime), time.perf_counter() - t0))
    return ref, engines, skipped


def _real_call(head, inputs, seed: int) -> tuple[torch.Tensor, ...]:
    """One real UNet call of the first frame's last step (recorded from the reference engine)."""
    from dheads.export.quantize import CallRecorder

    rec = CallRecorder(head.denoiser)
    type(head)(rec, head.info, head.encoder, head.runtime).frames(inputs, seed=seed).__next__()
    return tuple(torch.from_numpy(v) for v in rec.calls[-1].values())


def _interleaved_calls(engines: list[_Engine], args: tuple[torch.Tensor, ...], n: int) -> None:
    for e in engines:  # warm-up
        e.head.denoiser(*args)
    for _ in range(n):
        for e in engines:
            t0 = time.perf_counter()
            e.head.denoiser(*args)
            e.call_s.append(time.perf_counter() - t0)


def _interleaved_frames(engines: list[_Engine], inputs, frames: int, seed: int) -> None:
    for e in engines:
        e.frames = e.head.frames(inputs, seed=seed)
        t0 = time.perf_counter()
        next(e.frames)
        e.first_frame_s = time.perf_counter() - t0
    for _ in range(min(frames, inputs.n_frames - 1)):
        for e in engines:
            t0 = time.perf_counter()
            next(e.frames)
            e.frame_s.append(time.perf_counter() - t0)
    for e in engines:
        e.frames.close()


def _ms(xs: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in xs)
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)} if ms else {}


def _row(e: _Engine, ref_out: torch.Tensor, args, prepare_s: float, warm_prepare_s: float, steps: int,
         fps_video: int) -> dict:
    out = e.head.denoiser(*args).float()
    per_frame = statistics.median(e.frame_s) if e.frame_s else float("nan")
    return {"engine": e.name, "backend": e.head.info.backend, "precision": e.head.info.precision,
            "file": Path(getattr(e.head.denoiser, "path", "")).name, "open_s": e.open_s,
            "first_frame_ms": e.first_frame_s * 1000, "frame": _ms(e.frame_s), "call": _ms(e.call_s),
            "fps": 1 / per_frame, "real_time_factor": per_frame * fps_video, "steps": steps,
            "time_to_first_frame_s": e.open_s + prepare_s + e.first_frame_s,
            "warm_first_frame_s": warm_prepare_s + e.first_frame_s,  # engine open, landmarker loaded
            "vs_onnxruntime_fp32": {"rel_l2": ((out - ref_out).norm() / ref_out.norm()).item(),
                                    "max_abs": (out - ref_out).abs().max().item()}}


def compare(cc: CompareConfig) -> dict[str, object]:
    """Open every engine, prepare the inputs once, time calls then frames, interleaved; the result as JSON values."""
    from dheads.engine import threads as thread_policy
    from dheads.engine.pipeline import default_engine_path

    path = Path(cc.bundle) if cc.bundle else default_engine_path()
    examples = default_engine_path().parent / "examples"
    face, audio = cc.face or examples / "face.png", cc.audio or examples / "speech.wav"
    load_before = load_average()
    policy = thread_policy.apply(thread_policy.runtime_policy(cc.threads or None))
    ref, engines, skipped = _open_engines(cc, path, policy.onnxruntime)
    t0 = time.perf_counter()
    first = ref.prepare(face, audio)  # the first in a process also loads the face landmarker
    t1 = time.perf_counter()
    inputs = ref.prepare(face, audio)
    prepare_s, warm_prepare_s = t1 - t0, time.perf_counter() - t1
    args = _real_call(ref, inputs, cc.seed)
    ref_out = ref.denoiser(*args).float()
    _interleaved_calls(engines, args, cc.calls)
    _interleaved_frames(engines, inputs, cc.frames, cc.seed)
    steps = ref.default_sampler.steps
    rows = [_row(e, ref_out, args, prepare_s, warm_prepare_s, steps, ref.info.audio.fps) for e in engines]
    return {"kind": "cpu_engines", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "machine": machine(), "load_before": load_before,
            "load_after": load_average(), "threads": {"engine": policy.onnxruntime, "torch": policy.torch,
                                                      "why": policy.why},
            "bundle": str(path), "unet_sha256": ref.info.manifest.file("unet.onnx").sha256 if ref.info.manifest
            and ref.info.manifest.file("unet.onnx") else None,
            "sampler": ref.default_sampler.to_dict(), "inputs": {"face": str(face), "audio": str(audio),
                                                                 "frames": inputs.n_frames},
            "prepare_s": prepare_s, "warm_prepare_s": warm_prepare_s,
            "prepare_stages": first.stages, "warm_prepare_stages": inputs.stages, "config": dataclasses.asdict(cc), "results": rows, "skipped": skipped}


def markdown(result: dict) -> str:
    """The comparison as a markdown table, with the machine and load above it."""
    m, lb, la = result["machine"], result["load_before"], result["load_after"]
    head = (f"{m['cpu']}, {m['usable_cores']} cores, {result['threads']['engine']} engine threads; load "
            f"{lb['load1']:.2f} before, {la['load1']:.2f} after (1-min avg); onnxruntime {m.get('onnxruntime', '-')}, "
            f"openvino {m.get('openvino', '-')}; {result['bundle']}, {result['sampler']['steps']} steps a frame; "
            f"face + audio prepared in {result['prepare_s']:.2f} s (the process's first), "
            f"{result['warm_prepare_s']:.2f} s (warm)")
    lines = ["| engine | UNet call median (min) ms | frame median (min-max) ms | fps | real-time factor | "
             "first frame ms | open s | time to first frame s: cold (warm process) | rel. L2 vs ORT fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        c, f = r["call"], r["frame"]
        lines.append(f"| {r['engine']} | {c['median_ms']:.1f} ({c['min_ms']:.1f}) | {f['median_ms']:.1f} "
                     f"({f['min_ms']:.1f}-{f['max_ms']:.1f}) | {r['fps']:.1f} | {r['real_time_factor']:.2f} | "
                     f"{r['first_frame_ms']:.0f} | {r['open_s']:.2f} | {r['time_to_first_frame_s']:.2f} "
                     f"({r['warm_first_frame_s']:.2f}) | "
                     f"{r['vs_onnxruntime_fp32']['rel_l2']:.2e} |")
    stages = [f"{when}: face {st['face']:.2f} s, audio load {st['audio_load']:.2f} s, audio encode "
              f"{st['audio_encode']:.2f} s" for key, when in (("prepare_stages", "the process's first prepare"),
                                                              ("warm_prepare_stages", "a later one"))
              if (st := result.get(key))]
    if stages:  # the speech is encoded on a thread while the face is cropped: prepare is less than their sum
        lines += ["", "Preparation stages, each its own seconds (the audio overlaps the face): " + "; ".join(stages) + "."]
    skipped = "".join(f"\n- {k}: skipped ({v})" for k, v in result["skipped"].items())
    return f"{head}.\n\n" + "\n".join(lines) + "\n" + (skipped + "\n" if skipped else "")


def warm_renders(engines: tuple[tuple[str, str], ...], out_dir: Path, *, bundle: str | None = None,
                 face: str | None = None, audio: str | None = None, renders: int = 3, threads: int = 0,
                 seed: int = 0) -> dict[str, object]:
    """Whole renders (speech in, mp4 out, as ``dh-run``) from a warm process: each engine's ``TalkingHead`` is opened
    once, then renders the same request ``renders`` times, engines taking turns. Per render: preparation (wall
    and each stage's own seconds), the first frame, time to the first frame (prepare + first frame, from the call),
    per-frame median, fps and real-time factor of the frame loop, and end to end (the call's wall time over the
    video's seconds). The first render of a head also makes its face landmarker."""
    from dheads.engine import threads as thread_policy
    from dheads.engine.config import RuntimeConfig
    from dheads.engine.pipeline import RenderRequest, TalkingHead, default_engine_path

    examples = default_engine_path().parent / "examples"
    face, audio = face or str(examples / "face.png"), audio or str(examples / "speech.wav")
    load_before = load_average()
    policy = thread_policy.runtime_policy(threads or None)
    heads, opened = {}, {}
    for backend, precision in engines:
        t0 = time.perf_counter()
        heads[backend, precision] = TalkingHead.open(bundle, RuntimeConfig(backend=backend, device="cpu",
                                                                           precision=precision,
                                                                           threads=policy.onnxruntime))
        opened[backend, precision] = time.perf_counter() - t0
    rows: dict[tuple[str, str], list[dict]] = {k: [] for k in heads}
    for i in range(renders):
        for key, head in heads.items():
            t0 = time.perf_counter()
            st = head.render(RenderRequest(face, audio, Path(out_dir) / f"{key[0]}_{key[1]}_{i}.mp4", seed=seed))
            wall = time.perf_counter() - t0
            rows[key].append({"render": i, "prepare_s": st.prepare_s, "stages": st.prepare_stages,
                              "first_frame_s": st.first_frame_s, "time_to_first_frame_s": st.first_frame_at - t0,
                              "frame_median_ms": st.median_frame_s * 1000, "fps": st.fps,
                              "real_time_factor": st.real_time_factor, "end_to_end_s": wall,
                              "end_to_end_real_time_factor": wall / st.seconds_of_video, "frames": st.frames})
    return {"kind": "cpu_warm_renders", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "machine": machine(), "load_before": load_before,
            "load_after": load_average(), "threads": {"engine": policy.onnxruntime, "why": policy.why},
            "inputs": {"face": face, "audio": audio}, "sampler": next(iter(heads.values())).default_sampler.to_dict(),
            "results": [{"engine": f"{b} {p}", "open_s": opened[b, p], "renders": rows[b, p]} for b, p in heads]}


def warm_markdown(result: dict) -> str:
    """The warm renders as a markdown table, one row per render."""
    lines = ["| engine | render | time to first frame s (prepare: face, audio load, audio encode; first frame) | "
             "frame median ms | fps | real-time factor | end to end s (RTF) |", "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        for x in r["renders"]:
            st = x["stages"]
            lines.append(f"| {r['engine']} | {x['render'] + 1} | {x['time_to_first_frame_s']:.2f} ({x['prepare_s']:.2f}: "
                         f"{st['face']:.2f}, {st['audio_load']:.2f}, {st['audio_encode']:.2f}; "
                         f"{x['first_frame_s']:.2f}) | {x['frame_median_ms']:.1f} | {x['fps']:.2f} | "
                         f"{x['real_time_factor']:.2f} | {x['end_to_end_s']:.2f} ({x['end_to_end_real_time_factor']:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m dheads.benchmarks.cpu_engines ENGINES OUT.json [RENDERS]: warm renders
    import json
    import tempfile

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        res = warm_renders(parse_engines(sys.argv[1]), Path(tmp), renders=int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    Path(sys.argv[2]).write_text(json.dumps(res, indent=1) + "\n")
    sys.stdout.write(warm_markdown(res))
