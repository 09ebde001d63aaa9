"""The FastAPI application of a tessera server: routes, auth, errors, health, metrics.

Built per server (``build_app``), inside the Ray Serve replica that owns the
engine, so nothing here is module state. Errors always carry the OpenAI
error body: 400 for a bad request (a pydantic validation error names the
field; an engine refusal carries the engine's message), 401 without the API
key, 404 for another model, 429 with ``Retry-After`` when the waiting queue
is full, 500 when the engine failed the request, 503 while stopping.
``/health`` is open (load balancers probe it) and answers 200
``{"status": "ready"}`` or 503 with ``recovering`` / ``failed`` /
``stopping``; every ``/v1`` route and ``/metrics`` need the key when one is
set.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tessera.launch.serve.auth import bearer_ok
from tessera.launch.serve.images import ImageJob, ImageService, b64
from tessera.launch.serve.llm import ApiError, LLMService
from tessera.launch.serve.metrics import CONTENT_TYPE, ServeMetrics
from tessera.launch.serve.options import ServeOptions
from tessera.launch.serve.schemas import ChatCompletionRequest, CompletionRequest, ImageRequest, error_body
from tessera.runtime.llm.async_engine import EngineStopped, QueueFull

log = logging.getLogger("tessera.serve")

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/images/generations": "images",
             "/v1/models": "models", "/metrics": "metrics"}
HEALTH_CODES = {"ready": 200}


def build_app(service: LLMService | ImageService, metrics: ServeMetrics, options: ServeOptions, model_name: str,
              model_info: dict[str, Any], image_defaults: dict[str, Any] | None = None,
              state: Callable[[], str] | None = None) -> FastAPI:
    """The ASGI app for one engine: ``service`` is an LLMService (language model) or an ImageService (DiT)."""
    app = FastAPI(title="tessera", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    llm = service if isinstance(service, LLMService) else None
    images = service if isinstance(service, ImageService) else None

    def endpoint_of(request: Request) -> str:
        return ENDPOINTS.get(request.url.path, "other")

    def failure(request: Request, status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.request(endpoint_of(request), status)
        return JSONResponse(body, status_code=status, headers=headers)

    async def authorized(request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization"), options.api_key):
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'",
                           type_="authentication_error", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return failure(request, err.status, err.body, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        problems = []
        param = None
        for e in err.errors():
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            param = param or (".".join(loc) or None)
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{'.'.join(loc) or 'body'}: {msg}")
        return failure(request, 400, error_body("invalid request: " + "; ".join(problems), param=param))

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, err: ValueError):
        return failure(request, 400, error_body(str(err)))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, err: QueueFull):
        return failure(request, 429, error_body(str(err), "rate_limit_error", "queue_full"),
                       {"Retry-After": str(max(1, math.ceil(err.retry_after_s)))})

    @app.exception_handler(EngineStopped)
    async def _stopping(request: Request, err: EngineStopped):
        return failure(request, 503, error_body(str(err), "server_error", "stopping"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return failure(request, 500, error_body(f"internal error: {type(err).__name__}: {err}", "server_error"))

    def need(kind: str):
        if kind == "llm" and llm is None:
            raise ApiError(400, f"{model_name!r} is a diffusion model; use POST /v1/images/generations",
                           code="wrong_endpoint")
        if kind == "images" and images is None:
            raise ApiError(400, f"{model_name!r} is a language model; use /v1/completions or /v1/chat/completions",
                           code="wrong_endpoint")

    async def answer(endpoint: str, result: tuple[Any, bool]):
        body, streaming = result
        if streaming:
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        metrics.request(endpoint, 200)
        return JSONResponse(body)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        need("llm")
        return await answer("completions", await llm.completions(body))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest):
        need("llm")
        return await answer("chat", await llm.chat(body))

    @app.post("/v1/images/generations", dependencies=[Depends(authorized)])
    async def image_generations(body: ImageRequest):
        need("images")
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist here; this server serves {model_name!r}",
                           code="model_not_found", param="model")
        d = image_defaults or {}
        width, height = body.dimensions((d.get("width", 64), d.get("height", 64)))
        job = ImageJob(prompt=body.prompt, n=body.n, width=width, height=height,
                       steps=body.steps if body.steps is not None else d.get("steps"),
                       guidance_scale=body.guidance_scale if body.guidance_scale is not None else d.get("guidance_scale"),
                       seed=body.seed if body.seed is not None else d.get("seed", 0),
                       mode=body.mode or d.get("mode", "exact"), negative_prompt=body.negative_prompt or "")
        started = time.monotonic()
        pngs = await images.generate(job)
        metrics.images.inc(len(pngs))
        metrics.e2e.labels(endpoint="images").observe(time.monotonic() - started)
        metrics.request("images", 200)
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b64(p)} for p in pngs]})

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        metrics.request("models", 200)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tessera", **model_info}]}

    @app.get("/health")
    async def health():
        status = state() if state is not None else "ready"
        body = {"status": status}
        if llm is not None and llm.engine.last_error and status != "ready":
            body["error"] = llm.engine.last_error
        return JSONResponse(body, status_code=HEALTH_CODES.get(status, 503))

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
