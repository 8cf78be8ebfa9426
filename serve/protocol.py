"""The OpenAI wire format of the HTTP API: request and response models, OpenAI-shaped errors, and the
error handlers and body-size limit that make every failure answer in that shape."""

from __future__ import annotations

import hmac
import logging
import os
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from draftalign.runtime import API_KEY_ENV

logger = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413 before any parsing


# ====================================================================== errors and models
class APIError(Exception):
    """An OpenAI-style error: JSON {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


class _Request(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; unknown OpenAI fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """The fields completion and chat requests share: model, length, sampling and streaming."""

    model: str
    max_tokens: int | None = Field(None, description="≥ 1 and ≤ serve.max_tokens_cap")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1 = off (vLLM extension)")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: (str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    echo: bool = Field(False, description="not supported: must be false")
    logprobs: None = Field(None, description="not supported")
    suffix: None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = Field(None, description="not supported: must be false")
    tools: None = Field(None, description="not supported")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpecDecodingStats(BaseModel):
    """Speculative decoding statistics of one response, with `serve.acceptance`'s definitions."""

    # Per-token α = accepted / (accepted + rejected), the α of E[τ]; None when `rejected` is unknown.
    acceptance_rate: float | None
    draft_acceptance_rate: float  # accepted / proposed (vLLM's spec_decode counters)
    tokens_per_target_pass: float  # block efficiency τ
    proposed: int
    accepted: int
    # Rounds that ended in a rejection; None when the engine does not count them (engine=vllm).
    rejected: int | None
    rounds: int
    gamma: int  # 0 = target-only
    batch_size: int  # requests in the engine call that served this one (the largest, over prompts)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    spec_decoding: SpecDecodingStats


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    spec_decoding: SpecDecodingStats


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "draftalign"
    root: str
    draft: str | None
    engine: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ====================================================================== HTTP error plumbing
OPEN_PATHS = ("/health",)  # answered without a key: load balancers and Ray Serve probe it


class BearerAuthMiddleware:
    """ASGI middleware: with DRAFTALIGN_API_KEY set in the serving process's environment, every route but /health
    needs `Authorization: Bearer <key>` and answers 401 (OpenAI error JSON, `WWW-Authenticate: Bearer`) without
    it. The key is read from the environment only (never the job YAML), compared in constant time, never logged."""

    def __init__(self, app, key: str | None = None):
        self.app = app
        self.key = (key if key is not None else os.environ.get(API_KEY_ENV, "")).encode()

    async def __call__(self, scope, receive, send):
        if not self.key or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        denied = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                          "invalid_api_key", "authentication_error").response()
        denied.headers["WWW-Authenticate"] = "Bearer"
        return await denied(scope, receive, send)


class BodyLimitMiddleware:
    """ASGI middleware: 413 for bodies over `max_bytes` (declared or streamed), before parsing."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body exceeds {self.max_bytes} bytes", None, "request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await too_big.response()(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_big.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the client's disconnect

        return await self.app(scope, replay, send)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_of(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content', 'str') → 'messages.0.content' (drop union-member tags)."""
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif p.isidentifier() and not p[0].isupper() and p not in _TYPE_NAMES:
            parts.append(p)
        else:
            break
    return ".".join(parts) or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "), None,
                        "invalid_json").response()
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "request body is empty: send a JSON object", None, "invalid_json").response()
    param = _param_of(tuple(first.get("loc", ())))
    # Unions report one error per member; say which field, and what each member wanted.
    same = [e["msg"] for e in errors if _param_of(tuple(e.get("loc", ()))) == param]
    msg = "; or ".join(dict.fromkeys(same)) if same else first["msg"]
    return APIError(400, f"invalid {param or 'request body'}: {msg}", param, "invalid_value").response()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown route, wrong method, a body it cannot decode) in OpenAI shape."""
    code = "invalid_json" if exc.status_code == 400 else None
    return APIError(exc.status_code, str(exc.detail), None, code).response()


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s %s failed", request.method, request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}", None, None, "server_error").response()


def add_error_handling(api: FastAPI, max_bytes: int = MAX_BODY_BYTES) -> None:
    """Give `api` the body-size limit and answer every error (validation, HTTP, uncaught) as OpenAI JSON."""
    api.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)
    api.add_middleware(BearerAuthMiddleware)  # added last: runs first, before the body is read
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _internal_error)
