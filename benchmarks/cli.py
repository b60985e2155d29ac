"""dh-bench: one command, flags -> BenchConfig -> run_bench -> a markdown table (+ JSON and markdown in --out).

Nothing heavy is imported before the command runs, so ``dh-bench --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dheads.engine import names
from dheads.engine.cli_errors import OneLineErrors

MODEL_NAMES = ("small", "crema", "demo")

app = typer.Typer(add_completion=False, rich_markup_mode=None, help="Benchmark backends against the authors' sampling loop, same run.")
err = Console(stderr=True)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _print_table(text: str) -> None:
    """The markdown table on stdout: rendered on a terminal, else as is (never cut to 80 columns)."""
    out = Console()
    if out.is_terminal:
        from rich.markdown import Markdown

        out.print(Markdown(text))
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


@app.command(cls=OneLineErrors)
def bench(
    model: str = typer.Option("small", help="small | crema (random weights) | demo "
                                            "(the packaged bundle)."),
    backends: str = typer.Option("pytorch", help="Comma list: pytorch,onnxruntime,tensorrt."),
    precisions: str = typer.Option("fp32", help="Comma list: fp32,fp16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    steps: int = typer.Option(100, help="Denoising steps per frame."),
    frames: int = typer.Option(4, help="Frames timed in the sustained loop (after the first)."),
    batch: int = typer.Option(4, help="Batch of independent streams for the batched measurements."),
    repeats: int = typer.Option(10, help="Timed repeats of each UNet call."),
    reference: bool = typer.Option(True, help="Also time the authors' loop (the 1.00x baseline)."),
    cuda_graph: bool = typer.Option(True, help="Capture each frame's step loop as a CUDA graph."),
    timing: bool = typer.Option(True, help="--no-timing: only check parity "
                                   "with strict fp32."),
    threads: int = typer.Option(0, help="CPU threads, as dh-run --threads (0 = auto)."),
    out: Optional[Path] = typer.Option(None, help="Also write NAME.json and NAME.md "
                                                  "here."),
    name: str = typer.Option("", help="Result file stem (default: "
                                      "MODEL_DEVICE)."),
    compare: Optional[str] = typer.Option(None, help="Compare CPU engines instead: "
                                          "backend:precision,... or all."),
    engine: Optional[Path] = typer.Option(None, help="With --compare: the bundle "
                                          "(default: the demo)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress (INFO)."),
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("dheads").setLevel(logging.INFO)  # our progress; not the exporter libraries' chatter
    if compare is not None:
        _compare(compare, engine, frames, repeats, threads, out, name)
        return
    if model not in MODEL_NAMES:
        raise typer.BadParameter(f"choose one of {', '.join(MODEL_NAMES)}", param_hint="--model")
    try:
        names.check_steps(steps)
    except ValueError as e:
        raise typer.BadParameter(names.flag_error(e, "--steps"), param_hint="--steps") from None
    for value, hint in ((frames, "--frames"), (batch, "--batch"), (repeats, "--repeats")):
        if value < 1:
            raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=hint)
    from dheads.engine.backends import BACKENDS, BackendError

    for value, allowed, hint in ((backends, BACKENDS, "--backends"), (precisions, names.PRECISIONS[:2], "--precisions")):
        unknown = [v for v in _csv(value) if v not in allowed]
        if unknown or not _csv(value):
            raise typer.BadParameter(f"{', '.join(unknown) or 'nothing'} given; use a comma list of "
                                     f"{', '.join(allowed)}", param_hint=hint)
    if threads < 0:
        err.print(f"dh-bench: error: --threads must be 0 (auto) or a positive count, got {threads}")
        raise typer.Exit(2)
    from .bench import BenchConfig, markdown_table, run_bench, write_results

    bc = BenchConfig(model=model, backends=_csv(backends), precisions=_csv(precisions), device=device, steps=steps,
                     frames=frames, batch=batch, repeats=repeats, reference=reference, cuda_graph=cuda_graph,
                     timing=timing, threads=threads)
    try:
        with tempfile.TemporaryDirectory(prefix="dh-bench-") as tmp:
            result = run_bench(bc, Path(tmp))
    except BackendError as e:  # no GPU, no TensorRT, no CUDA provider: one line, exit 2
        err.print(f"dh-bench: error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _print_table(markdown_table(result))
    if out is not None:
        stem = name or f"{model}_{result['machine']['device'].split(':')[0]}" + ("" if timing else "_parity")
        js, md = write_results(result, out, stem)
        err.print(f"wrote {js} and {md}", markup=False, highlight=False, soft_wrap=True)


def _compare(engines: str, bundle: Path | None, frames: int, repeats: int, threads: int, out: Path | None,
             name: str) -> None:
    """dh-bench --compare: the CPU engines side by side (``--frames`` frames after the first, ``--repeats`` calls)."""
    from .cpu_engines import DEFAULT_ENGINES, CompareConfig, compare, markdown, parse_engines

    try:
        pairs = DEFAULT_ENGINES if engines.strip() == "all" else parse_engines(engines)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--compare") from None
    if threads < 0:
        raise typer.BadParameter(f"must be 0 (auto) or a positive count, got {threads}", param_hint="--threads")
    cc = CompareConfig(engines=pairs, bundle=None if bundle is None else str(bundle), frames=max(frames, 1),
                       calls=max(repeats, 1), threads=threads)
    from dheads.engine.backends import BackendError

    try:
        result = compare(cc)
    except BackendError as e:
        err.print(f"dh-bench: error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    text = markdown(result)
    _print_table(text)
    if out is not None:
        import json

        out.mkdir(parents=True, exist_ok=True)
        stem = name or f"cpu_engines_{result['date'][:10]}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(text)
        err.print(f"wrote {out / stem}.json and .md", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    app(prog_name="dh-bench")


if __name__ == "__main__":
    main()
