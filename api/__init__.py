"""OpenAI-compatible HTTP server (Litestar) on top of the llama_jax engine.

`create_app(engine, settings)` builds the app; `llama-jax serve` (api.cli) runs it under uvicorn.
"""

from api.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def create_app(engine, settings: ServerSettings = ServerSettings()):
    """See `api.app.create_app` (imported lazily so `import api` stays light)."""
    from api.app import create_app as _create_app

    return _create_app(engine, settings)
