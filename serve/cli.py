"""``dh-serve``: flags -> :class:`ServeConfig` -> uvicorn (or Ray Serve with ``--replicas``). Thin on purpose.

Nothing heavy is imported before the flags are parsed, so ``dh-serve --help`` is fast and works without
the ``[serve]`` extra; running it without the extra says in one line what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import typer

from dheads.engine.cli_errors import Interrupted, OneLineErrors

from .config import ServeConfig

app = typer.Typer(add_completion=False, help="Serve talking heads over HTTP and WebSocket.")
SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "prometheus_client")


def missing_extra(modules: tuple[str, ...] | None = None) -> str | None:
    """None when the [serve] extra (or ``modules``) is importable, else the one line to print."""
    missing = [m for m in (modules or SERVE_MODULES) if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"dh-serve: error: {', '.join(missing)} not installed; install the serve extra: "
            f"pip install 'diffused-heads[serve]'")


@app.command(cls=OneLineErrors)
def serve(
    engine: str = typer.Option(None, help="engine to load (plan, bundle dir, ONNX, checkpoint); default: the demo model"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    max_streams: int = typer.Option(8, help="streams batched together (more wait in the queue)"),
    max_queue: int = typer.Option(32, help="streams allowed to wait for a slot before new ones get 503"),
    token: str = typer.Option(None, envvar="DH_SERVE_TOKEN", help="require this bearer token (or ?token=)"),
    threads: int = typer.Option(None, help="CPU threads for the engine (default: auto)"),
    max_upload_mb: float = typer.Option(20.0, help="largest face or audio upload, MiB"),
    max_audio_seconds: float = typer.Option(60.0, help="longest speech a stream may have"),
    replicas: int = typer.Option(0, help="run on Ray Serve with this many replicas (one per device); 0: plain uvicorn"),
    log_level: str = typer.Option("info", help="logging level"),
) -> None:
    """Load the engine and serve: GET /, /healthz, /metrics; POST /v1/render; WS /v1/stream."""
    line = missing_extra() or (missing_extra(("ray",)) if replicas else None)
    if line:
        if replicas:
            line = line.replace("[serve]", "[serve,ray]").replace("serve extra", "serve and ray extras")
        sys.stderr.write(line + "\n")
        raise typer.Exit(2)
    try:
        config = ServeConfig(engine=engine, host=host, port=port, max_streams=max_streams, max_queue=max_queue,
                             token=token, threads=threads, max_upload_bytes=int(max_upload_mb * (1 << 20)),
                             max_audio_seconds=max_audio_seconds)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if replicas:
        from .ray_app import run

        run(config, replicas=replicas)
        return
    import uvicorn

    from .app import create_app

    try:
        uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                    ws_max_size=config.max_upload_bytes + (1 << 16))
    except Interrupted as e:  # uvicorn shut down gracefully, then re-raised the signal it caught: a clean stop
        logging.getLogger("dheads.serve").info("stopped (%s)", e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
