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
    return (f"dh-serve: error: {', '.join(missing)} not installed; install the serve extra from the project's "
            f"folder: pip install -e '.[serve]'")


@app.command(cls=OneLineErrors)
def serve(
    engine: str = typer.Option(None, help="engine to load (plan, bundle dir, ONNX, checkpoint); default: the demo model"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    max_streams: int = typer.Option(8, help="streams batched together (more wait in the queue)"),
    max_queue: int = typer.Option(32, help="streams allowed to be preparing or waiting for a slot before new ones "
                                           "get 503"),
    max_connections: int = typer.Option(64, help="renders and streams open at once before new ones get 503"),
    token: str = typer.Option(None, envvar="DH_SERVE_TOKEN", help="require this token: Authorization: Bearer "
                                                                   "<token> (a browser's WebSocket: a ticket)"),
    allow_origin: list[str] = typer.Option(None, help="a browser origin allowed to call the server (repeat; '*': "
                                                      "any). Default: any without --token, only its own with it"),
    threads: int = typer.Option(None, help="CPU threads for the engine (default: auto)"),
    max_upload_mb: float = typer.Option(20.0, help="largest face or audio upload, MiB"),
    max_audio_seconds: float = typer.Option(60.0, help="longest speech a stream may have"),
    start_timeout: float = typer.Option(30.0, help="seconds a stream may take to send each of its start, face "
                                                   "and audio messages"),
    idle_timeout: float = typer.Option(30.0, help="seconds a PCM stream may go without sending audio"),
    max_stream_seconds: float = typer.Option(600.0, help="longest a render or stream may take, start to end"),
    prep_timeout: float = typer.Option(60.0, help="seconds one upload's preparation (face crop, audio decode + "
                                                  "encode) may take in the worker process before it is killed"),
    video_dir: str = typer.Option(None, help="folder for finished videos (/v1/videos/{id}); share it between "
                                             "replicas so any of them serves any link. Default: a private temp folder"),
    drain_seconds: float = typer.Option(5.0, help="on SIGTERM, seconds /healthz answers 503 while open streams "
                                                  "finish, before the rest are ended"),
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
                             max_connections=max_connections, token=token,
                             allow_origins=tuple(allow_origin) if allow_origin else None, threads=threads,
                             max_upload_bytes=int(max_upload_mb * (1 << 20)), max_audio_seconds=max_audio_seconds,
                             start_timeout_s=start_timeout, idle_timeout_s=idle_timeout,
                             max_stream_seconds=max_stream_seconds, prep_timeout_s=prep_timeout,
                             drain_s=drain_seconds, video_dir=video_dir)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if replicas:
        from .ray_app import run

        run(config, replicas=replicas)
        return
    from .server import BindError, DrainingServer, bind

    try:
        sock = bind(host, port)  # before the engine loads (and torch imports): a busy port fails at once
    except BindError as e:
        sys.stderr.write(f"dh-serve: error: {e}\n")
        raise typer.Exit(2) from None
    import uvicorn

    from .app import create_app

    app_ = create_app(config)
    server = DrainingServer(uvicorn.Config(app_, log_level=log_level, timeout_graceful_shutdown=5,
                                           ws_max_size=config.max_upload_bytes + (1 << 16)), app_.state.worker)
    try:
        server.run(sockets=[sock])
    except Interrupted as e:  # uvicorn shut down gracefully, then re-raised the signal it caught: a clean stop
        logging.getLogger("dheads.serve").info("stopped (%s)", e)
    error = app_.state.worker.load_error
    if error is not None:
        sys.stderr.write(f"dh-serve: error: {' '.join(str(error).split())}\n")
        raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
