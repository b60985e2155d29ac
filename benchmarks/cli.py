"""dh-bench: one command, flags -> BenchConfig -> run_bench -> JSON + markdown under benchmarks/results/."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.markdown import Markdown

from dheads.engine.backends import BACKENDS, BackendError
from dheads.engine.cli_errors import OneLineErrors

from .bench import MODELS, BenchConfig, markdown_table, run_bench, write_results

app = typer.Typer(add_completion=False, help="Benchmark backends against the authors' sampling loop, same run.")
err = Console(stderr=True)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@app.command(cls=OneLineErrors)
def bench(
    model: str = typer.Option("small", help=f"Model config with random weights: {' | '.join(MODELS)}."),
    backends: str = typer.Option("pytorch", help="Comma list: pytorch,onnxruntime,tensorrt."),
    precisions: str = typer.Option("fp32", help="Comma list: fp32,fp16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    steps: int = typer.Option(100, help="Denoising steps per frame."),
    frames: int = typer.Option(4, help="Frames timed in the sustained loop (after the first)."),
    batch: int = typer.Option(4, help="Batch of independent streams for the batched measurements."),
    repeats: int = typer.Option(10, help="Timed repeats of each UNet forward."),
    reference: bool = typer.Option(True, help="Also time the authors' loop (the 1.00x baseline)."),
    cuda_graph: bool = typer.Option(True, help="Capture each frame's step loop as a CUDA graph."),
    timing: bool = typer.Option(True, help="Time the backends; --no-timing only checks each against strict fp32."),
    out: Path = typer.Option(Path("benchmarks/results"), help="Folder for <name>.json and <name>.md."),
    name: str = typer.Option("", help="Result file stem (default: <model>_<device>, + _parity with --no-timing)."),
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dheads").setLevel(logging.INFO)  # our progress; not the exporter libraries' chatter
    if model not in MODELS:
        raise typer.BadParameter(f"choose one of {sorted(MODELS)}", param_hint="--model")
    for value, hint in ((steps, "--steps"), (frames, "--frames"), (batch, "--batch"), (repeats, "--repeats")):
        if value < 1:
            raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=hint)
    for value, allowed, hint in ((backends, BACKENDS, "--backends"), (precisions, ("fp32", "fp16"), "--precisions")):
        unknown = [v for v in _csv(value) if v not in allowed]
        if unknown or not _csv(value):
            raise typer.BadParameter(f"{', '.join(unknown) or 'nothing'} given; use a comma list of "
                                     f"{', '.join(allowed)}", param_hint=hint)
    bc = BenchConfig(model=model, backends=_csv(backends), precisions=_csv(precisions), device=device, steps=steps,
                     frames=frames, batch=batch, repeats=repeats, reference=reference, cuda_graph=cuda_graph,
                     timing=timing)
    try:
        with tempfile.TemporaryDirectory(prefix="dh-bench-") as tmp:
            result = run_bench(bc, Path(tmp))
    except BackendError as e:  # no GPU, no TensorRT, no CUDA provider: one line, exit 2
        err.print(f"dh-bench: error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    stem = name or f"{model}_{result['machine']['device'].split(':')[0]}" + ("" if timing else "_parity")
    js, md = write_results(result, out, stem)
    err.print(Markdown(markdown_table(result)))
    err.print(f"wrote {js} and {md}")


def main() -> None:
    app(prog_name="dh-bench")


if __name__ == "__main__":
    main()
