"""The reward model as an HTTP service: a Ray Serve deployment around `TextRewardModel` with a FastAPI ingress.

Routes (API v1; the text policy is documented in `serving.api`):
  POST /v1/score      {items: [{prompt, response}], truncate_responses} -> scores, model version, request id
  GET  /v1/model      checkpoint, version, reward bias, limits, batching
  GET  /health        liveness, without auth
  GET  /metrics       Prometheus text format of this replica: requests, latency, errors, batch sizes
  GET  /openapi.json, /docs   the schema (no auth: it holds no data)

Auth: `Authorization: Bearer <token>` on every other route; the token comes from `serve.token_file` or the
variable `serve.token_env`, read by each replica (`serving.auth`). Every client error is a 4xx with an
`ErrorResponse` saying what is wrong; a 500 means a fault of the service.

Request id: the Ray Serve proxy forwards a client's X-Request-ID (or generates one) and echoes it in the
response header; the body repeats it.

Batching: items of all concurrent requests queue for `score_one` (`@serve.batch`), which scores up to
`serve.max_batch_size` sequences per model call, waiting at most `serve.batch_wait_timeout_s` to fill one.
Tokenizing and the model run on their own threads, never on the event loop.

Entry points: `build_app` (import path `rayrlhf.serving.reward_service:build_app` of a RayService `serveConfigV2`)
and `start_service` (what `rayrlhf serve` runs, see `pipeline.cli`).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at run time.
import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayrlhf.core.config import Config, load_config
from rayrlhf.core.process import init_worker_process
from rayrlhf.serving.api import (
    API_VERSION,
    MAX_PROMPT_CHARS,
    MAX_RESPONSE_CHARS,
    Batching,
    ErrorResponse,
    Health,
    Limits,
    ModelId,
    ModelInfo,
    ModelRef,
    ScoreRequest,
    ScoreResponse,
)
from rayrlhf.serving.auth import BearerAuth, TokenError, resolve_token
from rayrlhf.serving.proxy import REQUEST_ID_RULE, valid_request_id
from rayrlhf.serving.text_scoring import TextPolicyError, TextRewardModel

log = logging.getLogger(__name__)

APP_NAME = "reward"
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
PROTECTED_PATHS = frozenset({"/v1/score", "/v1/model", "/metrics"})  # and any path not listed here

app = FastAPI(
    title="rayrlhf reward service",
    version=API_VERSION,
    description="Scores TL;DR summaries with the reward model, tokenized exactly as the model was trained. "
                "Send `Authorization: Bearer <token>` to every route except /health and the docs.",
)


class ServiceMetrics:
    """Prometheus metrics of one replica, in its own registry, served at that replica's /metrics.

    Held by the deployment instance rather than module globals: Ray Serve ships the deployment class to
    the replica by value, so module-level collectors would exist twice there and the counts would split.
    Ray Serve's own metrics (serve_num_http_requests, ...) cover all replicas of the application.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("reward_service_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.errors = Counter("reward_service_errors", "Requests answered with an error: client (4xx) or server (5xx).",
                              ["route", "kind"], registry=self.registry)
        self.latency = Histogram("reward_service_request_latency_seconds", "Time from request to response, by route.",
                                 ["route"], registry=self.registry)
        self.batch_size = Histogram("reward_service_batch_size", "Sequences per model call (batched across requests).",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.model_seconds = Histogram("reward_service_model_call_seconds", "Duration of one batched model call.",
                                       registry=self.registry)
        self.items = Counter("reward_service_items_scored", "{prompt, response} items scored.", registry=self.registry)

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, "server" if status >= 500 else "client").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "too_many_items", 422: "invalid_request", 500: "internal_error", 503: "unavailable"}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {"model": ErrorResponse, "description": "More items than serve.max_request_items."},
    422: {"model": ErrorResponse, "description": "Malformed JSON, wrong fields or types, or text over a limit."},
}



def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    return given if given and valid_request_id(given) else uuid.uuid4().hex


def _error(status: int, message: str, request: Request, detail: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=_ERROR_CODES.get(status, "error"), message=message,
                         request_id=_request_id(request), detail=detail)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _route_path(request: Request) -> str:
    """The path below the application's route prefix."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def _route_label(request: Request) -> str:
    """The route (every route is a fixed path), also for requests refused before routing; other paths are
    "unmatched", so arbitrary paths do not create metric series."""
    path = _route_path(request)
    return path if path in OPEN_PATHS or path in PROTECTED_PATHS else "unmatched"


def _current_service() -> "RewardService":
    """The deployment instance of this replica (how Ray Serve itself injects `self` into the routes)."""
    return serve.get_replica_context().servable_object


@app.middleware("http")
async def authenticate_and_measure(request: Request, call_next) -> Response:
    """Auth before anything reads the body (so a bad body without a token is 401, not 422), then metrics.

    An exception escaping a route is a fault of the service: logged with the request id, answered 500.
    """
    t0 = time.perf_counter()
    service = _current_service()
    if not valid_request_id(request.headers.get("x-request-id")):
        response = _error(400, REQUEST_ID_RULE, request)
    elif _route_path(request) in OPEN_PATHS or service.auth.allows(request.headers.get("authorization")):
        try:
            response = await call_next(request)
        except Exception:
            log.exception("request %s failed", _request_id(request))
            response = _error(500, "internal error of the reward service; see its log", request)
    else:
        response = _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'", request,
                          headers={"WWW-Authenticate": "Bearer"})
    service.metrics.record_request(_route_label(request), request.method, response.status_code,
                                   time.perf_counter() - t0)
    return response


def _loc(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc) or "body"


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line per problem ("body.items.0.prompt: Field required"), malformed JSON included."""
    detail = []
    for e in exc.errors():
        msg = e["msg"]
        if e["type"] == "json_invalid" and "error" in e.get("ctx", {}):
            msg = f"{msg}: {e['ctx']['error']} (the body is not valid JSON)"
        elif e["type"] == "model_attributes_type" and list(e["loc"]) == ["body"]:
            msg = f"{msg} (send a JSON object with Content-Type: application/json)"
        detail.append({"loc": [str(p) for p in e["loc"]], "msg": msg, "type": e["type"]})
    message = "; ".join(f"{_loc(d['loc'])}: {d['msg']}" for d in detail) or "invalid request"
    return _error(422, message, request, detail=detail)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), request, headers=exc.headers)


@serve.deployment(name="RewardModel")
@serve.ingress(app)
class RewardService:
    """One replica: the reward model, its auth, and the batch queue that feeds it."""

    def __init__(self, checkpoint: str, cfg: Config, require_token: bool):
        s = cfg.serve
        init_worker_process(s.num_cpus)
        token = resolve_token(s)
        if require_token and token is None:
            raise TokenError(f"no bearer token in this replica's environment: set {s.token_env} (serve.token_env) or "
                             "serve.token_file; the service is reachable beyond loopback "
                             "(serve.allow_insecure_non_loopback=true runs it without one)")
        self.auth = BearerAuth(token)
        self.metrics = ServiceMetrics()
        self.model = TextRewardModel(checkpoint, cfg.data, s.max_batch_size, cfg.model.frozen_dtype)
        self.model_ref = ModelRef(version=self.model.version, checkpoint=self.model.checkpoint)
        self.max_request_items = s.max_request_items
        self.info = ModelInfo(
            api_version=API_VERSION, model=self.model_ref, reward_bias=self.model.reward_bias,
            limits=Limits(max_request_items=s.max_request_items, max_prompt_tokens=cfg.data.max_prompt_tokens,
                          max_summary_tokens=cfg.data.max_summary_tokens, max_prompt_chars=MAX_PROMPT_CHARS,
                          max_response_chars=MAX_RESPONSE_CHARS),
            batching=Batching(max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s),
            auth_required=self.auth.required,
        )
        # One thread each, off the event loop: the fast tokenizer must not be entered by two threads at once
        # ("Already borrowed"), and the model runs one batch at a time, which is what the batch queue feeds.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="reward-tokenizer")
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="reward-model")
        self.score_one.set_max_batch_size(s.max_batch_size)
        self.score_one.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        log.info("reward service replica: checkpoint %s, version %s, auth %s", self.model.checkpoint,
                 self.model.version, "on" if self.auth.required else "OFF")

    @app.get("/health", response_model=Health)
    async def health(self) -> Health:
        return Health(status="ok", model=ModelId(version=self.model_ref.version))

    @app.get("/v1/model", response_model=ModelInfo, responses={401: _ERROR_RESPONSES[401]})
    async def model_info(self) -> ModelInfo:
        return self.info

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERROR_RESPONSES)
    async def score(self, body: ScoreRequest, request: Request) -> ScoreResponse:
        if len(body.items) > self.max_request_items:
            raise HTTPException(413, f"{len(body.items)} items in one request; this service accepts at most "
                                     f"{self.max_request_items} (serve.max_request_items): split the batch")
        loop = asyncio.get_running_loop()
        try:
            encoded = await loop.run_in_executor(
                self._tokenizer_thread, self.model.encode, [it.prompt for it in body.items],
                [it.response for it in body.items], body.truncate_responses)
        except TextPolicyError as e:
            raise HTTPException(422, str(e)) from None
        scores = await asyncio.gather(*(self.score_one(seq) for seq in encoded.sequences))
        return ScoreResponse(request_id=_request_id(request), model=self.model_ref, scores=scores,
                             truncated=encoded.truncated)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)  # both replaced from cfg.serve in __init__
    async def score_one(self, sequences: list[list[int]]) -> list[float]:
        """Called once per sequence; Serve gathers the calls of all in-flight requests into one model call."""
        self.metrics.batch_size.observe(len(sequences))
        t0 = time.perf_counter()
        scores = await asyncio.get_running_loop().run_in_executor(
            self._model_thread, self.model.score_sequences, sequences)
        self.metrics.model_seconds.observe(time.perf_counter() - t0)
        if not all(math.isfinite(s) for s in scores):
            raise RuntimeError("the reward model produced non-finite scores")
        self.metrics.items.inc(len(sequences))
        return scores

    @app.get("/metrics", responses={401: _ERROR_RESPONSES[401]})
    async def metrics(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def reward_app(checkpoint: str, cfg: Config, require_token: bool) -> Application:
    """The deployment with replicas, resources and batching from `cfg.serve`."""
    s = cfg.serve
    return RewardService.options(
        num_replicas=s.num_replicas,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus,
                           **({"resources": dict(s.resources)} if s.resources else {})},
        # Enough requests inside a replica to fill the next batch while the current one runs.
        max_ongoing_requests=2 * s.max_batch_size,
        # A hung replica is found in seconds, not Serve's default half minute (a dead one is found at once).
        health_check_period_s=s.health_check_period_s,
        health_check_timeout_s=s.health_check_timeout_s,
    ).bind(checkpoint, cfg, require_token)


class RewardAppArgs(BaseModel):
    """`args` of the RayService application: the checkpoint directory and an optional config YAML."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    config: str | None = None


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serveConfigV2` (`import_path: rayrlhf.serving.reward_service:build_app`).

    A RayService is reached through a Kubernetes Service, i.e. beyond loopback, so every replica must find a
    token unless the config sets `serve.allow_insecure_non_loopback`.
    """
    parsed = RewardAppArgs.model_validate(args)
    cfg = load_config(parsed.config)
    return reward_app(parsed.checkpoint, cfg, require_token=not cfg.serve.allow_insecure_non_loopback)


def start_service(checkpoint: str, cfg: Config, host: str, port: int, require_token: bool) -> str:
    """Start Serve's HTTP proxy on host:port and deploy the reward application; returns its base URL.

    Needs a connected Ray; returns once every replica is up (raises if one fails to start).
    """
    serve.start(http_options={"host": host, "port": port})
    serve.run(reward_app(checkpoint, cfg, require_token), name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
