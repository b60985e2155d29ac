"""``export_bundle``: checkpoint -> verified bundle directory, all or nothing.

Everything is written into a hidden temporary directory beside ``out_dir`` and renamed into place only
after every parity check passed; on any failure (or Ctrl-C) the temporary directory is removed and
``out_dir`` is left as it was.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from dheads.engine.backends.base import BatchProfile, unet_io_spec
from dheads.engine.bundle import (MANIFEST, UNET_ONNX, UNET_ONNX_FP16, UNET_ONNX_INT8, UNET_PLAN, BundleError,
                                  BundleFile, Manifest, read_manifest, sha256_file, write_manifest)
from dheads.engine.checkpoint import load_checkpoint
from dheads.engine import names

from .audio import audio_record
from .errors import ExportError
from .to_onnx import DEFAULT_OPSET, export_unet_onnx
from .verify import FP16, ORT_FP32, ParityReport, verify_onnx

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 18, 21
StageFn = Callable[[str], None]


@dataclass
class ExportResult:
    """What an export made: the manifest, where it is, and how long each stage took (seconds)."""

    manifest: Manifest
    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    reports: list[ParityReport] = field(default_factory=list)


def export_bundle(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  audio_encoder: str | os.PathLike | None = None, precision: str = "fp16",
                  profile: BatchProfile = BatchProfile(), opset: int = DEFAULT_OPSET, tensorrt: bool | None = None,
                  overwrite: bool = False, seed: int | None = None, timing_cache: str | os.PathLike | None = None,
                  trt_typing: str = "auto", ema: bool = True, image_size: int | None = None,
                  on_stage: StageFn | None = None) -> Manifest:
    """Export ``ckpt_path`` (any checkpoint ``load_checkpoint`` accepts) into the bundle ``out_dir``.

    ``precision``: ``"fp16"`` also writes ``unet_fp16.onnx`` and builds an fp16 plan; ``"fp32"`` keeps
    everything fp32. ``tensorrt``: build ``unet.plan`` (None: when TensorRT and a CUDA GPU are present).
    ``seed``: of the parity inputs (fresh random when None). ``image_size``: the exported resolution, for
    checkpoints that do not record it (TorchScript, Lightning, bare state_dict: 128, the authors').
    Raises ExportError/CheckpointError for bad inputs, ParityError when a check fails; nothing is left
    behind on failure.
    """
    return run_export(ckpt_path, out_dir, audio_encoder=audio_encoder, precision=precision, profile=profile,
                      opset=opset, tensorrt=tensorrt, overwrite=overwrite, seed=seed, timing_cache=timing_cache,
                      trt_typing=trt_typing, ema=ema, image_size=image_size, on_stage=on_stage).manifest


def run_export(ckpt_path, out_dir, *, audio_encoder=None, precision: str = "fp16",
               profile: BatchProfile = BatchProfile(), opset: int = DEFAULT_OPSET, tensorrt: bool | None = None,
               overwrite: bool = False, seed: int | None = None, timing_cache=None, trt_typing: str = "auto",
               ema: bool = True, image_size: int | None = None, frame_noise: str | None = None,
               steps: int | None = None, spacing: str | None = None, calibration: tuple | None = None,
               on_stage: StageFn | None = None) -> ExportResult:
    """:func:`export_bundle`, also returning stage timings and parity reports (for the CLI's summary).

    ``frame_noise``: the bundle's default frame noise (``engine/noise.py``), recorded in its manifest in
    place of the checkpoint's; None keeps the checkpoint's. ``steps``, ``spacing``: likewise the bundle's
    default step count and step placement (e.g. 4 trailing steps for a model that samples well on them).
    ``precision="int8"``: the fp32 bundle plus ``unet_int8.onnx`` calibrated on ``calibration`` (a sequence of
    ``quantize.CalibrationSource``; None: the packaged example face and speech), see :func:`add_int8`."""
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    _check_request(ckpt_path, out_dir, precision, opset, overwrite, image_size, frame_noise, steps, spacing)
    build_plan = _want_tensorrt(tensorrt)
    seed = secrets.randbits(31) if seed is None else seed
    stage = _Stages(on_stage)
    tmp = _make_temp_dir(out_dir)
    try:
        with stage("load checkpoint"):
            ckpt = _with_sampling(_with_image_size(load_checkpoint(ckpt_path), image_size), frame_noise, steps, spacing)
            model = ckpt.build(ema=ema)
            source_sha = sha256_file(ckpt_path)
        with stage("export unet.onnx"):
            export_unet_onnx(model, tmp / UNET_ONNX, precision="fp32", opset=opset, profile=profile)
        with stage("verify unet.onnx (onnxruntime vs torch)"):
            reports = [verify_onnx(tmp / UNET_ONNX, model, profile, tolerance=ORT_FP32, seed=seed)]
            reports[-1].raise_if_failed()
        if precision == "fp16":  # int8: the fp32 graph, quantized after the manifest is written
            with stage("export unet_fp16.onnx"):
                export_unet_onnx(model, tmp / UNET_ONNX_FP16, precision="fp16", opset=opset, profile=profile)
            with stage("verify unet_fp16.onnx (onnxruntime vs torch)"):
                reports.append(verify_onnx(tmp / UNET_ONNX_FP16, model, profile, tolerance=FP16, seed=seed))
                reports[-1].raise_if_failed()
        with stage("audio encoder"):
            audio = audio_record(audio_encoder, ckpt.audio, ckpt.model, tmp, opset=opset, seed=seed)
        inputs, outputs = unet_io_spec(ckpt.model)
        base_precision = "fp32" if precision == "int8" else precision
        manifest = Manifest(model=ckpt.model, audio=ckpt.audio, diffusion=ckpt.diffusion, inputs=tuple(inputs),
                            outputs=tuple(outputs), profile=profile, precision=base_precision, source_sha256=source_sha,
                            source_name=ckpt_path.name, source_kind=ckpt.source, opset=opset, tools=tool_versions(),
                            audio_encoder=audio, training=dict(ckpt.meta.get("trained_on") or {}),
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if build_plan:
            manifest, plan_report = _tensorrt_stage(stage, tmp, manifest, model, base_precision, profile, trt_typing,
                                                    timing_cache, seed)
            reports.append(plan_report)
        with stage("write manifest"):
            verification = {r.engine: r.to_dict() for r in reports}
            if audio.kind == "onnx":
                verification[f"onnxruntime:{audio.file}"] = audio.options["parity"]
            manifest = replace(manifest, verification=verification, files=_bundle_files(tmp))
            write_manifest(tmp, manifest)
            if read_manifest(tmp) != manifest:
                raise ExportError("the manifest does not read back as written")
        if precision == "int8":
            manifest = add_int8(tmp, calibration, stage)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(manifest=manifest, out_dir=out_dir, timings=stage.timings, reports=reports)


def add_int8(bundle: Path, calibration=None, stage=None, threads: int | None = None) -> Manifest:
    """Write ``unet_int8.onnx`` into ``bundle`` (a finished fp32 bundle, in its temporary folder) from real calls
    of its fp32 UNet on ``calibration`` (None: the packaged example face and speech), check its parity, and
    record both in the manifest. Returns the new manifest."""
    from .quantize import default_sources, make_int8

    stage = stage or _Stages(None)
    manifest = read_manifest(bundle)
    sources = list(calibration) if calibration else default_sources()
    sampler = _default_sampler_dict(manifest)
    with stage("quantize unet_int8.onnx (NNCF, real calibration)"):
        record = make_int8(bundle, bundle / UNET_ONNX, bundle / UNET_ONNX_INT8, sources, sampler, threads)
    with stage("write manifest"):
        manifest = replace(manifest, int8=record, files=_bundle_files(bundle),
                           tools={**manifest.tools, **record.tools},
                           verification={**manifest.verification, "int8": record.parity})
        write_manifest(bundle, manifest)
    return manifest


def _default_sampler_dict(manifest: Manifest) -> dict:
    return manifest.diffusion.sampling.to_dict()


def run_quantize(bundle: str | os.PathLike, out_dir: str | os.PathLike, *, calibration=None, overwrite: bool = False,
                 threads: int | None = None, on_stage: StageFn | None = None) -> ExportResult:
    """An existing fp32 bundle in, a copy of it with ``unet_int8.onnx`` out (``dh-export BUNDLE --precision
    int8``); all or nothing, as :func:`run_export`."""
    bundle, out_dir = Path(bundle), Path(out_dir)
    try:
        read_manifest(bundle)
    except BundleError as e:
        raise ExportError(str(e)) from None
    if not (bundle / UNET_ONNX).is_file():
        raise ExportError(f"{bundle}: no {UNET_ONNX} to quantize")
    if out_dir.resolve() == bundle.resolve():
        raise ExportError(f"{out_dir}: give the int8 bundle a folder of its own (-o), not the source bundle")
    _check_output(out_dir, overwrite)
    stage = _Stages(on_stage)
    tmp = _make_temp_dir(out_dir)
    try:
        with stage("copy bundle"):
            for p in sorted(bundle.iterdir()):
                if p.is_file() and p.name != UNET_ONNX_INT8:
                    shutil.copy2(p, tmp / p.name)
        manifest = add_int8(tmp, calibration, stage, threads)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(manifest=manifest, out_dir=out_dir, timings=stage.timings)


def _tensorrt_stage(stage, tmp: Path, manifest: Manifest, model, precision: str, profile: BatchProfile,
                    typing: str, timing_cache, seed: int) -> tuple[Manifest, ParityReport]:
    from .to_tensorrt import build_plan
    from .verify import verify_plan

    with stage("build unet.plan (TensorRT)"):
        record = build_plan(tmp, model.config, profile=profile, precision=precision, typing=typing,
                            timing_cache=timing_cache)
        manifest = replace(manifest, tensorrt=record, tools={**manifest.tools, "tensorrt": record.version})
    with stage("verify unet.plan (TensorRT vs torch)"):
        report = verify_plan(tmp / UNET_PLAN, manifest, model, seed=seed)
        report.raise_if_failed()
    return manifest, report


class _Stages:
    """Times named stages and tells ``on_stage`` when one starts (the CLI's progress)."""

    def __init__(self, on_stage: StageFn | None):
        self.on_stage = on_stage
        self.timings: dict[str, float] = {}

    def __call__(self, name: str):
        return _Stage(self, name)


class _Stage:
    def __init__(self, stages: _Stages, name: str):
        self.stages, self.name = stages, name

    def __enter__(self):
        log.info("%s ...", self.name)
        if self.stages.on_stage:
            self.stages.on_stage(self.name)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.stages.timings[self.name] = time.perf_counter() - self.t0
        return False


def _with_sampling(ckpt, frame_noise: str | None, steps: int | None, spacing: str | None):
    """The checkpoint with these over its default sampling (what the manifest records), where given."""
    d = ckpt.diffusion
    try:
        if steps is not None:
            names.check_steps(steps, d.num_timesteps)
        sampling = d.sampling.override(frame_noise=frame_noise, steps=steps, spacing=spacing)
    except ValueError as e:
        raise ExportError(str(e) if str(e).startswith("--") else f"--{e}") from None
    return replace(ckpt, diffusion=replace(d, sampling=sampling))


def _with_image_size(ckpt, image_size: int | None):
    """The checkpoint exported at ``image_size`` (a multiple of 2**levels), when one is asked for."""
    if image_size is None or image_size == ckpt.model.image_size:
        return ckpt
    levels = len(ckpt.model.channel_mult) - 1
    if image_size % (2 ** levels):
        raise ExportError(f"--image-size {image_size} must be a multiple of {2 ** levels} for this model")
    if ckpt.source == "dheads":
        log.warning("exporting at %d px a model trained at %d px", image_size, ckpt.model.image_size)
    return replace(ckpt, model=replace(ckpt.model, image_size=image_size))


def _check_request(ckpt: Path, out_dir: Path, precision: str, opset: int, overwrite: bool,
                   image_size: int | None, frame_noise: str | None = None, steps: int | None = None,
                   spacing: str | None = None) -> None:
    if image_size is not None and image_size < 8:
        raise ExportError(f"--image-size must be at least 8, got {image_size}")
    try:  # the rules of engine/names.py (dh-export's CLI applies the same before torch loads)
        names.check_flags(frame_noise=frame_noise, steps=steps, spacing=spacing)
        names.check_precision(precision, names.EXPORT_PRECISIONS)
    except ValueError as e:
        raise ExportError(str(e) if str(e).startswith("--") else f"--{e}") from None
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} (torch's exporter "
                          f"emits opset 18+; its conversion down to 17 produces invalid Split nodes)")
    if not ckpt.exists():
        raise ExportError(f"{ckpt}: no such file")
    if not ckpt.is_file():
        raise ExportError(f"{ckpt}: is a directory, not a checkpoint file")
    _check_output(out_dir, overwrite)


def _check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ExportError(f"{out_dir}: already exists; pass --overwrite to replace it")
        if not out_dir.is_dir() or not (out_dir / MANIFEST).is_file():
            raise ExportError(f"{out_dir}: exists and is not an export bundle; refusing to replace it")
    parent = out_dir.parent
    if not parent.is_dir():
        raise ExportError(f"{out_dir}: parent directory {parent} does not exist or is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{out_dir}: output directory {parent} is not writable")


def _want_tensorrt(requested: bool | None) -> bool:
    available = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
    if requested and not available:
        raise ExportError("--tensorrt needs TensorRT (pip install tensorrt) and a CUDA GPU visible to torch")
    if requested is None and not available:
        log.info("TensorRT or a CUDA GPU unavailable: bundle without unet.plan")
    return available if requested is None else requested


def _make_temp_dir(out_dir: Path) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes 0700; the bundle gets ordinary directory permissions
        return tmp
    except OSError as e:
        raise ExportError(f"{out_dir}: cannot write to {out_dir.parent} ({e.strerror or e})") from None


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished bundle to ``out_dir`` (replacing an old bundle only when asked)."""
    old = None
    if overwrite and out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old / out_dir.name, out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _bundle_files(directory: Path) -> tuple[BundleFile, ...]:
    return tuple(BundleFile.of(directory, p.name) for p in sorted(directory.iterdir())
                 if p.is_file() and p.name != MANIFEST)


def tool_versions() -> dict[str, str]:
    """Versions of everything that shaped the bundle's files."""
    tools = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("diffused-heads", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"):
        try:
            tools[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tools
