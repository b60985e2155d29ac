"""``dh-eval GENERATED [--reference GT] [--json out.json]``: video metrics without downloaded weights.

Thin: flags -> :class:`EvalConfig` -> :func:`evaluate_path` -> a rich table and a JSON file.
Input errors (missing path, not a video) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import typer

log = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, rich_markup_mode=None, help=__doc__.splitlines()[0])

# (JSON key, column title, format) for the table; the JSON holds every metric.
COLUMNS = (
    ("n_frames", "frames", "{:d}"),
    ("ofm", "OFM px", "{:.3f}"),
    ("fmse", "F-MSE", "{:.2f}"),
    ("blinks_per_s", "blinks/s", "{:.2f}"),
    ("mouth_spread", "mouth", "{:.3f}"),
    ("mouth_spread_ratio", "mouth/real", "{:.2f}"),
    ("lip_corr", "sync r", "{:.3f}"),
    ("lip_lag_frames", "lag", "{:+d}"),
    ("lip_corr_other_audio", "r other", "{:.3f}"),
    ("ofm_ratio", "OFM/real", "{:.2f}"),
    ("fmse_ratio", "FMSE/real", "{:.2f}"),
    ("drift_mean", "drift", "{:.3f}"),
    ("color_flicker", "flicker", "{:.2f}"),
    ("color_drift_mean", "col.drift", "{:.2f}"),
    ("psnr", "PSNR", "{:.2f}"),
    ("ssim", "SSIM", "{:.3f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(int(value) if "d}" in fmt else float(value))


def render_table(document: dict[str, Any]):
    """One row per video plus the mean row, from :func:`report`'s document.

    Columns whose values are all missing (PSNR/SSIM without ``--reference``, face metrics with
    ``--no-face``) are left out.
    """
    from rich.table import Table

    rows, mean = document["videos"], document["mean"]
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    table = Table(title="dh-eval")
    table.add_column("video", no_wrap=True)
    for _, title, _ in columns:
        table.add_column(title, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["name"], *(_cell(row.get(k), f) for k, _, f in columns))
    table.add_row(f"mean ({mean['n_videos']})", *(_cell(mean.get(k), f) for k, _, f in columns), style="bold")
    return table


def _console():
    """stdout console; when piped, wide enough for the whole table instead of rich's 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ log lines
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    generated: Path = typer.Argument(..., help="A video, or a folder of videos."),
    reference: Optional[Path] = typer.Option(
        None, "--reference", "-r",
        help="The real video (or folder): PSNR/SSIM, and the metrics as ratios to it.",
    ),
    identity: Optional[Path] = typer.Option(
        None, "--identity", help="Identity image for drift (default: each video's first frame)."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all metrics to this JSON file."),
    face: bool = typer.Option(True, "--face/--no-face", help="Run MediaPipe for blinks, lip-sync and the face box."),
    size: int = typer.Option(128, help="Resize frames to SIZE x SIZE for pixel metrics (0: keep)."),
    max_frames: Optional[int] = typer.Option(None, help="Evaluate at most this many frames per video."),
    max_lag: int = typer.Option(5, help="Lip-sync lag searched, frames each way."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress."),
) -> None:
    """Smoothness (OFM, F-MSE), blinks, mouth motion and mouth-vs-speech sync (own and other videos' speech),
    identity and colour drift, colour flicker; with --reference, PSNR/SSIM and ratios to the real video."""
    _setup_logging(verbose)
    from dheads.benchmarks.evaluate import EvalConfig, EvalInputError, evaluate_path, report, write_json

    config = EvalConfig(size=size or None, face=face, max_frames=max_frames, max_lag=max_lag)
    try:
        rows = evaluate_path(generated, reference=reference, identity=identity, config=config)
    except EvalInputError as e:
        typer.echo(f"dh-eval: error: {e}", err=True)
        raise typer.Exit(2) from None
    document = report(rows, config)
    _console().print(render_table(document))
    if json_out is not None:
        write_json(json_out, document)


def main() -> None:
    """Console-script entry point ``dh-eval``."""
    app()


if __name__ == "__main__":
    main()
