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
from rich.table import Table

from .cli_errors import OneLineErrors, raise_if_interrupted
from .config import SamplerConfig
# Sampler and preset names for --help without importing torch (the registries: engine.sampling.SAMPLERS,
# engine.plan.PRESETS; tests/test_plan.py checks these lists against them).
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
PRESET_NAMES = ("quality", "realtime")

T_START = time.perf_counter()  # before torch loads: "time to first frame" counts it (not Python's own ~0.2 s)
T_OPEN = T_START  # when the engine began to open (imports done): set by run()
log = logging.getLogger("dheads.run")
progress_log = logging.getLogger("dheads.run.progress")  # logged without -v: the only sign of life in a log file
PROGRESS_EVERY_S = 10.0
err = Console(stderr=True)
app = typer.Typer(add_completion=False, help="Generate a talking-head video from one face image and speech.")


def describe_sampler(cfg: SamplerConfig) -> str:
    """One line for the summary: what the video was sampled with, e.g. ``ddpm, 4 trailing steps, frame noise 0.9``
    (the step placement is named unless it is the authors' uniform one)."""
    placed = "" if cfg.spacing == "uniform" else f"{cfg.spacing} "
    text = f"{cfg.name}, {cfg.steps} {placed}step{'s' if cfg.steps != 1 else ''}"
    if cfg.warm_steps:
        text += f" (warm start: {cfg.warm_steps})"
    return f"{text}, frame noise {cfg.frame_noise}"


def _summary(stats, out: Path, open_s: float, sampler: SamplerConfig, engine: str = "") -> None:
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


def _check_flags(steps: int | None, sampler: str | None, eta: float, seed: int, crop: str,
                 max_seconds: float | None, frame: int, spacing: str | None = None,
                 frame_noise: str | None = None) -> None:
    """Flag values that are wrong whatever the engine: refused before anything loads (one line, exit 2)."""
    from .config import SPACINGS
    from .noise import MAX_SEED, noise_correlation

    if frame_noise is not None:
        try:
            noise_correlation(frame_noise)
        except ValueError as e:
            raise typer.BadParameter(str(e).removeprefix("frame noise "), param_hint="--frame-noise") from None
    if crop not in ("auto", "none"):
        raise typer.BadParameter(f"must be 'auto' or 'none', got {crop!r}", param_hint="--crop")
    if spacing is not None and spacing not in SPACINGS:
        raise typer.BadParameter(f"must be one of {', '.join(SPACINGS)}, got {spacing!r}", param_hint="--spacing")
    if steps is not None and steps < 1:
        raise typer.BadParameter(f"must be at least 1, got {steps}", param_hint="--steps")
    if not (math.isfinite(eta) and eta >= 0):
        raise typer.BadParameter(f"must be a number >= 0, got {eta}", param_hint="--eta")
    if sampler is not None:
        try:
            SamplerConfig(name=sampler, steps=steps or 1, eta=eta)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--sampler") from None
    if not 0 <= seed <= MAX_SEED:
        raise typer.BadParameter(f"must be in 0..2**64-1, got {seed}", param_hint="--seed")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise typer.BadParameter(f"must be a positive number of seconds, got {max_seconds}",
                                 param_hint="--max-seconds")
    if frame < 0:
        raise typer.BadParameter(f"must be >= 0, got {frame}", param_hint="--frame")


def _sampler_config(sampler: str | None, steps: int | None, eta: float, tables: str, warm_steps: int,
                    preset: str | None, head, spacing: str | None = None,
                    frame_noise: str | None = None) -> SamplerConfig:
    """The preset's (else the engine's) sampler where a flag is not given (``plan.choose_sampler``, the merge
    dh-serve applies to a client's fields); ``--steps`` must fit the model."""
    from .plan import choose_sampler, preset_sampler

    diffusion = head.info.diffusion
    try:
        base = preset_sampler(preset, diffusion) if preset else head.default_sampler
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None
    try:
        return choose_sampler(diffusion, base, name=sampler, steps=steps, eta=eta, tables=tables,
                              warm_steps=warm_steps or None, spacing=spacing, frame_noise=frame_noise)
    except ValueError as e:
        if str(e).startswith("steps must be at most"):
            raise typer.BadParameter(str(e).removeprefix("steps "), param_hint="--steps") from None
        raise typer.BadParameter(str(e), param_hint="--preset/--sampler/--steps/--warm-steps/--tables/--spacing/--frame-noise") from None


@app.command(cls=OneLineErrors)
def run(
    face: Path = typer.Argument(..., help="Photo or video of one face (video: first frame, or --frame K)."),
    audio: Path = typer.Argument(..., help="Speech: wav, flac, mp3, ogg, m4a, or a video's audio track."),
    output: Path = typer.Option(Path("out.mp4"), "-o", "--output", help="Output mp4 (H.264 + AAC, 25 fps)."),
    engine: Optional[Path] = typer.Option(None, "--engine", "-e", help="Plan, export bundle dir, ONNX or "
                                          "checkpoint. Default: the small demo model shipped with the package."),
    steps: Optional[int] = typer.Option(None, help="Respaced denoising steps (default: the engine's)."),
    sampler: Optional[str] = typer.Option(None, help=f"{' | '.join(SAMPLER_NAMES)} (default: the engine's; README 'Sampling')."),
    eta: float = typer.Option(0.0, help="DDIM eta (0 = deterministic given x_T)."),
    warm_steps: int = typer.Option(0, help="Warm start: frames after the first start from the previous frame "
                                           "noised to this respaced step and run only these steps (0 = off)."),
    tables: str = typer.Option("float64", help="Step coefficient tables: float64, or authors (their float32 "
                                               "tables: their sampler bit for bit)."),
    spacing: Optional[str] = typer.Option(None, help="Which timesteps the steps visit: uniform (the authors' rule), "
                                                      "karras (denser at low noise) or trailing (Lin et al. 2024: "
                                                      "no call at t = 0). Default: the preset's, else the model's."),
    frame_noise: Optional[str] = typer.Option(None, help="fresh: new noise every frame (the authors' way); repeat: "
                                                          "every frame reuses frame 0's noise, so frames differ only "
                                                          "where their audio and motion do; a number between 0 and 1 "
                                                          "(e.g. 0.8): each frame's noise correlated that much with "
                                                          "every other frame's. Default: the preset's, else the model's."),
    preset: Optional[str] = typer.Option(None, help=f"{' | '.join(PRESET_NAMES)}: a measured sampler/steps choice "
                                                    "(--sampler/--steps/--warm-steps override its parts)."),
    seed: int = typer.Option(0, help="Seed of all noise; same seed, same device: same video."),
    backend: Optional[str] = typer.Option(None, help="pytorch | torch-compile | onnxruntime | openvino | tensorrt "
                                                  "(default: from the engine; openvino needs the [openvino] extra)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 (PyTorch backend on GPU) | bf16 (openvino, CPUs with "
                                               "bf16) | int8 (openvino or onnxruntime; a bundle with unet_int8.onnx)."),
    crop: str = typer.Option("auto", help="auto: find the face and frame it like the training data; none: centre."),
    frame: int = typer.Option(0, help="Frame index when FACE is a video."),
    max_seconds: Optional[float] = typer.Option(None, help="Use only the first N seconds of the audio."),
    allow_silence: bool = typer.Option(False, help="Accept silent audio (a face that does not talk) instead of "
                                                   "refusing it."),
    audio_encoder: Optional[Path] = typer.Option(None, help="The authors' audio_encoder.pt, for SDA models."),
    cuda_graph: bool = typer.Option(True, help="Capture each frame's step loop as a CUDA graph (GPU)."),
    threads: int = typer.Option(0, help="CPU threads for the engine running the UNet (0 = auto: OMP_NUM_THREADS, "
                                        "else the cores the load average leaves free); torch gets 1 unless it "
                                        "runs the UNet."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the engine does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _check_flags(steps, sampler, eta, seed, crop, max_seconds, frame, spacing, frame_noise)
    from .errors import USER_ERRORS
    from .pipeline import TalkingHead
    from .threads import parse_threads
    from .video import check_output

    from .config import RuntimeConfig

    try:
        runtime = RuntimeConfig(backend=backend, device=device, precision=precision, threads=parse_threads(threads),
                                cuda_graph=cuda_graph, audio_encoder=None if audio_encoder is None else str(audio_encoder))
    except ValueError as e:
        err.print(f"dh-run: error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    try:
        if not face.exists():
            raise FileNotFoundError(f"no such file: {face}")
        if not audio.exists():
            raise FileNotFoundError(f"no such file: {audio}")
        check_output(output, inputs=(face, audio))
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

            stats = head.render(face, audio, output, sampler=cfg, seed=seed, crop=crop, frame=frame,
                                max_seconds=max_seconds, allow_silence=allow_silence, on_frame=on_frame)
    except USER_ERRORS as e:
        err.print(f"dh-run: error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as e:  # a disk that fills up, an output folder that cannot be made, ...
        err.print(f"dh-run: error: {e.filename or output}: {e.strerror or e}", markup=False, highlight=False,
                  soft_wrap=True)
        raise typer.Exit(2) from None
    _summary(stats, output, open_s, cfg or head.default_sampler, head.info.description)


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
