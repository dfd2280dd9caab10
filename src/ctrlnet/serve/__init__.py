"""``ctrlnet serve``: a local web UI and a JSON API (OpenAPI schema at /openapi.json) over the
same Pipeline and annotators as the CLI. Needs the ``serve`` extra (fastapi, uvicorn,
python-multipart).

  config.py    ServeConfig: the models to load and the limits (no third-party imports)
  schemas.py   the JSON bodies (pydantic); ControlUnitRequest.to_control -> pipeline.Control
  server.py    Server: the loaded models, the checks before queueing, the work (no HTTP)
  app.py       the routes as module-level handlers, create_app, run (FastAPI)
  a1111.py     AUTOMATIC1111's /sdapi/v1 API over the Server (requests -> Pipeline calls -> responses)
  extension.py the A1111 ControlNet extension's modules, sliders, modes, units and model names
  queue.py     the bounded generation queue (503 + Retry-After past it)
  uploads.py   base64 / files -> images, images -> data URLs
"""

import importlib.util

from .config import ServeConfig, check_exposure

__all__ = ["ServeConfig", "Server", "create_app", "serve"]


def missing_extra() -> str | None:
    """The first module of the serve extra that is not installed (its pip name), or None."""
    for modules, name in ((("fastapi",), "fastapi"), (("uvicorn",), "uvicorn"),
                          (("python_multipart", "multipart"), "python-multipart")):  # multipart: before 0.0.13
        if not any(importlib.util.find_spec(m) for m in modules):
            return name
    return None


def serve(config: ServeConfig) -> None:
    """Load the models and serve until interrupted."""
    missing = missing_extra()
    if missing:
        raise ValueError(f"ctrlnet serve needs the serve extra ({missing} is missing): pip install 'ctrlnet[serve]'")
    check_exposure(config)
    from .app import run  # imports fastapi: only once it is known to be there
    run(config)


def __getattr__(name: str):
    # Server (pydantic) and create_app (fastapi) are imported on first use, so that `import
    # ctrlnet.serve`, ServeConfig and serve's message about the extra work without the extra
    if name == "Server":
        from .server import Server
        return Server
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
