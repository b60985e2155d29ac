"""dh-export: a checkpoint in, a verified bundle (ONNX, manifest, TensorRT plan where possible) out.

Flags become arguments of one library call (:func:`dheads.export.pipeline.run_export`). Bad inputs print
one line on stderr and exit 2; a failed parity check prints one line and exits 1; either way nothing is
left behind.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape

from dheads.engine import names
from dheads.engine.cli_errors import OneLineErrors

if TYPE_CHECKING:
    from dheads.engine.backends.base import BatchProfile

log = logging.getLogger("dheads.export")
err = Console(stderr=True)
out = Console()
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Export a Diffused Heads checkpoint to a verified ONNX / TensorRT bundle.")


def parse_batch(text: str) -> BatchProfile:
    """``"N"`` (fixed batch) or ``"MIN:OPT:MAX"``."""
    from dheads.engine.backends.base import BatchProfile  # torch: not imported for --help

    try:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            return BatchProfile(parts[0], parts[0], parts[0])
        if len(parts) == 3:
            return BatchProfile(*parts)
    except ValueError as e:
        if "profile" in str(e):
            raise typer.BadParameter(str(e), param_hint="--batch") from None
    raise typer.BadParameter(f"expected N or MIN:OPT:MAX, got {text!r}", param_hint="--batch")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _summary(result) -> None:
    from rich.table import Table

    m = result.manifest
    files = Table(title=f"bundle {result.out_dir}", show_header=True)
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for f in m.files:
        files.add_row(escape(f.name), _size(f.bytes), f.sha256[:16])
    out.print(files)
    parity = Table(title="parity against eager PyTorch (fresh random inputs)" if result.reports else "parity")
    for col in ("engine", "output", "max abs", "rel", "rtol / atol", "ok"):
        parity.add_column(col)
    for r in result.reports:
        for name, s in r.stats.items():
            parity.add_row(escape(r.engine), escape(name), f"{s.max_abs:.3g}", f"{s.rel:.3g}",
                           f"{r.tolerance.rtol:g} / {r.tolerance.atol:g}", "yes" if s.passes(r.tolerance) else "NO")
    if m.int8 is not None:
        p = m.int8.parity
        parity.add_row(escape(p["engine"]) + f" ({p['calls']} held-back real calls)", "model_out",
                       f"{p['max_abs']:.3g}", f"{p['rel_l2']:.3g}", f"rel L2 <= {p['bound_rel_l2']:g}",
                       "yes" if p["passed"] else "NO")
    out.print(parity)
    times = Table(title="time", show_header=False)
    for stage, seconds in result.timings.items():
        times.add_row(stage, f"{seconds:.1f} s")
    times.add_row("total", f"{sum(result.timings.values()):.1f} s")
    out.print(times)
    if m.tensorrt is None and not (m.int8 is not None and not result.reports):
        out.print("no unet.plan: TensorRT or a CUDA GPU was not available (run dh-export again on the GPU machine)")


@app.command(cls=OneLineErrors)
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (ours, crema_script.pt, Lightning) or a "
                                      "bundle folder (re-exported; int8: copied, int8 added)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Bundle folder "
                                          "(default: CHECKPOINT's name + _bundle)."),
    audio_encoder: Optional[Path] = typer.Option(None, "--audio-encoder", help="The authors' audio_encoder.pt "
                                                 "(bundled as ONNX)."),
    precision: str = typer.Option("fp16", help=f"{' | '.join(names.EXPORT_PRECISIONS)}: the TensorRT plan's; int8 "
                                  "adds unet_int8.onnx (docs)."),
    calibrate: Optional[list[str]] = typer.Option(None, "--calibrate", help="int8 calibration: a video or "
                                                  "FACE,AUDIO (repeatable)."),
    calibration_seconds: float = typer.Option(2.0, help="Seconds of each calibration "
                                              "source."),
    batch: str = typer.Option("1", help="Batch sizes the engine accepts: N, or MIN:OPT:MAX."),
    opset: int = typer.Option(18, help="ONNX opset (18..21)."),
    image_size: Optional[int] = typer.Option(None, help="Resolution, for checkpoints that "
                                             "record none (default 128)."),
    tensorrt: Optional[bool] = typer.Option(None, "--tensorrt/--no-tensorrt", help="Build unet.plan "
                                            "(default: with TensorRT and a GPU)."),
    typing_: str = typer.Option("auto", "--typing", help="TensorRT network typing: auto | strong | weak."),
    timing_cache: Optional[Path] = typer.Option(None, help="TensorRT timing cache to reuse and update."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at --output."),
    seed: Optional[int] = typer.Option(None, help="Seed of the parity-check inputs (default: fresh random)."),
    frame_noise: Optional[str] = typer.Option(None, help="Bundle's default: fresh | repeat | a "
                                              "correlation in (0, 1)."),
    steps: Optional[int] = typer.Option(None, help="Bundle's default steps (calls per frame)."),
    spacing: Optional[str] = typer.Option(None, help=f"Bundle's default: {' | '.join(names.SPACINGS)}."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the exporter does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _check_flags(checkpoint, precision, steps, spacing, frame_noise)
    from .errors import FAILURES, USER_ERRORS, ExportError
    from .pipeline import run_export

    profile = parse_batch(batch)
    from .quantize import CalibrationSource

    suffix = "_int8" if precision == "int8" and checkpoint.is_dir() else "_bundle"
    out_dir = output if output is not None else checkpoint.with_name(checkpoint.stem + suffix)
    try:
        if calibrate and precision != "int8":
            raise ExportError("--calibrate is only for --precision int8")
        if not calibration_seconds > 0:
            raise ExportError(f"--calibration-seconds must be > 0, got {calibration_seconds}")
        calibration = [CalibrationSource.parse(c, seed=i, seconds=calibration_seconds)
                       for i, c in enumerate(calibrate or ())] or None
        _check_source(checkpoint, precision)
        if precision == "int8" and checkpoint.is_dir():
            from .pipeline import run_quantize

            with err.status("starting") as status:
                result = run_quantize(checkpoint, out_dir, calibration=calibration, overwrite=overwrite,
                                      on_stage=lambda name: status.update(f"{escape(name)} ..."))
            _summary(result)
            return
        with err.status("starting") as status:
            def on_stage(name: str) -> None:  # a transient spinner: stderr stays clean when not a terminal
                status.update(f"{escape(name)} ...")

            make = _from_bundle if checkpoint.is_dir() else run_export  # a bundle: re-exported from its weights
            result = make(checkpoint, out_dir, audio_encoder=audio_encoder, precision=precision,
                          profile=profile, opset=opset, tensorrt=tensorrt, overwrite=overwrite, seed=seed,
                          timing_cache=timing_cache, trt_typing=typing_, image_size=image_size,
                          frame_noise=frame_noise, steps=steps, spacing=spacing, calibration=calibration,
                          on_stage=on_stage)
    except USER_ERRORS as e:
        _fail(e, 2)
    except FAILURES as e:
        _fail(e, 1)
    except OSError as e:
        _fail(f"{e.filename or out_dir}: {e.strerror or e}", 2)
    _summary(result)


def _check_source(path: Path, precision: str) -> None:
    """ExportError (one line) for a source dh-export cannot take: a symlink loop (``Path.exists`` calls it
    missing), or a folder that is not an export bundle."""
    import errno
    import os

    from dheads.engine.bundle import MANIFEST

    from .errors import ExportError

    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ExportError(f"{path}: symlink loop (the link leads back to itself), not a checkpoint") from None
        return  # missing: the pipeline says so
    if path.is_dir() and not (path / MANIFEST).is_file():
        raise ExportError(f"{path}: is a directory but not an export bundle (no {MANIFEST}); dh-export takes a "
                          "checkpoint file (ours, crema_script.pt, Lightning, a UNet state_dict) or a bundle folder")


def _from_bundle(bundle: Path, out_dir: Path, **options):
    """``run_export`` of a bundle folder: its weights read back from its ``unet.onnx`` (``load_checkpoint``, checked
    against ONNX Runtime, and the file against the manifest's sha256) into a checkpoint in a temporary folder, then
    exported as any checkpoint (a fresh ONNX verified, fp16, TensorRT where available: e.g. the plan of a shipped
    bundle, built on the GPU machine). The new manifest names its source as that ``unet.onnx`` and its sha256."""
    import dataclasses
    import tempfile

    from dheads.engine.bundle import UNET_ONNX, read_manifest, sha256_file, write_manifest
    from dheads.engine.checkpoint import load_checkpoint, save_checkpoint

    from .errors import ExportError
    from .pipeline import run_export

    try:
        ckpt = load_checkpoint(bundle)
    except ValueError as e:  # CheckpointError, BundleError: one line
        raise ExportError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="dh-export-") as tmp:
        result = run_export(save_checkpoint(Path(tmp) / "weights.pt", ckpt), out_dir, **options)
    record = read_manifest(bundle).file(UNET_ONNX)
    manifest = dataclasses.replace(result.manifest, source_name=f"{bundle.name}/{UNET_ONNX}", source_kind="bundle",
                                   source_sha256=record.sha256 if record else sha256_file(bundle / UNET_ONNX))
    write_manifest(out_dir, manifest)
    return dataclasses.replace(result, manifest=manifest)


def _check_flags(checkpoint: Path, precision: str, steps: int | None, spacing: str | None,
                 frame_noise: str | None) -> None:
    """What can be refused before torch is imported (the rules of ``engine/names.py``; the pipeline applies
    them again for library callers): one line, exit 2."""
    try:
        names.check_flags(frame_noise=frame_noise, steps=steps, spacing=spacing)
        names.check_precision(precision, names.EXPORT_PRECISIONS)
    except ValueError as e:
        _fail(str(e) if str(e).startswith("--") else f"--{e}", 2)
    if not checkpoint.exists() and not checkpoint.is_symlink():
        _fail(f"{checkpoint}: no such file", 2)


def _fail(e: BaseException | str, code: int) -> None:
    text = str(e).strip().splitlines()
    err.print(f"dh-export: error: {text[0] if text else type(e).__name__}", markup=False, highlight=False,
              soft_wrap=True)
    raise typer.Exit(code)


def main() -> None:
    """Console script entry point."""
    app(prog_name="dh-export")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
