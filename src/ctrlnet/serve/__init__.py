"""``ctrlnet serve``: a local web UI and a JSON API (OpenAPI schema at /openapi.json) over the
same Pipeline and annotators as the CLI. Needs the ``serve`` extra (fastapi, uvicorn,
python-multipart). See ``app`` for the routes and the safety rules."""

from .app import ServeConfig, Server, create_app, serve

__all__ = ["ServeConfig", "Server", "create_app", "serve"]
