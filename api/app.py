"""The Litestar app: every route family assembled (chat, completions, responses, tokenize,
playground), plus the server's own routes (models, health, readiness, metrics), the API-key guard,
the per-response counter and the OpenAPI document.

`create_app(engine, settings)` does not start or stop the engine: its owner does (the `serve`
command warms it up in a thread while the app already answers /health with 503).
"""

from __future__ import annotations

import hmac
import time

from litestar import Litestar, Request, Response, get
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.params import FromPath
from litestar.types import Message, Scope

from api.chat import chat_completions
from api.completions import completions
from api.context import STATE_KEY, ServerContext, context
from api.errors import EXCEPTION_HANDLERS, APIError
from api.metrics import Metrics
from api.offload import Offload
from api.playground import playground
from api.protocol import Model, ModelList
from api.replies import TokenText
from api.responses import create_response
from api.settings import ServerSettings
from api.tokenize import detokenize, tokenize

MODELS_PATHS = ["/v1/models", "/v1/openai/models"]
MODEL_PATHS = ["/v1/models/{model_id:path}", "/v1/openai/models/{model_id:path}"]
STATUS = {None: "ok", "model_not_ready": "warming up", "engine_failed": "failed",
          "server_shutting_down": "shutting down"}  # /health and /ready: the unavailable error's code -> status


def require_api_key(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """App-wide guard: `Authorization: Bearer <key>` must match a configured key (constant-time
    compare) on every route but /health, and /metrics when `metrics_public` says so."""
    settings = context(connection).settings
    keys = settings.api_keys
    if not keys or handler.opt.get("public") or (handler.opt.get("metrics") and settings.metrics_public):
        return
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]  # no short-circuit
    if not any(matches):
        raise APIError(401, "Incorrect API key provided.")


@get(MODELS_PATHS, summary="List the served model under each of its names")
async def list_models(request: Request) -> ModelList:
    ctx = context(request)
    return ModelList("list", [Model(name, "model", ctx.created, "llama-jax") for name in ctx.settings.model_names])


@get(MODEL_PATHS, summary="Retrieve the served model by one of its names")
async def retrieve_model(request: Request, model_id: FromPath[str]) -> Model:
    ctx = context(request)
    model_id = model_id.lstrip("/")
    if model_id not in ctx.settings.model_names:
        raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return Model(model_id, "model", ctx.created, "llama-jax")


@get("/health", summary="Liveness: 200 while the process can serve or is getting there (warming up, draining); "
                        "503 once the engine has failed for good (restart it)", opt={"public": True})
async def health(request: Request) -> Response[dict[str, str]]:
    error = context(request).unavailable()
    return Response({"status": STATUS[error and error.code]},
                    status_code=503 if error and error.code == "engine_failed" else 200)


@get("/ready", summary="Readiness: 200 when requests are served now; 503 while warming up, draining or failed",
     opt={"public": True})
async def ready(request: Request) -> Response[dict[str, str]]:
    error = context(request).unavailable()
    return Response({"status": STATUS[error and error.code]}, status_code=503 if error else 200)


@get("/metrics", summary="Prometheus metrics", include_in_schema=False, opt={"metrics": True})
async def metrics(request: Request) -> Response[bytes]:
    m = context(request).metrics
    return Response(m.render(), media_type=m.content_type)


async def count_response(message: Message, scope: Scope) -> None:
    """before_send hook: count every response by route and status (errors included)."""
    if message["type"] == "http.response.start":
        path = scope.get("path_template") if scope.get("route_handler") else None
        m = scope["app"].state[STATE_KEY].metrics
        m.requests.labels(m.model_name, path or "unmatched", str(message["status"])).inc()


def create_app(engine, settings: ServerSettings = ServerSettings()) -> Litestar:
    """An app serving `engine` (already started, or warming up elsewhere) under `settings`."""
    ctx = ServerContext(engine, settings, Metrics(engine, settings.model_name), TokenText(engine.tokenizer),
                        int(time.time()), Offload(settings.worker_threads))
    routes = [chat_completions, completions, create_response, tokenize, detokenize, list_models, retrieve_model,
              health, ready, metrics]
    return Litestar(
        route_handlers=[*routes, playground] if settings.playground else routes,
        state=State({STATE_KEY: ctx}),
        guards=[require_api_key],
        exception_handlers=EXCEPTION_HANDLERS,
        before_send=[count_response],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="llama-jax", version="0.1.0", path="/schema",
                                     description="OpenAI-compatible chat completions for Llama 2 on JAX/XLA.",
                                     render_plugins=[SwaggerRenderPlugin(), JsonRenderPlugin()]),
        logging_config=None,
    )
