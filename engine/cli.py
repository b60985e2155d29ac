"""dh-run: a face and a speech file in, a talking-head mp4 out. Flags become configs; one library call."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config import SamplerConfig
from .errors import USER_ERRORS
from .plan import PRESETS, preset_sampler
from .sampling import sampler_help

log = logging.getLogger("dheads.run")
err = Console(stderr=True)
app = typer.Typer(add_completion=False, help="Generate a talking-head video from one face image and speech.")


def _summary(stats, out: Path) -> None:
    t = Table(title=f"wrote {out}", show_header=False)
    t.add_row("frames", f"{stats.frames} ({stats.seconds_of_video:.2f} s of video at 25 fps)")
    t.add_row("total time", f"{stats.total_s:.2f} s")
    t.add_row("first frame", f"{stats.first_frame_s * 1000:.1f} ms")
    t.add_row("per frame (median)", f"{stats.median_frame_s * 1000:.1f} ms")
    t.add_row("frames per second", f"{stats.fps:.2f}")
    t.add_row("real-time factor", f"{stats.real_time_factor:.2f} (compute s / video s)")
    err.print(t)


@app.command()
def run(
    face: Path = typer.Argument(..., help="Photo or video of one face (video: first frame, or --frame K)."),
    audio: Path = typer.Argument(..., help="Speech: wav, flac, mp3, ogg, m4a, or a video's audio track."),
    output: Path = typer.Option(Path("out.mp4"), "-o", "--output", help="Output mp4 (H.264 + AAC, 25 fps)."),
    engine: Optional[Path] = typer.Option(None, "--engine", "-e", help="Plan, export bundle dir, ONNX or "
                                          "checkpoint. Default: the small demo model shipped with the package."),
    steps: Optional[int] = typer.Option(None, help="Respaced denoising steps (default: the engine's)."),
    sampler: Optional[str] = typer.Option(None, help=f"{sampler_help()} (default: the engine's)."),
    eta: float = typer.Option(0.0, help="DDIM eta (0 = deterministic given x_T)."),
    warm_steps: int = typer.Option(0, help="Warm start: frames after the first start from the previous frame "
                                           "noised to this respaced step and run only these steps (0 = off)."),
    tables: str = typer.Option("float64", help="Step coefficient tables: float64, or authors (their float32 "
                                               "tables: their sampler bit for bit)."),
    preset: Optional[str] = typer.Option(None, help=f"{' | '.join(PRESETS)}: a measured sampler/steps choice "
                                                    "(--sampler/--steps/--warm-steps override its parts)."),
    seed: int = typer.Option(0, help="Seed of all noise; same seed, same device: same video."),
    backend: Optional[str] = typer.Option(None, help="pytorch | onnxruntime | tensorrt (default: from the engine)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 (PyTorch backend on GPU)."),
    crop: str = typer.Option("auto", help="auto: find the face and frame it like the training data; none: centre."),
    frame: int = typer.Option(0, help="Frame index when FACE is a video."),
    max_seconds: Optional[float] = typer.Option(None, help="Use only the first N seconds of the audio."),
    allow_silence: bool = typer.Option(False, help="Accept silent audio (a face that does not talk) instead of "
                                                   "refusing it."),
    audio_encoder: Optional[Path] = typer.Option(None, help="The authors' audio_encoder.pt, for SDA models."),
    cuda_graph: bool = typer.Option(True, help="Capture each frame's step loop as a CUDA graph (GPU)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the engine does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .pipeline import TalkingHead

    if crop not in ("auto", "none"):
        raise typer.BadParameter(f"must be 'auto' or 'none', got {crop!r}", param_hint="--crop")
    try:
        if not face.exists():
            raise FileNotFoundError(f"no such file: {face}")
        if not audio.exists():
            raise FileNotFoundError(f"no such file: {audio}")
        head = TalkingHead.open(engine, backend=backend, device=device, precision=precision,
                                audio_encoder=audio_encoder)
        try:
            base = preset_sampler(preset, head.info.diffusion) if preset else head.default_sampler
            cfg = SamplerConfig(name=sampler or base.name, steps=steps or base.steps, eta=eta, tables=tables,
                                warm_steps=warm_steps or base.warm_steps)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--preset/--sampler/--steps/--warm-steps/--tables") from None
        with Progress(TextColumn("frames"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[fps]:.2f} fps"), TimeElapsedColumn(), TextColumn("left"),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task("frames", total=None, fps=0.0)

            def on_frame(done: int, total: int) -> None:
                elapsed = bar.tasks[0].elapsed or 1e-9
                bar.update(task, completed=done, total=total, fps=done / elapsed)

            stats = head.render(face, audio, output, sampler=cfg, seed=seed, crop=crop, frame=frame,
                                max_seconds=max_seconds, allow_silence=allow_silence, cuda_graph=cuda_graph,
                                on_frame=on_frame)
    except USER_ERRORS as e:
        err.print(f"dh-run: error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _summary(stats, output)


def main() -> None:
    app(prog_name="dh-run")


if __name__ == "__main__":
    sys.exit(main())
