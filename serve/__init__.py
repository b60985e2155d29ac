"""dheads.serve: ``dh-serve``, a streaming talking-head server (FastAPI + uvicorn, the ``[serve]`` extra).

``worker.py`` (engine + continuous batching thread, no web imports) -> ``app.py`` (HTTP and WebSocket
endpoints) -> ``cli.py`` (``dh-serve``); ``ray_app.py`` runs the same app as a Ray Serve deployment.
Importing this package imports no web framework.
"""
