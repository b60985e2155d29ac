"""dh-frontier: quality vs UNet calls per frame for every sampler, on held-out clips -> JSON, table, PNG.

Thin: flags -> :class:`FrontierConfig` -> :func:`frontier` -> ``benchmarks/results/<name>.{json,md,png}``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from dheads.engine import names

app = typer.Typer(add_completion=False, rich_markup_mode=None, help=__doc__.splitlines()[0])


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


@app.command()
def run(
    clips: list[Path] = typer.Argument(..., help="Held-out talking-face videos."),
    engine: Optional[Path] = typer.Option(None, "--engine", "-e", help="Engine to sample (default: the demo model)."),
    samplers: str = typer.Option("ddpm,ddim,dpmpp_2m,unipc", help="Comma list of samplers."),
    calls: str = typer.Option("2,3,4,6,8,10,15,20,25,50,100", help="Comma list of steps (= calls per frame)."),
    warm: str = typer.Option("2,4,6", help="Warm-start rows: calls per frame after the first ('' = none)."),
    seeds: str = typer.Option("0,1,2", help="Seeds of the DDPM-100 reference (its run-to-run spread)."),
    max_seconds: float = typer.Option(3.0, help="Use the first N seconds of each clip."),
    face: bool = typer.Option(True, "--face/--no-face", help="Lip-sync proxy and face crop (MediaPipe)."),
    out: Path = typer.Option(Path("benchmarks/results"), help="Folder for the results."),
    name: str = typer.Option("frontier", help="Result file stem."),
    extend: Optional[Path] = typer.Option(None, help="An earlier run's JSON: run only "
                                                     "the rows it lacks."),
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dheads").setLevel(logging.INFO)
    try:
        for s in samplers.split(","):
            if s:
                names.check_sampler(s)
        for c in clips:
            if not c.is_file():
                raise FileNotFoundError(f"no such file: {c}")
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"dh-frontier: error: {e}", err=True)
        raise typer.Exit(2) from None
    from dheads.engine.errors import USER_ERRORS
    from dheads.engine.pipeline import TalkingHead

    from .frontier import FrontierConfig, frontier, markdown, write

    try:
        for c in clips:
            if not c.is_file():
                raise FileNotFoundError(f"no such file: {c}")
        cfg = FrontierConfig(samplers=tuple(s for s in samplers.split(",") if s), calls=_ints(calls),
                             warm=_ints(warm), seeds=_ints(seeds), max_seconds=max_seconds, face=face)
        cfg.runs()  # sampler names and steps checked before any generation
        previous = json.loads(extend.read_text()) if extend is not None else None
        head = TalkingHead.open(engine)
        doc = frontier(head, clips, cfg, previous)
    except (ValueError, KeyError, *USER_ERRORS) as e:
        typer.echo(f"dh-frontier: error: {e}", err=True)
        raise typer.Exit(2) from None
    doc["engine"] = str(engine or "demo")
    paths = write(doc, out, name)
    typer.echo(markdown(doc))
    typer.echo("wrote " + ", ".join(map(str, paths)))


def main() -> None:
    app(prog_name="dh-frontier")


if __name__ == "__main__":
    main()
