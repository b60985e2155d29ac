"""dh-run: a face and a speech file in, a talking-head mp4 out. Flags become configs; one library call."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import names
from .cli_errors import OneLineErrors, raise_if_interrupted
from .config import RuntimeConfig, SamplerConfig

T_START = time.perf_counter()  # before torch loads: "time to first frame" counts it (not Python's own ~0.2 s)
T_OPEN = T_START  # when the engine began to open (imports done): set by run()
log = logging.getLogger("dheads.run")
progress_log = logging.getLogger("dheads.run.progress")  # logged without -v: the only sign of life in a log file
PROGRESS_EVERY_S = 10.0
err = Console(stderr=True)
# Plain (click) help: it wraps in any terminal width, where rich's option panels cut long words at 80 columns.
app = typer.Typer(add_completion=False, rich_markup_mode=None,
                  help="Generate a talking-head video from one face image and speech.")


def describe_sampler(cfg: SamplerConfig) -> str:
    """One line for the summary: what the video was sampled with, e.g. ``ddpm, 4 trailing steps, frame noise 0.9``
    (the step placement is named unless it is the authors' uniform one)."""
    placed = "" if cfg.spacing == "uniform" else f"{cfg.spacing} "
    text = f"{cfg.name}, {cfg.steps} {placed}step{'s' if cfg.steps != 1 else ''}"
    if cfg.warm_steps:
        text += f" (warm start: {cfg.warm_steps})"
    return f"{text}, frame noise {cfg.frame_noise}"


def _summary(stats, out: Path, open_s: float, sampler: SamplerConfig, engine: str = "") -> None:
    from rich.table import Table

    t = Table(title=f"wrote {out}", show_header=False)
    if engine:
        t.add_row("engine", engine)
    t.add_row("sampler", describe_sampler(sampler))
    t.add_row("frames", f"{stats.frames} ({stats.seconds_of_video:.2f} s of video at 25 fps)")
    t.add_row("total time", f"{stats.total_s:.2f} s")
    t.add_row("first frame", f"{stats.first_frame_s * 1000:.1f} ms")
    t.add_row("time to first frame", f"{stats.first_frame_at - T_START:.2f} s from start-up ({_stages(stats, open_s)})")
    t.add_row("per frame (median)", f"{stats.median_frame_s * 1000:.1f} ms")
    t.add_row("frames per second", f"{stats.fps:.2f}")
    t.add_row("real-time factor", f"{stats.real_time_factor:.2f} (compute s / video s)")
    err.print(t)


def _stages(stats, open_s: float) -> str:
    """Where the time to the first frame went: imports (start-up to opening the engine), the engine, face, audio
    load, audio encoding, the first frame's own compute."""
    st = stats.prepare_stages
    parts = [f"imports {T_OPEN - T_START:.2f} s", f"engine {open_s:.2f} s"]
    if st:
        parts += [f"face {st['face']:.2f} s", f"audio load {st['audio_load']:.2f} s",
                  f"audio encode {st['audio_encode']:.2f} s"]
    else:
        parts.append(f"face + audio {stats.prepare_s:.2f} s")
    return ", ".join(parts + [f"first frame {stats.first_frame_s:.2f} s"])


def _flag(flag: str, rule, *args):
    """``rule(*args)`` (an ``engine/names.py`` rule); its ValueError as ``Invalid value for <flag>: ...``."""
    try:
        return rule(*args)
    except ValueError as e:
        raise typer.BadParameter(names.flag_error(e, flag), param_hint=flag) from None


def _check_flags(steps: int | None, sampler: str | None, eta: float | None, seed: int, crop: str,
                 max_seconds: float | None, frame: int, spacing: str | None = None,
                 frame_noise: str | None = None, tables: str | None = None, warm_steps: int | None = None,
                 preset: str | None = None) -> None:
    """Flag values that are wrong whatever the engine: refused by the rules of ``engine/names.py`` before
    anything heavy (torch) is imported (one line, exit 2)."""
    if frame_noise is not None:
        _flag("--frame-noise", names.RULES["frame_noise"], frame_noise)
    if crop not in ("auto", "none"):
        raise typer.BadParameter(f"must be 'auto' or 'none', got {crop!r}", param_hint="--crop")
    for name, value in dict(spacing=spacing, steps=steps, eta=eta, sampler=sampler, tables=tables).items():
        if value is not None:
            _flag("--" + name, names.RULES[name], value)
    if warm_steps is not None:
        _flag("--warm-steps", names.check_warm_steps, warm_steps,
              steps if steps is not None else max(warm_steps, 0))
    for name, value in dict(preset=preset, seed=seed).items():
        if value is not None:
            _flag("--" + name, names.RULES[name], value)
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise typer.BadParameter(f"must be a positive number of seconds, got {max_seconds}",
                                 param_hint="--max-seconds")
    if frame < 0:
        raise typer.BadParameter(f"must be >= 0, got {frame}", param_hint="--frame")


def _sampler_config(sampler: str | None, steps: int | None, eta: float | None, tables: str | None,
                    warm_steps: int | None, preset: str | None, head, spacing: str | None = None,
                    frame_noise: str | None = None) -> SamplerConfig:
    """The preset's (else the engine's) sampler, with the flags given (not None) over it
    (``SamplerConfig.override``, the merge every front end uses); ``--steps`` must fit the model
    (``names.check_steps``)."""
    from .plan import preset_sampler

    diffusion = head.info.diffusion
    base = preset_sampler(preset, diffusion) if preset else head.default_sampler
    if steps is not None:
        _flag("--steps", names.check_steps, steps, diffusion.num_timesteps)
    try:
        return base.override(name=sampler, steps=steps, eta=eta, tables=tables, warm_steps=warm_steps,
                             spacing=spacing, frame_noise=frame_noise)
    except ValueError as e:
        hint = "--preset/--sampler/--steps/--warm-steps/--tables/--spacing/--frame-noise"
        raise typer.BadParameter(str(e), param_hint=hint) from None


def _error(message) -> None:
    err.print(f"dh-run: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command(cls=OneLineErrors)
def run(
    face: Path = typer.Argument(..., help="Photo or video of one face (video: --frame K)."),
    audio: Path = typer.Argument(..., help="Speech: wav, flac, mp3, ogg, m4a or a video."),
    output: Path = typer.Option(Path("out.mp4"), "-o", "--output", help="Output mp4 (H.264 + AAC, 25 fps)."),
    engine: Optional[Path] = typer.Option(None, "--engine", "-e", help="Bundle folder, .plan, .onnx or "
                                          "checkpoint (default: the demo model)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the engine's)."),
    sampler: Optional[str] = typer.Option(None, help=f"{' | '.join(names.SAMPLERS)} (default: the engine's)."),
    eta: Optional[float] = typer.Option(None, help="DDIM eta (default: the engine's, 0)."),
    warm_steps: Optional[int] = typer.Option(None, help="Start frames after the first from the previous one, "
                                             "noised to this step (0 = off)."),
    tables: Optional[str] = typer.Option(None, help=f"{' | '.join(names.TABLES)} (authors: their float32 "
                                         "tables)."),
    spacing: Optional[str] = typer.Option(None, help=f"{' | '.join(names.SPACINGS)}: which timesteps the "
                                          "steps visit."),
    frame_noise: Optional[str] = typer.Option(None, help="fresh | repeat | a correlation in (0, 1) between "
                                              "frames' noise."),
    preset: Optional[str] = typer.Option(None, help=f"{' | '.join(names.PRESETS)}: a measured sampler choice "
                                         "(flags override it)."),
    seed: int = typer.Option(0, help="Seed of all noise (same seed and device: same video)."),
    backend: Optional[str] = typer.Option(None, help="pytorch | torch-compile | onnxruntime | openvino | "
                                          "tensorrt (default: from the engine)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("fp32", help=f"{' | '.join(names.PRECISIONS)} (which backend runs which: "
                                  "docs)."),
    crop: str = typer.Option("auto", help="auto: frame the face as in training; none: centre."),
    frame: int = typer.Option(0, help="Frame index when FACE is a video."),
    max_seconds: Optional[float] = typer.Option(None, help="Use only the first N seconds of the audio."),
    allow_silence: bool = typer.Option(False, help="Accept silent audio instead of refusing it."),
    audio_encoder: Optional[Path] = typer.Option(None, help="The authors' audio_encoder.pt (SDA models)."),
    cuda_graph: bool = typer.Option(True, help="Capture each frame's steps as a CUDA graph (GPU)."),
    threads: int = typer.Option(0, help="CPU threads for the UNet (0 = auto)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the engine does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Everything that can be refused without the engine is refused here, before torch is imported.
    _check_flags(steps, sampler, eta, seed, crop, max_seconds, frame, spacing, frame_noise, tables, warm_steps,
                 preset)
    from .threads import parse_threads

    try:
        runtime = RuntimeConfig(backend=backend, device=device, precision=precision, threads=parse_threads(threads),
                                cuda_graph=cuda_graph, audio_encoder=None if audio_encoder is None else str(audio_encoder))
    except ValueError as e:
        _error(e)
    for path in (face, audio):
        if not path.exists():
            _error(f"no such file: {path}")
    from .video import VideoError, check_output  # av and numpy, not torch

    try:
        check_output(output, inputs=(face, audio))
    except VideoError as e:
        _error(e)
    from .errors import USER_ERRORS
    from .pipeline import RenderRequest, TalkingHead

    try:
        global T_OPEN
        t_open = T_OPEN = time.perf_counter()
        head = TalkingHead.open(engine, runtime)
        open_s = time.perf_counter() - t_open
        raise_if_interrupted()
        cfg = _sampler_config(sampler, steps, eta, tables, warm_steps, preset, head, spacing, frame_noise)
        with _progress() as show:
            def on_frame(done: int, total: int) -> None:
                raise_if_interrupted()
                show(done, total)

            request = RenderRequest(face, audio, output, sampler=cfg, seed=seed, crop=crop, frame=frame,
                                    max_seconds=max_seconds, allow_silence=allow_silence)
            stats = head.render(request, on_frame=on_frame)
    except USER_ERRORS as e:
        _error(e)
    except OSError as e:  # a disk that fills up, an output folder that cannot be made, ...
        _error(f"{e.filename or output}: {e.strerror or e}")
    _summary(stats, output, open_s, cfg, head.info.description)


@contextlib.contextmanager
def _progress():
    """``on_frame(done, total)``: a bar on a terminal, else a log line every ``PROGRESS_EVERY_S`` seconds."""
    if not err.is_terminal:
        from .progress import ProgressLog

        progress_log.setLevel(logging.INFO)
        yield ProgressLog(progress_log, "frames", every_s=PROGRESS_EVERY_S).update
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("frames"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[fps]:.2f} fps"), TimeElapsedColumn(), TextColumn("left"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("frames", total=None, fps=0.0)

        def on_frame(done: int, total: int) -> None:
            elapsed = bar.tasks[0].elapsed or 1e-9
            bar.update(task, completed=done, total=total, fps=done / elapsed)

        yield on_frame


def main() -> None:
    app(prog_name="dh-run")  # OneLineErrors exits: 0, 2 (bad input), 128 + signal (interrupted)


if __name__ == "__main__":
    sys.exit(main())
